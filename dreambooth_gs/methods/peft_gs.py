"""GSOFT, Double GSOFT and BOFT (GS core) as a PEFT method: named adapters with an orthogonal strength, several at
once, on PEFT's ``BaseTuner`` / ``BaseTunerLayer``.

Registered with PEFT when :mod:`dreambooth_gs` is imported (:func:`register`, idempotent; PEFT's files are not
edited), so ``peft.get_peft_model(model, GSOFTConfig(...))``, ``PeftModel.from_pretrained``,
``inject_adapter_in_model`` and diffusers' ``add_adapter`` / ``set_adapters`` / ``disable_adapters`` /
``delete_adapters`` build and drive these layers. The math is :mod:`dreambooth_gs.gs.functional`'s, the same kernel
the trainer's :class:`~dreambooth_gs.gs.layers.GSOFTLinear` calls.

Strength ``s`` of an adapter (PEFT's ``set_scale``, diffusers' ``set_adapters(names, weights)``): every orthogonal
block is ``Cayley(s K)`` of the block's skew generator ``K`` (``exp(s K)`` for the exp parametrisation), so the
rotation stays orthogonal for every ``s`` (0: identity, 1: the trained rotation, above 1: further along the same
one-parameter path); the scale vector becomes ``1 + s (d - 1)``. Several active adapters compose as a product, in
the order they were added: ``W -> T_1(W) -> T_2(T_1(W))`` with ``T(W) = diag(d) Q_out W Q_in`` (``Q_out = I`` but
for Double GSOFT), so the input meets the last adapter's rotation first and the merged weight keeps the base
weight's singular values when no scale vector is trained.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..gs import functional as gsf
from ..gs.config import PEFT_TYPE, GSOFTConfig, gsoft_peft_type
from ..gs.layers import dimension_error, transform_weight

PREFIX = "gsoft_"
# One ParameterDict per tensor kind; an adapter fills the ones its method has (by adapter name).
BLOCK_NAMES = ("gsoft_L", "gsoft_R", "gsoft_in_L", "gsoft_in_R", "gsoft_out_L", "gsoft_out_R", "gsoft_butterfly")
TENSOR_NAMES = (*BLOCK_NAMES, "gsoft_s")


def rotation_blocks(params: dict[str, torch.Tensor], parametrization: str, strength: float) -> dict[str, torch.Tensor]:
    """The orthogonal blocks of each factor at ``strength`` (float32; see ``gsf.orthogonal_blocks_at_strength``)."""
    return {
        name: gsf.orthogonal_blocks_at_strength(
            param.float().reshape(-1, *param.shape[-2:]), strength, parametrization
        ).view(param.shape)  # (..., b, b) -> (blocks, b, b) -> back
        for name, param in params.items()
    }


class GSOFTLayer(BaseTunerLayer):
    """The adapters of one frozen ``nn.Linear``: per adapter name its blocks, scale vector, config and strength."""

    adapter_layer_names = TENSOR_NAMES
    other_param_names = ("gsoft_config", "gsoft_strength")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        for name in TENSOR_NAMES:
            setattr(self, name, nn.ParameterDict({}))
        self.gsoft_config: dict[str, GSOFTConfig] = {}
        self.gsoft_strength: dict[str, float] = {}
        self._strength_multiplier: dict[str, float] = {}  # scale_layer / unscale_layer (diffusers' lora_scale)
        self._gathers: dict[tuple[str, torch.device], list[torch.Tensor | None]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"GS adapters adapt nn.Linear layers, not {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: GSOFTConfig, module_name: str = "linear", **kwargs) -> None:
        """Add adapter ``adapter_name`` (identity at initialisation: zero generators, unit scale vector)."""
        error = dimension_error(config, module_name, self.in_features, self.out_features)
        if error:
            raise ValueError(error)
        device = self.get_base_layer().weight.device
        d_in, d_out = self.in_features, self.out_features
        r = config.blocks_for(d_in)
        b = d_in // r

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=torch.float32, device=device))

        if config.method == "gsoft":
            shapes = {"gsoft_L": (r, b, b), "gsoft_R": (r, b, b)}
        elif config.method == "double_gsoft":
            r_out = config.blocks_for(d_out)
            b_out = d_out // r_out
            shapes = {"gsoft_in_L": (r, b, b), "gsoft_in_R": (r, b, b)}
            shapes |= {"gsoft_out_L": (r_out, b_out, b_out), "gsoft_out_R": (r_out, b_out, b_out)}
        else:
            shapes = {"gsoft_butterfly": (config.n_butterfly_factor, r, b, b)}
        for name, shape in shapes.items():
            getattr(self, name)[adapter_name] = zeros(*shape)
        if config.scale:
            self.gsoft_s[adapter_name] = nn.Parameter(torch.ones(d_out, dtype=torch.float32, device=device))
        self.gsoft_config[adapter_name] = config
        self.gsoft_strength[adapter_name] = 1.0
        self._strength_multiplier[adapter_name] = 1.0
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # -- one adapter's transform ------------------------------------------------------------------------------

    def strength(self, adapter_name: str) -> float:
        return self.gsoft_strength[adapter_name] * self._strength_multiplier[adapter_name]

    def _boft_gathers(self, adapter_name: str, device: torch.device) -> list[torch.Tensor | None]:
        """BOFT's fixed permutations between butterfly factors (derived, never saved; cached per device)."""
        key = (adapter_name, device)
        if key not in self._gathers:
            config = self.gsoft_config[adapter_name]
            r = config.blocks_for(self.in_features)
            b = self.in_features // r
            perms = [gsf.butterfly_permutation(self.in_features, r, b, i) for i in range(config.n_butterfly_factor)]
            self._gathers[key] = [g if g is None else g.to(device) for g in gsf.boft_gathers(perms)]
        return self._gathers[key]

    def adapter_transform(self, adapter_name: str, weight: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``T(W)`` of adapter ``adapter_name`` at its strength (or ``T^-1``), float32."""
        config = self.gsoft_config[adapter_name]
        s = self.strength(adapter_name)
        params = {n: getattr(self, n)[adapter_name] for n in BLOCK_NAMES if adapter_name in getattr(self, n)}
        blocks = rotation_blocks(params, config.parametrization, s)
        gathers = self._boft_gathers(adapter_name, weight.device) if config.method == "boft" else None
        scale = self.gsoft_s[adapter_name] if adapter_name in self.gsoft_s else None
        if scale is not None:
            scale = gsf.scale_at_strength(scale.float(), s)
            if inverse and bool((scale == 0).any()):
                raise ValueError(f"cannot unmerge {adapter_name!r}: its scale vector at this strength has zeros")
        return transform_weight(weight, config.method, blocks, gathers, scale, inverse)

    # -- PEFT's interface ---------------------------------------------------------------------------------------

    def set_scale(self, adapter: str, scale: float) -> None:
        """The strength of ``adapter`` (diffusers' ``set_adapters(names, weights)`` calls this)."""
        if adapter in self.gsoft_strength:
            if adapter in self.merged_adapters:
                raise ValueError(f"adapter {adapter!r} is merged; unmerge it before changing its strength")
            self.gsoft_strength[adapter] = float(scale)

    def scale_layer(self, scale: float) -> None:
        for adapter in self.active_adapters:
            if adapter in self._strength_multiplier:
                self._strength_multiplier[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        for adapter in self.active_adapters:
            if adapter in self._strength_multiplier:
                self._strength_multiplier[adapter] = (
                    1.0 if scale is None else self._strength_multiplier[adapter] / scale
                )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters (default: the active ones) into the base weight, in order (see the module's note)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.gsoft_config:
                continue
            with torch.no_grad():
                merged = self.adapter_transform(name, base.weight)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs in the merged weight of adapter {name!r}; it is broken")
                base.weight.data = merged.to(base.weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo :meth:`merge`, last merged first (exact up to rounding: each ``T`` is orthogonal)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                base.weight.data = self.adapter_transform(name, base.weight, inverse=True).to(base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``T_n(...T_1(W)) - W`` of the active, unmerged adapters (float32)."""
        weight = self.get_base_layer().weight
        return self._effective_weight(weight) - weight.float()

    def _effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        for name in self.active_adapters:
            if name in self.gsoft_config and name not in self.merged_adapters:
                w = self.adapter_transform(name, w)
        return w


class GSOFTLinear(nn.Module, GSOFTLayer):
    """A frozen ``nn.Linear`` with named GS adapters (PEFT's layer; the trainer uses :mod:`..gs.layers`)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GSOFTConfig, module_name: str = "linear"):
        super().__init__()
        GSOFTLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.gsoft_config and a not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = self._effective_weight(base.weight)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    def __repr__(self) -> str:
        return "gsoft." + super().__repr__()


class GSOFTModel(BaseTuner):
    """PEFT's tuner for :class:`GSOFTConfig`: replaces each target ``nn.Linear`` with a :class:`GSOFTLinear`."""

    prefix: str = PREFIX
    tuner_layer_cls = GSOFTLayer
    target_module_mapping: dict = {}

    def _create_and_replace(
        self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if isinstance(target, GSOFTLayer):
            target.update_layer(adapter_name, config, current_key)
            return
        if isinstance(target, BaseTunerLayer):
            raise ValueError(
                f"{current_key} already holds a {type(target).__name__} adapter of another method; GS adapters "
                "stack only on GS adapters (load the other method into another copy of the model)"
            )
        if not isinstance(target, nn.Linear):
            raise ValueError(f"{current_key} is a {type(target).__name__}; GS adapters adapt nn.Linear layers only")
        new_module = GSOFTLinear(target, adapter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a further adapter is not trainable until it is set active
        self._replace_module(parent, target_name, new_module, target)


def register() -> None:
    """Make ``GSOFT`` a PEFT method (its ``PeftType`` member, config, tuner and ``gsoft_`` prefix); idempotent."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if gsoft_peft_type() in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=PEFT_TYPE.lower(), config_cls=GSOFTConfig, model_cls=GSOFTModel, prefix=PREFIX)
