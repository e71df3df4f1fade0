"""One SD-sized projection, forward + backward: GSOFT / Double GSOFT / BOFT against PEFT's LoRA r=4 and OFT.

Every method wraps a copy of the same frozen nn.Linear; the input requires grad and the output receives a fixed
dense random gradient (as inside a UNet; ``sum()`` would hand every method an expanded all-ones gradient that no real
layer sees). Methods are timed interleaved in one process after warm-up; the table reports medians and ratios to
PEFT LoRA r=4 and PEFT
OFT (same block count; exact Cayley as the trainer's OFT baseline, and PEFT's default Neumann-series
approximation, which is not exactly orthogonal, for reference). Writes its table into docs/benchmarks.md (between
the layer_speed markers).

``--shapes sdxl`` times SDXL's projections at 1024 px instead (one latent: 4096 tokens x 640, 1024 x 1280, and the
cross-attention to_k / to_v from 77 text tokens x 2048 to 640 and 1280, whose input needs no gradient, as with
frozen text encoders), one torch thread by default, into docs/benchmarks.md only (layer_speed_sdxl markers).

``--shapes flux`` times one projection at FLUX.1's width: nn.Linear(3072, 3072) on one 1024 px latent's 4096 image
tokens and 512 text tokens side by side (x of shape (1, 4608, 3072), a single-stream block's to_q / to_k / to_v),
GSOFT r=32 (auto and both explicit sides) against PEFT's LoRA r=16 and OFT with 32 blocks, ratios to LoRA r=16; one
torch thread by default, into docs/benchmarks.md only (layer_speed_flux markers). Each call takes seconds on one
CPU thread: use few rounds and one repeat (``--rounds 7 --repeats 1``, about 4 minutes).

``--device cuda`` times the same SD cases on the GPU (modules and tensors there, ``torch.cuda.synchronize()`` before
and after each timed call: CUDA calls return before their kernels finish) into docs/benchmarks.md only
(layer_speed_cuda markers; with ``--bf16``, bf16 autocast as the trainer's ``--mixed_precision bf16`` runs it, the
layer_speed_cuda_bf16 markers). ``--bf16`` on the CPU prints only.

    python benchmarks/bench_layer_speed.py [--shapes sd|sdxl|flux] [--rounds 7] [--repeats 5] [--threads N] [--no-write]
    python benchmarks/bench_layer_speed.py --device cuda [--bf16] [--rounds 15] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, OFTConfig
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import adapted_linear, peft_linear  # noqa: E402
from benchmarks.measure import THREADS_HELP, add_device_arguments, check_device_arguments, layer_medians  # noqa: E402
from benchmarks.report import DOCS, load_line, machine_line, markdown_table, replace_section  # noqa: E402
from dreambooth_gs.gs.functional import gs_linear  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One projection shape: x is (tokens, in_features), or (batch, tokens, in_features), the output likewise."""

    tokens: int
    in_features: int
    out_features: int
    input_grad: bool = True  # False for cross-attention to_k / to_v: the text encoders' output needs no gradient
    calls: int = 0  # how many of the UNet's projections have this shape (0: not summed)
    batch: int | None = None  # a leading batch dimension (None: tokens flattened into rows)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (*(() if self.batch is None else (self.batch,)), self.tokens, self.in_features)

    @property
    def name(self) -> str:
        if self.in_features == self.out_features:
            return f"{self.tokens} x {self.in_features}"
        return f"{self.tokens} x {self.in_features} -> {self.out_features}"


