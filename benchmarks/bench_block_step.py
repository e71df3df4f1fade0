"""One transformer block of each family people train now, one training step (forward, backward, AdamW), every
adapter side by side in one process: issue 34's whole-block benchmark.

Blocks (random weights, built with diffusers' own classes from the real configs in configs/, batch 1, 1024 px):

- ``sdxl``: an SDXL BasicTransformerBlock at level 2 (the first of ``down_blocks[1]``): 4096 tokens x 640,
  self-attention, cross-attention to 77 x 2048 text tokens (frozen text encoders: no gradient), feed-forward;
  adapted: to_q / to_k / to_v / to_out.0 of both attentions (the trainer's SD / SDXL default).
- ``sd3``: an SD3.5 Medium JointTransformerBlock (width 1536; block 13, the first with neither MMDiT-X's second
  self-attention nor the last block's context_pre_only): 4096 image + 333 text tokens (77 CLIP + 256 T5); adapted:
  the SD3 family's default targets (image- and text-side attention projections).
- ``flux``: a FLUX.1-dev FluxSingleTransformerBlock (width 3072): 512 text + 4096 image tokens with the rotary
  embeddings FluxTransformer2DModel.forward passes (FluxPosEmbed of the text ids, zeros, and the 64 x 64 image
  grid's ids); adapted: attn.to_q / to_k / to_v (what the family's default targets match in a single block).

The block's hidden states require grad (adapted blocks upstream need theirs), so the frozen floor includes the
input-gradient matmuls; text states coming from an earlier block (SD3, Flux) require grad too. Each output receives
a fixed dense random gradient (not ``.sum()``). Every method trains a structural copy of ONE frozen block (shared
weights, :func:`benchmarks.common.shared_copy`) through the trainer's own injection
(:func:`benchmarks.common.apply_method`): the frozen floor, PEFT LoRA r=16 (lora_alpha 16), PEFT OFT with 16 and 32
blocks (exact Cayley, as the trainer's OFT baseline), GSOFT r=32 and Double GSOFT r=32 (forward_mode 'auto').
One timed call: forward, backward, AdamW step over the trainable parameters, zero_grad. Medians over interleaved
rounds, the order rotating each round (:func:`benchmarks.measure.interleaved`), after one untimed warm-up call each;
ratios are medians of per-round ratios.

The arithmetic limit (issue 34): with r blocks each block-diagonal factor costs 1/r of the frozen matmul, so a GS
method's least time is floor x (1 + factors / r), factors 3 for GSOFT, 6 for Double GSOFT, 1.5 for OFT at its block
count. Applied to the whole block's floor it is generous: attention and feed-forward carry no adapter. The table's
note gives the adapted projections' share of the floor's FLOPs (counted on the meta device) and the tighter limit.

``--compile`` adds torch.compile'd (inductor) rows of the frozen floor, GSOFT r=32 and PEFT LoRA r=16 (the compiled
rows' time above the floor is the compiled floor's); their first call (the compile) and its graph breaks are
reported apart, left out of the medians. ``--quick`` divides every token count by 16 and runs 1 round without
writing (a smoke run). Writes into docs/benchmarks.md between the ``block_step_<block>`` markers.

    python benchmarks/bench_block_step.py --block sdxl|sd3|flux|all [--rounds 5] [--threads 1] [--compile] [--no-write]
    python benchmarks/bench_block_step.py --block all --quick
    python benchmarks/bench_block_step.py --device cuda --bf16 --block all   # on a GPU: its own sections

``--device cuda`` puts the block and its inputs on the GPU and waits for the device after each timed call;
``--bf16`` runs the forward under bf16 autocast (trainable parameters stay fp32), print-only on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    TARGETS,
    Method,
    apply_method,
    build_transformer,
    fill_on,
    projection_linears,
    shared_copy,
    transformer_config,
    unet_config,
)
from benchmarks.measure import (  # noqa: E402
    THREADS_HELP,
    Samples,
    add_device_arguments,
    check_device_arguments,
    interleaved,
    per_round_ratio,
    synchronize,
)
from benchmarks.report import DOCS, load_line, machine_line, markdown_table, replace_section  # noqa: E402
from dreambooth_gs import families  # noqa: E402
from dreambooth_gs.methods.injection import adapter_layers  # noqa: E402

BLOCK_NAMES = ("sdxl", "sd3", "flux")
QUICK_SCALE = 16  # --quick: token counts divided by this

FLOOR = Method("frozen floor (no adapter, input grad)", "floor")
LORA = Method("PEFT LoRA r=16", "lora", {"rank": 16})  # LoraConfig(r=16, lora_alpha=16), as make_peft_config
OFT_16 = Method("PEFT OFT, 16 blocks", "oft", {"nblocks": 16})  # GSOFT r=32's parameter count
OFT_32 = Method("PEFT OFT, 32 blocks", "oft", {"nblocks": 32})
GSOFT = Method("GSOFT r=32", "gsoft", {"nblocks": 32})
DOUBLE = Method("Double GSOFT r=32", "double_gsoft", {"nblocks": 32})
METHODS = [FLOOR, LORA, OFT_16, OFT_32, GSOFT, DOUBLE]
COMPILED = [FLOOR, GSOFT, LORA]  # --compile: these again, torch.compile'd (their floor: the compiled frozen block)
# Issue 34's arithmetic: block-diagonal matmuls per frozen forward + backward pair, in units of 1 / (block count)
LIMIT_FACTORS = {"gsoft": 3.0, "double_gsoft": 6.0, "oft": 1.5}
LIMIT_SLACK = 1.5  # the goal: time above the floor within 1.5x of the arithmetic's


def compiled_label(method: Method) -> str:
    return f"{method.label}, torch.compile"


COMPILED_LABELS = {compiled_label(m): m for m in COMPILED}


# ---------------------------------------------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Block:
    """One frozen random-weight block, its inputs and the fixed gradients its outputs receive."""

    name: str
    title: str  # what the block is and sees, for the table's title
    meta: nn.Module  # the block on the meta device (FLOP counts)
    targets: tuple[str, ...]  # matched like the trainer's target_modules
    inputs: dict[str, Any]  # keyword arguments of the block's forward
    tokens: str  # the token counts, in words
    grads: list[torch.Tensor] = field(default_factory=list)  # one per output, set by :func:`build_block`
    module: nn.Module = field(init=False)  # the random-weight CPU block

    def __post_init__(self) -> None:
        self.meta.requires_grad_(False)
        self.module = fill_random(self.meta)

    @property
    def leaves(self) -> list[torch.Tensor]:
        """The inputs whose gradient the step computes (cleared before each call)."""
        return [t for t in self.inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def meta_inputs(self) -> dict[str, Any]:
        """The inputs as meta tensors (shapes and requires_grad only), for :attr:`meta`."""

        def on_meta(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return torch.empty_like(value, device="meta").requires_grad_(value.requires_grad)
            return tuple(on_meta(v) for v in value) if isinstance(value, tuple) else value

        return {key: on_meta(value) for key, value in self.inputs.items()}

    def outputs(self, module: nn.Module, inputs: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """``module``'s outputs on the block's inputs (or on ``inputs``), the None ones left out."""
        out = module(**(self.inputs if inputs is None else inputs))
        return [out] if isinstance(out, torch.Tensor) else [o for o in out if o is not None]


def fill_random(meta: nn.Module, seed: int = 0) -> nn.Module:
    """A CPU copy of the meta-device module ``meta`` with build_unet's fill (:func:`benchmarks.common.fill_on`),
    frozen."""
    if any(True for _ in meta.buffers()):
        raise ValueError(f"{type(meta).__name__} has buffers, which to_empty would leave uninitialised")
    return fill_on(copy.deepcopy(meta), "cpu", seed).requires_grad_(False)


def scaled(tokens: int, scale: int) -> int:
    return max(1, tokens // scale)


def grid_side(tokens: int) -> int:
    """The image grid's side for ``tokens`` image tokens (a square latent)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} image tokens are not a square grid; use a --tokens-scale that keeps them square")
    return side


