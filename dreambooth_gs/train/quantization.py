"""``--base_model_precision``: the frozen denoiser quantized at load time through diffusers' own quantization config
(``TorchAoConfig`` passed to its ``from_pretrained``), what each method needs to train on it, and the one-line
refusals of what cannot (checked when the options are made, before anything is written).

Adapters train through the quantized layers: PEFT's LoRA / OFT call the frozen layer (PEFT has torchao layers);
the GS methods' kernels read the frozen weight itself (``W Q x`` in one node), and torchao's weight tensors have no
transpose, so each targeted layer is seen through :class:`DequantizedLinear` (its weight dequantized at each call,
in the layer's dtype; the stored weight stays quantized)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("no_change", "int8-torchao", "fp8-torchao", "nf4-bnb", "int8-bnb")
TORCHAO_PIN = "torchao==0.18.0"  # imports with torch 2.14; diffusers 0.42 asks for >= 0.15
GS_ADAPTERS = ("gsoft", "double_gsoft", "boft")


def check_precision(options) -> None:
    """Refuse, in one line, a ``--base_model_precision`` this machine or these options cannot train with."""
    precision = options.base_model_precision
    if precision == "no_change":
        return
    flag = f"--base_model_precision {precision}"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown {flag}; choose one of {', '.join(PRECISIONS)}")
    if precision.endswith("-bnb"):
        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"{flag} needs a CUDA GPU and bitsandbytes; use int8-torchao (CPU or GPU) here")
        raise ValueError(f"{flag} is not implemented yet; use int8-torchao")
    if precision == "fp8-torchao" and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        raise ValueError(f"{flag} needs a CUDA GPU of compute capability 8.9 or more (Ada, Hopper); use int8-torchao")
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"{flag} needs torchao: pip install {TORCHAO_PIN}")
    if options.adapter == "full":
        raise ValueError(f"{flag} quantizes the frozen weights, but --adapter full trains them; use an adapter")
    if options.adapter in GS_ADAPTERS and (options.gsoft_forward_mode == "weight" or options.gsoft_weight_side_modules):
        raise ValueError(
            f"{flag} trains the GS methods on the activation side only; drop --gsoft_forward_mode weight and "
            "--gsoft_weight_side_modules"
        )
    if options.adapter == "boft" and options.boft_backend == "peft":
        raise ValueError(f"{flag}: PEFT's BOFT rotates the frozen weight itself; use --boft_backend gs")
    model = options.pretrained_model_name_or_path
    if model and Path(model).is_file():
        raise ValueError(f"{flag} quantizes a diffusers folder or hub id's denoiser, not a single file {model}")


def denoiser_kwargs(precision: str, weight_dtype: torch.dtype) -> dict:
    """The denoiser's extra ``from_pretrained`` arguments for ``precision`` (none for ``no_change``)."""
    if precision == "no_change":
        return {}
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    config = {"int8-torchao": Int8WeightOnlyConfig, "fp8-torchao": Float8WeightOnlyConfig}[precision]()
    # The layers torchao leaves alone (norms, embeddings) stay in the training dtype, as without quantization.
    return {"quantization_config": TorchAoConfig(config), "torch_dtype": weight_dtype}


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is one of torchao's quantized tensors."""
    if importlib.util.find_spec("torchao") is None:
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


class DequantizedLinear(nn.Module):
    """A quantized ``nn.Linear`` as the GS layers see a frozen one: ``weight`` is dequantized at each read (a
    temporary, in the layer's dtype; the GS kernel keeps it for the input's gradient until backward), calling it
    calls the quantized layer. The quantized layer stays the only stored copy."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight.dequantize()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def expose_dequantized_weights(model: nn.Module) -> int:
    """Put :class:`DequantizedLinear` between each GS layer of ``model`` and its quantized base layer; returns how
    many were wrapped (0 for a model that is not quantized)."""
    from ..gs.layers import GSOFTLinear

    wrapped = 0
    for module in model.modules():
        if isinstance(module, GSOFTLinear) and isinstance(module.base_layer, nn.Linear):
            if is_quantized(module.base_layer.weight):
                module.base_layer = DequantizedLinear(module.base_layer)
                wrapped += 1
    return wrapped