SHAPE_SETS = {
    # SD at 512 px, two latents' tokens side by side: 2 x 64x64 at 320 channels, 2 x 16x16 at 1280
    "sd": [Case(8192, 320, 320), Case(512, 1280, 1280)],
    # SDXL at 1024 px, one latent (the SDXL recipe's --train_batch_size 1): 64x64 at 640, 32x32 at 1280, and the
    # cross-attention to_k / to_v from 77 tokens of both text encoders' 2048-wide output
    "sdxl": [
        # calls: 10 transformer blocks at 640 and 60 at 1280, each with 6 projections reading the hidden states
        # (self-attention q / k / v / out, cross-attention q / out) and 2 reading the text (cross-attention k / v)
        Case(4096, 640, 640, calls=60),
        Case(1024, 1280, 1280, calls=360),
        Case(77, 2048, 640, input_grad=False, calls=20),
        Case(77, 2048, 1280, input_grad=False, calls=120),
    ],
    # FLUX.1 at 1024 px, batch 1: 64x64 image tokens (4096) and 512 T5 tokens through one 3072-wide projection, as
    # a single-stream block's to_q / to_k / to_v sees them (the double-stream blocks run the same tokens through
    # two Linears: to_* on the 4096 image tokens, add_* on the 512 text tokens)
    "flux": [Case(4608, 3072, 3072, batch=1)],
    # SD3.5 Medium at 1024 px, batch 1: a joint block's image-side projections (to_q / to_k / to_v / to_out.0 on
    # 64x64 = 4096 tokens) and text-side ones (add_*_proj / to_add_out on 77 CLIP + 256 T5 = 333 tokens), width 1536
    "sd3": [Case(4096, 1536, 1536, batch=1), Case(333, 1536, 1536, batch=1)],
}
SECTIONS = {"sd": "layer_speed", "sdxl": "layer_speed_sdxl", "flux": "layer_speed_flux", "sd3": "layer_speed_sd3"}
# The row every ratio divides by: issue 2's LoRA r=4 on the UNets; on the transformers LoRA r=16, a common rank there
REFERENCES = {"sd": "PEFT LoRA r=4", "sdxl": "PEFT LoRA r=4", "flux": "PEFT LoRA r=16", "sd3": "PEFT LoRA r=16"}
NBLOCKS = 32
GOAL = 1.10  # issue 2: GSOFT r=32 at most 1.10x PEFT LoRA r=4 and 1.10x PEFT OFT r=32
GOAL_ROW = f"GSOFT r={NBLOCKS} (auto)"


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


