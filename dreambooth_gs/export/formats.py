"""Export an adapter folder for other tools: a merged diffusers pipeline, a LoRA file, or one original-layout file.

Nothing here knows the methods: the base pipeline is loaded, the adapted modules' weights are copied, the adapter is
loaded merged (:func:`dreambooth_gs.load_adapter`; at a strength other than 1, by :mod:`.strength`), and each format
works from the merged pipeline or from the changes ``W_merged - W_base`` of the modules that ``adapter_config.json``
lists. Every output is written into a hidden temporary sibling and renamed into place at the end, so ``--output`` is
either untouched or complete (a full disk or a read-only folder is one :class:`~dreambooth_gs.fileio.WriteFailure`
line, and leaves nothing behind).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters.serialization import denoiser_name, load_adapter, read_adapter_config
from ..fileio import atomic_write, created_directories, first_line, reporting_write_failures, staged_directory
from .ldm_layout import TEXT_LAYOUTS, default_text_layout, pipeline_to_ldm, sdxl_pipeline_to_ldm
from .lora import FULL_RANK, LORA_LAYOUTS, ModuleDelta, lora_tensors, report_markdown, report_summary
from .model_card import model_card
from .strength import adapter_documents, check_strength, load_at_strength

FORMATS = ("diffusers", "lora", "single_file")
LORA_FILES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}
REPORT_JSON, REPORT_MD, MODEL_CARD = "export_report.json", "export_report.md", "README.md"


@dataclass
class MergedPipeline:
    """A pipeline with the adapter merged in, the adapter's config, and the adapted modules' base weights."""

    pipeline: Any
    document: dict[str, Any]
    base_model: str
    base: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]]  # (component, module) -> (weight, bias)
    strength: float = 1.0  # the strength the adapter was merged at (--scale)

    def linear(self, component: str, module: str) -> nn.Linear:
        """The adapted (merged) Linear ``component.module`` of the pipeline."""
        return _linear(self.pipeline, component, module)


def adapted_modules(
    document: dict[str, Any], adapter_dir: str | os.PathLike, denoiser: str = "unet"
) -> list[tuple[str, str]]:
    """``(component, module path)`` of every module the adapter changes: the denoiser's (adapter_config.json's
    paths are relative to the pipeline's ``denoiser``: ``unet`` or ``transformer``), then those of the text-encoder
    adapters ``--train_text_encoder`` writes in subfolders named after the pipeline's encoders."""
    documents = adapter_documents(document, adapter_dir, denoiser)
    return [(component, name) for component, config in documents.items() for name in config["modules"]]


def _linear(pipeline: Any, component: str, module: str) -> nn.Linear:
    try:
        layer = getattr(pipeline, component).get_submodule(module)
    except AttributeError as err:
        raise ValueError(
            f"the base model has no {component}.{module}, which the adapter adapts; pass the base it was trained on "
            "with --pretrained_model_name_or_path"
        ) from err
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{component}.{module} is a {type(layer).__name__}, not an nn.Linear; cannot export it")
    return layer


def check_pipeline_class(base_model: str) -> None:
    """Refuse a pipeline folder (or hub id) whose ``model_index.json`` names a class this diffusers does not have
    (``from_pretrained`` would fail with an AttributeError); an index that cannot be read is left to the load."""
    import diffusers

    from .. import families
    from ..families.base import read_model_index

    try:
        class_name = read_model_index(base_model).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(class_name, str) and not hasattr(diffusers, class_name):
        raise ValueError(
            f"cannot load the base model {base_model!r}: its model_index.json names the pipeline class {class_name!r}, "
            f"which diffusers {diffusers.__version__} does not have; pass a diffusers folder of a supported family "
            f"({families.supported()}) with --pretrained_model_name_or_path, or install a newer diffusers"
        )


