"""Fit the constant of ``forward_mode='auto'``'s cost model (``FLOPS_PER_ELEMENT_PASS``) from measured timings.

While adapter gradients are needed, :func:`dreambooth_gs.gs.layers.choose_forward_side` compares, in element passes
(p = ``ROTATION_PASSES[True]``, n tokens, k = 2 for Double GSOFT, else 1; rotated = in, plus out for Double GSOFT):

    activation side:  p * n * rotated
    weight side:      p * out * in * k  +  2 * n * in * out / C

``2 n in out`` is the FLOP count of the weight gradient ``grad_y^T x``, the one matmul the frozen layer never pays,
and C (FLOPs per element pass) converts it. The timing model behind it, per side, forward + backward above the
frozen floor (the same Linear without an adapter, its input requiring grad):

    t_activation - t_floor = c_shape + alpha * p * n * rotated
    t_weight - t_floor     = c_shape + alpha * p * out * in * k + beta * 2 * n * in * out

alpha is the seconds of one element pass, beta the seconds of one matmul FLOP, and c_shape what both sides pay alike
at one layer shape (the Cayley transform of its blocks, the scale vector, kernel launches), which the comparison
cancels. :func:`fit_constant` finds alpha, beta and one c_shape per shape by least squares on relative errors (every
timing counts by its own size) and returns C = alpha / beta, exactly the constant that makes the comparison the
timing model's. :func:`agreement` then counts the cases where ``choose_forward_side`` with a given constant picks
the side that was measured faster (through the function itself, with the constant swapped in).

Measured cases: GSOFT r=32 and Double GSOFT r=64 (the paper's rows) on square Linears of the SD UNet's widths, at
token counts from a few latents' cross-attention to SD's 512 px batch-4 self-attention and beyond. ``--device cuda``
writes docs/benchmarks.md (cost_model_cuda markers); ``--save`` keeps the timings as JSON and ``--load`` refits
them without a device. The script never edits ``layers.py``: its report says which constant to put there.

    python benchmarks/fit_cost_model.py --device cuda --precision fp32 bf16 --save timings.json
    OMP_NUM_THREADS=1 python benchmarks/fit_cost_model.py --quick --no-write      # the CPU check, ~30 s
    python benchmarks/fit_cost_model.py --load timings.json --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import adapted_linear  # noqa: E402
from benchmarks.measure import layer_medians  # noqa: E402
from benchmarks.report import DOCS, load_line, machine_line, markdown_table, replace_section  # noqa: E402
from dreambooth_gs.gs import layers  # noqa: E402

METHODS = {"gsoft": 32, "double_gsoft": 64}  # method -> block count: the paper's GSOFT r=32, Double GSOFT r=64
# (in_features, token counts): square Linears at the SD UNet's widths; 77 x 4 tokens is batch 4's cross-attention
# from the text, 16384 x 320 its 64x64 self-attention, 65536 four times that
CASES = {320: (308, 1024, 4096, 16384, 65536), 640: (308, 1024, 4096, 16384, 65536), 1280: (308, 1024, 4096, 16384)}
QUICK_CASES = {320: (256, 1024, 4096), 640: (256, 1024, 2048)}  # the CPU check: ~30 s on one thread here
QUICK_METHODS = {"gsoft": 32}
GRID = [10 ** (k / 40) for k in range(241)]  # candidate constants, 1 to 1e6 in steps of 10^(1/40) (~6%)


@dataclass(frozen=True)
class Timing:
    """Median seconds of one forward + backward of each variant of one layer at one token count."""

    tokens: int
    in_features: int
    out_features: int
    double: bool  # Double GSOFT (rotations on both sides of W), else GSOFT
    floor: float  # the frozen Linear, input requires grad
    activation: float
    weight: float

    @property
    def shape(self) -> tuple[int, int, bool]:
        return self.in_features, self.out_features, self.double

    @property
    def faster(self) -> str:
        return "weight" if self.weight < self.activation else "activation"

    def seconds(self, side: str) -> float:
        return self.weight if side == "weight" else self.activation


@dataclass(frozen=True)
class Fit:
    alpha: float  # seconds per element pass
    beta: float  # seconds per matmul FLOP
    intercepts: dict[tuple[int, int, bool], float]  # c_shape: seconds both sides pay alike at that shape
    rms_relative_error: float  # of the fitted side times (floor added back) against the measured ones

    @property
    def constant(self) -> float:
        """C = alpha / beta; inf if the fit finds the matmul free, nan if it finds the rotation free."""
        if self.alpha <= 0:
            return math.nan
        return self.alpha / self.beta if self.beta > 0 else math.inf


def cost_terms(timing: Timing) -> tuple[float, float, float]:
    """(element passes of the activation side, element passes of the weight side, the weight gradient's FLOPs),
    the terms :func:`~dreambooth_gs.gs.layers.choose_forward_side` weighs while adapter gradients are needed."""
    passes = layers.ROTATION_PASSES[True]
    n, d_in, d_out = timing.tokens, timing.in_features, timing.out_features
    rotated = d_in + (d_out if timing.double else 0)
    return passes * n * rotated, passes * d_out * d_in * (2 if timing.double else 1), 2.0 * n * d_in * d_out


def fit_constant(timings: list[Timing]) -> Fit:
    """alpha, beta and the per-shape intercepts by weighted least squares over both sides' times above the floor.

    Each row is divided by its side's measured time, so the fit minimises relative errors: a 65536-token case and a
    308-token one count alike.
    """
    shapes = sorted({t.shape for t in timings})
    for shape in shapes:
        if len({t.tokens for t in timings if t.shape == shape}) < 2:
            raise ValueError(f"shape {shape} has timings at one token count; the fit needs two or more per shape")
    rows, targets, weights = [], [], []
    for t in timings:
        act_passes, weight_passes, weight_flops = cost_terms(t)
        one_hot = [1.0 if t.shape == shape else 0.0 for shape in shapes]
        for side, terms in (("activation", [act_passes, 0.0]), ("weight", [weight_passes, weight_flops])):
            rows.append(one_hot + terms)
            targets.append(t.seconds(side) - t.floor)
            weights.append(1.0 / t.seconds(side))
    a = torch.tensor(rows, dtype=torch.float64)  # (2 * cases, shapes + 2)
    y = torch.tensor(targets, dtype=torch.float64)[:, None]
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    scale = a.abs().amax(dim=0).clamp_min(1e-300)  # columns to unit size: passes and FLOPs differ by 10^6
    solution = torch.linalg.lstsq(a * w / scale, y * w).solution[:, 0] / scale
    fitted = a @ solution
    totals = torch.tensor([t.seconds(side) for t in timings for side in ("activation", "weight")], dtype=torch.float64)
    floors = torch.tensor([t.floor for t in timings for _ in range(2)], dtype=torch.float64)
    error = float((((fitted + floors) / totals - 1) ** 2).mean().sqrt())
    intercepts = {shape: float(solution[i]) for i, shape in enumerate(shapes)}
    return Fit(float(solution[-2]), float(solution[-1]), intercepts, error)


@contextlib.contextmanager
def flops_per_element_pass(device_type: str, value: float) -> Iterator[None]:
    """``choose_forward_side`` with ``value`` as the device's constant (the real function, not a copy of it)."""
    with mock.patch.dict(layers.FLOPS_PER_ELEMENT_PASS, {device_type: value}):
        yield


def picks(timings: list[Timing], constant: float, device_type: str) -> list[str]:
    """The side ``forward_mode='auto'`` picks for each case, training, with ``constant`` for ``device_type``."""
    with flops_per_element_pass(device_type, constant):
        return [
            layers.choose_forward_side(t.tokens, t.in_features, t.out_features, t.double, True, device_type)
            for t in timings
        ]


def agreement(timings: list[Timing], constant: float, device_type: str) -> int:
    """How many cases the cost model with ``constant`` sends to the side that was measured faster."""
    return sum(side == t.faster for side, t in zip(picks(timings, constant, device_type), timings))


def time_lost(timings: list[Timing], constant: float, device_type: str) -> float:
    """Seconds the picked sides take beyond the faster ones, summed over the cases."""
    chosen = picks(timings, constant, device_type)
    return sum(t.seconds(side) - min(t.activation, t.weight) for side, t in zip(chosen, timings))


def best_constants(timings: list[Timing], device_type: str, grid: list[float] = GRID) -> tuple[int, list[tuple]]:
    """The most cases any constant of ``grid`` gets right, and the (low, high) runs of the grid that do."""
    counts = [agreement(timings, c, device_type) for c in grid]
    best = max(counts)
    runs: list[tuple[float, float]] = []
    for i, (c, count) in enumerate(zip(grid, counts)):
        if count != best:
            continue
        if i and counts[i - 1] == best:  # extends the run before
            runs[-1] = (runs[-1][0], c)
        else:
            runs.append((c, c))
    return best, runs


# -- measuring ------------------------------------------------------------------------------------------------------


def measure_shape(
    d_in: int, method: str, tokens: tuple[int, ...], device: str, bf16: bool, rounds: int, repeats: int
) -> list[Timing]:
    """Floor, activation side and weight side of one square Linear at each token count, interleaved per round."""
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_in).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GSOFT's note that b < r makes Q sparse (true of r=32 at 320 and 640)
        variants = {
            "floor": copy.deepcopy(linear).requires_grad_(False),
            "activation": adapted_linear(linear, "activation", method=method, nblocks=METHODS[method]),
            "weight": adapted_linear(linear, "weight", method=method, nblocks=METHODS[method]),
        }
    timings = []
    for n in tokens:
        x = torch.randn(n, d_in).to(device).requires_grad_()
        grad_out = torch.randn(n, d_in).to(device)
        medians = layer_medians(variants, x, grad_out, rounds, repeats, bf16)
        timings.append(Timing(n, d_in, d_in, method == "double_gsoft", **medians))
        print(f"  {method} {n} x {d_in}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in medians.items()), flush=True)
    return timings


def measure(cases: dict, methods: dict, device: str, bf16: bool, rounds: int, repeats: int) -> list[Timing]:
    return [
        timing
        for method in methods
        for d_in, tokens in cases.items()
        for timing in measure_shape(d_in, method, tokens, device, bf16, rounds, repeats)
    ]


# -- reporting ------------------------------------------------------------------------------------------------------


def constant_text(value: float) -> str:
    return f"{value:.0f}" if math.isfinite(value) and value >= 10 else f"{value:.3g}"


def fit_report(timings: list[Timing], device_type: str) -> tuple[str, Fit]:
    """The per-case table and the fitted constant against the current one, as Markdown."""
    fit = fit_constant(timings)
    current = layers.FLOPS_PER_ELEMENT_PASS.get(device_type, 600.0)
    fitted = fit.constant
    now_picks = picks(timings, current, device_type)
    fit_picks = ["—"] * len(timings) if math.isnan(fitted) else picks(timings, fitted, device_type)

    def score(constant: float) -> str:
        right, lost = agreement(timings, constant, device_type), time_lost(timings, constant, device_type)
        return f"in {right} / {len(timings)} cases, losing {lost * 1e3:.3f} ms summed over them"

    rows = []
    for t, now, new in zip(timings, now_picks, fit_picks):
        name = "Double GSOFT r=64" if t.double else "GSOFT r=32"
        mark = {side: side if side == t.faster else f"**{side}**" for side in ("activation", "weight", "—")}
        shape = f"{t.tokens} x {t.in_features} -> {t.out_features}"
        ms = [f"{seconds * 1e3:.3f}" for seconds in (t.floor, t.activation, t.weight)]
        rows.append([name, shape, *ms, t.faster, mark[now], mark[new]])
    header = ["method", "tokens x in -> out", "floor (ms)", "activation side (ms)", "weight side (ms)", "faster"]
    header += [f"auto picks, C = {constant_text(current)} (now)", f"auto picks, C = {constant_text(fitted)} (fitted)"]
    lines = [markdown_table(header, rows, "llrrrlll")]
    best, runs = best_constants(timings, device_type)
    intercepts = ", ".join(
        f"{'Double ' if double else ''}{d_in} -> {d_out}: {c * 1e3:.3f} ms"
        for (d_in, d_out, double), c in sorted(fit.intercepts.items())
    )
    fitted_score = "no constant (the fit finds the rotation free)" if math.isnan(fitted) else score(fitted)
    lines += [
        "",
        f"Fit: alpha = {fit.alpha * 1e12:.3g} ps per element pass, beta = {fit.beta * 1e15:.3g} fs per matmul FLOP, "
        f"so C = alpha / beta = **{constant_text(fitted)}** FLOPs per element pass "
        f"(`FLOPS_PER_ELEMENT_PASS['{device_type}']` is {constant_text(current)} now); shared per-shape costs "
        f"{intercepts}; rms relative error of the fitted times {fit.rms_relative_error:.1%}.",
        "",
        f"Picks the faster side (bold: a slower pick): the current constant {score(current)}; the fitted one "
        f"{fitted_score}. The most any constant gets right is {best} / {len(timings)}, for C in "
        + " or ".join(f"{constant_text(lo)} to {constant_text(hi)}" for lo, hi in runs)
        + " (a grid from 1 to 10^6 in steps of ~6%).",
    ]
    return "\n".join(lines), fit


def report(runs: dict[str, list[Timing]], meta: dict, command: str) -> str:
    device = meta["device"]
    parts = [
        f"### The auto side's cost model on {device.upper() if device == 'cuda' else device} ({meta['machine']})",
        "",
        f"Written by `{command}`: forward + backward of one square Linear (bias, a dense random output gradient, "
        f"the input requiring grad) as the frozen floor, with GSOFT / Double GSOFT forced to the activation side "
        f"and to the weight side; medians of {meta['rounds']} interleaved rounds of {meta['repeats']} calls. The "
        "fit is the timing model of `choose_forward_side` (the script's docstring): time above the floor = a "
        "per-shape cost both sides pay + alpha x element passes (+ beta x the weight gradient's FLOPs on the weight "
        "side), so C = alpha / beta. Measured with " + meta["load"] + ".",
    ]
    for precision, timings in runs.items():
        text, _ = fit_report(timings, device)
        parts += ["", f"**{precision}**{' (autocast)' if precision == 'bf16' else ''}", "", text]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"], help="one fit each")
    parser.add_argument("--quick", action="store_true", help="the CPU check's cases: GSOFT at 320 and 640, few tokens")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (median over rounds)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant per round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--save", type=Path, default=None, help="write the timings to this JSON file")
    parser.add_argument("--load", type=Path, default=None, help="refit timings saved by --save (measures nothing)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)
    saved = json.loads(args.load.read_text()) if args.load is not None else None
    device = saved["meta"]["device"] if saved else args.device  # a loaded file says where it was measured
    if saved is None and device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    section = f"cost_model_{device}"
    if not args.no_write and f"<!-- {section}:begin -->" not in DOCS.read_text():  # before measuring, not after
        parser.error(f"docs/benchmarks.md has no {section} markers: add them, or pass --no-write")
    if saved is not None:
        meta = saved["meta"]
        runs = {p: [Timing(**t) for t in timings] for p, timings in saved["runs"].items()}
    else:
        torch.set_num_threads(args.threads)
        cases, methods = (QUICK_CASES, QUICK_METHODS) if args.quick else (CASES, METHODS)
        runs = {}
        for precision in args.precision:
            print(f"{precision} on {device} ...", flush=True)
            runs[precision] = measure(cases, methods, device, precision == "bf16", args.rounds, args.repeats)
        gpu = f", {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if device == "cuda" else ""
        meta = {
            "device": device,
            "machine": machine_line() + gpu,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "load": load_line(),
        }
    if args.save is not None:
        payload = {"meta": meta, "runs": {p: [asdict(t) for t in timings] for p, timings in runs.items()}}
        args.save.write_text(json.dumps(payload, indent=1) + "\n")
    command = f"benchmarks/fit_cost_model.py --device {device} --precision {' '.join(runs)}"
    body = report(runs, meta, command)
    print(body)
    if not args.no_write:
        replace_section(DOCS, section, body)


if __name__ == "__main__":
    main()
