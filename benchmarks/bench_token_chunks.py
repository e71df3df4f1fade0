"""Token chunks (issue 34): one projection's forward + backward with the GS rotation's token-sized batched matmuls
and the scale's reductions run chunk by chunk (the library's default on the CPU) against whole activations, GSOFT
r=32 and Double GSOFT r=32 at the transformer-width shapes, side by side in one process.

    python benchmarks/bench_token_chunks.py            # ~3 min, 1 thread; writes docs/benchmarks.md's section
    python benchmarks/bench_token_chunks.py --no-write

Every row wraps a copy of the same frozen ``nn.Linear(d, d)`` (``forward_mode`` 'auto'); the input requires grad and
the output gets a fixed random gradient. Each timed call first sets ``functional.CPU_CHUNK_BYTES`` (the batched
matmuls' chunk) and ``functional.CPU_REDUCTION_CHUNK_BYTES`` (the scale's reductions'): "whole" sets both larger
than any activation, which is the library before chunks; the other rows vary the first and keep the second at its
default. Medians of interleaved rounds (order rotating); the ratio column is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import adapted_linear  # noqa: E402
from benchmarks.measure import interleaved, per_round_ratio  # noqa: E402
from benchmarks.report import DOCS, load_line, machine_line, markdown_table, replace_section  # noqa: E402
from dreambooth_gs.gs import functional  # noqa: E402

SHAPES = [(4096, 640, "SDXL level 2"), (1024, 1280, "SDXL level 3"), (4096, 1536, "SD3.5"), (1024, 3072, "FLUX.1")]
WHOLE = 2**40  # bytes: more than any activation, so one chunk
CHUNK_MIB = (0.5, 1, 2, 4)  # the batched matmuls' chunk, MiB; the default is functional.CPU_CHUNK_BYTES


def chunked(step, matmul_bytes: int, reduction_bytes: int):
    """``step`` run with the given chunk sizes (restored afterwards)."""

    def run() -> None:
        saved = functional.CPU_CHUNK_BYTES, functional.CPU_REDUCTION_CHUNK_BYTES
        functional.CPU_CHUNK_BYTES, functional.CPU_REDUCTION_CHUNK_BYTES = matmul_bytes, reduction_bytes
        try:
            step()
        finally:
            functional.CPU_CHUNK_BYTES, functional.CPU_REDUCTION_CHUNK_BYTES = saved

    return run


def measure(tokens: int, width: int, rounds: int) -> tuple[dict, list]:
    """Samples per row label and the load averages seen."""
    torch.manual_seed(0)
    base = nn.Linear(width, width)
    models = {"floor": nn.Sequential(base).requires_grad_(False)}
    for method in ("gsoft", "double_gsoft"):
        models[method] = adapted_linear(base, method=method, nblocks=32)
    x = torch.randn(tokens, width, requires_grad=True)
    grad = torch.randn(tokens, width)

    def step_of(model: nn.Module):
        def step() -> None:
            x.grad = None
            model.zero_grad(set_to_none=True)
            model(x).backward(grad)

        return step

    default_matmul, default_reduction = functional.CPU_CHUNK_BYTES, functional.CPU_REDUCTION_CHUNK_BYTES
    fns = {"floor": step_of(models["floor"])}
    for method, label in (("gsoft", "GSOFT"), ("double_gsoft", "Double GSOFT")):
        fns[f"{label} whole"] = chunked(step_of(models[method]), WHOLE, WHOLE)
        sizes = CHUNK_MIB if method == "gsoft" else (default_matmul / 2**20,)
        for mib in sizes:
            fns[f"{label} {mib:g} MiB"] = chunked(step_of(models[method]), int(mib * 2**20), default_reduction)
    return interleaved(fns, rounds, log=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (median over rounds)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    default_mib = functional.CPU_CHUNK_BYTES / 2**20
    labels = [f"GSOFT {mib:g} MiB" for mib in CHUNK_MIB]
    rows, all_loads = [], []
    for tokens, width, name in SHAPES:
        samples, loads = measure(tokens, width, args.rounds)
        all_loads += loads
        floor = samples["floor"].wall_median
        above = {label: f"{(s.wall_median / floor - 1) * 100:+.0f}%" for label, s in samples.items()}
        double = f"Double GSOFT {default_mib:g} MiB"
        row = [f"{tokens} x {width} ({name})", f"{floor * 1000:.1f}", above["GSOFT whole"]]
        row += [above[label] for label in labels]
        row += [f"{per_round_ratio(samples, f'GSOFT {default_mib:g} MiB', 'GSOFT whole'):.2f}"]
        row += [above["Double GSOFT whole"], above[double]]
        row += [f"{per_round_ratio(samples, double, 'Double GSOFT whole'):.2f}"]
        rows.append(row)
        print(row, flush=True)
    header = ["tokens x width", "floor ms", "GSOFT r=32 whole", *[f"{mib:g} MiB" for mib in CHUNK_MIB]]
    header += [f"GSOFT {default_mib:g} MiB / whole", "Double GSOFT whole", f"{default_mib:g} MiB", "Double / whole"]
    body = "\n\n".join(
        [
            "### Token chunks: the rotation's token-sized work in cache-sized pieces "
            "(`benchmarks/bench_token_chunks.py`, issue 34)",
            f"One projection `nn.Linear(d, d)`, forward + backward, input requiring grad, forward_mode 'auto'; "
            f"{machine_line()}; medians of {args.rounds} interleaved rounds; {load_line(all_loads)}. Each GS column "
            "is the time above the frozen floor with the batched matmuls run in chunks of that many MiB of "
            f"activation ('whole': one chunk, the library before chunks; {default_mib:g} MiB is the default, "
            "`functional.CPU_CHUNK_BYTES`); the scale's reductions run in chunks of "
            f"{functional.CPU_REDUCTION_CHUNK_BYTES / 2**20:g} MiB except in 'whole'. The ratio columns are "
            "medians of per-round ratios of the whole step.",
            markdown_table(header, rows),
        ]
    )
    print(body)
    if not args.no_write:
        replace_section(DOCS, "token_chunks", body)


if __name__ == "__main__":
    main()
