"""One optimizer step (forward, backward, AdamW) of the whole SD-2-base-architecture UNet, every adapter side by side.

One random-weight base UNet is built once; each method gets a structural copy sharing its frozen weights, with the
adapter injected into the copy. Methods are timed interleaved in one process after a warm-up step, the order
rotating each round; the table reports per-round ratios (method time / LoRA r=4 time in the same round, median over
rounds), wall and CPU medians. Memory per method: autograd-saved tensors of one step (in-process, parameters
excluded) and the peak RSS of a child process that builds the UNet and runs two steps of that method alone.

Default shapes fit a 2-core CPU: 32x32 latents (256 px), batch 1, cross-attention from 77 tokens of width 1024.
The paper's setting (GPU, 64x64 latents, batch 4, bf16) is ``--device cuda --latent 64 --batch 4 --bf16``, which
writes its own section.

    python benchmarks/bench_unet_step.py [--rounds 5] [--quick] [--no-write] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ALL_METHODS,
    BOFT,
    BY_LABEL,
    DOCS,
    DOUBLE,
    FLOOR,
    GSOFT,
    GSOFT_WEIGHT_SIDE_OUT,
    IMAGES,
    LORA,
    PEFT_BOFT,
    PEFT_OFT,
    REFERENCE,
    THREADS_HELP,
    Method,
    Samples,
    apply_method,
    build_unet,
    interleaved,
    load_line,
    machine_line,
    markdown_table,
    save_figure,
    shared_copy,
    timed,
)
from benchmarks.memory import status_kib  # noqa: E402
from benchmarks.report import replace_section  # noqa: E402

QUICK_METHODS = [FLOOR, LORA[0], GSOFT[0], DOUBLE[0], BOFT[0], PEFT_OFT, PEFT_BOFT]
QUICK_RSS_METHODS = [GSOFT[0]]
CONTEXT_TOKENS, CONTEXT_WIDTH = 77, 1024

# The side-by-side set of the paper's setting (64x64 latents, batch 4): PEFT's LoRA and OFT, the GS-core BOFT.
PAPER_METHODS = [FLOOR, LORA[0], PEFT_OFT, BOFT[0], GSOFT[0], GSOFT_WEIGHT_SIDE_OUT, DOUBLE[0]]
# The goals (issues 5 and 19), as (method, reference, largest allowed ratio).
TIME_GOALS = [(GSOFT[0], LORA[0], 1.05), (GSOFT[0], BOFT[0], 0.60), (DOUBLE[0], LORA[0], 1.15)]
SAVED_GOALS = [(GSOFT[0], LORA[0], 1.10), (DOUBLE[0], LORA[0], 1.20)]
RSS_GOAL = (GSOFT[0], LORA[0], 1.05)
# What the step table's columns mean, whichever way the steps were run.
MEASURES = (
    "Ratios are medians over rounds of (method / reference in the same round). Saved tensors: distinct storages "
    "autograd keeps for backward in one step (frozen weights excluded). Adapter state: parameters + gradients + "
    "AdamW moments."
)


# ---------------------------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    latents: torch.Tensor  # (batch, 4, s, s), requires grad: the floor's only gradient
    timesteps: torch.Tensor  # (batch,)
    context: torch.Tensor  # (batch, 77, 1024)
    target: torch.Tensor  # (batch, 4, s, s)


def make_batch(batch: int, latent: int, device: str, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, latent, latent, generator=generator)
    context = torch.randn(batch, CONTEXT_TOKENS, CONTEXT_WIDTH, generator=generator)
    target = torch.randn(batch, 4, latent, latent, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    to = {"device": device}
    return Batch(latents.to(**to).requires_grad_(), timesteps.to(**to), context.to(**to), target.to(**to))


class StepRunner:
    """forward, MSE loss in fp32, backward, AdamW over the method's trainable parameters (none for the floor)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], batch: Batch, bf16: bool) -> None:
        self.model, self.params, self.batch, self.bf16 = model, params, batch, bf16
        self.optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None

    def forward_loss(self) -> torch.Tensor:
        b = self.batch
        device_type = b.latents.device.type
        autocast = torch.autocast(device_type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            prediction = self.model(b.latents, b.timesteps, b.context).sample
        return F.mse_loss(prediction.float(), b.target)

    def __call__(self, pack_hook: Callable[[torch.Tensor], torch.Tensor] | None = None, backward: bool = True) -> float:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.batch.latents.grad = None
        hooks = contextlib.nullcontext()
        if pack_hook is not None:
            hooks = torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda tensor: tensor)
        with hooks:
            loss = self.forward_loss()
        if not backward:  # the forward alone (saved-tensor counts): the graph is freed with ``loss``
            return loss.item()
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        if self.batch.latents.device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()


