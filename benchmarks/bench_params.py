"""Trainable parameters on the SD-2-base UNet architecture for every Table 2 configuration, next to the paper.

Counted on the meta device (shapes only, well under a second per row): every adapter goes into a fresh meta UNet
through the same code the trainer uses, and the trainable tensors are summed. PEFT's BOFT is counted as it is
built here (one butterfly factor after its CUDA extension fails to build) and labelled so.

``--unet sdxl`` counts the same configurations (plus LoRA r=16 and PEFT's OFT with 32 blocks) on the SDXL base 1.0
UNet (`configs/sdxl_base_unet.json`), next to their SD-2-base counts, with the block layout each one gets at
SDXL's projection widths and a line for any configuration that does not divide them; its own section.

``--transformers`` counts the same rows on the real SD3.5 Medium, SD3.5 Large and FLUX.1-dev transformers
(`configs/*_transformer.json`), at the attention projections the trainer adapts in a transformer (every joint
block's image and text side; Flux's single blocks' to_q / to_k / to_v), with the same block layout and divisibility
lines; its own section.

    python benchmarks/bench_params.py [--unet sd2|sdxl | --transformers] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    BOFT,
    DOUBLE,
    FULL,
    GSOFT,
    LORA,
    PEFT_OFT,
    PEFT_OFT_32_BLOCKS,
    TABLE_2,
    TARGETS,
    TRANSFORMER_CONFIG_PATHS,
    TRANSFORMER_TARGETS,
    Method,
    apply_method,
    build_transformer,
    build_unet,
    projection_linears,
)
from benchmarks.report import DOCS, markdown_table, millions, replace_section  # noqa: E402

PEFT_BOFT_AS_RUN = [
    Method(f"PEFT BOFT ({r},{m}) as run here", "peft_boft_fallback", {"nblocks": r, "n_butterfly_factor": m})
    for r, m in ((32, 4), (32, 6), (16, 5))
]
LORA_16 = Method("LoRA r=16 (PEFT)", "lora", {"rank": 16})
# SDXL: the rows first (GSOFT r=32 / r=16, Double GSOFT r=64, BOFT (32,4), LoRA r=4 / r=16, OFT with 32
# blocks and, as in the SD-2 table, with blocks of 32), then the rest of Table 2 for the divisibility check.
SDXL_METHODS = [
    LORA[0],
    LORA_16,
    GSOFT[0],
    GSOFT[1],
    DOUBLE[0],
    BOFT[0],
    PEFT_OFT_32_BLOCKS,
    PEFT_OFT,
    *LORA[1:],
    GSOFT[2],
    *DOUBLE[1:],
    *BOFT[1:],
    FULL,
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


def count_on(build: Callable[[], nn.Module], method: Method, targets: tuple[str, ...]) -> tuple[int, int, str]:
    """(trainable parameters, adapted layers, butterfly factors built) of ``method`` on a fresh ``build()`` model."""
    model = build()
    layers = len(projection_linears(model, targets))
    params = apply_method(model, method, targets)
    return sum(p.numel() for p in params), layers, factors_built(model)


def count(method: Method, size: str = "sd2") -> tuple[int, int, str]:
    """(trainable parameters, adapted layers, butterfly factors built) of ``method`` on a meta UNet (``size``)."""
    return count_on(lambda: build_unet(size, device="meta"), method, TARGETS)


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


def block_layout(method: Method, widths: list[int]) -> tuple[str, list[int]]:
    """'blocks x size' of ``method``'s orthogonal blocks at each width (''/'—' if it has none) and the widths it
    does not divide. The GSOFT family and OFT act on the input width (Double GSOFT on the output width too, which
    is one of the same widths here); a block count r divides d when d % r == 0, a block size b when d % b == 0."""
    if method.kind not in ("gsoft", "double_gsoft", "boft", "oft"):
        return "—", []
    cells, bad = [], []
    for d in widths:
        if "nblocks" in method.options:
            r = method.options["nblocks"]
            blocks, size = r, d // r
            ok = d % r == 0
        else:
            size = method.options["block_size"]
            blocks = d // size
            ok = d % size == 0
        if method.kind == "boft" and method.options.get("n_butterfly_factor", 1) > 1:
            ok = ok and size % 2 == 0  # several butterfly factors need an even block size
        sparse = method.kind in ("gsoft", "double_gsoft") and ok and size < blocks  # two GS factors: dense iff b >= r
        cells.append(f"{blocks} x {size}" + (" (b < r)" if sparse else "") if ok else f"{d}: does not divide")
        if not ok:
            bad.append(d)
    return " / ".join(cells), bad


def sdxl_body() -> str:
    """The SDXL section: counts on the meta SDXL UNet, SD-2-base's for the same rows, block layouts, divisibility."""
    unet = build_unet("sdxl", device="meta")
    linears = [m for _, m in projection_linears(unet)]
    in_widths = sorted({m.in_features for m in linears})
    out_widths = sorted({m.out_features for m in linears})
    reference = count(GSOFT[0], "sdxl")[0]
    lora = count(LORA[0], "sdxl")[0]
    rows, counts, problems = [], {}, []
    for method in SDXL_METHODS:
        layout, bad = block_layout(method, in_widths)
        try:
            n, layers, _ = count(method, "sdxl")
        except ValueError as err:
            problems.append(f"{method.label}: {str(err).splitlines()[0]}")
            rows.append([method.label, "refused", "—", "—", "—", "—", layout, "—"])
            continue
        if bad:
            problems.append(f"{method.label}: built although {bad} are not divided (check the layout)")
        counts[method.label] = n
        sd2 = count(method, "sd2")[0]
        rows.append(
            [
                method.label,
                f"{n:,}",
                millions(n),
                f"{n / sd2:.2f}",
                f"{n / reference:.2f}",
                f"{n / lora:.2f}",
                layout,
                str(layers),
            ]
        )
    header = ["adapter", "trainable parameters", "ours", "/ SD-2-base", "/ GSOFT r=32", "/ LoRA r=4"]
    header += [f"blocks x size at {' / '.join(map(str, in_widths))} in", "adapted layers"]
    full = counts[FULL.label]
    per_width = {d: sum(m.in_features == d for m in linears) for d in in_widths}
    per_out = {d: sum(m.out_features == d for m in linears) for d in out_widths}
    divides = (
        "Every configuration here divides SDXL's projection widths (in: "
        + ", ".join(f"{d} ({per_width[d]} layers)" for d in in_widths)
        + f"; out: {', '.join(map(str, out_widths))})."
        if not problems
        else "Configurations that do not fit SDXL's widths:\n\n" + "\n".join(f"- {p}" for p in problems)
    )
    return "\n".join(
        [
            f"### Trainable parameters (SDXL base 1.0 UNet, every to_q / to_k / to_v / to_out.0: {len(linears)} "
            "projections)",
            "",
            "Written by `benchmarks/bench_params.py --unet sdxl`: each adapter injected into a meta-device SDXL UNet "
            "(`configs/sdxl_base_unet.json`, 2.57B parameters) by the same code the trainer uses; the trainable "
            "tensors summed; '/ SD-2-base' divides by the same row's count on SD-2-base (table above). GSOFT-family "
            "counts include the per-output scale vector. PEFT's OFT is counted two ways: 'OFT r=32 blocks' is "
            "PEFT's `OFTConfig(r=32, oft_block_size=0)`, 32 blocks per layer whatever its width (the convention of "
            "the projection timings, `bench_layer_speed.py`); 'OFT b=32' is `oft_block_size=32`, blocks of 32 "
            "(the SD-2 table's and the trainer's `--adapter oft` convention), so 20 / 40 / 64 blocks at SDXL's "
            "widths. The block layout is that of the input side (Double GSOFT also rotates the output side, "
            f"{' / '.join(map(str, out_widths))} wide, with the same block count).",
            "",
            markdown_table(header, rows, align="lrrrrrlr"),
            "",
            "SDXL has "
            + " and ".join(f"{per_out[d] // 8} transformer blocks at {d}" for d in out_widths)
            + " (8 projections each; their cross-attention to_k / to_v read the 2048-wide text). "
            "'(b < r)': with a block size b below the block count r, two GS factors give a sparse Q (the library "
            "warns); "
            "GSOFT r=32 is dense at 1280 and 2048 but not at 640, as on SD-2-base's 320- and 640-wide layers. "
            f"Full fine-tuning of its {len(linears)} projections trains {millions(full)} parameters; GSOFT r=32 is "
            f"{counts[GSOFT[0].label] / full:.1%} of that. {divides}",
        ]
    )