def sdxl_block(scale: int, batch: int, generator: torch.Generator) -> Block:
    from diffusers import UNet2DConditionModel

    config = unet_config("sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    module = unet.down_blocks[1].attentions[0].transformer_blocks[0]
    width, text_width = config["block_out_channels"][1], config["cross_attention_dim"]
    image, text = scaled(4096, scale), scaled(77, scale)
    return Block(
        "sdxl",
        f"SDXL BasicTransformerBlock, level 2 (width {width}, cross-attention from {text_width})",
        module,
        TARGETS,
        {
            "hidden_states": torch.randn(batch, image, width, generator=generator).requires_grad_(),
            "encoder_hidden_states": torch.randn(batch, text, text_width, generator=generator),  # frozen text
        },
        f"{image} image tokens, {text} text tokens (no gradient)",
    )


def sd3_block(scale: int, batch: int, generator: torch.Generator) -> Block:
    _, config = transformer_config("sd35_medium")
    model = build_transformer("sd35_medium")
    index = next(i for i in range(config["num_layers"] - 1) if i not in config["dual_attention_layers"])
    module = model.transformer_blocks[index]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    image, text = scaled(4096, scale), scaled(77 + 256, scale)
    return Block(
        "sd3",
        f"SD3.5 Medium JointTransformerBlock {index} of {config['num_layers']} (width {width})",
        module,
        families.get("sd3").default_targets,
        {
            "hidden_states": torch.randn(batch, image, width, generator=generator).requires_grad_(),
            "encoder_hidden_states": torch.randn(batch, text, width, generator=generator).requires_grad_(),
            "temb": torch.randn(batch, width, generator=generator),  # timestep + pooled text: frozen embedders
        },
        f"{image} image + {text} text tokens (77 CLIP + 256 T5 at full size), both requiring grad",
    )


def flux_rotary(image: int, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) as FluxTransformer2DModel.forward builds them: FluxPosEmbed of cat(txt_ids, img_ids), text ids
    zero, image ids (0, row, column) of the packed latent grid (FluxPipeline._prepare_latent_image_ids)."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    _, config = transformer_config("flux1_dev")
    side = grid_side(image)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] += torch.arange(side)[:, None]
    img_ids[..., 2] += torch.arange(side)[None, :]
    ids = torch.cat([torch.zeros(text, 3), img_ids.reshape(image, 3)])  # (text + image, 3)
    return FluxPosEmbed(theta=10000, axes_dim=config["axes_dims_rope"])(ids)


