"""--profile: where GSOFT's extra step time and memory go on the UNet.

Three views of LoRA r=4, GSOFT r=32 and Double GSOFT r=64: forward + backward of one projection per distinct shape
the UNet calls (and of parts of the GSOFT layer), timed in interleaved rounds; torch.profiler's self-CPU time by op
over a whole step; what autograd keeps inside one projection, read from the graph.
"""

from __future__ import annotations

import argparse
import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import (
    DOUBLE,
    GSOFT,
    LORA,
    adapted_linear,
    apply_method,
    build_unet,
    peft_linear,
    projection_linears,
    shared_copy,
)
from benchmarks.measure import interleaved, saved_in_graph
from benchmarks.report import load_line, machine_line, markdown_table
from benchmarks.unet_step.step import Batch, StepRunner, make_batch


def projection_shapes(model: nn.Module, runner: StepRunner) -> list[tuple[str, int, int, int]]:
    """(name, tokens, in, out) of every to_q / to_k / to_v / to_out.0 call in one forward."""
    calls = []
    hooks = [
        linear.register_forward_hook(
            lambda mod, inp, out, name=name: calls.append(
                (name, inp[0].numel() // inp[0].shape[-1], *mod.weight.T.shape)
            )  # noqa: E501
        )
        for name, linear in projection_linears(model)
    ]
    with torch.no_grad():
        runner.forward_loss()
    for hook in hooks:
        hook.remove()
    return calls


def _layer_variants(linear: nn.Linear) -> dict[str, nn.Module]:
    """The frozen layer, then LoRA r=4, GSOFT r=32 (auto and each side) and Double GSOFT r=64 on copies of it."""
    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants: dict[str, nn.Module] = {"frozen": nn.Sequential(linear)}
        variants["LoRA r=4"] = peft_linear(linear, LoraConfig(r=4, target_modules=["0"]))
        for mode in ("auto", "activation", "weight"):
            variants[f"GSOFT r=32 {mode}"] = adapted_linear(linear, mode, method="gsoft", nblocks=32)
        variants["Double GSOFT r=64 auto"] = adapted_linear(linear, "auto", method="double_gsoft", nblocks=64)
    return variants


def _backward_fn(fn: Callable[[], torch.Tensor], zero: Callable[[], None]) -> Callable[[], None]:
    """Forward + backward of ``fn`` with a fixed dense random output gradient, as inside the UNet (``sum()`` would
    hand every layer an expanded all-ones gradient, which makes copies of it look free)."""
    grads: dict[torch.Size, torch.Tensor] = {}

    def run() -> None:
        zero()
        out = fn()
        if out.shape not in grads:
            generator = torch.Generator().manual_seed(0)
            grads[out.shape] = torch.randn(out.shape, generator=generator).to(out.dtype)
        out.backward(grads[out.shape])

    return run


def layer_profile(base: nn.Module, batch: Batch, rounds: int) -> str:
    """Forward + backward of one projection per distinct (tokens, in, out): LoRA r=4 vs GSOFT, and GSOFT's parts.

    Parts of the GSOFT r=32 layer, each forward + backward alone: the Cayley solve of its blocks
    (``orthogonal_factors``) and the frozen matmul of the rotated activations (``gs_linear``, the node the
    activation side runs, without the scale vector; minus the frozen column, what the rotation costs); the rest of
    the layer's extra time over the frozen layer is the weight side's transform and weight gradient, the scale
    vector and glue.
    """
    from dreambooth_gs.gs import functional as gsf

    calls = projection_shapes(base, StepRunner(base, [], batch, False))
    shapes: dict[tuple[int, int, int], int] = {}
    for _, tokens, d_in, d_out in calls:
        shapes[(tokens, d_in, d_out)] = shapes.get((tokens, d_in, d_out), 0) + 1
    rows, totals, labels = [], {}, []
    for (tokens, d_in, d_out), count in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        torch.manual_seed(0)
        linear = nn.Linear(d_in, d_out).requires_grad_(False)
        x = torch.randn(tokens, d_in, requires_grad=True)
        variants = _layer_variants(linear)
        gsoft = variants["GSOFT r=32 auto"][0]
        with torch.enable_grad():
            sides = [variants[k][0].forward_side(x) for k in ("GSOFT r=32 auto", "Double GSOFT r=64 auto")]

        def zero_all(x: torch.Tensor = x, modules: tuple[nn.Module, ...] = ()) -> None:
            x.grad = None
            for module in modules:
                module.zero_grad(set_to_none=True)

        zero_all = functools.partial(zero_all, modules=tuple(variants.values()))

        fns = {label: _backward_fn(lambda m=module, x=x: m(x), zero_all) for label, module in variants.items()}
        factors = {k: v.detach().requires_grad_() for k, v in gsoft.orthogonal_factors().items()}
        fns["GSOFT r=32: Cayley"] = _backward_fn(
            lambda g=gsoft: torch.cat([f.flatten() for f in g.orthogonal_factors().values()]), zero_all
        )
        fns["GSOFT r=32: W Q x"] = _backward_fn(
            lambda f=factors, x=x, w=linear.weight: gsf.gs_linear(x, f["gsoft_L"], f["gsoft_R"], w), zero_all
        )
        samples, _ = interleaved(fns, rounds=rounds, warmup=2, log=None)
        medians = {label: s.wall_median * 1e3 for label, s in samples.items()}
        labels = list(fns)
        for label, ms in medians.items():
            totals[label] = totals.get(label, 0.0) + ms * count
        rows.append([f"{tokens} x {d_in} -> {d_out}", str(count), *[f"{medians[k]:.2f}" for k in labels], *sides])
    total_row = [f"**{totals[label]:.0f}**" for label in labels]
    rows.append(["**sum over the UNet's calls**", str(len(calls)), *total_row, "", ""])
    header = ["tokens x in -> out", "calls", *[f"{label} (ms)" for label in labels]]
    header += ["GSOFT auto side", "Double auto side"]
    return markdown_table(header, rows)


def op_times(runners: dict[str, StepRunner], repeats: int = 3) -> dict[str, dict[str, tuple[int, float]]]:
    """Per runner, torch.profiler's (calls, self-CPU ms) by op for one step: the minimum over ``repeats`` profiled
    steps, runners interleaved (a single profiled step moves by +-10% on this shared machine)."""
    from torch.profiler import ProfilerActivity, profile

    best: dict[str, dict[str, tuple[int, float]]] = {label: {} for label in runners}
    for runner in runners.values():
        runner()  # warm-up
    for _ in range(repeats):
        for label, runner in runners.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runner()
            for event in prof.key_averages():
                ms = event.self_cpu_time_total / 1e3
                previous = best[label].get(event.key)
                if previous is None or ms < previous[1]:
                    best[label][event.key] = (event.count, ms)
    return best


def op_diff_table(runners: dict[str, StepRunner], reference: str, top: int = 14) -> str:
    """Self-CPU time by op for each runner; the ops that differ most from ``reference``."""
    times = op_times(runners)
    others = [label for label in runners if label != reference]
    ops = set().union(*times.values())

    def ms(label: str, op: str) -> float:
        return times[label].get(op, (0, 0.0))[1]

    ranked = sorted(ops, key=lambda op: -max(abs(ms(o, op) - ms(reference, op)) for o in others))[:top]
    rows = []
    for op in ranked:
        row = [op]
        for label in runners:
            calls, value = times[label].get(op, (0, 0.0))
            row.append(f"{value:.0f} ({calls})")
        row += [f"{ms(o, op) - ms(reference, op):+.0f}" for o in others]
        rows.append(row)
    totals = {label: sum(v for _, v in times[label].values()) for label in runners}
    rows.append(
        [
            "**all ops** (sum of the per-op minima)",
            *[f"**{totals[k]:.0f}**" for k in runners],
            *[f"{totals[o] - totals[reference]:+.0f}" for o in others],
        ]
    )
    header = ["op", *[f"{label}: ms (calls)" for label in runners], *[f"{o} - {reference}" for o in others]]
    return markdown_table(header, rows)


def saved_layer_table(shapes: list[tuple[int, int, int]]) -> str:
    rows = []
    for tokens, d_in, d_out in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(d_in, d_out).requires_grad_(False)
        x = torch.randn(tokens, d_in, requires_grad=True)
        variants = _layer_variants(linear)
        for label in ("LoRA r=4", "GSOFT r=32 auto", "Double GSOFT r=64 auto"):
            entries = saved_in_graph(variants[label], x)
            listing = "; ".join(f"{name} {list(shape)} {mib:.2f}" for name, shape, mib in entries)
            total = sum(mib for _, _, mib in entries)
            rows.append([f"{tokens} x {d_in} -> {d_out}", label, f"{total:.2f}", listing])
    return markdown_table(["layer", "adapter", "saved MiB", "saved tensors (op.attribute [shape] MiB)"], rows, "llrl")


def profile_body(args: argparse.Namespace) -> str:
    """--profile: where GSOFT's extra time and memory go, for its own section."""
    base = build_unet(args.size)
    batch = make_batch(args.batch, args.latent, "cpu")
    runners = {}
    for method in (LORA[0], GSOFT[0], DOUBLE[0]):
        model = shared_copy(base)
        runners[method.label] = StepRunner(model, apply_method(model, method), batch, args.bf16)
    print("per-layer timings ...", flush=True)
    layers = layer_profile(base, batch, rounds=max(3, args.rounds))
    print("op profiles ...", flush=True)
    ops = op_diff_table(runners, LORA[0].label)
    saved = saved_layer_table([(args.latent**2, 320, 320), ((args.latent // 2) ** 2, 640, 640), (77, 1024, 320)])
    return "\n".join(
        [
            f"### Where GSOFT's extra step time and memory go ({args.size} UNet, {args.latent}x{args.latent} latents, "
            f"batch {args.batch}, {machine_line()})",
            "",
            "Written by `benchmarks/bench_unet_step.py --profile`. First, every distinct projection shape of this "
            "UNet at this resolution: forward + backward of one layer alone (input requires grad, a fixed dense "
            "random output gradient), medians of interleaved rounds, and the sum over the UNet's 128 projection "
            "calls. The two 'GSOFT r=32:' columns time parts of the GSOFT layer alone: its Cayley solve and the "
            "activation-side rotation. 'auto side' is what `forward_mode='auto'` chose (`layer.forward_side(x)`).",
            "",
            layers,
            "",
            "Self-CPU time by op over one whole training step (torch.profiler; per op the minimum over 3 "
            "profiled steps, methods interleaved), the ops that differ most from LoRA r=4:",
            "",
            ops,
            "",
            "What autograd keeps for backward inside one projection (read from the graph's `_saved_*` "
            "attributes; frozen weights and adapter parameters excluded). Custom autograd Functions keep their "
            "tensors where these attributes do not show them: GSOFT's activation-side node (`_GSRotatedLinear`) "
            "keeps its input and `R x` (tokens x in_features each) and, with the scale vector, the unscaled "
            "output (tokens x out_features), which the whole-step saved-tensor column of the step table does "
            "count (through saved-tensor hooks):",
            "",
            saved,
            "",
            f"Profiled with {load_line()}.",
        ]
    )
