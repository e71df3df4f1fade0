"""LipConvnet-15 on CIFAR-100 shapes: SOC against GS-SOC (4, -) and (4, 1), next to the GS paper's numbers.

Two tables: trainable parameters (models built on the meta device, so no initialisation work) and the
forward + backward time of one training step (5 series terms, one power-iteration step per SOC), timed interleaved
in one process after warm-up at a reduced batch; medians, minima and ratios GS-SOC / SOC. Writes both into
docs/benchmarks.md between the lipconvnet markers.

    python benchmarks/bench_lipconvnet.py [--batch_size 8] [--rounds 15] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import Samples, interleaved  # noqa: E402
from benchmarks.report import DOCS, markdown_table, replace_section  # noqa: E402
from dreambooth_gs.lipschitz import LipConvnet  # noqa: E402

# (label, conv, groups, paper parameters in millions, paper speed-up over SOC): Gorbunov et al. 2024, Table 4.
VARIANTS = [
    ("SOC", "soc", None, 24.1, 1.0),
    ("GS-SOC (4, -)", "gs_soc", (4, None), 6.81, 1.64),
    ("GS-SOC (4, 1)", "gs_soc", (4, 1), 8.91, 1.21),
]
DEPTH, NUM_CLASSES, INPUT_SIZE = 15, 100, 32


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_rows() -> tuple[list[tuple[str, int, float]], int]:
    """(label, our trainable parameter count, paper's millions) per variant, and the bias count that the GS
    authors' code adds on top for a two-stage GS-SOC (its 1x1 stage has a bias of its own)."""
    rows = []
    for label, conv, groups, paper_millions, _ in VARIANTS:
        with torch.device("meta"):
            model = LipConvnet(DEPTH, NUM_CLASSES, conv, groups, input_size=INPUT_SIZE)
        rows.append((label, trainable_parameters(model), paper_millions))
    second_biases = sum(layer.out_channels for layer in model.layers)
    return rows, second_biases


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One forward + backward in training mode (the previous step's gradients dropped first)."""
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(images), labels).backward()


def time_rows(batch_size: int, rounds: int, warmup: int, seed: int = 0) -> dict[str, Samples]:
    """Per-variant wall and CPU step times over ``rounds`` interleaved rounds (order rotated each round) after
    ``warmup`` untimed steps of each."""
    torch.manual_seed(seed)
    models = {label: LipConvnet(DEPTH, NUM_CLASSES, conv, groups).train() for label, conv, groups, _, _ in VARIANTS}
    images = torch.randn(batch_size, 3, INPUT_SIZE, INPUT_SIZE)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,))
    steps = {label: lambda model=model: train_step(model, images, labels) for label, model in models.items()}
    return interleaved(steps, rounds, warmup, log=None)[0]


def format_report(params, second_biases: int, times, batch_size: int, rounds: int, warmup: int) -> str:
    soc_params = params[0][1]
    counts = [
        [label, f"{n:,} ({n / 1e6:.2f}M)", f"{paper:.2f}M", f"{n / soc_params:.3f}", f"{paper / params[0][2]:.3f}"]
        for label, n, paper in params
    ]
    lines = [
        f"LipConvnet-{DEPTH}, CIFAR-100 shapes ({NUM_CLASSES} classes, {INPUT_SIZE}x{INPUT_SIZE} inputs, "
        "init_channels 32). Written by `benchmarks/bench_lipconvnet.py`.",
        "",
        markdown_table(["model", "parameters (ours)", "parameters (paper)", "ours / SOC", "paper / SOC"], counts),
    ]
    soc = times["SOC"]
    rows = []
    for label, _, _, _, paper_speedup in VARIANTS:
        t = times[label]
        rows.append(
            [
                label,
                f"{t.wall_median:.3f}",
                f"{t.wall_min:.3f} / {t.wall_max:.3f}",
                f"{t.cpu_median:.3f}",
                f"{t.wall_median / soc.wall_median:.2f}",
                f"{t.wall_min / soc.wall_min:.2f}",
                f"{t.cpu_median / soc.cpu_median:.2f}",
                f"{paper_speedup:.2f}x (time / SOC {1 / paper_speedup:.2f})",
            ]
        )
    header = ["model", "wall median (s)", "wall min / max (s)", "CPU median (s)", "time / SOC: wall median"]
    header += ["wall min", "CPU", "paper's speed-up (GPU)"]
    lines += [
        "",
        f"The GS authors' code counts {params[-1][1] + second_biases:,} for GS-SOC (4, 1), {second_biases:,} more: "
        "its 1x1 stage has a bias of its own, which adds nothing (Q(x + b1) + b2 = Qx + (Q b1 + b2) for the "
        "orthogonal 1x1 map Q); we keep one bias per layer.",
        "",
        f"Forward + backward of one training step (5 series terms, one power-iteration step per SOC), batch "
        f"{batch_size} at {INPUT_SIZE}x{INPUT_SIZE}, {torch.get_num_threads()} CPU threads "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}); {rounds} interleaved rounds "
        f"after {warmup} warm-up rounds. Other jobs share this machine (1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end), so wall times spread widely: the fastest round (min) shows the "
        "unloaded machine best, the median of the process CPU time the work done.",
        "",
        markdown_table(header, rows),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8, help="images per timed step (the paper trains with 128)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--no-write", dest="write", action="store_false", help="print only; leave the docs alone")
    args = parser.parse_args(argv)
    params, second_biases = parameter_rows()
    times = time_rows(args.batch_size, args.rounds, args.warmup)
    report = format_report(params, second_biases, times, args.batch_size, args.rounds, args.warmup)
    print(report)
    if args.write:
        replace_section(DOCS, "lipconvnet", report)
    return report


if __name__ == "__main__":
    main()
