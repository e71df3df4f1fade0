"""How well does a LoRA of rank r reproduce an orthogonal adapter? Relative error against rank.

The export (``export_adapter.py --format lora``) approximates each adapted projection's change
``delta = W_merged - W_base`` (GSOFT: ``diag(s) W Q - W``) by its truncated SVD; by Eckart-Young the relative
Frobenius error at rank r is exactly ``sqrt(sum_{i > r} s_i^2 / sum_i s_i^2)``, so the weight curve needs only each
module's singular values.

Two modes:

* default: GSOFT r=32 on every to_q / to_k / to_v / to_out.0 of the SD-2-base UNet architecture with RANDOM weights
  (configs/sd2_base_unet.json) and a RANDOM adapter (blocks ~ N(0, std), scales ~ 1 + N(0, std)): the shape of the
  curve at SD scale, nothing downloaded. Writes docs/images/export_lora_error.png.
* ``--adapter_dir DIR [DIR ...]``: TRAINED adapters (any method ``export_adapter.py`` reads, e.g. MiniBooth runs),
  each on the base model its adapter_config.json names. Besides the weight error it draws samples of the training
  prompt with the base model, the adapter, and the rank-r export of every rank (same seeds, same sampler) and
  reports ``||img_r - img_adapter|| / ||img_adapter - img_base||``: the part of the adapter's effect on its pictures
  that the rank-r LoRA loses. Writes docs/images/export_lora_error_trained.png and a sample grid per adapter.

    python benchmarks/export_lora_error.py [--stds 0.01 0.1] [--no-plot]      # ~1-2 min on 2 CPU cores, ~3.5 GB
    python benchmarks/export_lora_error.py --adapter_dir runs/gsoft runs/lora --labels GSOFT LoRA
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import build_unet  # noqa: E402
from benchmarks.report import IMAGES, machine_line, markdown_table, millions, save_figure  # noqa: E402
from dreambooth_gs import GSOFTConfig, adapter_layers, inject_adapter, remove_adapter  # noqa: E402
from dreambooth_gs.adapters.sampling import labeled_grid  # noqa: E402
from dreambooth_gs.adapters.serialization import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from dreambooth_gs.export.formats import MergedPipeline, load_merged, module_deltas  # noqa: E402
from dreambooth_gs.export.lora import ModuleDelta  # noqa: E402
from dreambooth_gs.export.lowrank import LowRank, error_curve, low_rank, relative_error, singular_values  # noqa: E402

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


def lora_parameters(shapes: list[tuple[int, int]], rank: int) -> int:
    """Numbers a LoRA of ``rank`` stores on modules of these ``(out, in)`` shapes (each capped at full rank)."""
    return sum(min(rank, min(shape)) * (shape[0] + shape[1]) for shape in shapes)


def equal_rank(parameters: int, shapes: list[tuple[int, int]]) -> float:
    """The LoRA rank that stores as many numbers as ``parameters`` on modules of these shapes."""
    return parameters / sum(sum(shape) for shape in shapes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stds", type=float, nargs="+", default=[0.01, 0.1], help="random adapter parameter scales")
    parser.add_argument("--adapter_dir", nargs="+", default=None, help="trained adapter folders: measure these instead")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per --adapter_dir (default: the method)")
    parser.add_argument("--prompt", default=None, help="samples' prompt (default: each run's instance prompt)")
    parser.add_argument("--seeds", type=int, default=4, help="samples per rank (seeds 0 .. N-1)")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--no-samples", action="store_true", help="trained adapters: the weight error only")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument("--images_dir", default=str(IMAGES), help="where the figures go (default: docs/images)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.labels is not None and (args.adapter_dir is None or len(args.labels) != len(args.adapter_dir)):
        parser.error("--labels needs one name per --adapter_dir")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    for folder in args.adapter_dir or []:
        if not (Path(folder) / CONFIG_NAME).is_file():
            parser.error(f"{folder} is not an adapter folder (no {CONFIG_NAME}); pass a train_dreambooth_gsoft.py "
                         "output directory")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.adapter_dir:
        trained_main(args)
    else:
        random_main(args)


@torch.no_grad()
def random_main(args: argparse.Namespace) -> None:
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
        lora_params = lora_parameters(shapes, r)
        label = f"{r} (full)" if r == full else str(r)
        rows.append([label, f"{lora_params / 1e6:.2f}M"] + [f"{curves[std][j]:.3f}" for std in args.stds])
    equal = equal_rank(gsoft_params, shapes)
    print(f"GSOFT r={NBLOCKS} on SD-2-base's {len(layers)} attention projections ({gsoft_params / 1e6:.2f}M adapter "
          f"parameters, as many as a LoRA of rank {equal:.1f}), random weights and random adapter; "
          f"{machine_line()}\n")  # fmt: skip
    print(markdown_table(header, rows))
    name, measured, predicted = check
    print(f"\ncheck: {name} at rank 64, measured error {measured:.6f} vs Eckart-Young {predicted:.6f}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if not args.no_plot:
        plot(ranks, curves, gsoft_params, shapes, Path(args.images_dir))


def plot(ranks, curves: dict[float, list[float]], gsoft_params: int, shapes: list[tuple[int, int]], images: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for std, errors in curves.items():
        ax.plot(ranks, errors, marker="o", label=f"random GSOFT r={NBLOCKS}, std {std:g}")
    equal = equal_rank(gsoft_params, shapes)
    ax.axvline(equal, color="gray", linestyle=":", label=f"LoRA with GSOFT's parameter count (r = {equal:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank per module (capped at min(out, in))")
    ax.set_ylabel("||delta - BA||_F / ||delta||_F (all modules)")
    ax.set_title("LoRA export of GSOFT on the SD-2-base UNet (random weights)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    print(f"wrote {save_figure(fig, 'export_lora_error.png', images)}")


# ---------------------------------------------------------------------------------------------------------------
# Trained adapters (--adapter_dir): the weight error from the spectra, and what the samples lose
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainedCurve:
    """One trained adapter's export error against rank."""

    label: str
    adapter_parameters: int
    shapes: list[tuple[int, int]]  # (out, in) of every adapted module
    ranks: list[int]
    weight_errors: list[float]  # total relative Frobenius error of the changes, per rank
    image_errors: list[float] | None  # ||img_r - img_adapter|| / ||img_adapter - img_base||, per rank
    samples: dict[str, torch.Tensor]  # row label -> (seeds, 3, H, W) in [0, 1]


