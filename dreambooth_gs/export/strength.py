"""An adapter folded in at a strength ``s`` (``export_adapter.py --scale S``): what each method's change is at ``s``.

* Rotations (gsoft, double_gsoft, boft; PEFT's oft): each orthogonal block at ``s`` is ``Cayley(s K)`` of its skew
  generator ``K`` (``s = 0``: the identity, ``s = 1``: the trained block; every ``s`` orthogonal) and a trained scale
  vector ``d`` is ``1 + s (d - 1)``. This is not the linear blend that LyCORIS (``s R + (1 - s) I``), kohya
  (``I + s (R - I)``) or A1111 (``W + s (R W - W)``) apply: that leaves the orthogonal group for ``0 < s < 1``.
  PEFT's OFT stores the upper triangle of ``K``, so scaling that vector by ``s`` is ``Cayley(s K)`` too.
* Additive methods (lora, full): the change itself is scaled, ``W + s (W_trained - W)`` (the bias likewise).
* PEFT's BOFT (peft_boft) is exported at ``s = 1`` only.

The strength itself is the loader's (``load_adapter(pipe, dir, scale=s)``, one home for every method); this module
says which adapters an export can take at which strength. ``s = 1`` is the plain merge, so the export is the one it
always was, bit for bit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..adapters.serialization import CONFIG_NAME, TEXT_ENCODER_FOLDERS, load_adapter, read_adapter_config

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


def load_at_strength(
    pipeline: Any, adapter_dir: str | os.PathLike, strength: float, documents: dict[str, dict[str, Any]]
) -> None:
    """Merge the adapter of ``adapter_dir`` into ``pipeline`` at ``strength`` (``documents``: see
    :func:`adapter_documents`), through the loader's own strength (:func:`dreambooth_gs.load_adapter`'s ``scale``):
    plain layers with the adapter folded in, as the exporter needs them."""
    check_strength(strength, documents)
    load_adapter(pipeline, adapter_dir, scale=strength)