def flux_block(scale: int, batch: int, generator: torch.Generator) -> Block:
    _, config = transformer_config("flux1_dev")
    model = build_transformer("flux1_dev")
    module = model.single_transformer_blocks[0]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    image, text = scaled(4096, scale), scaled(512, scale)
    return Block(
        "flux",
        f"FLUX.1-dev FluxSingleTransformerBlock (width {width})",
        module,
        families.get("flux").default_targets,
        {
            "hidden_states": torch.randn(batch, image, width, generator=generator).requires_grad_(),
            "encoder_hidden_states": torch.randn(batch, text, width, generator=generator).requires_grad_(),
            "temb": torch.randn(batch, width, generator=generator),  # timestep + guidance + pooled: frozen
            "image_rotary_emb": flux_rotary(image, text),
        },
        f"{text} text + {image} image tokens, both requiring grad, with rotary embeddings",
    )


BUILDERS: dict[str, Callable[[int, int, torch.Generator], Block]] = {
    "sdxl": sdxl_block,
    "sd3": sd3_block,
    "flux": flux_block,
}


def build_block(name: str, scale: int = 1, batch: int = 1, seed: int = 0, device: str = "cpu") -> Block:
    """The block ``name`` with its inputs and a fixed dense random gradient for each output, on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    block = BUILDERS[name](scale, batch, generator)
    with torch.no_grad():
        shapes = [out.shape for out in block.outputs(block.meta, block.meta_inputs())]  # shapes only
    block.grads = [torch.randn(shape, generator=generator).to(device) for shape in shapes]
    if device != "cpu":
        block.module.to(device)
        block.inputs = {key: _to(value, device) for key, value in block.inputs.items()}
    return block


def _to(value: Any, device: str) -> Any:
    """``value`` (a tensor, a tuple of them, or anything else) on ``device``; a leaf stays a leaf."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device).requires_grad_(value.requires_grad)
    return tuple(_to(v, device) for v in value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------------------------
# One step, and the rounds
# ---------------------------------------------------------------------------------------------------------------


class BlockStep:
    """forward (under bf16 autocast with ``bf16``), backward with the block's fixed output gradients, AdamW over
    ``params`` (none: the floor), zero_grad; on CUDA it returns once the device has finished (a timed call must)."""

    def __init__(self, block: Block, module: nn.Module, params: list[nn.Parameter], bf16: bool = False) -> None:
        self.block, self.module, self.params, self.bf16 = block, module, params, bf16
        self.optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
        self.device = block.grads[0].device

    def __call__(self) -> None:
        for leaf in self.block.leaves:
            leaf.grad = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outputs = self.block.outputs(self.module)
        torch.autograd.backward(outputs, [g.to(o.dtype) for o, g in zip(outputs, self.block.grads)])
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)


