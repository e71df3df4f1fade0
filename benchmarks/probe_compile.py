"""``torch.compile`` of the GS adapters (issue 34, item 3): graph breaks, first-call compile time, eager against
compiled step time, on the CPU (inductor) or CUDA.

    python benchmarks/probe_compile.py                  # ~2 min on the CPU, 1 thread
    python benchmarks/probe_compile.py --skip-unet      # the layers only
    python benchmarks/probe_compile.py --device cuda

Three probes, each in train mode with the input requiring grad:

1. ``torch._dynamo.explain`` of ``layer(x).square().sum()`` for one ``GSOFTLinear`` (GSOFT and Double GSOFT, both
   forward sides). Dynamo traces a custom autograd Function's forward and backward when it meets ``apply``, so a
   backward it cannot trace shows here as a break;
2. the same for a tiny diffusers UNet with GSOFT adapters on every attention projection (the tests' UNet);
3. eager against ``torch.compile`` medians of one forward + backward: GSOFT r=32 on 1024 tokens x 1280 (SDXL level 3)
   and the tiny UNet's step, with the first compiled call's time (compilation) beside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import THREADS_HELP, synchronize  # noqa: E402
from benchmarks.report import load_line, machine_line, markdown_table  # noqa: E402
from dreambooth_gs import GSOFTConfig, inject_adapter  # noqa: E402
from dreambooth_gs.gs.layers import GSOFTLinear  # noqa: E402


def gs_layer(method: str, d_in: int, d_out: int, nblocks: int, forward_mode: str, device: str) -> GSOFTLinear:
    """A frozen ``nn.Linear`` with a GS adapter moved off the identity (so every gradient is non-trivial)."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    layer = GSOFTLinear(base, GSOFTConfig(method=method, nblocks=nblocks, forward_mode=forward_mode)).to(device)
    with torch.no_grad():
        for param in layer.adapter_parameters():
            param.add_(0.05 * torch.randn_like(param))
    return layer.train()


def tiny_unet(method: str, device: str) -> nn.Module:
    """The tiny demo UNet2DConditionModel (dreambooth_gs/resources/tiny_sd: 2 levels, widths 32 / 64, random weights)
    with ``method`` adapters, nblocks 4."""
    import json

    from dreambooth_gs.resources import TINY_SD_CONFIG_DIR
    from dreambooth_gs.tiny.pipelines import make_model

    torch.manual_seed(0)
    unet = make_model(json.loads((TINY_SD_CONFIG_DIR / "unet.json").read_text()))
    inject_adapter(unet, GSOFTConfig(method=method, nblocks=4))
    return unet.to(device).train()


def unet_inputs(device: str, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    encoder_hidden_states = torch.randn(batch, 3, 32, generator=g)
    return sample.to(device), torch.tensor([10] * batch, device=device), encoder_hidden_states.to(device)


def explain(step: Callable[..., torch.Tensor], *args) -> tuple[int, int, list[str]]:
    """(graphs, graph breaks, distinct break reasons, first line each) of ``step(*args)`` under Dynamo."""
    torch._dynamo.reset()
    result = torch._dynamo.explain(step)(*args)
    reasons = sorted({b.reason.strip().splitlines()[0][:120] for b in result.break_reasons})
    return result.graph_count, result.graph_break_count, reasons


def layer_step(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: layer(x).square().sum()


def unet_step(unet: nn.Module) -> Callable[..., torch.Tensor]:
    return lambda sample, t, context: unet(sample, t, context).sample.square().mean()


def train_call(step: Callable[..., torch.Tensor], params: list[torch.Tensor], args: tuple) -> Callable[[], None]:
    """One forward + backward of ``step(*args)``, gradients cleared first."""

    def run() -> None:
        for p in params:
            p.grad = None
        step(*args).backward()

    return run


def eager_and_compiled(
    model: nn.Module, step_of: Callable, args: tuple, rounds: int, calls: int, device: torch.device
) -> tuple[float, float, float]:
    """(first compiled call s, eager ms, compiled ms): medians over interleaved rounds of ``calls`` steps each."""
    params = [p for p in model.parameters() if p.requires_grad] + [a for a in args if a.requires_grad]
    torch._dynamo.reset()
    compiled = torch.compile(model)
    eager_run = train_call(step_of(model), params, args)
    compiled_run = train_call(step_of(compiled), params, args)
    start = time.perf_counter()
    compiled_run()
    synchronize(device)
    first = time.perf_counter() - start
    eager_run()
    samples: dict[str, list[float]] = {"eager": [], "compiled": []}
    for index in range(rounds):
        order = [("eager", eager_run), ("compiled", compiled_run)]
        for name, run in order if index % 2 == 0 else order[::-1]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / calls)
    return first, 1e3 * statistics.median(samples["eager"]), 1e3 * statistics.median(samples["compiled"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the timings (default 5)")
    parser.add_argument("--skip-unet", action="store_true", help="the layers only (no UNet compile)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    x = torch.randn(64, 128, device=device, requires_grad=True)
    for method in ("gsoft", "double_gsoft"):
        for side in ("activation", "weight"):
            graphs, breaks, reasons = explain(layer_step(gs_layer(method, 128, 96, 8, side, args.device)), x)
            rows.append([f"GSOFTLinear 128 -> 96, {method}, {side} side", str(graphs), str(breaks), "; ".join(reasons)])
    if not args.skip_unet:
        for method in ("gsoft", "double_gsoft"):
            graphs, breaks, reasons = explain(unet_step(tiny_unet(method, args.device)), *unet_inputs(args.device))
            rows.append([f"tiny UNet, {method} on to_q / to_k / to_v / to_out.0", str(graphs), str(breaks),
                         "; ".join(reasons)])  # fmt: skip
    breaks_table = markdown_table(["train-mode forward + backward", "graphs", "graph breaks", "reasons"], rows, "lrrl")

    timing_rows = []
    layer = gs_layer("gsoft", 1280, 1280, 32, "auto", args.device)
    big_x = torch.randn(1024, 1280, device=device, requires_grad=True)
    first, eager, compiled = eager_and_compiled(layer, layer_step, (big_x,), args.rounds, 3, device)
    timing_rows.append(["GSOFT r=32, 1024 tokens x 1280", f"{first:.1f}", f"{eager:.2f}", f"{compiled:.2f}",
                        f"{compiled / eager:.2f}x"])  # fmt: skip
    if not args.skip_unet:
        unet = tiny_unet("gsoft", args.device)
        first, eager, compiled = eager_and_compiled(unet, unet_step, unet_inputs(args.device), args.rounds, 3, device)
        timing_rows.append(["tiny UNet step, GSOFT r=4 (batch 2)", f"{first:.1f}", f"{eager:.2f}", f"{compiled:.2f}",
                            f"{compiled / eager:.2f}x"])  # fmt: skip
    timing = markdown_table(["forward + backward", "first compiled call, s", "eager, ms", "compiled, ms", "ratio"],
                            timing_rows)  # fmt: skip
    text = "\n\n".join(
        [
            f"`torch._dynamo.explain` ({args.device}):",
            breaks_table,
            f"Eager against `torch.compile` (inductor), medians of {args.rounds} interleaved rounds of 3 steps:",
            timing,
            f"{machine_line()}; {load_line()}.",
        ]
    )
    print(text)
    return text


if __name__ == "__main__":
    main(parse_args())
