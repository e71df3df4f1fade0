"""An adapter folded in at a strength ``s`` (``export_adapter.py --scale S``): what each method's change is at ``s``.

* Rotations (gsoft, double_gsoft, boft; PEFT's oft): each orthogonal block at ``s`` is ``Cayley(s K)`` of its skew
  generator ``K`` (``s = 0``: the identity, ``s = 1``: the trained block; every ``s`` orthogonal) and a trained scale
  vector ``d`` is ``1 + s (d - 1)``. This is not the linear blend that LyCORIS (``s R + (1 - s) I``), kohya
  (``I + s (R - I)``) or A1111 (``W + s (R W - W)``) apply: that leaves the orthogonal group for ``0 < s < 1``.
  PEFT's OFT stores the upper triangle of ``K``, so scaling that vector by ``s`` is ``Cayley(s K)`` too.
* Additive methods (lora, full): the change itself is scaled, ``W + s (W_trained - W)`` (the bias likewise).
* PEFT's BOFT (peft_boft) is exported at ``s = 1`` only.

``s = 1`` is never computed here: :func:`dreambooth_gs.export.formats.load_merged` takes the plain merge then, so
the export is the one it always was, bit for bit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.serialization import CONFIG_NAME, TEXT_ENCODER_FOLDERS, load_adapter, read_adapter_config
from ..methods.baselines import peft_layers
from ..methods.injection import adapter_layers, merge_adapter

ROTATION_METHODS = ("gsoft", "double_gsoft", "boft", "oft")
ADDITIVE_METHODS = ("lora", "full")


def adapter_documents(
    document: dict[str, Any], adapter_dir: str | os.PathLike, denoiser: str = "unet"
) -> dict[str, dict[str, Any]]:
    """``{component: its adapter_config.json}`` for the denoiser and every text encoder with an adapter."""
    found = {denoiser: document}
    for component in TEXT_ENCODER_FOLDERS:
        if (Path(adapter_dir) / component / CONFIG_NAME).is_file():
            found[component] = read_adapter_config(Path(adapter_dir) / component)
    return found


def check_strength(strength: float, documents: dict[str, dict[str, Any]]) -> None:
    """Refuse a strength the adapters of ``documents`` (see :func:`adapter_documents`) cannot be exported at."""
    if not math.isfinite(strength):
        raise ValueError(f"--scale must be a finite number, got {strength}")
    if strength == 1:
        return
    for component, document in documents.items():
        method = document["method"]
        if method not in ROTATION_METHODS + ADDITIVE_METHODS:
            raise ValueError(
                f"--scale {strength:g}: the {component} adapter is {method}, which is exported at --scale 1 only "
                f"(--scale applies to {', '.join(ROTATION_METHODS + ADDITIVE_METHODS)})"
            )
        if method == "oft" and document["config"].get("coft"):
            raise ValueError(
                f"--scale {strength:g}: the {component} adapter is a constrained OFT (coft), whose rotation is "
                "projected at every use; it is exported at --scale 1 only"
            )


def _rotations_at_strength(model: nn.Module, strength: float) -> None:
    """Set every rotation adapter of ``model`` (injected, unmerged) to ``strength`` before it is merged: GS layers
    fold their weight at that strength now; PEFT's OFT generators are scaled (its merge then uses ``Cayley(s K)``)."""
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.base_layer.weight.copy_(layer.merged_weight(strength))
            layer.merged = True  # merge_adapter then only puts the plain layer back
        for _, layer in peft_layers(model):
            for rotation in getattr(layer, "oft_R", {}).values():
                rotation.weight.mul_(strength)  # the upper triangle of K: Cayley(s K)


def load_at_strength(
    pipeline: Any,
    adapter_dir: str | os.PathLike,
    strength: float,
    documents: dict[str, dict[str, Any]],
    base: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]],
) -> None:
    """Merge the adapter of ``adapter_dir`` into ``pipeline`` at ``strength`` (``documents``: see
    :func:`adapter_documents`; ``base``: the adapted modules' base weight and bias, by ``(component, module)``)."""
    check_strength(strength, documents)
    load_adapter(pipeline, adapter_dir, merge=False)
    for component, document in documents.items():
        model = getattr(pipeline, component)
        if document["method"] in ROTATION_METHODS:
            _rotations_at_strength(model, strength)
        merge_adapter(model)
    with torch.no_grad():
        for (component, module), (weight, bias) in base.items():
            if documents[component]["method"] not in ADDITIVE_METHODS:
                continue
            layer = getattr(pipeline, component).get_submodule(module)
            layer.weight.copy_(weight + strength * (layer.weight - weight))
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias + strength * (layer.bias - bias))
