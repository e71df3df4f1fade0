"""Adapters used as LoRA users use theirs: loaded under a name, at a strength, several at once, switched off and on,
fused, unloaded; in a torch model or every component of a diffusers pipeline.

Every folder the trainer writes loads this way through PEFT's layers (the GS methods are a PEFT method, see
:mod:`dreambooth_gs.methods.peft_gs`; LoRA and OFT are PEFT's own), so diffusers' and PEFT's own adapter calls
(``unet.set_adapters``, ``disable_adapters``, ``delete_adapters``) drive them too. Strength: GS adapters stay
orthogonal at every strength (``Cayley(s K)``, see :mod:`~dreambooth_gs.methods.peft_gs`); LoRA's is PEFT's
(``s * B A``); PEFT's OFT layers have none, so its strength is fixed when it loads (its stored generators scaled:
``Cayley(s K)`` as well) and ``set_adapters`` refuses another weight for it; PEFT's BOFT and a constrained OFT load
at 1.0 only; a ``full`` folder has no name (use :func:`~dreambooth_gs.adapters.serialization.load_adapter`, whose
``scale`` gives ``W + s (W_trained - W)``).
Loading is all or nothing: a failure leaves every component as it was, adapters and trainability included.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft import inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from ..methods import registry as methods
from ..methods.peft_gs import GSOFTLayer
from .saving import guard_save_pretrained
from .serialization import CONFIG_NAME, WEIGHTS_NAME, _read_tensors, adapter_parts, read_adapter_config


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    """The named adapters loaded into ``model``, in loading order."""
    return list(getattr(model, "peft_config", {}) or {})


def _components(model: nn.Module | Any) -> list[nn.Module]:
    """``model`` itself, or every torch component of a pipeline that holds named adapters."""
    if isinstance(model, nn.Module):
        return [model]
    found = [c for c in getattr(model, "components", {}).values() if isinstance(c, nn.Module)]
    return [c for c in found if adapter_names(c)]


def _add_named(component: nn.Module, folder: Path, name: str, scale: float) -> None:
    document = read_adapter_config(folder)
    method = methods.get(document["method"])
    if method.kind is methods.FullKind:
        raise ValueError(
            f"{folder} holds full fine-tuning (the projections' own weights), which has no name or switch: load it "
            "with load_adapter(pipe, folder, scale=...) without adapter_name"
        )
    if method.name == "peft_boft" and scale != 1:
        raise ValueError(f"{folder} is PEFT's BOFT, which loads at scale 1.0 only (got {scale:g})")
    if method.name == "oft" and scale != 1 and document["config"].get("coft"):
        raise ValueError(
            f"{folder} is a constrained OFT (coft), whose rotation is projected at every use: it loads at scale 1.0 "
            f"only (got {scale:g})"
        )
    if name in adapter_names(component):
        raise ValueError(f"an adapter named {name!r} is already loaded; unload_adapter() it first or pick another")
    if not adapter_names(component) and methods.find(component) is not None:
        raise ValueError(
            "the model holds an unnamed adapter (load_adapter without adapter_name, merge=False); remove_adapter() "
            "it or merge it before loading named ones"
        )
    config = method.config_from_dict(document["config"])
    tensors = _read_tensors(folder / WEIGHTS_NAME)
    if method.name == "oft" and scale != 1:  # PEFT's OFT stores the upper triangle of K: scaled, it is Cayley(s K)
        tensors = {k: v * scale if ".oft_R." in f".{k}." else v for k, v in tensors.items()}
        scale = 1.0  # fixed at load: PEFT's OFT layers have no strength to set later
    layers = tuner_layers(component)
    active = list(layers[0].active_adapters) if layers else []  # every layer of a component has the same ones
    with warnings.catch_warnings():  # PEFT warns that several adapters share the model: that is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, component, name)
    expected = get_peft_model_state_dict(component, adapter_name=name)
    if set(expected) != set(tensors) or any(expected[k].shape != tensors[k].shape for k in tensors):
        unexpected, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ValueError(
            f"{folder / WEIGHTS_NAME} does not match the model: unexpected {unexpected[:3]}, missing {missing[:3]} "
            "(or shapes differ): was it trained on another base model?"
        )
    set_peft_model_state_dict(component, tensors, adapter_name=name)
    if getattr(component, "_hf_peft_config_loaded", None) is False:
        component._hf_peft_config_loaded = True  # diffusers' own set_adapters / disable_adapters then see it
    for layer in tuner_layers(component):
        layer.set_adapter([*dict.fromkeys([*active, name])])  # the adapters that were on stay on
        if name in _layer_adapters(layer) and _has_strength(layer):
            layer.set_scale(name, scale)
    for param_name, param in component.named_parameters():
        if f".{name}." in f"{param_name}." or param_name.endswith(f".{name}"):
            param.requires_grad_(False)  # loaded to use, not to train


def _layer_adapters(layer: BaseTunerLayer) -> set[str]:
    return set(layer._get_available_adapters())


def _has_strength(layer: BaseTunerLayer) -> bool:
    """GS layers and PEFT's LoRA scale; PEFT's OFT ``set_scale`` reads an attribute it never defines."""
    return isinstance(layer, GSOFTLayer) or hasattr(layer, "scaling")


def load_named_adapter(
    model: nn.Module | Any, directory: str | os.PathLike, adapter_name: str, scale: float = 1.0, fuse: bool = False
) -> list[nn.Module]:
    """Load the adapter folder ``directory`` (its text-encoder subfolders too) under ``adapter_name`` at strength
    ``scale``; ``fuse`` folds it into the weights at that strength (it stays named: unfuse with
    :func:`unfuse_adapters`). All or nothing; returns the components it went into."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty name without dots, got {adapter_name!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    parts = adapter_parts(model, Path(directory))
    flags = [{n: p.requires_grad for n, p in c.named_parameters()} for c, _ in parts]
    done = []
    try:
        for component, folder in parts:
            done.append(component)
            _add_named(component, folder, adapter_name, scale)
    except Exception:
        for component, saved in zip([c for c, _ in parts], flags):
            if component in done:  # PEFT may have wrapped some layers before it failed, even without a peft_config
                _delete(component, adapter_name)
            for param_name, param in component.named_parameters():
                param.requires_grad_(saved.get(param_name, param.requires_grad))
        raise
    for component, _ in parts:
        guard_save_pretrained(component)  # its save_pretrained keeps the base weights and the adapters apart
        for layer in tuner_layers(component) if fuse else ():
            if adapter_name in _layer_adapters(layer):
                layer.merge(adapter_names=[adapter_name])
    return [component for component, _ in parts]