def load_pipeline_for_export(base_model: str) -> Any:
    """The base pipeline in float32 exactly as its folder (or hub id, or single file) defines it, scheduler included."""
    from diffusers import DiffusionPipeline

    from .. import families
    from ..adapters.sampling import quiet_loading
    from ..families.base import null_components

    if not Path(base_model).is_file():
        check_pipeline_class(base_model)
    try:
        with quiet_loading():
            if Path(base_model).is_file():
                pipeline = families.detect(base_model).pipeline_class().from_single_file(base_model)
            else:
                pipeline = DiffusionPipeline.from_pretrained(base_model, **null_components(base_model))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load the base model {base_model!r}: {first_line(err)} (pass a local diffusers folder or a hub "
            "id with --pretrained_model_name_or_path)"
        ) from err
    denoiser = denoiser_name(pipeline)
    if denoiser is None:
        raise ValueError(
            f"{base_model!r} is a {type(pipeline).__name__} without a UNet or transformer (the adapted denoiser)"
        )
    if any(p.dtype != torch.float32 for p in getattr(pipeline, denoiser).parameters()):
        pipeline.to(torch.float32)  # merge and compare in float32; --save_dtype chooses what is written
    return pipeline


def load_merged(adapter_dir: str | os.PathLike, base_model: str | None = None, strength: float = 1.0) -> MergedPipeline:
    """Load the base pipeline (``base_model`` or the adapter's ``base_model`` field) and merge the adapter into it,
    at ``strength`` (``--scale``; see :mod:`dreambooth_gs.export.strength`; 1: the plain merge, bit for bit)."""
    document = read_adapter_config(adapter_dir)
    base_model = base_model or document.get("base_model")
    if not base_model:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base_model; pass --pretrained_model_name_or_path")
    pipeline = load_pipeline_for_export(str(base_model))
    base = {}
    for component, module in adapted_modules(document, adapter_dir, denoiser_name(pipeline)):
        layer = _linear(pipeline, component, module)
        bias = None if layer.bias is None else layer.bias.detach().clone()
        base[(component, module)] = (layer.weight.detach().clone(), bias)
    if strength == 1:
        load_adapter(pipeline, adapter_dir, merge=True)
    else:
        documents = adapter_documents(document, adapter_dir, denoiser_name(pipeline))
        load_at_strength(pipeline, adapter_dir, strength, documents)
    return MergedPipeline(pipeline, document, str(base_model), base, strength)


def module_deltas(merged: MergedPipeline) -> list[ModuleDelta]:
    """``W_merged - W_base`` (and the bias change) of every adapted module, in float64."""
    deltas = []
    for (component, module), (weight, bias) in merged.base.items():
        layer = merged.linear(component, module)
        new_bias = None if layer.bias is None else layer.bias.detach().double()
        bias_delta = None if bias is None or new_bias is None else new_bias - bias.double()
        deltas.append(ModuleDelta(component, module, layer.weight.detach().double() - weight.double(), bias_delta))
    return deltas


# -- writing ---------------------------------------------------------------------------------------------------


def check_output(output: Path, overwrite: bool, is_file: bool) -> None:
    """Refuse to replace an existing output (a non-empty folder, or a file) unless ``overwrite``."""
    if is_file:
        if output.suffix != ".safetensors":
            raise ValueError(f"--output {output} must end with .safetensors for --format single_file")
        if output.is_dir():
            raise ValueError(f"--output {output} is a folder; --format single_file writes one .safetensors file")
        if output.exists() and not overwrite:
            raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
        return
    if output.is_file():
        raise ValueError(f"--output {output} is a file; this format writes a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")


def _writing(output: Path, what: str) -> contextlib.AbstractContextManager:
    """A failed write of ``output`` (full disk, read-only folder) as one line that says the old output is intact."""
    kept = f"the existing {output} is unchanged" if output.exists() else "no partial output was left"
    return reporting_write_failures(f"{what} {output}", kept)


