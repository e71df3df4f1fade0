"""Trainable parameters on the SD-2-base UNet architecture for every Table 2 configuration, next to the paper.

Counted on the meta device (shapes only, well under a second per row): every adapter goes into a fresh meta UNet
through the same code the trainer uses, and the trainable tensors are summed. PEFT's BOFT is counted as it is
built here (one butterfly factor after its CUDA extension fails to build) and labelled so.

    python benchmarks/bench_params.py [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DOCS,
    GSOFT,
    PEFT_OFT,
    TABLE_2,
    Method,
    apply_method,
    build_unet,
    markdown_table,
    millions,
    projection_linears,
)
from benchmarks.report import replace_section  # noqa: E402

PEFT_BOFT_AS_RUN = [
    Method(f"PEFT BOFT ({r},{m}) as run here", "peft_boft_fallback", {"nblocks": r, "n_butterfly_factor": m})
    for r, m in ((32, 4), (32, 6), (16, 5))
]


def factors_built(model) -> str:
    """How many butterfly factors each adapted layer really has (GS-core BOFT or PEFT BOFT), '' otherwise."""
    counts = set()
    for module in model.modules():
        if hasattr(module, "gsoft_butterfly"):
            counts.add(module.gsoft_butterfly.shape[0])
        boft_r = getattr(module, "boft_R", None)
        if boft_r is not None and "default" in boft_r:
            counts.add(boft_r["default"].shape[0])
    return ", ".join(map(str, sorted(counts)))


def count(method: Method) -> tuple[int, int, str]:
    """(trainable parameters, adapted layers, butterfly factors built) of ``method`` on a meta SD-2-base UNet."""
    unet = build_unet("sd2", device="meta")
    layers = len(projection_linears(unet))
    params = apply_method(unet, method)
    return sum(p.numel() for p in params), layers, factors_built(unet)


def rows_for(methods: list[Method]) -> tuple[list[list[str]], dict[str, int]]:
    counts = {}
    rows = []
    reference = count(GSOFT[0])[0]
    for method in methods:
        n, layers, factors = count(method)
        counts[method.label] = n
        paper = f"{method.paper_millions:.1f}M" if method.paper_millions is not None else "—"
        ratio = f"{n / 1e6 / method.paper_millions:.3f}" if method.paper_millions is not None else "—"
        rows.append(
            [method.label, f"{n:,}", millions(n), paper, ratio, f"{n / reference:.2f}", factors or "—", str(layers)]
        )
    return rows, counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--quick", action="store_true", help="same as the full run (it takes seconds); no write")
    args = parser.parse_args(argv)
    rows, counts = rows_for([*TABLE_2, PEFT_OFT, *PEFT_BOFT_AS_RUN])
    header = ["adapter", "trainable parameters", "ours", "paper (Table 2)", "ours / paper", "/ GSOFT r=32"]
    header += ["butterfly factors built", "adapted layers"]
    full = counts["full fine-tuning of the projections"]
    body = "\n".join(
        [
            "### Trainable parameters (SD-2-base UNet, every to_q / to_k / to_v / to_out.0)",
            "",
            "Written by `benchmarks/bench_params.py`: each adapter injected into a meta-device SD-2-base UNet "
            "(`configs/sd2_base_unet.json`) by the same code the trainer uses; the trainable tensors summed. "
            "GSOFT-family counts include the per-output scale vector. The paper's LoRA and full fine-tuning counts "
            "are not given to us (—), so only our count is shown for those rows.",
            "",
            markdown_table(header, rows, align="lrrrrrrr"),
            "",
            f"Full fine-tuning of the 128 projections trains {millions(full)} parameters; GSOFT r=32 is "
            f"{counts[GSOFT[0].label] / full:.1%} of that. PEFT's BOFT asks for (blocks, factors) but, without "
            "its CUDA extension, builds ONE block-diagonal factor per layer (the factors column), so its count is "
            "that of a single factor plus its scale; the GS-core rows build every factor on any device. PEFT's OFT "
            "stores each skew block as its b(b-1)/2 free entries, while the GS-core rows store full b x b blocks "
            "(the paper's convention; only the skew part of each is used), so OFT's count is about half of what "
            "the same blocks would count here.",
        ]
    )
    print(body)
    if not (args.no_write or args.quick):
        replace_section(DOCS, "params", body)


if __name__ == "__main__":
    main()
