"""One SD-sized projection, forward + backward: GSOFT / Double GSOFT / BOFT against PEFT's LoRA r=4 and OFT.

Every method wraps a copy of the same frozen nn.Linear; the input requires grad and the output receives a fixed
dense random gradient (as inside a UNet; ``sum()`` would hand every method an expanded all-ones gradient that no real
layer sees). Methods are timed interleaved in one process after warm-up; the table reports medians and ratios to
PEFT LoRA r=4 and PEFT
OFT (same block count; exact Cayley as the trainer's OFT baseline, and PEFT's default Neumann-series
approximation, which is not exactly orthogonal, for reference). Writes its table into docs/benchmarks.md and
README.md (between the layer_speed markers).

    python benchmarks/bench_layer_speed.py [--rounds 7] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, OFTConfig, get_peft_model
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import load_line, machine_line  # noqa: E402
from benchmarks.report import replace_section  # noqa: E402
from dreambooth_gs import GSOFTConfig, inject_adapter  # noqa: E402
from dreambooth_gs.functional import gs_linear  # noqa: E402

CASES = [  # (tokens, in_features = out_features): SD's 64x64 latents at 320 channels, 16x16 at 1280
    (8192, 320),
    (512, 1280),
]
NBLOCKS = 32
GOAL = 1.10  # issue 2: GSOFT r=32 at most 1.10x PEFT LoRA r=4 and 1.10x PEFT OFT r=32
GOAL_ROW = f"GSOFT r={NBLOCKS} (auto)"


def peft_wrapped(linear: nn.Linear, peft_config) -> nn.Module:
    model = get_peft_model(nn.Sequential(copy.deepcopy(linear)), peft_config)
    return model


def ours(linear: nn.Linear, forward_mode: str = "auto", **config) -> nn.Module:
    model = nn.Sequential(copy.deepcopy(linear))
    inject_adapter(model, GSOFTConfig(target_modules=("0",), forward_mode=forward_mode, **config))
    return model


class CayleyPart(nn.Module):
    """Part of a GSOFT layer's cost: its orthogonal blocks from its parameters (Cayley), forward + backward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layer = model[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(f.sum() for f in self.layer.orthogonal_factors().values())