@dataclass
class Measured:
    block: Block
    samples: dict[str, Samples]
    loads: list[tuple[float, float, float]]
    params: dict[str, int]  # trainable parameters per row
    compile_s: dict[str, float]  # first (compiling) call of each compiled row, seconds
    graph_breaks: dict[str, int]  # dynamo's graph breaks in that call
    adapted: list[str]  # the adapted module names
    share: float  # the adapted projections' share of the floor's FLOPs
    floor_gflop: float


def floor_flops(block: Block) -> tuple[float, float]:
    """(GFLOP of the floor's forward + backward, the targets' share of them), counted on the meta device.

    FlopCounterMode attributes backward FLOPs to the wrong modules, so a target's share is its forward FLOPs, twice
    when its input requires grad (the frozen floor's backward of a Linear is the input-gradient matmul alone).
    """
    from torch.utils.flop_counter import FlopCounterMode

    input_grad: dict[str, bool] = {}
    hooks = [
        linear.register_forward_pre_hook(lambda _, args, name=name: input_grad.update({name: args[0].requires_grad}))
        for name, linear in projection_linears(block.meta, block.targets)
    ]
    with FlopCounterMode(display=False) as counter:
        outs = block.outputs(block.meta, block.meta_inputs())
        forward = counter.get_flop_counts()
        forward = {name: sum(forward.get(f"{type(block.meta).__name__}.{name}", {}).values()) for name in input_grad}
        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
    for hook in hooks:
        hook.remove()
    adapted = sum(flops * (1 + input_grad[name]) for name, flops in forward.items())
    total = counter.get_total_flops()
    return total / 1e9, adapted / total


def runners_for(
    block: Block, compile_rows: bool, bf16: bool = False
) -> tuple[dict[str, BlockStep], dict[str, int], list[str]]:
    runners, params, adapted = {}, {}, []
    rows = [(m, False) for m in METHODS] + ([(m, True) for m in COMPILED] if compile_rows else [])
    for method, compiled in rows:
        model = shared_copy(block.module)
        trainable = apply_method(model, method, block.targets)
        if method is GSOFT and not compiled:
            adapted = sorted(name for name, _ in adapter_layers(model))
        label = compiled_label(method) if compiled else method.label
        if compiled:
            model = torch.compile(model, backend="inductor")
        runners[label] = BlockStep(block, model, trainable, bf16)
        params[label] = sum(p.numel() for p in trainable)
    return runners, params, adapted