TRANSFORMER_TITLES = {"sd35_medium": "SD3.5 Medium", "sd35_large": "SD3.5 Large", "flux1_dev": "FLUX.1-dev"}
# The transformers' table: the issue's rows first, then the rest of Table 2 (for the divisibility check).
TRANSFORMER_METHODS = SDXL_METHODS
ORDER = [t.removeprefix("attn.") for t in TRANSFORMER_TARGETS]  # how the 'where' column lists the suffixes


def block_lists(names: list[str]) -> str:
    """Where the adapted projections sit: per block list, 'N x (suffixes)' for each group of equally many."""
    per_list: dict[str, Counter] = {}
    for name in names:
        blocks, _, rest = name.partition(".")
        suffix = rest.partition(".")[2].removeprefix("attn.")  # transformer_blocks.3.attn.to_q -> to_q
        per_list.setdefault(blocks, Counter())[suffix] += 1
    parts = []
    for blocks, suffixes in per_list.items():
        by_count: dict[int, list[str]] = {}
        for suffix in sorted(suffixes, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER)):
            by_count.setdefault(suffixes[suffix], []).append(suffix)
        groups = ", ".join(f"{n} x ({', '.join(s)})" for n, s in sorted(by_count.items(), reverse=True))
        parts.append(f"{blocks}: {groups}")
    return "; ".join(parts)


