"""Saving a model that holds unmerged adapters: the base weights in the model's own files, each adapter in its own
folder beside them, never adapter tensors mixed into the model's weights.

diffusers' and transformers' ``save_pretrained`` write ``model.state_dict()``: with adapters loaded unmerged that
holds ``base_layer.weight`` and adapter keys, a folder that reloads with "newly initialized" weights (or, for a
transformers model whose PEFT flag is set, only the adapter). :func:`guard_save_pretrained` (installed by
``load_adapter`` on every component it puts an unmerged adapter into) makes the component's ``save_pretrained``,
and so ``pipeline.save_pretrained``, write instead:

- the base model, as it was before any adapter came (fused adapters are taken out of the weights while it is
  written and put back afterwards), in the usual files, so the folder loads as the base model;
- every adapter in ``<component folder>/adapters/<name>/``, the folder ``load_adapter`` reads (the trained
  tensors: a strength set with ``set_adapters`` is not part of the file, OFT's strength fixed at load is).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from ..gs.config import GSOFTConfig
from ..gs.layers import GSOFTLinear
from ..methods import baselines
from ..methods import registry as methods

logger = logging.getLogger(__name__)
ADAPTERS_FOLDER = "adapters"  # beside a saved component's own files
UNNAMED = "default"  # the folder name of an adapter loaded without a name
WRAPPERS = (GSOFTLinear, BaseTunerLayer)


def _wrapped_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, outermost wrapper)`` of every adapter-wrapped layer of ``model``."""
    found, names = [], []
    for name, module in model.named_modules():
        if isinstance(module, WRAPPERS) and not any(name.startswith(f"{outer}.") for outer in names):
            parent_name, _, child = name.rpartition(".")
            found.append((model.get_submodule(parent_name) if parent_name else model, child, module))
            names.append(name)
    return found


def _chain(layer: nn.Module) -> list[nn.Module]:
    """The wrappers from the outermost in, e.g. a LoRA around a GS layer: [lora, gs]."""
    chain = []
    while isinstance(layer, WRAPPERS):
        chain.append(layer)
        layer = layer.base_layer
    return chain


def _merged(layer: nn.Module) -> list[str] | bool:
    return list(layer.merged_adapters) if isinstance(layer, BaseTunerLayer) else layer.merged


def has_unmerged_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds adapter-wrapped layers (merged into the weights or not) that its plain
    ``save_pretrained`` would write as adapter keys."""
    return bool(_wrapped_layers(model))


@contextlib.contextmanager
def base_model_only(model: nn.Module) -> Iterator[None]:
    """Inside the ``with`` block ``model`` is its base model: every wrapped layer replaced by its base layer with
    every fused adapter taken out, the PEFT flag of a transformers model lowered. Everything is put back after."""
    layers = _wrapped_layers(model)
    states = [[(w, _merged(w)) for w in _chain(layer)] for _, _, layer in layers]
    peft_flag = getattr(model, "_hf_peft_config_loaded", None)
    try:
        for (parent, child, layer), chain in zip(layers, states):
            for wrapper, merged in chain:  # the outermost first: each one's delta sits on top of the next
                if merged:
                    wrapper.unmerge()
            setattr(parent, child, _chain(layer)[-1].base_layer)
        if peft_flag:
            model._hf_peft_config_loaded = False
        yield
    finally:
        if peft_flag:
            model._hf_peft_config_loaded = peft_flag
        for (parent, child, layer), chain in zip(layers, states):
            setattr(parent, child, layer)
            for wrapper, merged in reversed(chain):  # the innermost first, as they were fused
                if isinstance(wrapper, BaseTunerLayer) and merged:
                    wrapper.merge(adapter_names=merged)
                elif merged:
                    wrapper.merge()


def adapters_of(model: nn.Module) -> dict[str, tuple[str, dict[str, Any], dict[str, torch.Tensor]]]:
    """``{name: (method, config dict, tensors)}`` of every adapter in ``model``: the named ones (PEFT's
    ``peft_config``) and an unnamed one of the trainer's own layers, as adapter folders store them."""
    found = {}
    if any(isinstance(m, GSOFTLinear) for m in model.modules()):
        method, config = methods.GSKind.find(model)
        found[UNNAMED] = (method, config, methods.GSKind.state_dict(model))
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        if isinstance(config, GSOFTConfig):
            method, document = config.method, config.adapter_dict()
        else:
            method, document = baselines.peft_config_method(config), baselines.peft_config_to_dict(config)
        tensors = {  # an adapter under another one (a LoRA around a GS layer) is reached through its base_layer
            key.replace(".base_layer.", "."): value.detach().float().contiguous().cpu()
            for key, value in get_peft_model_state_dict(model, adapter_name=name).items()
        }
        found[name if name not in found else f"{name}-peft"] = (method, document, tensors)
    return found


def _guarded_save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    from .serialization import write_adapter_folder

    save = functools.partial(type(self).save_pretrained, self)
    if not has_unmerged_adapters(self):
        return save(save_directory, *args, **kwargs)
    adapters = adapters_of(self)  # read (and checked) before anything is written
    with base_model_only(self):
        result = save(save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        for name, (method, config, tensors) in adapters.items():
            write_adapter_folder(Path(save_directory) / ADAPTERS_FOLDER / name, method, config, tensors)
        logger.warning(
            "%s holds adapters: saved its base weights to %s and the adapters (%s) to %s/<name>; load them back with "
            "load_adapter",
            type(self).__name__,
            save_directory,
            ", ".join(adapters),
            Path(save_directory) / ADAPTERS_FOLDER,
        )
    return result


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` save the base weights and the adapters apart (see the module's docstring).
    Idempotent; a model without ``save_pretrained`` is left alone; once every adapter is gone it saves as usual."""
    original = getattr(type(model), "save_pretrained", None)
    if original is None or isinstance(model.__dict__.get("save_pretrained"), types.MethodType):
        return

    @functools.wraps(original)  # keeps the signature diffusers' pipeline inspects for the arguments it passes
    def guarded(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        return _guarded_save_pretrained(self, save_directory, *args, **kwargs)

    model.save_pretrained = types.MethodType(guarded, model)


__all__ = ["ADAPTERS_FOLDER", "adapters_of", "base_model_only", "guard_save_pretrained", "has_unmerged_adapters"]