@contextlib.contextmanager
def export_directory(output: Path, what: str) -> Iterator[Path]:
    """A staging folder that replaces ``output`` when the block succeeds (see :func:`staged_directory`: files get
    ``open``'s permissions; a failure leaves the old output and no new folder), write failures in one line."""
    with _writing(output, what), staged_directory(output) as staging:
        yield staging


def _metadata(merged: MergedPipeline, fmt: str) -> dict[str, str]:
    metadata = {
        "format": "pt",
        "dreambooth_gs_export": fmt,
        "dreambooth_gs_method": str(merged.document["method"]),
        "base_model": merged.base_model,
    }
    if merged.strength != 1:  # written only then: a --scale 1 file is the one earlier releases wrote
        metadata["dreambooth_gs_scale"] = repr(merged.strength)
    return metadata


def export_diffusers(
    merged: MergedPipeline, output: Path, adapter_dir: str | os.PathLike, dtype: torch.dtype, command: str | None
) -> dict[str, Any]:
    """The merged pipeline as a diffusers folder (``save_pretrained``) with a model card."""
    from ..adapters.sampling import quiet_loading

    with export_directory(output, "the merged pipeline") as staging:
        if dtype != torch.float32:  # loaded and merged in float32
            merged.pipeline.to(dtype)
        with quiet_loading():  # no "Writing model shards" bar per component: the command prints what it wrote
            merged.pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / MODEL_CARD).write_text(model_card(merged.document, merged.base_model, adapter_dir, command))
    return {"format": "diffusers", "output": str(output)}