def chosen_methods(args: argparse.Namespace) -> list[Method]:
    return QUICK_METHODS if args.quick else PAPER_METHODS if args.methods == "paper" else ALL_METHODS


def setting_line(args: argparse.Namespace) -> str:
    """The measured setting, for a section title: UNet, latents, batch, context, precision, device, machine."""
    return (
        f"{args.size} UNet, {args.latent}x{args.latent} latents, batch {args.batch}, cross-attention from "
        f"{CONTEXT_TOKENS} tokens of width {CONTEXT_WIDTH}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"{device_name(args.device)} ({machine_line()})"
    )


def device_name(device: str) -> str:
    return f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else device


def frozen_base(args: argparse.Namespace, device: str | None = None, fill: str = "uniform") -> nn.Module:
    """The random-weight base UNet; with --bf16 its frozen weights are bf16, as the trainer keeps them under mixed
    precision (fp32 weights under autocast would add a bf16 copy of every weight to the saved tensors)."""
    unet = build_unet(args.size, device=device or args.device, seed=0, fill=fill)
    return unet.to(torch.bfloat16) if args.bf16 else unet


def saved_tensor_bytes(runner: StepRunner, backward: bool = True) -> int:
    """Bytes of the distinct storages autograd saves for backward in one step, parameters and buffers excluded.

    The step is a real one (optimizer included), so this doubles as the warm-up step. ``backward=False`` runs the
    forward only: autograd saves everything during the forward, so the count is the same, at a third of the cost.
    """
    model = runner.model
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    runner(pack_hook=pack, backward=backward)
    return sum(storages.values())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters as stored (the frozen weights in every row's memory)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def adapter_state_bytes(params: list[nn.Parameter]) -> int:
    """Parameters + gradients + AdamW's two moments, fp32."""
    return 16 * sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------------------------
# Peak RSS, one child process per method
# ---------------------------------------------------------------------------------------------------------------


def rss_child(args: argparse.Namespace) -> None:
    """Build the UNet, reset the RSS high-water mark, run two steps of one method; print JSON."""
    method = BY_LABEL[args.rss_child]
    unet = frozen_base(args, device="cpu", fill="constant")
    params = apply_method(unet, method)
    runner = StepRunner(unet, params, make_batch(args.batch, args.latent, "cpu"), args.bf16)
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    for _ in range(2):  # the second step runs with AdamW's moments allocated
        runner()
    print(json.dumps({"rss_before_kib": before, "peak_kib": status_kib("VmHWM")}))


def child_command(flag: str, method: Method, args: argparse.Namespace) -> list[str]:
    """This script as a child process measuring ``method`` alone (``--rss-child`` / ``--saved-child`` /
    ``--step-child``), with the parent's UNet size, latents, batch, threads and precision."""
    command = [sys.executable, __file__, flag, method.label, "--size", args.size]
    command += ["--latent", str(args.latent), "--batch", str(args.batch), "--threads", str(args.threads)]
    return command + (["--bf16"] if args.bf16 else [])


def peak_rss(method: Method, args: argparse.Namespace) -> dict[str, int]:
    done = subprocess.run(child_command("--rss-child", method, args), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"RSS child for {method.label} failed:\n{done.stderr[-2000:]}")
    print(f"  peak RSS measured: {method.label}", flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_all(methods: list[Method], args: argparse.Namespace, workers: int = 2) -> dict[str, dict[str, int]]:
    """Peak RSS per method, two children at a time (after the timing, so they never disturb it)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda method: peak_rss(method, args), methods)
        return {method.label: result for method, result in zip(methods, results)}


# ---------------------------------------------------------------------------------------------------------------
# Where the time goes (--profile)
# ---------------------------------------------------------------------------------------------------------------


def projection_shapes(model: nn.Module, runner: StepRunner) -> list[tuple[str, int, int, int]]:
    """(name, tokens, in, out) of every to_q / to_k / to_v / to_out.0 call in one forward."""
    from benchmarks.common import projection_linears

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
    from peft import LoraConfig, get_peft_model

    from dreambooth_gs import GSOFTConfig, inject_adapter

    def ours(mode: str, method: str, r: int) -> nn.Module:
        model = nn.Sequential(linear)
        inject_adapter(model, GSOFTConfig(method=method, nblocks=r, target_modules=("0",), forward_mode=mode))
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants: dict[str, nn.Module] = {"frozen": nn.Sequential(linear)}
        variants["LoRA r=4"] = get_peft_model(nn.Sequential(linear), LoraConfig(r=4, target_modules=["0"]))
        for mode in ("auto", "activation", "weight"):
            variants[f"GSOFT r=32 {mode}"] = ours(mode, "gsoft", 32)
        variants["Double GSOFT r=64 auto"] = ours("auto", "double_gsoft", 64)
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
        medians = {label: statistics.median(s.wall) * 1e3 for label, s in samples.items()}
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


def saved_in_layer(layer: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...], float]]:
    """What autograd keeps for backward inside one layer's forward: (node.attribute, shape, MiB), parameters excluded.

    Walks the graph from the output back to ``x`` and reads each node's ``_saved_*`` tensors.
    """
    excluded = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    out = layer(x)
    seen, found, stack = set(), {}, [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node is x.grad_fn:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr, None)
                if isinstance(value, torch.Tensor) and value.numel() > 0:
                    ptr = value.untyped_storage().data_ptr()
                    if ptr not in excluded and ptr not in found:
                        found[ptr] = (
                            f"{node.name()}.{attr[7:]}",
                            tuple(value.shape),
                            value.untyped_storage().nbytes() / 2**20,
                        )
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(found.values(), key=lambda item: -item[2])


def saved_layer_table(shapes: list[tuple[int, int, int]]) -> str:
    rows = []
    for tokens, d_in, d_out in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(d_in, d_out).requires_grad_(False)
        x = torch.randn(tokens, d_in, requires_grad=True)
        variants = _layer_variants(linear)
        for label in ("LoRA r=4", "GSOFT r=32 auto", "Double GSOFT r=64 auto"):
            entries = saved_in_layer(variants[label], x)
            listing = "; ".join(f"{name} {list(shape)} {mib:.2f}" for name, shape, mib in entries)
            total = sum(mib for _, _, mib in entries)
            rows.append([f"{tokens} x {d_in} -> {d_out}", label, f"{total:.2f}", listing])
    return markdown_table(["layer", "adapter", "saved MiB", "saved tensors (op.attribute [shape] MiB)"], rows, "llrl")


def run_profile(args: argparse.Namespace) -> None:
    """--profile: where GSOFT's extra time and memory go, written to its own section."""
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
    body = "\n".join(
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
    print(body)
    if not args.no_write:
        replace_section(DOCS, "unet_step_profile", body)


# ---------------------------------------------------------------------------------------------------------------
# Tables and plot
# ---------------------------------------------------------------------------------------------------------------


def per_round_ratio(samples: dict[str, Samples], label: str, reference: str, stat: str = "wall") -> float:
    """Median over rounds of (label's time / reference's time in the same round)."""
    ours, ref = getattr(samples[label], stat), getattr(samples[reference], stat)
    return statistics.median(a / b for a, b in zip(ours, ref))


def results_table(
    methods: list[Method],
    samples: dict[str, Samples],
    saved: dict[str, int],
    state: dict[str, int],
    rss: dict[str, dict[str, int]],
    device: str = "cpu",
) -> str:
    ref, floor = REFERENCE.label, FLOOR.label
    rows = []
    for method in methods:
        s, label = samples[method.label], method.label
        row = [
            label,
            f"{s.wall_median:.2f}",
            f"{s.wall_min:.2f}",
            f"{s.cpu_median:.2f}",
            f"{per_round_ratio(samples, label, ref):.2f}",
            f"{per_round_ratio(samples, label, ref, 'cpu'):.2f}",
            f"{per_round_ratio(samples, label, floor):.2f}",
            f"{saved[label] / 2**20:.0f}",
            f"{saved[label] / saved[ref]:.2f}",
            f"{state[label] / 2**20:.0f}",
        ]
        if rss:
            peak = rss.get(label, {}).get("peak_kib")
            floor_peak, ref_peak = rss.get(floor, {}).get("peak_kib"), rss.get(ref, {}).get("peak_kib")
            row += [
                f"{peak / 2**20:.2f}" if peak else "—",
                f"{(peak - floor_peak) / 2**10:+.0f}" if peak and floor_peak else "—",
                f"{peak / ref_peak:.3f}" if peak and ref_peak else "—",
            ]
        rows.append(row)
    header = [
        "method",
        "wall median (s)",
        "wall min (s)",
        "CPU median (s)",
        "time / LoRA r=4 (wall)",
        "time / LoRA r=4 (CPU)",
        "time / floor (wall)",
        "saved tensors (MiB)",
        "saved / LoRA r=4",
        "adapter state (MiB)",
    ]
    if rss:
        header += ["peak RSS (GiB)", "RSS - floor (MiB)", "RSS / LoRA r=4"]
        if device == "cuda":  # the CUDA allocator's peak, all methods' parameters and optimizer states resident
            header[-3:] = ["peak CUDA memory (GiB)", "peak - floor (MiB)", "peak / LoRA r=4"]
    return markdown_table(header, rows)


def goals_text(
    samples: dict[str, Samples], saved: dict[str, int], rss: dict[str, dict[str, int]], device: str = "cpu"
) -> str:
    """The goals' verdicts; on CUDA the wall clock alone (the process's CPU time is host time there)."""
    lines = []
    memory = "peak CUDA memory" if device == "cuda" else "peak RSS"
    for method, reference, limit in TIME_GOALS:
        if method.label in samples and reference.label in samples:
            wall = per_round_ratio(samples, method.label, reference.label)
            cpu = wall if device == "cuda" else per_round_ratio(samples, method.label, reference.label, "cpu")
            verdict = "met" if max(wall, cpu) <= limit else "MISSED"
            if verdict == "MISSED" and min(wall, cpu) <= limit:
                verdict = "met on one clock only"
            floor = per_round_ratio(samples, FLOOR.label, reference.label)
            overhead = (samples[method.label].wall_median - samples[FLOOR.label].wall_median) / (
                samples[reference.label].wall_median - samples[FLOOR.label].wall_median
            )
            lines.append(
                f"- {method.label} / {reference.label}: {wall:.2f} (wall), {cpu:.2f} (CPU); goal <= {limit}: "
                f"{verdict}. The floor alone is {floor:.2f} of {reference.label}; time above the floor: "
                f"{overhead:.2f}x {reference.label}'s"
            )
    if GSOFT[0].label in samples and PEFT_BOFT.label in samples:
        ratio = per_round_ratio(samples, GSOFT[0].label, PEFT_BOFT.label)
        lines.append(f"- for comparison, {GSOFT[0].label} / {PEFT_BOFT.label}: {ratio:.2f}")
    for method, reference, limit in SAVED_GOALS:
        if method.label in saved and reference.label in saved:
            ratio = saved[method.label] / saved[reference.label]
            lines.append(
                f"- memory {method.label} / {reference.label}, autograd-saved tensors: {ratio:.3f}; goal <= "
                f"{limit}: {'met' if ratio <= limit else 'MISSED'}"
            )
    method, reference, limit = RSS_GOAL
    if method.label in rss and reference.label in rss:
        ratio = rss[method.label]["peak_kib"] / rss[reference.label]["peak_kib"]
        lines.append(
            f"- memory {method.label} / {reference.label}, {memory}: {ratio:.3f}; goal <= {limit}: "
            f"{'met' if ratio <= limit else 'MISSED'}"
        )
    return "\n".join(lines)


def plot(methods: list[Method], samples: dict[str, Samples], saved: dict[str, int], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {FLOOR.label: "floor (no adapter)", PEFT_BOFT.label: "PEFT BOFT (32,4) as run (1 factor)"}
    labels = [short.get(m.label, m.label.replace(" (PEFT)", "").split(" (GS core")[0]) for m in methods]
    ratios = [per_round_ratio(samples, m.label, REFERENCE.label) for m in methods]
    memory = [saved[m.label] / saved[REFERENCE.label] for m in methods]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    y = range(len(methods))
    left.barh(y, ratios, color="tab:blue")
    left.axvline(1.0, color="k", lw=0.8)
    left.set_xlabel("step time / LoRA r=4 (median of per-round ratios)")
    right.barh(y, memory, color="tab:orange")
    right.axvline(1.0, color="k", lw=0.8)
    right.set_xlabel("autograd-saved tensors / LoRA r=4")
    left.set_yticks(list(y), labels, fontsize=8)
    left.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path.name, path.parent)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timed rounds (one step per method each)")
    parser.add_argument("--quick", action="store_true", help="mid-size UNet at 8x8 latents, 7 methods, 1 round")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument(
        "--saved-only",
        action="store_true",
        help="only the autograd-saved tensors, from one forward per method (exact, no timing, no RSS): the "
        "paper's setting, --latent 64 --batch 4, in minutes on a CPU; its own section",
    )
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="every method's steps in a fresh process of its own, one per method and round (the order rotating): "
        "only one UNet in memory at a time, so the paper's setting (--latent 64 --batch 4) fits where the shared "
        "process does not; each child's peak RSS and saved tensors come from the same run",
    )
    parser.add_argument(
        "--profile", action="store_true", help="instead: per-layer timings, op profile, saved tensors per layer"
    )
    parser.add_argument("--size", default="sd2", choices=("sd2", "mid"), help="UNet architecture")
    parser.add_argument("--latent", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--methods",
        default="all",
        choices=("all", "paper"),
        help="all: every Table 2 row and the PEFT baselines; paper: floor, LoRA r=4, OFT, BOFT (32,4), GSOFT r=32 "
        "(also with --gsoft_weight_side_modules to_out.0), Double GSOFT r=64 (the side-by-side set for the "
        "paper's setting, --latent 64 --batch 4)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (adapter parameters stay fp32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: peak memory from the CUDA allocator)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--saved-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--step-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.latent, args.rounds, args.no_write = "mid", 8, 1, True
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    if args.profile:
        run_profile(args)
        return
    if args.saved_child:
        saved_child(args)
        return
    if args.saved_only:
        saved_only(args)
        return
    if args.step_child:
        step_child(args)
        return
    methods = chosen_methods(args)
    if args.isolated:
        samples, saved, state, rss, loads, weight_bytes = isolated_rounds(methods, args)
        how = (
            "Each method runs in a fresh process of its own per round (one UNet in memory at a time), the order "
            f"rotating over {args.rounds} rounds; each process builds the UNet, resets the RSS high-water mark, runs "
            f"a warm-up step (saved tensors counted) and one timed step. {MEASURES} Peak RSS: the process's "
            f"high-water mark over its two steps (the {weight_bytes / 2**30:.1f} GiB of fp32 weights are in every row)."
        )
    else:
        samples, saved, state, rss, loads, weight_bytes = shared_rounds(methods, args)
        how = (
            "One random-weight UNet shared by every method (structural copies), "
            f"{args.rounds} interleaved rounds after one warm-up step each, the order rotating per round. {MEASURES} "
            + (
                "Peak RSS: a child process per method builds the UNet, resets the high-water mark, runs two steps "
                f"(the {weight_bytes / 2**30:.1f} GiB of fp32 weights are in every row)."
                if rss and args.device == "cpu"
                else ""
            )
        )
    timing_load = load_line(loads)
    print(timing_load, flush=True)

    setting = setting_line(args)
    parts = [
        f"### Training step: {setting}",
        "",
        "Written by `benchmarks/bench_unet_step.py"
        + (" --isolated" if args.isolated else "")
        + "`. One step = forward, fp32 MSE loss, backward, AdamW over the "
        "method's trainable parameters; the input latents require grad in every row, so the floor (no adapter) "
        "has the same backward extent. " + how,
        "",
        f"Timing {timing_load}.",
        "",
        results_table(methods, samples, saved, state, rss, args.device),
        "",
        "Goals (issues 5 and 19):",
        "",
        goals_text(samples, saved, rss, args.device),
    ]
    title = f"{args.size} UNet training step ({args.device}, {args.latent}x{args.latent} latents, batch {args.batch})"
    section = "unet_step_gpu" if args.device == "cuda" else "unet_step"
    if args.device != "cuda" and (args.latent, args.batch) != (32, 1):
        section = f"unet_step_latent{args.latent}_batch{args.batch}"
    name = f"{section}.png"
    image = plot(methods, samples, saved, title, (Path(tempfile.mkdtemp()) if args.no_write else IMAGES) / name)
    print(f"plot: {image}")
    parts += ["", f"![step time and saved memory relative to LoRA r=4](images/{image.name})"]
    body = "\n".join(parts)
    print(body)
    if not args.no_write:
        replace_section(DOCS, section, body)


Measured = tuple[
    dict[str, Samples], dict[str, int], dict[str, int], dict[str, dict[str, int]], list[tuple[float, float, float]], int
]


def shared_rounds(methods: list[Method], args: argparse.Namespace) -> Measured:
    """Every method in this process on one shared UNet, interleaved rounds; peak RSS from child processes."""
    torch.manual_seed(0)
    print(f"building the {args.size} UNet ({args.device}) ...", flush=True)
    base = frozen_base(args)
    weight_bytes = parameter_bytes(base)
    batch = make_batch(args.batch, args.latent, args.device)
    runners: dict[str, StepRunner] = {}
    state: dict[str, int] = {}
    for method in methods:
        model = shared_copy(base)
        params = apply_method(model, method)
        runners[method.label] = StepRunner(model, params, batch, args.bf16)
        state[method.label] = adapter_state_bytes(params)
    print(f"{len(methods)} methods; a warm-up step each (saved tensors counted), then {args.rounds} rounds")
    saved = {label: saved_tensor_bytes(runner) for label, runner in runners.items()}
    samples, loads = interleaved(runners, rounds=args.rounds, warmup=0)
    rss: dict[str, dict[str, int]] = {}
    if args.device == "cuda":
        for label, runner in runners.items():  # the CUDA allocator's peak stands in for RSS
            torch.cuda.reset_peak_memory_stats()
            runner()
            rss[label] = {"peak_kib": torch.cuda.max_memory_allocated() // 1024}
    elif not args.no_rss:
        rss = peak_rss_all(QUICK_RSS_METHODS if args.quick else methods, args)
    return samples, saved, state, rss, loads, weight_bytes


def step_child(args: argparse.Namespace) -> None:
    """--step-child LABEL: build the UNet, reset the RSS high-water mark, a warm-up step (saved tensors counted),
    one timed step; print JSON."""
    method = BY_LABEL[args.step_child]
    torch.manual_seed(0)
    unet = frozen_base(args)  # random values: constant ones could drift into denormals and time differently
    params = apply_method(unet, method)
    runner = StepRunner(unet, params, make_batch(args.batch, args.latent, args.device), args.bf16)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    saved = saved_tensor_bytes(runner)
    wall, cpu = timed(runner)
    weight_bytes = parameter_bytes(unet)
    result = {"wall": wall, "cpu": cpu, "saved": saved, "state": adapter_state_bytes(params)}
    print(json.dumps(result | {"peak_kib": status_kib("VmHWM"), "weight_bytes": weight_bytes}))


def isolated_rounds(methods: list[Method], args: argparse.Namespace) -> Measured:
    """--isolated: one fresh child process per method and round, the order rotating; a child that dies (killed for
    memory) ends the run with its message."""
    samples = {method.label: Samples() for method in methods}
    saved: dict[str, int] = {}
    state: dict[str, int] = {}
    rss: dict[str, dict[str, int]] = {}
    loads, weight_bytes = [], 0
    for round_index in range(args.rounds):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            done = subprocess.run(child_command("--step-child", method, args), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(
                    f"bench_unet_step: the step process of {method.label} failed (exit {done.returncode}; -9 is a "
                    f"kill for memory): {done.stderr.strip()[-300:]}"
                )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            samples[method.label].wall.append(result["wall"])
            samples[method.label].cpu.append(result["cpu"])
            saved[method.label], state[method.label] = result["saved"], result["state"]
            peak = max(result["peak_kib"], rss.get(method.label, {}).get("peak_kib", 0))
            rss[method.label], weight_bytes = {"peak_kib": peak}, result["weight_bytes"]
            peak_gib = result["peak_kib"] / 2**20
            print(f"  {method.label}: {result['wall']:.1f} s, peak RSS {peak_gib:.1f} GiB", flush=True)
        loads.append(os.getloadavg())
        print(f"  round {round_index + 1}/{args.rounds} done, load average {loads[-1][0]:.1f}", flush=True)
    return samples, saved, state, rss, loads, weight_bytes


def saved_child(args: argparse.Namespace) -> None:
    """--saved-child LABEL: build the UNet, one forward of that method under the hooks; print JSON."""
    method = BY_LABEL[args.saved_child]
    base = frozen_base(args, fill="constant")
    params = apply_method(base, method)
    runner = StepRunner(base, params, make_batch(args.batch, args.latent, args.device), args.bf16)
    saved = saved_tensor_bytes(runner, backward=False)
    print(json.dumps({"saved": saved, "state": adapter_state_bytes(params), "peak_kib": status_kib("VmHWM")}))


def saved_in_child(method: Method, args: argparse.Namespace) -> dict[str, int] | None:
    """One method's saved bytes from a fresh process (no method inherits another's freed-but-held memory);
    None when the process dies (e.g. killed for memory)."""
    command = child_command("--saved-child", method, args) + ["--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"  {method.label}: the child process failed (exit {done.returncode}): {done.stderr[-300:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def saved_only(args: argparse.Namespace) -> None:
    """--saved-only: one forward per method under the saved-tensor hooks, each in its own process; a table and the
    saved-memory goals."""
    methods = chosen_methods(args)
    saved: dict[str, int] = {}
    state: dict[str, int] = {}
    peaks: dict[str, int] = {}
    failed: list[str] = []
    for method in methods:
        result = saved_in_child(method, args)
        if result is None:
            failed.append(method.label)
            continue
        saved[method.label], state[method.label], peaks[method.label] = (
            result["saved"],
            result["state"],
            result["peak_kib"],
        )
        print(f"  {method.label}: {saved[method.label] / 2**20:.0f} MiB saved", flush=True)
    methods = [m for m in methods if m.label in saved]
    reference = saved[LORA[0].label]
    rows = [
        [m.label, f"{saved[m.label] / 2**20:.0f}", f"{saved[m.label] / reference:.3f}", f"{state[m.label] / 2**20:.0f}",
         f"{peaks[m.label] / 2**20:.1f}"]
        for m in methods
    ]  # fmt: skip
    setting = setting_line(args)
    body = "\n".join(
        [
            f"### Autograd-saved memory of one training step: {setting}",
            "",
            "Written by `benchmarks/bench_unet_step.py --saved-only`: one forward per method (fp32 MSE loss "
            "included) under `torch.autograd.graph.saved_tensors_hooks`, the distinct storages autograd keeps for "
            "backward summed (frozen weights excluded). Autograd saves everything in the forward, so this is the "
            "step's count exactly, without the backward. Each method runs in its own process; the last column is "
            "that process's peak RSS (weights, the forward's saved tensors and temporaries; no backward, no "
            "optimizer), not the training step's.",
            "",
            markdown_table(
                [
                    "method",
                    "saved tensors (MiB)",
                    "saved / LoRA r=4",
                    "adapter state (MiB)",
                    "forward's peak RSS (GiB)",
                ],
                rows,
            ),
            *(
                [
                    "",
                    "Killed (the child process died, on this machine: out of memory) before its count: "
                    + ", ".join(failed)
                    + ".",
                ]
                if failed
                else []
            ),
            "",
            "Goals (issue 19):",
            "",
            goals_text({}, saved, {}),
        ]
    )
    print(body)
    if not args.no_write:
        replace_section(DOCS, f"unet_step_saved_latent{args.latent}_batch{args.batch}", body)


if __name__ == "__main__":
    main()