def set_adapters(model: nn.Module | Any, names: str | Sequence[str], weights: float | Sequence[float] | None = None):
    """Make ``names`` the active adapters at ``weights`` (their strengths; default 1 each), as diffusers'
    ``set_adapters``; every component of a pipeline that holds them."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else weights
    weights = [weights] * len(names) if isinstance(weights, (int, float)) else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
    components = _components(model)
    loaded = {n for c in components for n in adapter_names(c)}
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise ValueError(f"no adapter named {unknown[0]!r} is loaded; loaded: {', '.join(sorted(loaded)) or 'none'}")
    for component in components:  # checked before anything changes: PEFT's OFT layers have no strength
        for layer in tuner_layers(component):
            for name, weight in zip(names, weights):
                if name in _layer_adapters(layer) and weight != 1 and not _has_strength(layer):
                    raise ValueError(
                        f"adapter {name!r} is PEFT's OFT, whose strength is fixed when it loads "
                        "(load_adapter(..., scale=...)); give it weight 1.0 here"
                    )
    for component in components:
        for layer in tuner_layers(component):
            layer.set_adapter(names)
            for name, weight in zip(names, weights):
                if name in _layer_adapters(layer) and _has_strength(layer):
                    layer.set_scale(name, weight)
        for param in component.parameters():
            param.requires_grad_(False)  # set_adapter makes the active adapters trainable: these are for use


def enable_adapters(model: nn.Module | Any, enabled: bool = True) -> None:
    """Switch every named adapter of ``model`` (every component of a pipeline) on, or off with ``enabled=False``."""
    for component in _components(model):
        for layer in tuner_layers(component):
            layer.enable_adapters(enabled)


def disable_adapters(model: nn.Module | Any) -> None:
    """The base model again, adapters kept: :func:`enable_adapters` switches them back on."""
    enable_adapters(model, False)


def unfuse_adapters(model: nn.Module | Any) -> None:
    """Take fused adapters back out of the weights (they stay loaded, unfused)."""
    for component in _components(model):
        for layer in tuner_layers(component):
            if layer.merged:
                layer.unmerge()


def fuse_and_unload(model: nn.Module | Any, name: str) -> None:
    """Fold adapter ``name`` into the weights at its strength and drop it: layers left with no adapter become plain
    layers again (what an unnamed ``load_adapter(..., merge=True)`` leaves, at any strength)."""
    for component in [c for c in _components(model) if name in adapter_names(c)]:
        for layer in tuner_layers(component):
            if name in _layer_adapters(layer) and name not in layer.merged_adapters:
                layer.merge(adapter_names=[name])
            if name in layer.merged_adapters:
                layer.merged_adapters.remove(name)  # folded for good: deleting it must not unmerge it
        _delete(component, name)


def _delete(component: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapter become their plain base layers again (and a model left
    with none loses its PEFT bookkeeping), so the model is exactly what it was before the adapter came."""
    for layer in tuner_layers(component):
        if name in _layer_adapters(layer):
            if name in layer.merged_adapters:
                layer.unmerge()
            layer.delete_adapter(name)
    getattr(component, "peft_config", {}).pop(name, None)
    for module_name, layer in list(component.named_modules()):
        if isinstance(layer, BaseTunerLayer) and not _layer_adapters(layer):
            parent_name, _, child = module_name.rpartition(".")
            parent = component.get_submodule(parent_name) if parent_name else component
            setattr(parent, child, layer.base_layer)  # one level: a LoRA may wrap a GS layer that stays
    if hasattr(component, "peft_config") and not component.peft_config:
        del component.peft_config
        if getattr(component, "_hf_peft_config_loaded", None):
            component._hf_peft_config_loaded = False


def unload_adapter(model: nn.Module | Any, name: str) -> None:
    """Remove the adapter ``name`` (unfused first if it was fused); the others stay as they are."""
    components = [c for c in _components(model) if name in adapter_names(c)]
    if not components:
        raise ValueError(f"no adapter named {name!r} is loaded")
    for component in components:
        _delete(component, name)


__all__ = [
    "CONFIG_NAME",
    "adapter_names",
    "disable_adapters",
    "enable_adapters",
    "fuse_and_unload",
    "load_named_adapter",
    "set_adapters",
    "unfuse_adapters",
    "unload_adapter",
]