def transformer_architecture(name: str) -> dict:
    """What bench_params needs to know of one meta transformer: sizes, widths, adapted and left-out projections."""
    model = build_transformer(name)
    adapted = projection_linears(model, TRANSFORMER_TARGETS)
    adapted_names = {n for n, _ in adapted}
    left_out = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".attn" in n and n not in adapted_names
    ]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "buffers": sum(b.numel() for b in model.buffers()),  # SD3's pos_embed table
        "joint_blocks": len(getattr(model, "transformer_blocks", [])),
        "single_blocks": len(getattr(model, "single_transformer_blocks", [])),
        "in_widths": sorted({m.in_features for _, m in adapted}),
        "out_widths": sorted({m.out_features for _, m in adapted}),
        "adapted": len(adapted),
        "where": block_lists([n for n, _ in adapted]),
        "left_out": block_lists(left_out) if left_out else "",
    }


def transformers_body() -> str:
    """The SD3.5 / Flux.1 section: counts on the meta transformers, block layouts, divisibility, one table."""
    names = list(TRANSFORMER_CONFIG_PATHS)
    arch = {name: transformer_architecture(name) for name in names}
    lora = {name: count_on(lambda n=name: build_transformer(n), LORA[0], TRANSFORMER_TARGETS)[0] for name in names}
    rows, counts, problems = [], {name: {} for name in names}, []
    for method in TRANSFORMER_METHODS:
        row, layouts = [method.label], []
        for name in names:
            layout, bad = block_layout(method, arch[name]["in_widths"])
            layouts.append(layout)
            try:
                n, layers, _ = count_on(lambda n=name: build_transformer(n), method, TRANSFORMER_TARGETS)
            except ValueError as err:
                problems.append(f"{method.label} on {TRANSFORMER_TITLES[name]}: {str(err).splitlines()[0]}")
                row += ["refused", "—"]
                continue
            assert layers == arch[name]["adapted"]
            if bad:
                problems.append(f"{method.label} on {TRANSFORMER_TITLES[name]}: built although {bad} is not divided")
            counts[name][method.label] = n
            row += [f"{n:,}", f"{n / lora[name]:.2f}"]
        rows.append(row + [" / ".join(layouts) if method.kind in ("gsoft", "double_gsoft", "boft", "oft") else "—"])
    widths = " / ".join("+".join(map(str, arch[name]["in_widths"])) for name in names)
    header = ["adapter"]
    for name in names:
        header += [f"{TRANSFORMER_TITLES[name]} ({arch[name]['adapted']} proj.)", "/ LoRA r=4"]
    header += [f"blocks x size at {widths} in"]
    arch_rows = [
        [
            TRANSFORMER_TITLES[name],
            f"`configs/{TRANSFORMER_CONFIG_PATHS[name].name}`",
            f"{arch[name]['parameters'] / 1e9:.2f}B"
            + (f" + {arch[name]['buffers'] / 1e9:.2f}B" if arch[name]["buffers"] >= 1e7 else ""),
            f"{arch[name]['joint_blocks']} + {arch[name]['single_blocks']}",
            " / ".join(map(str, arch[name]["in_widths"])) + " -> " + " / ".join(map(str, arch[name]["out_widths"])),
            str(arch[name]["adapted"]),
            arch[name]["where"],
            arch[name]["left_out"] or "—",
            millions(counts[name][FULL.label]) if FULL.label in counts[name] else "—",
        ]
        for name in names
    ]
    arch_header = ["model", "config", "parameters (+ buffers)", "joint + single blocks", "widths (in -> out)"]
    arch_header += ["adapted projections", "where", "attention Linears not adapted", "full fine-tuning of them"]
    divides = (
        "Every configuration here divides the three transformers' projection widths."
        if not problems
        else "Configurations that do not fit a transformer's widths:\n\n" + "\n".join(f"- {p}" for p in problems)
    )
    gsoft = {name: counts[name].get(GSOFT[0].label) for name in names}
    shares = ", ".join(
        f"{TRANSFORMER_TITLES[name]} {gsoft[name] / counts[name][FULL.label]:.1%}"
        for name in names
        if gsoft[name] and FULL.label in counts[name]
    )
    return "\n".join(
        [
            "### Trainable parameters (SD3.5 Medium / Large, FLUX.1-dev: every joint block's attention projections)",
            "",
            "Written by `benchmarks/bench_params.py --transformers`: each transformer built on the meta device from "
            "its diffusers config (`SD3Transformer2DModel` / `FluxTransformer2DModel.from_config`), each adapter "
            "injected by the same code the trainer uses at the module-name suffixes "
            + ", ".join(f"`{t}`" for t in TRANSFORMER_TARGETS)
            + " (image and text side of every joint block, as diffusers' SD3 DreamBooth LoRA script targets by "
            "default; in Flux the same suffixes match the single blocks' fused-stream to_q / to_k / to_v, whose "
            "output goes through proj_out with the MLP, so they have no to_out), and the trainable tensors summed. "
            "GSOFT-family counts include the per-output scale vector; 'OFT r=32 blocks' and 'OFT b=32' are PEFT's "
            "OFT with 32 blocks per layer and with blocks of 32, as in the SDXL table. The buffers next to SD3.5's "
            "parameter counts are its positional-embedding table (pos_embed_max_size^2 x width), which Stability's "
            "2.5B / 8.1B include.",
            "",
            markdown_table(arch_header, arch_rows, align="llrrlrllr"),
            "",
            markdown_table(header, rows, align="l" + "rr" * len(names) + "l"),
            "",
            "'(b < r)': with a block size b below the block count r, two GS factors give a sparse Q (the library "
            "warns). "
            + (f"GSOFT r=32 trains {shares} of the adapted projections' own weights and biases. " if shares else "")
            + divides,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=("sd2", "sdxl"), default="sd2", help="the UNet to count on")
    parser.add_argument(
        "--transformers",
        action="store_true",
        help="count on the SD3.5 Medium / Large and FLUX.1-dev transformers instead (their own section)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--quick", action="store_true", help="same as the full run (it takes seconds); no write")
    args = parser.parse_args(argv)
    if args.transformers:
        body = transformers_body()
        print(body)
        if not (args.no_write or args.quick):
            replace_section(DOCS, "params_transformers", body)
        return
    if args.unet == "sdxl":
        body = sdxl_body()
        print(body)
        if not (args.no_write or args.quick):
            replace_section(DOCS, "params_sdxl", body)
        return
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