class RotatedMatmulPart(nn.Module):
    """Part of a GSOFT layer's cost: the frozen matmul of the rotated input, ``W Q x`` (``gs_linear``), from given
    orthogonal blocks (gradients for x and the blocks); minus the floor row, what the rotation costs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        layer = model[0]
        factors = layer.orthogonal_factors()
        self.left = nn.Parameter(factors["gsoft_L"].detach().clone())
        self.right = nn.Parameter(factors["gsoft_R"].detach().clone())
        self.weight = layer.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gs_linear(x, self.left, self.right, self.weight)


def methods_for(linear: nn.Linear) -> dict[str, nn.Module]:
    frozen = copy.deepcopy(linear).requires_grad_(False)
    activation = ours(linear, "activation", nblocks=NBLOCKS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "frozen base (floor)": frozen,
            "PEFT LoRA r=4": peft_wrapped(linear, LoraConfig(r=4, target_modules=["0"])),
            f"PEFT OFT r={NBLOCKS}": peft_wrapped(
                linear, OFTConfig(r=NBLOCKS, oft_block_size=0, target_modules=["0"], use_cayley_neumann=False)
            ),
            f"PEFT OFT r={NBLOCKS}, Neumann approx. (PEFT default)": peft_wrapped(
                linear, OFTConfig(r=NBLOCKS, oft_block_size=0, target_modules=["0"], use_cayley_neumann=True)
            ),
            f"GSOFT r={NBLOCKS} (auto)": ours(linear, nblocks=NBLOCKS),
            f"GSOFT r={NBLOCKS} activation-side": activation,
            f"GSOFT r={NBLOCKS} activation-side, no scale vector": ours(
                linear, "activation", nblocks=NBLOCKS, scale=False
            ),
            f"part of GSOFT r={NBLOCKS}: Cayley of its {2 * NBLOCKS} blocks": CayleyPart(activation),
            f"part of GSOFT r={NBLOCKS}: frozen matmul of the rotated input, W Q x": RotatedMatmulPart(activation),
            f"GSOFT r={NBLOCKS} weight-side": ours(linear, "weight", nblocks=NBLOCKS),
            f"Double GSOFT r={NBLOCKS} (auto)": ours(linear, method="double_gsoft", nblocks=NBLOCKS),
            f"BOFT ({NBLOCKS},4) on the GS core": ours(linear, method="boft", nblocks=NBLOCKS, n_butterfly_factor=4),
        }


def step_time(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward (output gradient ``grad_out``) over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        x.grad = None
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = module(x)
        out.backward(grad_out if out.shape == grad_out.shape else torch.ones_like(out))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(tokens: int, dim: int, rounds: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    linear = nn.Linear(dim, dim)
    x = torch.randn(tokens, dim, requires_grad=True)
    grad_out = torch.randn(tokens, dim)
    methods = methods_for(linear)
    for module in methods.values():  # warm-up
        step_time(module, x, grad_out, 2)
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):  # interleaved rounds
        for name, module in methods.items():
            samples[name].append(step_time(module, x, grad_out, repeats))
    return {name: statistics.median(values) for name, values in samples.items()}


def auto_side(tokens: int, dim: int) -> str:
    """The side ``forward_mode='auto'`` picks for this shape while training."""
    layer = ours(nn.Linear(dim, dim), nblocks=NBLOCKS)[0]
    return layer.forward_side(torch.empty(tokens, dim))


def table(results: dict[tuple[int, int], dict[str, float]]) -> tuple[str, list[str]]:
    """The per-case tables and one line per goal check."""
    lines, checks = [], []
    for (tokens, dim), medians in results.items():
        lora, oft = medians["PEFT LoRA r=4"], medians[f"PEFT OFT r={NBLOCKS}"]
        lines += [
            f"**{tokens} tokens x {dim} features** (forward + backward, input requires grad; auto side: "
            f"{auto_side(tokens, dim)})",
            "",
            f"| method | median ms | / LoRA r=4 | / OFT r={NBLOCKS} |",
            "|---|---:|---:|---:|",
        ]
        for name, seconds in medians.items():
            lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / lora:.2f} | {seconds / oft:.2f} |")
        lines.append("")
        ours_s = medians[GOAL_ROW]
        for label, ref in (("PEFT LoRA r=4", lora), (f"PEFT OFT r={NBLOCKS}", oft)):
            verdict = "met" if ours_s / ref <= GOAL else "MISSED"
            checks.append(f"{tokens} x {dim}: {GOAL_ROW} / {label} = {ours_s / ref:.2f} (goal <= {GOAL}): {verdict}")
    return "\n".join(lines), checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case (median over rounds)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method per round")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ and README.md alone")
    args = parser.parse_args(argv)
    results = {case: run_case(*case, args.rounds, args.repeats) for case in CASES}
    tables, checks = table(results)
    body = (
        f"### One projection: GSOFT vs PEFT LoRA / OFT ({machine_line()})\n\n"
        f"Written by `benchmarks/bench_layer_speed.py`: forward + backward of one projection with a dense random "
        f"output gradient, medians of {args.rounds} interleaved rounds of {args.repeats} calls each.\n\n"
        + tables
        + "\nGoals (issue 2):\n\n"
        + "\n".join(f"- {check}" for check in checks)
        + f"\n\nMeasured with {load_line()}.\n"
    )
    print(body)
    if not args.no_write:
        for path in (ROOT / "docs" / "benchmarks.md", ROOT / "README.md"):
            replace_section(path, "layer_speed", body)


if __name__ == "__main__":
    main()
