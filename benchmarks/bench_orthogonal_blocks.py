"""Orthogonal blocks (issue 34, item 2): what r blocks of b x b cost forward + backward, by parametrization, and how
far PEFT's Cayley-Neumann series is from orthogonal at the parameter sizes training reaches.

    python benchmarks/bench_orthogonal_blocks.py            # ~1-2 min, 1 thread: the shapes with r * b in 640..4096
    python benchmarks/bench_orthogonal_blocks.py --all      # every (r, b) of the grid
    python benchmarks/bench_orthogonal_blocks.py --rounds 3 --quick

Compared, each on the same float32 parameters ``(r, b, b)`` with a fixed random output gradient:

* ``cayley`` (ours, the default): ``2 (I - K)^-1 - I`` by LAPACK's batched ``inv_ex`` inside one custom autograd
  node (:class:`_Cayley`: its backward is two batched matmuls);
* ``cayley_neumann``: PEFT OFT's default series ``I + 2K + 2K^2 + 2K^3 + K^4`` (5 terms; two bmm's forward);
* ``solve``: ``torch.linalg.solve(I - K, I + K)`` under plain autograd (PEFT OFT's exact path solves the same way);
* ``inv_ex``: ``2 inv_ex(I - K) - I`` under plain autograd;
* ``matrix_exp``: ``torch.linalg.matrix_exp(K)``.

Times are medians over interleaved rounds (the order rotates each round), each sample the mean of a few calls. The
accuracy table draws parameters with entries of standard deviation ``std`` (0: the identity at initialisation; 1e-3
to 5e-2 brackets trained adapters) and reports, in float32 as training computes them, ``max |Q^T Q - I|`` of the
series and of exact Cayley, and ``max |Q_neumann - Q_cayley|``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import THREADS_HELP, interleaved  # noqa: E402
from benchmarks.report import load_line, machine_line, markdown_table  # noqa: E402
from dreambooth_gs.gs import functional as gsf  # noqa: E402

NBLOCKS = (16, 32, 64)
BLOCK_SIZES = (16, 32, 48, 64, 96, 128)
WIDTHS = (640, 4096)  # the widths that matter most: SD / SDXL / SD3.5 / Flux projections
STDS = (0.0, 1e-3, 1e-2, 5e-2)
ACCURACY_BLOCK_SIZES = (16, 32, 64, 128)
ACCURACY_HEADER = [  # "\\|" is a literal bar inside a Markdown table cell
    "r x b",
    "entry std",
    "max \\|K\\|_2",
    "neumann: max abs(Q^T Q - I)",
    "cayley: max abs(Q^T Q - I)",
    "max abs(neumann - cayley)",
    "bound 2 \\|K\\|^4 + \\|K\\|^8",
]


def _solve_cayley(params: torch.Tensor) -> torch.Tensor:
    k = gsf.skew(params)
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    return torch.linalg.solve(eye - k, eye + k)  # (I - K)^-1 (I + K) = (I + K)(I - K)^-1: they commute


def _inv_ex_cayley(params: torch.Tensor) -> torch.Tensor:
    k = gsf.skew(params)
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    return 2 * torch.linalg.inv_ex(eye - k)[0] - eye


PARAMETRIZATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cayley (ours)": gsf.cayley,
    f"cayley_neumann ({gsf.NUM_CAYLEY_NEUMANN_TERMS} terms)": gsf.cayley_neumann,
    "solve": _solve_cayley,
    "inv_ex": _inv_ex_cayley,
    "matrix_exp": lambda params: torch.linalg.matrix_exp(gsf.skew(params)),
}


def shapes(every: bool) -> list[tuple[int, int]]:
    return [(r, b) for r in NBLOCKS for b in BLOCK_SIZES if every or WIDTHS[0] <= r * b <= WIDTHS[1]]


def step(function: Callable[[torch.Tensor], torch.Tensor], params: torch.Tensor, grad: torch.Tensor, calls: int):
    """``calls`` forward + backward passes of ``function`` on ``params`` (a leaf requiring grad)."""

    def run() -> None:
        for _ in range(calls):
            params.grad = None
            function(params).backward(grad)

    return run


def time_shape(r: int, b: int, rounds: int, std: float) -> dict[str, float]:
    """Milliseconds per forward + backward, per parametrization (medians over interleaved rounds)."""
    g = torch.Generator().manual_seed(0)
    params = (std * torch.randn(r, b, b, generator=g)).requires_grad_()
    grad = torch.randn(r, b, b, generator=g)
    calls = max(1, int(1e7 / (r * b**3)))  # ~ equal work per sample: fewer calls for the big blocks
    fns = {name: step(function, params, grad, calls) for name, function in PARAMETRIZATIONS.items()}
    samples, _ = interleaved(fns, rounds, warmup=1, log=None)
    return {name: 1e3 * s.wall_median / calls for name, s in samples.items()}


def accuracy_rows(r: int) -> list[list[str]]:
    """``max |Q^T Q - I|`` of the series and of exact Cayley, and the series' distance to Cayley, in float32."""
    rows = []
    for b in ACCURACY_BLOCK_SIZES:
        eye = torch.eye(b)
        for std in STDS:
            params = std * torch.randn(r, b, b, generator=torch.Generator().manual_seed(1))
            exact, series = gsf.cayley(params), gsf.cayley_neumann(params)
            norm = torch.linalg.matrix_norm(gsf.skew(params.double()), ord=2).max().item()
            rows.append(
                [
                    f"{r} x {b}",
                    f"{std:g}",
                    f"{norm:.3g}",
                    f"{(series.mT @ series - eye).abs().max().item():.1e}",
                    f"{(exact.mT @ exact - eye).abs().max().item():.1e}",
                    f"{(series - exact).abs().max().item():.1e}",
                    f"{2 * norm**4 + norm**8:.1e}",
                ]
            )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every (r, b) of the grid, not only r * b in 640..4096")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per shape (default 9)")
    parser.add_argument("--std", type=float, default=1e-2, help="entry std of the timed parameters (default 1e-2)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help="r = 32 only (a smoke run)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    names = list(PARAMETRIZATIONS)
    rows, relative = [], []
    for r, b in shapes(args.all):
        if args.quick and r != 32:
            continue
        ms = time_shape(r, b, args.rounds, args.std)
        ours = ms[names[0]]
        relative.append({n: ms[n] / ours for n in names})
        rows.append([f"{r} x {b}", str(r * b), *(f"{ms[n]:.3f} ({ms[n] / ours:.2f}x)" for n in names)])
        print(f"  {r} x {b} done", file=sys.stderr)
    timing = markdown_table(["r x b", "d", *(f"{n}, ms" for n in names)], rows)
    accuracy = markdown_table(ACCURACY_HEADER, accuracy_rows(32))
    ratios = {n: statistics.median(r[n] for r in relative) for n in names}
    text = "\n\n".join(
        [
            f"Forward + backward of r orthogonal b x b blocks (float32, parameters of entry std {args.std:g}), "
            f"ms per call, median of {args.rounds} interleaved rounds; in brackets the ratio to exact Cayley (ours).",
            timing,
            "Median ratio over the shapes: " + ", ".join(f"{n} {v:.2f}x" for n, v in ratios.items()) + ".",
            "Orthogonality (float32, as training computes the blocks; r = 32):",
            accuracy,
            f"{machine_line()}; {load_line()}.",
        ]
    )
    print(text)
    return text


if __name__ == "__main__":
    main(parse_args())
