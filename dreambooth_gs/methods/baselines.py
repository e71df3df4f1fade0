"""The paper's baselines from PEFT (LoRA, OFT, and PEFT's own BOFT), behind the same inject / save / load shape.

Nothing here re-implements a baseline: PEFT builds the layers, and these helpers only choose PEFT configs, check
that PEFT built what was asked for, and move tensors in and out of the project's adapter folder format.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft import BOFTConfig, LoraConfig, OFTConfig, PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

PEFT_METHODS = ("lora", "oft", "peft_boft")
PEFT_CONFIG_CLASSES = {"lora": LoraConfig, "oft": OFTConfig, "peft_boft": BOFTConfig}
PEFT_TYPE_TO_METHOD = {"LORA": "lora", "OFT": "oft", "BOFT": "peft_boft"}


def make_peft_config(method: str, target_modules: tuple[str, ...], **options: Any) -> PeftConfig:
    """A PEFT config for ``method`` with the project's conventions.

    lora: ``rank`` (lora_alpha = rank, Gaussian init as diffusers' DreamBooth LoRA script); oft: ``block_size``
    (exact Cayley, no Neumann approximation, to compare like with like); peft_boft: ``nblocks`` or ``block_size``
    and ``n_butterfly_factor``.
    """
    targets = list(target_modules)
    if method == "lora":
        rank = options.get("rank", 4)
        return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    if method == "oft":
        return OFTConfig(
            r=0, oft_block_size=options.get("block_size", 32), target_modules=targets, use_cayley_neumann=False
        )
    if method == "peft_boft":
        return BOFTConfig(
            boft_block_num=options.get("nblocks") or 0,
            boft_block_size=options.get("block_size") or 0,
            boft_n_butterfly_factor=options.get("n_butterfly_factor", 1),
            target_modules=targets,
        )
    raise ValueError(f"unknown PEFT baseline {method!r}; choose one of {', '.join(PEFT_METHODS)}")


def peft_layers(model: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def check_peft_boft_factors(model: nn.Module, requested: int) -> None:
    """Refuse PEFT's silent fallback: without its CUDA extension PEFT's BOFT trains ONE butterfly factor."""
    for name, layer in peft_layers(model):
        built = layer.boft_R["default"].shape[0]
        if built != requested:
            raise ValueError(
                f"PEFT's BOFT built {built} butterfly factor(s) instead of {requested} at {name} (its CUDA "
                f"extension is unavailable here, so it falls back to one factor); use the GS-core BOFT "
                f"(--adapter boft, the default backend) to train real BOFT"
            )


def check_oft_block_size(model: nn.Module, requested: int) -> None:
    """Refuse PEFT's silent rounding: OFT replaces a block size that does not divide a layer's in_features by the
    nearest one that does (with a warning) while its config keeps the requested one. The trainer checks a new
    adapter with it; loading does not, so folders saved before the check (config 7, blocks of 8) still load."""
    layers = peft_layers(model)
    for name, layer in layers:
        built = layer.oft_block_size["default"]
        if built != requested:
            common = math.gcd(*(other.in_features for _, other in layers))
            valid = ", ".join(str(b) for b in range(1, common + 1) if common % b == 0)
            raise ValueError(
                f"oft_block_size={requested} does not divide in_features={layer.in_features} of {name} (PEFT would "
                f"silently train blocks of {built} there); use a divisor of every target's in_features: {valid}"
            )


def inject_peft_adapter(model: nn.Module, method: str, config: PeftConfig) -> list[str]:
    """Inject a PEFT baseline into ``model`` (every non-adapter parameter frozen); returns the adapted names."""
    if peft_layers(model):
        raise ValueError("the model already has PEFT adapters; merge or reload the model first")
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:  # PEFT's own messages name the missing targets
        raise ValueError(f"cannot inject {method}: {str(err).splitlines()[0]}") from err
    if method == "peft_boft":
        try:
            check_peft_boft_factors(model, config.boft_n_butterfly_factor)
        except ValueError:
            remove_peft_adapter(model)
            raise
    return [name for name, _ in peft_layers(model)]


def peft_method(model: nn.Module) -> tuple[str, PeftConfig] | None:
    """``(method, config)`` of the PEFT baseline injected into ``model``, or None."""
    configs = getattr(model, "peft_config", None)
    if not configs or not peft_layers(model):
        return None
    config = configs["default"]
    return peft_config_method(config), config


def peft_config_method(config: PeftConfig) -> str:
    """The registry's method name of a PEFT baseline's config (one clear error for another PEFT type)."""
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type not in PEFT_TYPE_TO_METHOD:
        raise ValueError(f"PEFT adapter type {peft_type} is not one of this toolkit's baselines ({PEFT_METHODS})")
    return PEFT_TYPE_TO_METHOD[peft_type]


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors by name (PEFT's keys without the adapter name), float32 and contiguous."""
    return {k: v.detach().float().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}


def load_peft_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` strictly into the PEFT adapter of ``model`` (same keys, same shapes)."""
    expected = get_peft_model_state_dict(model)
    if set(tensors) != set(expected):
        unexpected, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ValueError(
            f"{source} does not match the model's adapter: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            file_shape, model_shape = tuple(value.shape), tuple(expected[key].shape)
            raise ValueError(f"{source}: {key} has shape {file_shape} in the file but {model_shape} in the model")
    set_peft_model_state_dict(model, tensors)


def peft_config_to_dict(config: PeftConfig) -> dict[str, Any]:
    """A JSON-safe dict of a PEFT config (sets become sorted lists, enums their values)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(plain(v) for v in value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return getattr(value, "value", value)

    return {k: plain(v) for k, v in config.to_dict().items()}


def peft_config_from_dict(method: str, data: dict[str, Any]) -> PeftConfig:
    cls = PEFT_CONFIG_CLASSES[method]
    known = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in data.items() if k in known and k not in ("peft_type", "auto_mapping")})


def merge_peft_layers(model: nn.Module) -> list[str]:
    """Fold PEFT adapters into their base layers and put the base layers back."""
    merged = []
    for name, layer in peft_layers(model):
        layer.merge()
        _replace(model, name, layer.get_base_layer())
        merged.append(name)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return merged


def remove_peft_adapter(model: nn.Module) -> list[str]:
    """Take PEFT adapters out without merging (the base model again)."""
    removed = []
    for name, layer in peft_layers(model):
        _replace(model, name, layer.get_base_layer())
        removed.append(name)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return removed


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