def measure_block(name: str, args: argparse.Namespace) -> Measured:
    print(f"building the {name} block (tokens / {args.tokens_scale}) ...", flush=True)
    block = build_block(name, args.tokens_scale, args.batch, device=args.device)
    gflop, share = floor_flops(block)
    runners, params, adapted = runners_for(block, args.compile, args.bf16)
    expected = sorted(n for n, _ in projection_linears(block.module, block.targets))
    if adapted != expected:
        raise AssertionError(f"GSOFT adapted {adapted}, the targets match {expected}")
    compile_s, breaks = {}, {}
    for label, runner in runners.items():  # the warm-up call; a compiled row's is its compile
        if label not in COMPILED_LABELS:
            runner()
            continue
        counters = torch._dynamo.utils.counters
        counters.clear()
        start = time.perf_counter()
        runner()
        compile_s[label] = time.perf_counter() - start
        breaks[label] = sum(counters["graph_break"].values())
    print(f"{len(runners)} rows warmed up; {args.rounds} interleaved rounds", flush=True)
    samples, loads = interleaved(runners, rounds=args.rounds, warmup=0)
    return Measured(block, samples, loads, params, compile_s, breaks, adapted, share, gflop)


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def limit_overhead(method: Method) -> float | None:
    """Issue 34's arithmetic above the floor, as a fraction of it (None: no limit stated for this method)."""
    factor = LIMIT_FACTORS.get(method.kind)
    return None if factor is None else factor / method.options["nblocks"]


def rows_of(measured: Measured) -> list[list[str]]:
    """The table's rows; a compiled row's time above the floor and limit are the compiled floor's."""
    samples = measured.samples
    methods = {m.label: m for m in METHODS} | COMPILED_LABELS
    rows = []
    for label in samples:
        method = methods[label]
        floor = compiled_label(FLOOR) if label in COMPILED_LABELS and label != compiled_label(FLOOR) else FLOOR.label
        floor_ms = samples[floor].wall_median * 1e3
        above = per_round_ratio(samples, label, floor) - 1
        limit = limit_overhead(method)
        if limit is None:
            limit_text = within = "-"
        else:
            limit_text = f"{floor_ms * (1 + limit):.1f} (+{limit:.1%})"
            within = "yes" if above <= LIMIT_SLACK * limit else f"no ({above / limit:.1f} x)"
        rows.append(
            [
                label,
                f"{measured.params[label] / 1e6:.3f}M",
                f"{samples[label].wall_median * 1e3:.1f}",
                f"{per_round_ratio(samples, label, LORA.label):.2f}",
                f"{per_round_ratio(samples, label, OFT_16.label):.2f}",
                "-" if label == FLOOR.label else f"{above:+.1%}",
                limit_text,
                within,
            ]
        )
    return rows


HEADER = [
    "method",
    "trainable",
    "median ms",
    "/ LoRA r=16",
    "/ OFT 16 blocks",
    "above floor",
    "arithmetic limit ms (above floor)",
    f"within {LIMIT_SLACK}x of the limit's overhead?",
]


