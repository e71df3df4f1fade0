"""Model families: one module per family of diffusion models behind one small interface, so that the training
loop, checkpoints, validation, prior preservation, the evaluator and ``load_adapter`` know no family.

A family loads its components (tokenizers, text encoders, denoiser, VAE, training noise scheduler), encodes
prompts (with pooled embeddings where it has them), calls the denoiser on a training batch (its extra inputs: SDXL's
time ids, Flux's packing, position ids and guidance), names its objective (DDPM for the UNet families, flow matching
for the transformers) and builds the pipeline used for sampling. :func:`detect` finds the family of a diffusers
folder, a hub id or a single file.

May import :mod:`~dreambooth_gs.gs` (the default targets), :mod:`~dreambooth_gs.fileio` and the package resources;
nothing of methods, adapters, training, evaluation or export. A new family is a module here plus its entry in
``FAMILIES``.
"""

from __future__ import annotations

from pathlib import Path

from .base import Conditioning, Family, LoadedParts, TextSettings, read_model_index
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {
    family.name: family for family in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())
}
BY_PIPELINE_CLASS = {cls: family for family in FAMILIES.values() for cls in family.pipeline_classes}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def supported() -> str:
    return ", ".join(f"{f.name} ({f.pipeline_classes[0]})" for f in FAMILIES.values())


def _family_of_single_file(path: Path) -> Family:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:  # keys only, plus the few tensors the check reads
        keys = list(handle.keys())
        probe = {k: handle.get_slice(k) for k in keys}
    model_type = infer_diffusers_model_type(_ShapeView(probe))
    for family in FAMILIES.values():
        if model_type in family.single_file_types:
            return family
    raise ValueError(f"{path} is a {model_type!r} checkpoint; supported families: {supported()}")


class _ShapeView(dict):
    """What ``infer_diffusers_model_type`` reads of a checkpoint (``key in``, ``[key].shape``) without loading it."""

    def __getitem__(self, key):
        sliced = super().__getitem__(key)
        return type("Shape", (), {"shape": tuple(sliced.get_shape())})()


def _check_override(model_id: str, revision: str | None, family: Family) -> None:
    """Refuse ``--model_family`` against a pipeline folder whose model_index.json names another supported family
    (loading it would fail after pages of load reports); a class we do not know, or no readable index, is left to
    the override."""
    if Path(model_id).is_file():
        return
    try:
        class_name = read_model_index(model_id, revision).get("_class_name", "")
    except (OSError, ValueError):
        return
    found = BY_PIPELINE_CLASS.get(class_name)
    if found is not None and found is not family:
        raise ValueError(
            f"--model_family {family.name} does not match {model_id}: its model_index.json names a {class_name} "
            f"({found.name}); drop --model_family (the family is detected) or pass a {family.name} model"
        )


def detect(model_id: str, revision: str | None = None, override: str | None = None) -> Family:
    """The family of ``model_id`` (its ``model_index.json`` class, or a single file's keys); ``override`` names it
    where detection cannot (a pipeline class we do not know), and is refused where it contradicts the index."""
    if override is not None:
        family = get(override)
        _check_override(model_id, revision, family)
        return family
    if Path(model_id).is_file():
        return _family_of_single_file(Path(model_id))
    try:
        class_name = read_model_index(model_id, revision).get("_class_name", "")
    except (OSError, ValueError) as err:
        from ..fileio import first_line

        raise ValueError(
            f"cannot read the pipeline class of {model_id!r}: {first_line(err)} (give a local diffusers folder, a "
            "single-file .safetensors, or a hub id with network access; --model_family names the family)"
        ) from err
    if class_name not in BY_PIPELINE_CLASS:
        raise ValueError(
            f"{model_id} is a {class_name or 'pipeline of unknown class'} pipeline; supported families: "
            f"{supported()} (--model_family overrides the detection)"
        )
    return BY_PIPELINE_CLASS[class_name]


__all__ = ["FAMILIES", "Conditioning", "Family", "LoadedParts", "TextSettings", "detect", "get", "supported"]