def adapter_parameter_count(folder: Path) -> int:
    """Numbers the adapter stores: every tensor of the folder's adapter files (text-encoder subfolders included)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.rglob(WEIGHTS_NAME)):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def run_prompt(folder: Path) -> str:
    """The instance prompt of the run (its training_args.json), with ``{class}`` filled in."""
    info_file = folder / "training_args.json"
    if not info_file.is_file():
        raise SystemExit(f"error: {folder} has no training_args.json to take the prompt from; pass --prompt")
    info = json.loads(info_file.read_text())
    return info["instance_prompt"].replace("{class}", info.get("class_name") or "")


def set_rank(merged: MergedPipeline, deltas: list[ModuleDelta], factors: list[LowRank], rank: int | None) -> None:
    """Every adapted module's weight = base + the rank-``rank`` truncated SVD of its change, capped at full rank
    (the ``--format lora`` export, bias change included as in its diffusers layout); ``rank=None``: the base.

    ``factors`` are each change's full-rank :func:`low_rank` factors: their first ``r`` columns / rows are exactly
    the rank-``r`` export's (``up = U sqrt(S)``, ``down = sqrt(S) V^T``), so one SVD per module serves every rank."""
    for delta, full in zip(deltas, factors):
        layer = merged.linear(delta.component, delta.module)
        base_weight, base_bias = merged.base[(delta.component, delta.module)]
        weight = base_weight.double()
        if rank is not None and not delta.unchanged:
            weight = weight + full.up[:, :rank] @ full.down[:rank]
        layer.weight.copy_(weight.to(layer.weight.dtype))
        if base_bias is not None:
            bias = base_bias.double() + (delta.bias if rank is not None and delta.bias is not None else 0)
            layer.bias.copy_(bias.to(layer.bias.dtype))


def draw(pipeline, prompt: str, seeds: int, steps: int, guidance: float) -> torch.Tensor:
    """``(seeds, 3, H, W)`` samples in [0, 1], generator seeded 0 .. seeds - 1, the pipeline's own sampler."""
    generators = [torch.Generator().manual_seed(seed) for seed in range(seeds)]
    result = pipeline(
        prompt=[prompt] * seeds,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        output_type="pt",
    )
    return result.images.float().cpu()


def image_error(images: torch.Tensor, adapter: torch.Tensor, base: torch.Tensor) -> float:
    """The part of the adapter's effect on the samples that ``images`` miss: 0 reproduces it, 1 is the base."""
    effect = float(torch.linalg.vector_norm((adapter - base).double()))
    miss = float(torch.linalg.vector_norm((images - adapter).double()))
    return miss / effect if effect > 0 else 0.0


