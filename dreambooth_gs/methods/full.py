"""Full fine-tuning of the projections: a baseline that trains the targeted nn.Linear weights (and biases) themselves.

Nothing is wrapped: the model keeps its plain Linears and only their ``requires_grad`` flags change. A
:class:`FullConfig` kept on the model (as PEFT keeps ``peft_config``) says what is trained, so that saving,
checkpoints and resume find the trained tensors by name (``<module path>.weight`` / ``.bias``) without a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from ..gs.config import target_module_names
from .baselines import peft_layers
from .injection import adapter_layers, find_targets, require_targets

FULL_METHOD = "full"
CONFIG_ATTRIBUTE = "dreambooth_gs_full"  # where enable_full_finetuning leaves the FullConfig on the model


@dataclass
class FullConfig:
    """What full fine-tuning trains; ``to_dict`` / ``from_dict`` round-trip it (``adapter_config.json``)."""

    method: str = field(default=FULL_METHOD, metadata={"help": "Always 'full' (names the method in saved files)."})
    target_modules: tuple[str, ...] = field(
        default=("to_q", "to_k", "to_v", "to_out.0"),
        metadata={
            "help": "nn.Linear modules whose weight and bias are trained, matched as for the adapters (dotted name "
            "equal to a target or ending with '.' + target). Default: every attention projection of a UNet."
        },
    )

    def __post_init__(self) -> None:
        self.target_modules = target_module_names(self.target_modules)
        if self.method != FULL_METHOD:
            raise ValueError(f"FullConfig.method must be {FULL_METHOD!r}, got {self.method!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FullConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FullConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def enable_full_finetuning(model: nn.Module, config: FullConfig) -> list[str]:
    """Freeze ``model`` except the weight and bias of every targeted nn.Linear; returns the trained module names.

    Every target is checked before anything changes, so a bad configuration leaves the model untouched.
    """
    if adapter_layers(model) or peft_layers(model) or full_config(model) is not None:
        raise ValueError("the model already has an adapter; full fine-tuning needs the plain base model")
    targets = require_targets(model, config.target_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    for _, linear in targets:
        linear.requires_grad_(True)
    setattr(model, CONFIG_ATTRIBUTE, config)
    return [name for name, _ in targets]


def full_config(model: nn.Module) -> FullConfig | None:
    """The :class:`FullConfig` that :func:`enable_full_finetuning` left on ``model``, or None."""
    return getattr(model, CONFIG_ATTRIBUTE, None)


def full_parameters(model: nn.Module, config: FullConfig) -> list[tuple[str, nn.Parameter]]:
    """``(<module path>.<weight|bias>, parameter)`` of every projection ``config`` targets in ``model``."""
    return [
        (f"{name}.{pname}", param)
        for name, linear in find_targets(model, config.target_modules)
        for pname, param in linear.named_parameters(recurse=False)
    ]