def section_body(measured: Measured, args: argparse.Namespace) -> str:
    block = measured.block
    flags = f" --block {block.name} --rounds {args.rounds}" + (" --compile" if args.compile else "")
    flags += f" --tokens-scale {args.tokens_scale}" if args.tokens_scale != 1 else ""
    flags += f" --device {args.device}" if args.device != "cpu" else ""
    flags += " --bf16" if args.bf16 else ""
    precision = "bf16 autocast (fp32 parameters)" if args.bf16 else "fp32"
    where = f" on CUDA ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    gsoft_tight = GSOFT_FACTOR_TEXT.format(share=measured.share, limit=limit_overhead(GSOFT) * measured.share)
    lines = [
        f"### One training step of one {block.title}{where}: GSOFT vs PEFT LoRA / OFT ({machine_line()})",
        "",
        f"Written by `benchmarks/bench_block_step.py{flags}`: batch {args.batch}, {block.tokens}, {precision}; "
        f"forward, backward with fixed dense random output gradients, AdamW over the trainable parameters, "
        f"zero_grad; the medians of {args.rounds} interleaved rounds (order rotating; one untimed warm-up call "
        f"each), ratios the medians of per-round ratios. Adapted: {', '.join(measured.adapted)}. The floor trains "
        f"nothing but computes the input gradients ({measured.floor_gflop:.0f} GFLOP forward + backward). PEFT "
        f"LoRA r=16 is `LoraConfig(r=16, lora_alpha=16)`; PEFT OFT `OFTConfig(r=blocks, oft_block_size=0, "
        f"use_cayley_neumann=False)` (exact Cayley); GSOFT / Double GSOFT the trainer's injection, forward_mode "
        f"'auto'. Arithmetic limit: floor x (1 + factors / r), factors 3 (GSOFT), 6 (Double GSOFT), 1.5 (OFT at "
        f"its block count) (issue 34); 'no (N x)': the time above the floor is N times the "
        f"arithmetic's. {gsoft_tight} 'trainable' counts the elements of the trainable tensors (GSOFT "
        f"keeps whole b x b blocks and uses their skew-symmetric part, PEFT's OFT stores the upper triangles).",
        "",
        markdown_table(HEADER, rows_of(measured)),
        "",
    ]
    if measured.compile_s:
        compile_text = "; ".join(
            f"{label} {seconds:.1f} s, {measured.graph_breaks[label]} graph break(s)"
            for label, seconds in measured.compile_s.items()
        )
        lines += [
            f"torch.compile rows (inductor, the adapted block compiled whole): 'above floor' and the limit are the "
            f"compiled frozen block's (its own 'above floor': against the eager floor). First call (the compile, "
            f"left out of the medians; shorter when inductor's on-disk cache already holds the graphs): "
            f"{compile_text}.",
            "",
        ]
    lines.append(f"Measured with {load_line(measured.loads)}.")
    return "\n".join(lines) + "\n"


GSOFT_FACTOR_TEXT = (
    "Over the whole block's floor this limit is generous: the adapted projections do {share:.0%} of the floor's "
    "FLOPs (counted on the meta device), so over them alone GSOFT r=32's arithmetic is +{limit:.1%} of the floor."
)


# ---------------------------------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------------------------------


def section_name(block: str, device: str = "cpu", bf16: bool = False) -> str:
    """The markers a run writes between: the CPU's fp32 per block, CUDA's with a suffix per precision."""
    if device == "cpu":
        return f"block_step_{block}"
    return f"block_step_{block}_cuda{'_bf16' if bf16 else ''}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", choices=(*BLOCK_NAMES, "all"), default="all", help="which block (all: each)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (one step per row each)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--batch", type=int, default=1, help="latents per step")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add torch.compile'd (inductor) rows of the floor, GSOFT r=32 and PEFT LoRA r=16; their first call "
        "compiles and is reported apart",
    )
    add_device_arguments(parser)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: token counts / {QUICK_SCALE}, 1 round, --no-write",
    )
    parser.add_argument("--tokens-scale", type=int, default=1, help=argparse.SUPPRESS)  # token counts divided by
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens_scale = QUICK_SCALE if args.tokens_scale == 1 else args.tokens_scale
        args.rounds, args.no_write = 1, True
    if args.tokens_scale != 1 and not args.no_write:
        parser.error("--tokens-scale times other shapes than the section's: add --no-write")
    check_device_arguments(parser, args)
    args.blocks = BLOCK_NAMES if args.block == "all" else (args.block,)
    if not args.no_write:  # before the timing, not after it
        text = DOCS.read_text()
        names = [section_name(b, args.device, args.bf16) for b in args.blocks]
        missing = [name for name in names if f"<!-- {name}:begin -->" not in text]
        if missing:
            markers = ", ".join(f"<!-- {name}:begin --> / <!-- {name}:end -->" for name in missing)
            parser.error(f"docs/benchmarks.md lacks the markers {markers}: add them where the tables go, or --no-write")
    return args


def main(argv: list[str] | None = None) -> dict[str, Measured]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.blocks:
        measured = measure_block(name, args)
        body = section_body(measured, args)
        print(body, flush=True)
        if not args.no_write:
            replace_section(DOCS, section_name(name, args.device, args.bf16), body)
        results[name] = measured
    return results


if __name__ == "__main__":
    main()
