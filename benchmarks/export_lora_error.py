"""How well does a LoRA of rank r reproduce a GSOFT adapter? Relative error against rank on the SD-2-base UNet.

The export (``export_adapter.py --format lora``) approximates each adapted projection's change
``delta = diag(s) W Q - W`` by its truncated SVD; by Eckart-Young the relative Frobenius error at rank r is exactly
``sqrt(sum_{i > r} s_i^2 / sum_i s_i^2)``, so the curve needs only each module's singular values.

The UNet is SD-2-base's architecture (configs/sd2_base_unet.json) with RANDOM weights (nothing is downloaded), and
the adapter is GSOFT r=32 on every to_q / to_k / to_v / to_out.0 with RANDOM small parameters (blocks ~ N(0, std),
scales ~ 1 + N(0, std)), not a trained one: no trained adapter of this size is on this machine. A trained adapter
on pretrained weights may have a faster-decaying spectrum; read the numbers as an illustration of the shape of the
curve, not as a promise for a real run.

    python benchmarks/export_lora_error.py [--stds 0.01 0.1] [--no-plot]      # ~1-2 min on 2 CPU cores, ~3.5 GB
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import build_unet, machine_line, markdown_table, save_figure  # noqa: E402
from dreambooth_gs import GSOFTConfig, adapter_layers, inject_adapter, remove_adapter  # noqa: E402
from dreambooth_gs.lowrank import error_curve, low_rank, relative_error, singular_values  # noqa: E402

NBLOCKS = 32


def perturb(unet: torch.nn.Module, std: float, seed: int) -> None:
    """Blocks ~ N(0, std), scales ~ 1 + N(0, std): a random, non-identity GSOFT adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(unet):
            for param in layer.adapter_parameters():
                noise = torch.randn(param.shape, generator=g) * std
                param.copy_(noise + 1 if param is layer.gsoft_s else noise)


def module_delta(layer) -> torch.Tensor:
    """``W_merged - W_base`` of one adapted projection, float64 ``(out, in)``."""
    return layer.merged_weight().double() - layer.base_layer.weight.double()


def module_spectra(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> singular values of the change of every adapted projection (the changes themselves are not kept)."""
    return {name: singular_values(module_delta(layer)) for name, layer in adapter_layers(unet)}


def ranks_up_to(full: int) -> list[int]:
    ranks, r = [], 1
    while r < full:
        ranks.append(r)
        r *= 2
    return ranks + [full]


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stds", type=float, nargs="+", default=[0.01, 0.1], help="adapter parameter scales")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    unet = build_unet("sd2")
    with warnings.catch_warnings():  # b < r at 320 / 640 features: the paper's r=32 all the same
        warnings.simplefilter("ignore", UserWarning)
        inject_adapter(unet, GSOFTConfig(nblocks=NBLOCKS))
    layers = adapter_layers(unet)
    shapes = [tuple(layer.base_layer.weight.shape) for _, layer in layers]
    full = max(min(s) for s in shapes)
    ranks = ranks_up_to(full)
    gsoft_params = sum(p.numel() for _, layer in layers for p in layer.adapter_parameters())
    curves, check = {}, None
    for i, std in enumerate(args.stds):
        perturb(unet, std, seed=i)
        spectra = module_spectra(unet)
        curves[std] = error_curve(list(spectra.values()), ranks)
        if check is None:  # the closed form against real factors, on the largest module at rank 64
            name, layer = max(layers, key=lambda item: item[1].base_layer.weight.numel())
            delta = module_delta(layer)
            f = low_rank(delta, rank=64)
            check = (name, relative_error(delta, f.up @ f.down), f.predicted_error)
    remove_adapter(unet)

    header = ["rank r", "LoRA parameters"] + [f"relative error, std {std:g}" for std in args.stds]
    rows = []
    for j, r in enumerate(ranks):
        lora_params = sum(min(r, min(s)) * (s[0] + s[1]) for s in shapes)
        label = f"{r} (full)" if r == full else str(r)
        rows.append([label, f"{lora_params / 1e6:.2f}M"] + [f"{curves[std][j]:.3f}" for std in args.stds])
    equal = gsoft_params / sum(sum(s) for s in shapes)
    print(f"GSOFT r={NBLOCKS} on SD-2-base's {len(layers)} attention projections ({gsoft_params / 1e6:.2f}M adapter "
          f"parameters, as many as a LoRA of rank {equal:.1f}), random weights and random adapter; "
          f"{machine_line()}\n")  # fmt: skip
    print(markdown_table(header, rows))
    name, measured, predicted = check
    print(f"\ncheck: {name} at rank 64, measured error {measured:.6f} vs Eckart-Young {predicted:.6f}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if not args.no_plot:
        plot(ranks, curves, gsoft_params, shapes)


def plot(ranks: list[int], curves: dict[float, list[float]], gsoft_params: int, shapes: list[tuple[int, int]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for std, errors in curves.items():
        ax.plot(ranks, errors, marker="o", label=f"random GSOFT r={NBLOCKS}, std {std:g}")
    equal = gsoft_params / sum(sum(s) for s in shapes)  # the rank whose LoRA stores as many numbers as GSOFT
    ax.axvline(equal, color="gray", linestyle=":", label=f"LoRA with GSOFT's parameter count (r = {equal:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank per module (capped at min(out, in))")
    ax.set_ylabel("||delta - BA||_F / ||delta||_F (all modules)")
    ax.set_title("LoRA export of GSOFT on the SD-2-base UNet (random weights)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    print(f"wrote {save_figure(fig, 'export_lora_error.png')}")


if __name__ == "__main__":
    main()
