"""What autograd keeps for backward in one adapted projection, at the paper's setting, every method side by side.

SD-2-base at 512 px, batch 4: the attention projections see 16384 tokens x 320, 4096 x 640, 1024 x 1280 and
256 x 1280 (square Linears). For each shape and method one random-weight ``nn.Linear`` (frozen, its input requiring
grad as inside the UNet) gets the adapter through the same code the trainer uses; one forward runs under
``torch.autograd.graph.saved_tensors_hooks`` and the distinct storages it keeps are summed (parameters and buffers
excluded: they exist anyway). Shapes only matter, so this runs in seconds on a CPU.

Two columns per method: everything kept, and everything but the layer's own output. The output counts once in a
real network, where the op that consumes it keeps it too (attention keeps q / k / v); GSOFT keeps it for the scale
vector's gradient instead of a copy of its own.

    python benchmarks/bench_saved_memory.py [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BOFT, DOUBLE, GSOFT, LORA, PEFT_OFT, Method, apply_method  # noqa: E402
from benchmarks.measure import SavedTensors  # noqa: E402
from benchmarks.report import DOCS, machine_line, markdown_table, replace_section  # noqa: E402

SHAPES = [(16384, 320), (4096, 640), (1024, 1280), (256, 1280)]  # (tokens, width) at 512 px, batch 4
GSOFT_SIDES = [
    Method(f"{GSOFT[0].label} ({side} side)", GSOFT[0].kind, {**GSOFT[0].options, "forward_mode": side})
    for side in ("activation", "weight")
]
METHODS = [LORA[0], GSOFT[0], *GSOFT_SIDES, DOUBLE[0], BOFT[0], PEFT_OFT]
GOALS = {GSOFT[0].label: 1.10, DOUBLE[0].label: 1.20}  # summed over the shapes, / LoRA r=4 (issue 19)


class Holder(nn.Module):
    """A module with one projection named like the UNet's, so the trainer's injection finds it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(width, width, bias=False)


def kept_bytes(method: Method, tokens: int, width: int) -> tuple[int, int]:
    """(all kept bytes, kept bytes other than the output's storage) of one forward."""
    torch.manual_seed(0)
    model = Holder(width)
    apply_method(model, method, targets=("to_q",))
    x = torch.randn(tokens, width, requires_grad=True)
    with SavedTensors(model) as saved:
        y = model.to_q(x)
    return saved.total, saved.total - saved.bytes_of(y)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)
    results = {m.label: [kept_bytes(m, tokens, width) for tokens, width in SHAPES] for m in METHODS}
    reference = results[LORA[0].label]
    mib = 2**20
    header = ["method", *[f"{t} x {w}: MiB (/ LoRA)" for t, w in SHAPES], "summed / LoRA"]
    header += ["summed / LoRA, output not counted"]
    table, summary = [], []
    for method in METHODS:
        rows = results[method.label]
        cells = [f"{a / mib:.1f} ({a / r[0]:.2f})" for (a, _), r in zip(rows, reference)]
        total = sum(a for a, _ in rows) / sum(r[0] for r in reference)
        beyond = sum(b for _, b in rows) / sum(r[1] for r in reference)
        table.append([method.label, *cells, f"{total:.2f}", f"{beyond:.2f}"])
        if method.label in GOALS:
            goal = GOALS[method.label]
            summary.append(
                f"- {method.label} / {LORA[0].label}, summed over the four shapes: {total:.2f} with the output, "
                f"{beyond:.2f} without it; goal <= {goal}: {'met' if total <= goal else 'MISSED'} "
                f"({'met' if beyond <= goal else 'MISSED'} when the output is counted where its consumer keeps it)"
            )
    body = "\n".join(
        [
            f"### Kept for backward, one projection at the paper's shapes (512 px, batch 4; {machine_line()})",
            "",
            "Written by `benchmarks/bench_saved_memory.py`: distinct storages autograd keeps after one forward of a "
            "frozen `nn.Linear` (input requiring grad) with each adapter, parameters and buffers excluded. The "
            "last column leaves out the layer's output, which the next op keeps anyway in a network (attention "
            "keeps q / k / v).",
            "",
            markdown_table(header, table),
            "",
            *summary,
        ]
    )
    print(body)
    if not args.no_write:
        replace_section(DOCS, "saved_memory", body)


if __name__ == "__main__":
    main()