def transformer_methods(linear: nn.Linear) -> dict[str, nn.Module]:
    """The transformer-width comparison (SD3.5, FLUX.1): the floor, PEFT LoRA r=16, PEFT OFT with 32 blocks and with
    16 (GSOFT r=32's parameter count; exact Cayley), GSOFT r=32 on each side, Double GSOFT r=32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "frozen base (floor)": copy.deepcopy(linear).requires_grad_(False),
            "PEFT LoRA r=16": peft_linear(linear, LoraConfig(r=16, lora_alpha=16, target_modules=["0"])),
            f"PEFT OFT r={NBLOCKS}": peft_linear(
                linear, OFTConfig(r=NBLOCKS, oft_block_size=0, target_modules=["0"], use_cayley_neumann=False)
            ),
            f"PEFT OFT r={NBLOCKS // 2} (GSOFT r={NBLOCKS}'s parameters)": peft_linear(
                linear, OFTConfig(r=NBLOCKS // 2, oft_block_size=0, target_modules=["0"], use_cayley_neumann=False)
            ),
            f"GSOFT r={NBLOCKS} (auto)": adapted_linear(linear, nblocks=NBLOCKS),
            f"GSOFT r={NBLOCKS} activation-side": adapted_linear(linear, "activation", nblocks=NBLOCKS),
            f"GSOFT r={NBLOCKS} weight-side": adapted_linear(linear, "weight", nblocks=NBLOCKS),
            f"Double GSOFT r={NBLOCKS} (auto)": adapted_linear(linear, method="double_gsoft", nblocks=NBLOCKS),
        }


def methods_for(linear: nn.Linear, shapes: str = "sd") -> dict[str, nn.Module]:
    if shapes in ("flux", "sd3"):
        return transformer_methods(linear)
    frozen = copy.deepcopy(linear).requires_grad_(False)
    activation = adapted_linear(linear, "activation", nblocks=NBLOCKS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "frozen base (floor)": frozen,
            "PEFT LoRA r=4": peft_linear(linear, LoraConfig(r=4, target_modules=["0"])),
            f"PEFT OFT r={NBLOCKS}": peft_linear(
                linear, OFTConfig(r=NBLOCKS, oft_block_size=0, target_modules=["0"], use_cayley_neumann=False)
            ),
            f"PEFT OFT r={NBLOCKS}, Neumann approx. (PEFT default)": peft_linear(
                linear, OFTConfig(r=NBLOCKS, oft_block_size=0, target_modules=["0"], use_cayley_neumann=True)
            ),
            f"GSOFT r={NBLOCKS} (auto)": adapted_linear(linear, nblocks=NBLOCKS),
            f"GSOFT r={NBLOCKS} activation-side": activation,
            f"GSOFT r={NBLOCKS} activation-side, no scale vector": adapted_linear(
                linear, "activation", nblocks=NBLOCKS, scale=False
            ),
            f"part of GSOFT r={NBLOCKS}: Cayley of its {2 * NBLOCKS} blocks": CayleyPart(activation),
            f"part of GSOFT r={NBLOCKS}: frozen matmul of the rotated input, W Q x": RotatedMatmulPart(activation),
            f"GSOFT r={NBLOCKS} weight-side": adapted_linear(linear, "weight", nblocks=NBLOCKS),
            f"Double GSOFT r={NBLOCKS} (auto)": adapted_linear(linear, method="double_gsoft", nblocks=NBLOCKS),
            f"BOFT ({NBLOCKS},4) on the GS core": adapted_linear(
                linear, method="boft", nblocks=NBLOCKS, n_butterfly_factor=4
            ),
        }


def run_case(
    case: Case,
    rounds: int,
    repeats: int,
    shapes: str = "sd",
    loads: list[tuple[float, float, float]] | None = None,
    device: str = "cpu",
    bf16: bool = False,
) -> dict[str, float]:
    """Median seconds per method; appends the load average after each round to ``loads`` when given."""
    torch.manual_seed(0)
    linear = nn.Linear(case.in_features, case.out_features).to(device)
    x = torch.randn(case.input_shape).to(device).requires_grad_(case.input_grad)  # drawn on the CPU: same values
    grad_out = torch.randn(*case.input_shape[:-1], case.out_features).to(device)
    return layer_medians(methods_for(linear, shapes), x, grad_out, rounds, repeats, bf16, loads)


def auto_side(case: Case, device: str = "cpu") -> str:
    """The side ``forward_mode='auto'`` picks for this shape while training (on ``device``: its constant)."""
    layer = adapted_linear(nn.Linear(case.in_features, case.out_features), nblocks=NBLOCKS)[0]
    return layer.forward_side(torch.empty(case.input_shape, device=device))


def table(
    results: dict[Case, dict[str, float]], reference: str = "PEFT LoRA r=4", device: str = "cpu"
) -> tuple[str, list[str]]:
    """The per-case tables (ratios to ``reference`` and to PEFT OFT) and one line per goal check."""
    lines, checks = [], []
    short = reference.removeprefix("PEFT ")
    for case, medians in results.items():
        lora, oft = medians[reference], medians[f"PEFT OFT r={NBLOCKS}"]
        features = (
            f"{case.in_features} features"
            if case.in_features == case.out_features
            else f"{case.in_features} -> {case.out_features} features"
        )
        grad = "input requires grad" if case.input_grad else "input needs no grad (text), floor is forward only"
        batch = "" if case.batch is None else f"batch {case.batch} x "
        rows = [[name, f"{t * 1e3:.1f}", f"{t / lora:.2f}", f"{t / oft:.2f}"] for name, t in medians.items()]
        lines += [
            f"**{batch}{case.tokens} tokens x {features}** (forward + backward, {grad}; auto side: "
            f"{auto_side(case, device)})",
            "",
            markdown_table(["method", "median ms", f"/ {short}", f"/ OFT r={NBLOCKS}"], rows),
            "",
        ]
        ours_s = medians[GOAL_ROW]
        for label, ref in ((reference, lora), (f"PEFT OFT r={NBLOCKS}", oft)):
            verdict = "met" if ours_s / ref <= GOAL else "MISSED"
            checks.append(f"{case.name}: {GOAL_ROW} / {label} = {ours_s / ref:.2f} (goal <= {GOAL}): {verdict}")
    return "\n".join(lines), checks


def unet_sum(results: dict[Case, dict[str, float]]) -> str:
    """Each method's times summed over the UNet's projection calls (the cases' ``calls``), '' if not given."""
    if not all(case.calls for case in results):
        return ""
    names = [name for name in next(iter(results.values())) if not name.startswith("part of")]
    sums = {name: sum(case.calls * medians[name] for case, medians in results.items()) for name in names}
    lora, oft = sums["PEFT LoRA r=4"], sums[f"PEFT OFT r={NBLOCKS}"]
    calls = sum(case.calls for case in results)
    rows = [[name, f"{t:.2f}", f"{t / lora:.2f}", f"{t / oft:.2f}"] for name, t in sums.items()]
    lines = [
        f"**Summed over the UNet's {calls} projection calls** (one forward + backward of each, batch 1; "
        + ", ".join(f"{case.calls} x ({case.name})" for case in results)
        + "): what the projections alone would cost in one training step, at these medians",
        "",
        markdown_table(["method", "sum (s)", "/ LoRA r=4", f"/ OFT r={NBLOCKS}"], rows),
    ]
    return "\n".join(lines) + "\n\n"


def section_name(shapes: str, device: str, bf16: bool) -> str:
    """The markers a run writes between: the CPU's per shape set (fp32), CUDA's with a suffix per precision."""
    if device == "cpu":
        return SECTIONS[shapes]
    return f"{SECTIONS[shapes]}_cuda{'_bf16' if bf16 else ''}"


def device_words(device: str, bf16: bool) -> str:
    """'' on the CPU in fp32 (the titles as they were), else where and in what precision, for a title."""
    if device == "cpu":
        return " (bf16 autocast)" if bf16 else ""
    return f" on CUDA ({torch.cuda.get_device_name()}, {'bf16 autocast' if bf16 else 'fp32'})"


def cuda_note(device: str) -> str:
    if device != "cuda":
        return ""
    return (
        f" Each call is timed from `torch.cuda.synchronize()` to `torch.cuda.synchronize()` (kernel launches "
        f"included); torch {torch.__version__}, CUDA {torch.version.cuda}, TF32 for fp32 matmuls "
        f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}."
    )


