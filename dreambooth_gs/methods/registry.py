"""The one registry of fine-tuning methods: per method its name, how it is built from the trainer's options, how
it goes into a model, how its tensors are named, saved and loaded, its default learning rate and the flags it
reads. Every caller (trainer, adapter files, evaluator, benchmarks) looks methods up here.

Three kinds of implementation sit behind the entries: the GS family (this toolkit's layers: gsoft, double_gsoft,
boft), PEFT's baselines (lora, oft, peft_boft) and full fine-tuning of the projections. Adding a method is one entry
here (plus its kind, if it is a new one) and its tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..gs.config import GSOFTConfig
from . import baselines
from .full import FULL_METHOD, FullConfig, enable_full_finetuning, full_config, full_parameters
from .injection import adapter_layers, inject_adapter, trainable_parameters


def plain_tensors(params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Tensors by name, float32, detached, contiguous, on the CPU: what adapter files hold."""
    return {name: param.detach().float().contiguous().cpu() for name, param in params}


def copy_strictly(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``params`` by name: the same keys and shapes, all checked before any copy."""
    if set(tensors) != set(params):
        unexpected, absent = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        raise ValueError(
            f"{source} does not match its adapter_config.json (interrupted save?): "
            f"unexpected tensors {unexpected[:5]}, missing tensors {absent[:5]}"
        )
    for key, param in params.items():
        if tensors[key].shape != param.shape:
            module, _, pname = key.rpartition(".")
            raise ValueError(
                f"{source}: {pname} of {module} has shape {tuple(tensors[key].shape)} in the file but "
                f"{tuple(param.shape)} in the model (in_features/out_features differ from the saved base model)"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


# -- the three kinds ------------------------------------------------------------------------------------------------


class GSKind:
    """This toolkit's GSOFT / Double GSOFT / BOFT layers (``gsoft_`` parameters)."""

    @staticmethod
    def inject(model: nn.Module, method: str, config: GSOFTConfig) -> list[str]:
        return inject_adapter(model, config)

    @staticmethod
    def find(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        layers = adapter_layers(model)
        if not layers:
            return None
        configs = {json.dumps(layer.config_dict, sort_keys=True) for _, layer in layers}
        if len(configs) != 1:
            raise ValueError("the model's adapter layers were made from different configs; save them separately")
        config = layers[0][1].config_dict
        return config["method"], config

    @staticmethod
    def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
        return plain_tensors(trainable_parameters(model))

    @staticmethod
    def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        copy_strictly(dict(trainable_parameters(model)), tensors, source)

    @staticmethod
    def config_from_dict(method: str, data: dict[str, Any]) -> GSOFTConfig:
        return GSOFTConfig.from_dict(data)

    @staticmethod
    def split_key(key: str) -> tuple[str, str]:
        module, _, pname = key.rpartition(".")
        return module, pname


class PeftKind:
    """PEFT's own LoRA / OFT / BOFT layers, named and stored as PEFT names them."""

    @staticmethod
    def inject(model: nn.Module, method: str, config: Any) -> list[str]:
        return baselines.inject_peft_adapter(model, method, config)

    @staticmethod
    def find(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        found = baselines.peft_method(model)
        if found is None:
            return None
        method, config = found
        return method, baselines.peft_config_to_dict(config)

    @staticmethod
    def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
        return baselines.peft_state_dict(model)

    @staticmethod
    def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        baselines.load_peft_state(model, tensors, source)

    @staticmethod
    def config_from_dict(method: str, data: dict[str, Any]) -> Any:
        return baselines.peft_config_from_dict(method, data)

    @staticmethod
    def split_key(key: str) -> tuple[str, str]:
        """``a.b.to_q.lora_A.weight`` -> (``a.b.to_q``, ``lora_A.weight``)."""
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part.startswith(("lora_", "oft_", "boft_")):
                return ".".join(parts[:i]), ".".join(parts[i:])
        return key.rpartition(".")[0], key.rpartition(".")[2]


class FullKind:
    """Full fine-tuning of the targeted Linears' own weights and biases (no wrapper)."""

    @staticmethod
    def inject(model: nn.Module, method: str, config: FullConfig) -> list[str]:
        return enable_full_finetuning(model, config)

    @staticmethod
    def find(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        config = full_config(model)
        return None if config is None else (FULL_METHOD, config.to_dict())

    @staticmethod
    def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
        return plain_tensors(full_parameters(model, full_config(model)))

    @staticmethod
    def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        copy_strictly(dict(full_parameters(model, full_config(model))), tensors, source)

    @staticmethod
    def config_from_dict(method: str, data: dict[str, Any]) -> FullConfig:
        return FullConfig.from_dict(data)

    split_key = GSKind.split_key


KINDS = (GSKind, PeftKind, FullKind)


# -- the entries ----------------------------------------------------------------------------------------------------


def _gs_config(method: str, options) -> GSOFTConfig:
    nblocks = options.gsoft_nblocks if options.gsoft_block_size is None else None
    return GSOFTConfig(
        method=method,
        nblocks=nblocks,
        block_size=options.gsoft_block_size,
        scale=not options.gsoft_no_scale,
        parametrization=options.gsoft_parametrization,
        forward_mode=options.gsoft_forward_mode,
        target_modules=tuple(options.target_modules),
        weight_side_modules=weight_side_modules(options),
    )


def weight_side_modules(options) -> tuple[str, ...]:
    """--gsoft_weight_side_modules as GSOFTConfig takes it (unset or 'none': no module)."""
    names = options.gsoft_weight_side_modules or ()
    return () if [name.lower() for name in names] == ["none"] else tuple(names)


def _boft_blocks(options) -> tuple[int | None, int | None]:
    if options.boft_block_size is not None:
        return None, options.boft_block_size
    return (options.boft_block_num if options.boft_block_num is not None else 32), None


def _boft_config(options) -> GSOFTConfig:
    nblocks, block_size = _boft_blocks(options)
    return GSOFTConfig(
        method="boft",
        nblocks=nblocks,
        block_size=block_size,
        n_butterfly_factor=options.boft_n_butterfly_factor,
        forward_mode=options.gsoft_forward_mode,
        target_modules=tuple(options.target_modules),
        weight_side_modules=weight_side_modules(options),
    )


def _peft_boft_config(options):
    nblocks, block_size = _boft_blocks(options)
    return baselines.make_peft_config(
        "peft_boft",
        tuple(options.target_modules),
        nblocks=nblocks,
        block_size=block_size,
        n_butterfly_factor=options.boft_n_butterfly_factor,
    )


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: its saved name, its kind and what the trainer needs to know about it."""

    name: str
    kind: type
    description: str
    default_learning_rate: float
    flags: tuple[str, ...]  # the TrainingOptions fields (flags) it reads, beside --target_modules
    make_config: Callable[[Any], Any]  # TrainingOptions -> the method's config object

    def inject(self, model: nn.Module, config: Any) -> list[str]:
        return self.kind.inject(model, self.name, config)

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        return self.kind.config_from_dict(self.name, data)


GS_FLAGS = (
    "gsoft_nblocks",
    "gsoft_block_size",
    "gsoft_no_scale",
    "gsoft_parametrization",
    "gsoft_forward_mode",
    "gsoft_weight_side_modules",
)
BOFT_FLAGS = (
    "boft_block_num",
    "boft_block_size",
    "boft_n_butterfly_factor",
    "boft_backend",
    "gsoft_forward_mode",
    "gsoft_weight_side_modules",
)
# Default learning rates: GSOFT / Double GSOFT follow the GSOFT paper (AdamW 2e-5); LoRA follows diffusers'
# DreamBooth LoRA recipe; OFT and BOFT follow their papers' subject-driven settings; full (fine-tuning the
# projections themselves) takes the usual DreamBooth full fine-tuning rate, 5e-6 (diffusers' train_dreambooth.py
# examples): a literature default, not tuned here.
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gsoft", GSKind, "y = s * (W Q x) + b, Q a GS orthogonal matrix", 2e-5, GS_FLAGS,
               lambda o: _gs_config("gsoft", o)),
        Method("double_gsoft", GSKind, "y = s * (Q_out W Q_in x) + b", 2e-5, GS_FLAGS,
               lambda o: _gs_config("double_gsoft", o)),
        Method("boft", GSKind, "BOFT's butterfly orthogonal matrix on the GS core", 3e-5, BOFT_FLAGS, _boft_config),
        Method("peft_boft", PeftKind, "PEFT's BOFT (needs its CUDA extension)", 3e-5, BOFT_FLAGS, _peft_boft_config),
        Method("lora", PeftKind, "PEFT's LoRA (lora_alpha = rank)", 1e-4, ("rank",),
               lambda o: baselines.make_peft_config("lora", tuple(o.target_modules), rank=o.rank)),
        Method("oft", PeftKind, "PEFT's OFT (exact Cayley)", 6e-5, ("oft_block_size",),
               lambda o: baselines.make_peft_config("oft", tuple(o.target_modules), block_size=o.oft_block_size or 32)),
        Method("full", FullKind, "the projections' own weights and biases", 5e-6, (),
               lambda o: FullConfig(target_modules=tuple(o.target_modules))),
    )
}  # fmt: skip
ALL_METHODS = tuple(REGISTRY)
# What --adapter offers: every method but PEFT's BOFT, which is --adapter boft --boft_backend peft.
TRAINER_ADAPTERS = tuple(name for name in REGISTRY if name != "peft_boft")
DEFAULT_LEARNING_RATES = {name: REGISTRY[name].default_learning_rate for name in TRAINER_ADAPTERS}


def get(name: str) -> Method:
    """The registry entry of ``name``; one clear error for an unknown one."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(ALL_METHODS)}")
    return REGISTRY[name]


def for_options(options) -> tuple[Method, Any]:
    """``(method, config)`` the trainer's options ask for (``--adapter boft --boft_backend peft``: PEFT's BOFT);
    no ``target_modules`` means the UNet families' attention projections (the trainer fills in the family's)."""
    name = "peft_boft" if options.adapter == "boft" and options.boft_backend == "peft" else options.adapter
    method = get(name)
    if options.target_modules is None:
        options = replace(options, target_modules=list(GSOFTConfig().target_modules))
    return method, method.make_config(options)


def find(model: nn.Module) -> tuple[Method, dict[str, Any]] | None:
    """``(method, config dict)`` of the adapter in ``model``, or None when it has none."""
    for kind in KINDS:
        found = kind.find(model)
        if found is not None:
            return get(found[0]), found[1]
    return None