@torch.no_grad()
def measure_trained(folder: Path, label: str | None, args: argparse.Namespace) -> TrainedCurve:
    merged = load_merged(folder)
    merged.pipeline.set_progress_bar_config(disable=True)
    deltas = module_deltas(merged)
    shapes = [tuple(delta.weight.shape) for delta in deltas]
    full = max(min(shape) for shape in shapes)
    ranks = ranks_up_to(full)
    weight_errors = error_curve([singular_values(delta.weight) for delta in deltas], ranks)
    factors = [low_rank(delta.weight, rank=min(delta.weight.shape)) for delta in deltas]
    label = label or merged.document.get("method", folder.name)
    image_errors, samples = None, {}
    if not args.no_samples:
        prompt = args.prompt or run_prompt(folder)
        sample = functools.partial(
            draw, merged.pipeline, prompt, args.seeds, args.num_inference_steps, args.guidance_scale
        )
        adapter = samples["adapter"] = sample()  # the merged pipeline as load_merged left it
        set_rank(merged, deltas, factors, None)
        base = samples["base model"] = sample()
        image_errors = []
        for rank in tqdm(ranks, desc=f"{label}: samples per rank", leave=False):
            set_rank(merged, deltas, factors, rank)
            images = samples[f"LoRA r={rank}"] = sample()
            image_errors.append(image_error(images, adapter, base))
    return TrainedCurve(label, adapter_parameter_count(folder), shapes, ranks, weight_errors, image_errors, samples)


def trained_table(curve: TrainedCurve) -> str:
    header = ["rank r", "LoRA parameters", "weight error"] + (["sample error"] if curve.image_errors else [])
    rows = []
    for i, rank in enumerate(curve.ranks):
        row = [
            f"{rank} (full)" if i == len(curve.ranks) - 1 else str(rank),
            millions(lora_parameters(curve.shapes, rank)),
        ]
        row.append(f"{curve.weight_errors[i]:.3f}")
        if curve.image_errors:
            row.append(f"{curve.image_errors[i]:.3f}")
        rows.append(row)
    return markdown_table(header, rows)


def trained_main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    labels = args.labels or [None] * len(args.adapter_dir)
    curves = [measure_trained(Path(folder), label, args) for folder, label in zip(args.adapter_dir, labels)]
    images = Path(args.images_dir)
    for curve, folder in zip(curves, args.adapter_dir):
        equal = equal_rank(curve.adapter_parameters, curve.shapes)
        print(f"\n{curve.label} ({folder}): {len(curve.shapes)} adapted modules, {millions(curve.adapter_parameters)} "
              f"adapter parameters, as many as a LoRA of rank {equal:.1f}; {machine_line()}\n")  # fmt: skip
        print(trained_table(curve))
        if curve.samples and not args.no_plot:
            print(f"wrote {save_sample_grid(curve, images)}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if not args.no_plot:
        print(f"wrote {plot_trained(curves, images)}")


def save_sample_grid(curve: TrainedCurve, images: Path) -> Path:
    """Rows: the base model, the LoRA export at each rank, the adapter; columns: seeds. A JPEG in ``images``."""
    from torchvision.transforms.functional import to_pil_image

    order = ["base model"] + [f"LoRA r={rank}" for rank in curve.ranks] + ["adapter"]
    rows = [[to_pil_image(picture) for picture in curve.samples[name]] for name in order]
    grid = labeled_grid(rows, order, label_width=84)
    images.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in curve.label.lower()).strip("_")
    path = images / f"export_lora_samples_{slug}.jpg"
    grid.save(path, quality=90)
    return path


def plot_trained(curves: list[TrainedCurve], images: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_images = any(curve.image_errors for curve in curves)
    fig, axes = plt.subplots(1, 2 if with_images else 1, figsize=(11 if with_images else 6.4, 3.8), squeeze=False)
    for curve in curves:
        (line,) = axes[0][0].plot(curve.ranks, curve.weight_errors, marker="o", label=curve.label)
        if curve.image_errors:
            axes[0][1].plot(curve.ranks, curve.image_errors, marker="o", color=line.get_color(), label=curve.label)
    axes[0][0].set_ylabel("||delta - BA||_F / ||delta||_F (all modules)")
    axes[0][0].set_title("weight change the LoRA misses")
    if with_images:
        axes[0][1].set_ylabel("||img_r - img_adapter|| / ||img_adapter - img_base||")
        axes[0][1].set_title("adapter's effect on its samples the LoRA misses")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank per module (capped at min(out, in))")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, "export_lora_error_trained.png", images)


if __name__ == "__main__":
    main()