def command_flags(args: argparse.Namespace) -> str:
    flags = "" if args.shapes == "sd" else f" --shapes {args.shapes}"
    flags += "" if args.device == "cpu" else f" --device {args.device}"
    return flags + (" --bf16" if args.bf16 else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case (median over rounds)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method per round")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument(
        "--shapes",
        choices=sorted(SHAPE_SETS),
        default="sd",
        help="sd: SD at 512 px (the first table of docs/benchmarks.md); sdxl: SDXL base at 1024 px; sd3: SD3.5 "
        "Medium's image- and text-side projections at 1024 px; flux: one FLUX.1-width projection (the last three: "
        "their own sections in docs/benchmarks.md)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"{THREADS_HELP}; with --shapes sd the default is torch's own, as that table was measured",
    )
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    check_device_arguments(parser, args)
    section = section_name(args.shapes, args.device, args.bf16)
    paths = [DOCS]
    if not args.no_write:
        missing = [str(path.relative_to(ROOT)) for path in paths if f"<!-- {section}:begin -->" not in path.read_text()]
        if missing:  # before the timing, not after it
            parser.error(f"{', '.join(missing)} has no {section} markers: add them, or pass --no-write")
    threads = args.threads if args.threads is not None else (None if args.shapes == "sd" else 1)
    if threads is not None:
        torch.set_num_threads(threads)
    loads: list[tuple[float, float, float]] = []
    results = {
        case: run_case(case, args.rounds, args.repeats, args.shapes, loads, args.device, args.bf16)
        for case in SHAPE_SETS[args.shapes]
    }
    tables, checks = table(results, REFERENCES[args.shapes], args.device)
    goals = "Goals (issue 2)"
    where = device_words(args.device, args.bf16)
    if args.shapes == "sd":
        title = f"### One projection{where}: GSOFT vs PEFT LoRA / OFT ({machine_line()})"
        shapes = ""
    elif args.shapes == "flux":
        title = (
            f"### One projection{where} at FLUX.1's width (3072, 4096 image + 512 text tokens): GSOFT vs PEFT LoRA "
            f"r=16 / OFT ({machine_line()})"
        )
        shapes = (
            " One nn.Linear(3072, 3072) with bias, x of shape (1, 4608, 3072): a 1024 px latent's 64x64 = 4096 image "
            "tokens and 512 T5 tokens side by side, as a FLUX.1 single-stream block's to_q / to_k / to_v sees them "
            "(its 19 double-stream blocks run the same tokens through two Linears, to_* on the image and add_* on "
            "the text). The input requires grad (it comes from earlier adapted blocks). 'PEFT LoRA r=16' is "
            "`LoraConfig(r=16, lora_alpha=16)`; 'PEFT OFT r=32' is 32 blocks of 96 and 'PEFT OFT r=16' 16 blocks "
            "of 192, GSOFT r=32's parameter count (`OFTConfig(r=..., oft_block_size=0)`, exact Cayley); GSOFT r=32 "
            "is 2 x 32 blocks of 96 with its scale vector, in the trainer's default forward_mode 'auto' and forced "
            "to each side; Double GSOFT r=32 adds the same on the output side."
        )
        goals = "Issue 2's bound, 1.10x (set there against LoRA r=4 and OFT r=32 on SD), against LoRA r=16 here"
    elif args.shapes == "sd3":
        title = (
            f"### One projection{where} at SD3.5 Medium's width (1536, 1024 px): GSOFT vs PEFT LoRA r=16 / OFT "
            f"({machine_line()})"
        )
        shapes = (
            " One nn.Linear(1536, 1536) with bias, batch 1: 4096 tokens (a 1024 px latent's 64x64 image tokens, as "
            "a joint block's to_q / to_k / to_v / to_out.0 see them) and 333 tokens (77 CLIP + 256 T5, as its "
            "add_q_proj / add_k_proj / add_v_proj / to_add_out see them). The input requires grad. 'PEFT OFT r=32' "
            "is 32 blocks of 48 and 'PEFT OFT r=16' 16 blocks of 96, GSOFT r=32's parameter count (`OFTConfig(r=..., "
            "oft_block_size=0)`, exact Cayley); GSOFT r=32 is 2 x 32 blocks of 48 with its scale vector."
        )
        goals = "Issue 2's bound, 1.10x (set there against LoRA r=4 and OFT r=32 on SD), against LoRA r=16 here"
    else:
        title = f"### One projection{where} at SDXL's shapes (1024 px): GSOFT vs PEFT LoRA / OFT ({machine_line()})"
        shapes = (
            " Shapes of one 1024 px latent (batch 1, tokens flattened into rows as in the SD table, whose 8192 and "
            "512 tokens are two 512 px latents): self- and cross-attention to_q / to_k / to_v / to_out.0 at 64x64 "
            "= 4096 tokens x 640 and 32x32 = 1024 tokens x 1280, and cross-attention to_k / to_v from the 77 text "
            "tokens, 2048 wide (both text encoders), to 640 and 1280. The text needs no gradient (frozen text "
            "encoders), so those rows time the adapters' own backward only. 'PEFT OFT r=32' is 32 blocks per "
            "layer (`OFTConfig(r=32, oft_block_size=0)`, exact Cayley)."
        )
    body = (
        f"{title}\n\n"
        f"Written by `benchmarks/bench_layer_speed.py{command_flags(args)}`: "
        f"forward + backward of one projection with a dense random "
        f"output gradient, medians of {args.rounds} interleaved rounds of {args.repeats} calls each.{shapes}"
        f"{cuda_note(args.device)}\n\n"
        + tables
        + unet_sum(results)
        + f"\n{goals}:\n\n"
        + "\n".join(f"- {check}" for check in checks)
        + f"\n\nMeasured with {load_line(loads)}.\n"
    )
    print(body)
    if not args.no_write:
        for path in paths:
            replace_section(path, section, body)


if __name__ == "__main__":
    main()