def export_lora(
    merged: MergedPipeline,
    output: Path,
    layout: str,
    rank: int | str | None,
    max_error: float | None,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The adapter's changes as a LoRA file plus ``export_report.json`` / ``.md`` beside it."""
    tensors, report = lora_tensors(module_deltas(merged), layout=layout, rank=rank, max_error=max_error, dtype=dtype)
    report.update(
        method=merged.document["method"], base_model=merged.base_model, file=LORA_FILES[layout], scale=merged.strength
    )
    with export_directory(output, "the LoRA export") as staging:
        save_file(tensors, staging / LORA_FILES[layout], metadata=_metadata(merged, f"lora/{layout}"))
        (staging / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
        (staging / REPORT_MD).write_text(report_markdown(report, f"LoRA export of a {report['method']} adapter"))
    report["summary"] = report_summary(report)
    return {"format": "lora", "output": str(output), **report}


def export_single_file(merged: MergedPipeline, output: Path, text_layout: str, dtype: torch.dtype) -> dict[str, Any]:
    """UNet, VAE and text encoder(s) in the original single-file layout (one ``.safetensors``): SD 1.x / 2.x, or
    SDXL (``conditioner.embedders.0`` CLIP + ``.1`` OpenCLIP; its layout is fixed, so ``text_layout`` must be auto)."""
    pipe = merged.pipeline
    for component in ("unet", "vae", "text_encoder"):
        if not isinstance(getattr(pipe, component, None), nn.Module):
            raise ValueError(
                f"--format single_file needs a Stable Diffusion 1.x / 2.x / XL pipeline; it has no {component}"
            )
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if sdxl and text_layout != "auto":
        raise ValueError(
            f"--text_encoder_layout {text_layout} is for SD 1.x / 2.x; SDXL's layout is fixed (CLIP + OpenCLIP), "
            "leave it at auto"
        )

    def plain(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}

    unet_vae = (
        plain(pipe.unet),
        pipe.unet.config.layers_per_block,
        plain(pipe.vae),
        len(pipe.vae.config.up_block_types),
    )
    if sdxl:
        text_layout = "sdxl"
        tensors = sdxl_pipeline_to_ldm(*unet_vae, plain(pipe.text_encoder), plain(pipe.text_encoder_2))
    else:
        if text_layout == "auto":
            text_layout = default_text_layout(pipe.text_encoder.config.hidden_act)
        tensors = pipeline_to_ldm(*unet_vae, plain(pipe.text_encoder), text_layout)
    metadata = {**_metadata(merged, "single_file"), "text_encoder_layout": text_layout}
    with _writing(output, "the single file"), created_directories(output.parent):
        atomic_write(output, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return {"format": "single_file", "output": str(output), "text_encoder_layout": text_layout, "tensors": len(tensors)}


def _check_kohya_family(adapter_dir: str | os.PathLike, base_model: str | None) -> None:
    """Refuse the kohya layout for a transformer family before the base pipeline loads (its model_index is read;
    a base that cannot be read is left to the load, which says why)."""
    from .. import families

    base = base_model or read_adapter_config(adapter_dir).get("base_model")
    try:
        family = families.detect(str(base)) if base else None
    except ValueError:
        return
    if family is not None and family.denoiser_name != "unet":
        raise ValueError(
            f"--lora_format kohya is the UNet families' layout; a {family.pipeline_classes[0]} LoRA is written in "
            "the diffusers layout (--lora_format diffusers: its pipeline's load_lora_weights and ComfyUI, which maps "
            "transformer.* keys, read it)"
        )


def export_adapter(
    adapter_dir: str | os.PathLike,
    fmt: str,
    output: str | os.PathLike,
    base_model: str | None = None,
    rank: int | str | None = None,
    max_error: float | None = None,
    lora_format: str = "diffusers",
    text_encoder_layout: str = "auto",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    command: str | None = None,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Export the adapter of ``adapter_dir`` as ``fmt`` (diffusers | lora | single_file) to ``output``, applied at
    strength ``scale`` (``--scale``: rotations ``Cayley(s K)`` and scale vectors ``1 + s (d - 1)``, additive changes
    ``s * delta``; see :mod:`dreambooth_gs.export.strength`).

    Arguments are checked before the (slow) pipeline load; returns a summary (for ``lora``, the full report).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "lora":
        if (rank is None) == (max_error is None):
            raise ValueError("--format lora needs --rank R (or --rank full) or --max_error E, exactly one")
        if lora_format not in LORA_LAYOUTS:
            raise ValueError(f"unknown --lora_format {lora_format!r}; choose one of {', '.join(LORA_LAYOUTS)}")
        if max_error is not None and not 0.0 <= max_error < 1.0:
            raise ValueError(f"--max_error must be in [0, 1), got {max_error}")
        if rank is not None and rank != FULL_RANK and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"--rank must be a positive integer or 'full', got {rank!r}")
    elif rank is not None or max_error is not None:
        raise ValueError("--rank / --max_error only apply to --format lora")
    if not math.isfinite(scale):
        raise ValueError(f"--scale must be a finite number, got {scale}")
    if fmt == "lora" and scale == 0:
        raise ValueError(
            "--scale 0 is the base model itself: the LoRA would change nothing, so none is written (use a non-zero "
            "--scale, or --format diffusers / single_file for the base model)"
        )
    if text_encoder_layout not in ("auto", *TEXT_LAYOUTS):
        raise ValueError(f"unknown --text_encoder_layout {text_encoder_layout!r}; choose auto, clip or open_clip")
    output = Path(output)
    check_output(output, overwrite, is_file=fmt == "single_file")
    adapter = Path(adapter_dir).resolve()
    if output.resolve() == adapter or output.resolve() in adapter.parents:
        raise ValueError(f"--output {output} would replace the adapter folder {adapter_dir}; choose another path")
    if fmt == "lora" and lora_format == "kohya":
        _check_kohya_family(adapter_dir, base_model)
    if scale != 1:  # the denoiser's name does not matter to the check: only the methods do
        check_strength(scale, adapter_documents(read_adapter_config(adapter_dir), adapter_dir))
    merged = load_merged(adapter_dir, base_model, strength=scale)
    if fmt == "diffusers":
        return export_diffusers(merged, output, adapter_dir, dtype, command)
    if fmt == "lora":
        return export_lora(merged, output, lora_format, rank, max_error, dtype)
    return export_single_file(merged, output, text_encoder_layout, dtype)
