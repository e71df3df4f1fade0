"""Put adapters into any torch model and take them out: find targets, wrap, freeze, merge-and-unload."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

from ..gs.config import GSOFTConfig, is_target
from ..gs.layers import ADAPTER_PREFIX, GSOFTLinear, dimension_error
from .baselines import merge_peft_layers, peft_layers, remove_peft_adapter


def _split_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child_name = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child_name


def find_targets(model: nn.Module, target_modules: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` for every plain nn.Linear whose name matches a target (wrapped ones are skipped)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_target(name, target_modules) and ".base_layer" not in f".{name}":
            found.append((name, module))
    return found


def require_targets(model: nn.Module, target_modules: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """:func:`find_targets`, refusing (one line, with the model's Linear names) when nothing matches."""
    targets = find_targets(model, target_modules)
    if not targets:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        examples = ", ".join(linear_names[:12]) + (", ..." if len(linear_names) > 12 else "")
        raise ValueError(
            f"no nn.Linear matches target_modules={list(target_modules)}; "
            + (f"the model's Linear modules include: {examples}" if linear_names else "the model has no nn.Linear")
        )
    return targets


def adapter_layers(model: nn.Module) -> list[tuple[str, GSOFTLinear]]:
    """Every GSOFT adapter layer in ``model`` with its dotted name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GSOFTLinear)]


def _warn_sparse(config: GSOFTConfig, targets: list[tuple[str, nn.Linear]]) -> None:
    """Two GS factors give a dense Q only when b >= r: say so once per distinct shape."""
    if config.method == "boft":
        return
    dims = set()
    for _, linear in targets:
        dims.add(linear.in_features)
        if config.method == "double_gsoft":
            dims.add(linear.out_features)
    for d in sorted(dims):
        r = config.blocks_for(d)
        b = d // r
        if b < r:
            warnings.warn(
                f"GSOFT on dimension {d} with {r} blocks of size {b}: b < r, so Q = P^T L P R is sparse (at most "
                f"b/r = {b / r:.0%} of its entries are nonzero); it is dense when b >= r, e.g. nblocks <= "
                f"{max(k for k in range(1, d + 1) if d % k == 0 and d // k >= k)} for this dimension",
                stacklevel=3,
            )


def inject_adapter(model: nn.Module, config: GSOFTConfig) -> list[str]:
    """Wrap every targeted nn.Linear of ``model`` in a :class:`GSOFTLinear` and freeze everything else.

    Every target is checked before anything changes, so a bad configuration leaves the model untouched.
    Returns the wrapped module names.
    """
    if adapter_layers(model):
        raise ValueError("the model already has GSOFT adapters; merge_adapter() or remove_adapter() it first")
    targets = require_targets(model, config.target_modules)
    for name, linear in targets:
        error = dimension_error(config, name, linear.in_features, linear.out_features)
        if error:
            raise ValueError(error)
    _warn_sparse(config, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, linear in targets:
        parent, child = _split_parent(model, name)
        setattr(parent, child, GSOFTLinear(linear, config, name=name))
    return [name for name, _ in targets]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter parameters (``gsoft_`` prefix) of ``model``, by name."""
    return [(n, p) for n, p in model.named_parameters() if n.rpartition(".")[2].startswith(ADAPTER_PREFIX)]


def _unwrap_gsoft_layers(model: nn.Module, fold: bool) -> list[str]:
    """Put each GSOFT layer's base nn.Linear back, with the adapter folded in (``fold``) or undone."""
    names = []
    for name, layer in adapter_layers(model):
        layer.merge() if fold else layer.unmerge()
        parent, child = _split_parent(model, name)
        setattr(parent, child, layer.base_layer)
        names.append(name)
    return names


def merge_adapter(model: nn.Module) -> list[str]:
    """Fold every adapter (GSOFT family or PEFT baseline) into its base weight and put the plain layer back."""
    return merge_peft_layers(model) + _unwrap_gsoft_layers(model, fold=True)


def remove_adapter(model: nn.Module) -> list[str]:
    """Take every adapter out without folding it in (the model is the base model again)."""
    return remove_peft_adapter(model) + _unwrap_gsoft_layers(model, fold=False)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the ``with`` block: GSOFT-family layers (merged ones are unmerged and merged back
    afterwards) and PEFT baselines alike."""
    layers = [layer for _, layer in adapter_layers(model)]
    states = [(layer.adapter_enabled, layer.merged) for layer in layers]
    peft = [layer for _, layer in peft_layers(model)]
    peft_disabled = [layer.disable_adapters for layer in peft]
    try:
        for layer in layers:
            layer.unmerge()
            layer.adapter_enabled = False
        for layer in peft:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, (enabled, merged) in zip(layers, states):
            layer.adapter_enabled = enabled
            if merged:
                layer.merge()
        for layer, disabled in zip(peft, peft_disabled):
            layer.enable_adapters(not disabled)
