"""Inference cost of the adapters on the SD-2-base-architecture UNet: merged (should cost nothing) and unmerged.

One random-weight base UNet; every row is a structural copy sharing its frozen weights. Merged rows first give the
copy its own projection weights (so merging never touches the shared base), move the adapter off its identity
initialisation, then fold it in with ``merge_adapter`` (plain nn.Linear layers again). Unmerged rows run the
adapter layers as they are (no grad, so ``forward_mode="auto"`` picks the cheaper side for inference). Forward passes
under ``torch.inference_mode``, interleaved rounds after a warm-up, medians of per-round ratios to the base UNet.

    python benchmarks/bench_inference.py [--rounds 5] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    BOFT,
    DOUBLE,
    GSOFT,
    LORA,
    PEFT_OFT,
    Method,
    apply_method,
    build_unet,
    randomize_adapter,
    shared_copy,
    unshare_projections,
)
from benchmarks.measure import THREADS_HELP, interleaved, per_round_ratio  # noqa: E402
from benchmarks.report import DOCS, load_line, machine_line, markdown_table, replace_section  # noqa: E402

BASE = "base UNet (no adapter)"
MERGED = [GSOFT[0], DOUBLE[0], LORA[0]]
UNMERGED = [GSOFT[0], DOUBLE[0], BOFT[0], LORA[0], PEFT_OFT]


def adapted_copy(base: nn.Module, method: Method, merge: bool) -> nn.Module:
    """A copy of ``base`` with ``method`` (moved off identity), merged into its own weights if ``merge``."""
    from dreambooth_gs import merge_adapter

    model = shared_copy(base)
    if merge:
        unshare_projections(model)
    torch.manual_seed(0)  # LoRA's A starts random: the merged and unmerged copies must get the same values
    randomize_adapter(apply_method(model, method))
    if merge:
        merge_adapter(model)
        assert not any(p.requires_grad for p in model.parameters())
    return model.eval()


def forward_fn(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(*inputs).sample

    return run


def auto_sides(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    """Which side ``forward_mode='auto'`` picked, counted over the GSOFT layers' calls in one forward."""
    from dreambooth_gs.methods.injection import adapter_layers

    counts: dict[str, int] = {}
    hooks = []
    for _, layer in adapter_layers(model):

        def record(module, args, layer=layer):
            side = layer.forward_side(args[0])
            counts[side] = counts.get(side, 0) + 1

        hooks.append(layer.register_forward_pre_hook(record))
    with torch.inference_mode():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return ", ".join(f"{n} {side}" for side, n in sorted(counts.items())) or "—"


def run_resolution(base: nn.Module, latent: int, batch: int, rounds: int) -> tuple[str, list[tuple]]:
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(batch, 4, latent, latent, generator=generator),
        torch.tensor([500] * batch),
        torch.randn(batch, 77, 1024, generator=generator),
    )
    models: dict[str, nn.Module] = {BASE: base.eval()}
    for method in MERGED:
        models[f"{method.label}, merged"] = adapted_copy(base, method, merge=True)
    for method in UNMERGED:
        models[f"{method.label}, unmerged"] = adapted_copy(base, method, merge=False)
    reference = forward_fn(base, inputs)()
    agreement = {}
    for method in MERGED:  # merged vs unmerged outputs of the same adapter values
        merged = forward_fn(models[f"{method.label}, merged"], inputs)()
        unmerged = forward_fn(models[f"{method.label}, unmerged"], inputs)()
        agreement[method.label] = (merged - unmerged).abs().max().item() / unmerged.abs().max().item()
    samples, loads = interleaved({k: forward_fn(m, inputs) for k, m in models.items()}, rounds=rounds, warmup=1)
    rows = []
    for label, s in samples.items():
        ratio = per_round_ratio(samples, label, BASE)
        note = ""
        if label.endswith(", merged"):
            note = f"max abs diff to unmerged / max abs output: {agreement[label.removesuffix(', merged')]:.1e}"
        elif label != BASE and label.startswith(("GSOFT", "Double", "BOFT")):
            note = "auto side: " + auto_sides(models[label], inputs)
        rows.append([label, f"{s.wall_median:.3f}", f"{s.wall_min:.3f}", f"{ratio:.3f}", note])
    header = ["UNet forward", "median (s)", "min (s)", "/ base (per-round median)", "notes"]
    text = markdown_table(header, rows, "lrrrl")
    del reference
    return f"**{latent}x{latent} latents, batch {batch}** ({load_line(loads)})\n\n{text}", rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (median of per-round ratios)")
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64], help="latent sizes (64 = 512 px)")
    parser.add_argument("--quick", action="store_true", help="mid-size UNet, 8x8 latents, 1 round; no write")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = "mid" if args.quick else "sd2"
    if args.quick:
        args.latents, args.rounds, args.no_write = [8], 1, True
    print(f"building the {size} UNet ...", flush=True)
    base = build_unet(size)
    tables = []
    for latent in args.latents:
        print(f"{latent}x{latent} latents ...", flush=True)
        tables.append(run_resolution(base, latent, batch=1, rounds=args.rounds)[0])
    body = "\n\n".join(
        [
            f"### Inference: one UNet forward ({size} UNet, cross-attention from 77 tokens of width 1024, fp32, "
            f"{machine_line()})",
            "Written by `benchmarks/bench_inference.py`. Merged adapters are plain nn.Linear layers again "
            "(`merge_adapter`), so their cost is the base UNet's: the merged rows' ratio to the base is the noise "
            f"of this machine. {args.rounds} interleaved rounds after a warm-up; the ratio is the median over rounds "
            "of (row / base in the same round). Adapter parameters are moved off their identity initialisation "
            "first; the notes check that merged and unmerged outputs agree.",
            *tables,
        ]
    )
    print(body)
    if not args.no_write:
        replace_section(DOCS, "inference", body)


if __name__ == "__main__":
    main()
