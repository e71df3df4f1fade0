"""``--base_model_precision``: the frozen denoiser quantized at load time through diffusers' own quantization config
(``TorchAoConfig`` or ``BitsAndBytesConfig`` passed to its ``from_pretrained``), and with it the text encoders that
stay on the GPU through training (neither cached nor trained: transformers' configs of the same names), what each
method needs to train on it, and the one-line refusals of what cannot (checked when the options are made, before
anything is written).

Adapters train through the quantized layers: PEFT's LoRA / OFT call the frozen layer (PEFT has torchao and
bitsandbytes layers); the GS methods' kernels read the frozen weight itself (``W Q x`` in one node), and quantized
weight tensors have no transpose, so each targeted layer is seen through :class:`DequantizedLinear` (its weight
dequantized at each call: torchao's ``dequantize()``, bitsandbytes' NF4 ``dequantize_4bit`` or its int8 rows times
their scales; the stored weight stays quantized). diffusers loads a bitsandbytes base only on CUDA; the GS path
through bitsandbytes' NF4 and int8 layers is tested on the CPU with layers built by hand."""

from __future__ import annotations

import importlib.util
import json
import os
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
    _check_machine(options, flag)
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


def _check_machine(options, flag: str) -> None:
    """What running (not planning: ``--estimate_memory`` plans for any GPU) needs: the device and the package."""
    if getattr(options, "estimate_memory", False):
        return
    precision = options.base_model_precision
    if precision.endswith("-bnb"):
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} needs a CUDA GPU (diffusers loads bitsandbytes on CUDA only); use int8-torchao")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"{flag} needs bitsandbytes: pip install bitsandbytes")
    if precision == "fp8-torchao" and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        raise ValueError(f"{flag} needs a CUDA GPU of compute capability 8.9 or more (Ada, Hopper); use int8-torchao")
    if precision.endswith("-torchao") and importlib.util.find_spec("torchao") is None:
        raise ValueError(f"{flag} needs torchao: pip install {TORCHAO_PIN}")


def read_bnb_config(path: str | os.PathLike) -> dict:
    """The ``BitsAndBytesConfig`` arguments of ``--bnb_quantization_config_path`` (a JSON object asking for exactly
    one of ``load_in_4bit`` / ``load_in_8bit``); one clear error for a missing, unreadable or contradictory file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--bnb_quantization_config_path {path} does not exist")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--bnb_quantization_config_path {path} is not valid JSON ({err})") from None
    if not isinstance(document, dict) or bool(document.get("load_in_4bit")) == bool(document.get("load_in_8bit")):
        raise ValueError(
            f"--bnb_quantization_config_path {path} must be a JSON object with one of load_in_4bit / load_in_8bit "
            'true, e.g. {"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}'
        )
    return document


def bnb_precision(path: str | os.PathLike, requested: str) -> str:
    """The ``--base_model_precision`` that ``--bnb_quantization_config_path`` implies (nf4-bnb for 4 bits, int8-bnb
    for 8); a different non-default ``--base_model_precision`` beside it is refused."""
    precision = "nf4-bnb" if read_bnb_config(path).get("load_in_4bit") else "int8-bnb"
    if requested not in ("no_change", precision):
        raise ValueError(f"--bnb_quantization_config_path asks for {precision}, --base_model_precision for {requested}")
    return precision


def denoiser_kwargs(precision: str, weight_dtype: torch.dtype, bnb_config_path: str | None = None) -> dict:
    """The denoiser's extra ``from_pretrained`` arguments for ``precision`` (none for ``no_change``);
    ``bnb_config_path``: ``--bnb_quantization_config_path``'s arguments instead of the defaults below."""
    return _from_pretrained_kwargs("diffusers", precision, weight_dtype, bnb_config_path)


def text_encoder_kwargs(precision: str, weight_dtype: torch.dtype, bnb_config_path: str | None = None) -> dict:
    """The same quantization for a text encoder's ``from_pretrained`` (transformers' config classes)."""
    return _from_pretrained_kwargs("transformers", precision, weight_dtype, bnb_config_path)


def quantized_text_encoders(options, family) -> tuple[str, ...]:
    """The text encoders ``--base_model_precision`` quantizes with the denoiser: those that stay through training,
    neither freed after caching the prompts (``--cache_text_embeddings``) nor trained (``--train_text_encoder``)."""
    if options.base_model_precision == "no_change" or options.pre_compute_text_embeddings:
        return ()
    trained = family.trainable_text_encoders if options.train_text_encoder else ()
    return tuple(name for name in family.text_encoder_names if name not in trained)


def _from_pretrained_kwargs(
    library: str, precision: str, weight_dtype: torch.dtype, bnb_config_path: str | None
) -> dict:
    """``quantization_config`` (diffusers' or transformers' class of the same name and arguments) and the dtype
    of the layers it leaves alone, for ``library``'s ``from_pretrained``."""
    if precision == "no_change":
        return {}
    import importlib

    classes = importlib.import_module(library)
    dtype_key = "torch_dtype" if library == "diffusers" else "dtype"  # transformers 5 renamed it
    if precision.endswith("-bnb"):
        BitsAndBytesConfig = classes.BitsAndBytesConfig  # noqa: N806 (a class)

        if bnb_config_path:
            arguments = {"bnb_4bit_compute_dtype": weight_dtype} | read_bnb_config(bnb_config_path)
            config = BitsAndBytesConfig(**arguments)
        elif precision == "nf4-bnb":  # NF4 with compute in the training dtype, as diffusers' Flux QLoRA recipe
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=weight_dtype
            )
        else:
            config = BitsAndBytesConfig(load_in_8bit=True)
        return {"quantization_config": config, dtype_key: weight_dtype}
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    config = {"int8-torchao": Int8WeightOnlyConfig, "fp8-torchao": Float8WeightOnlyConfig}[precision]()
    # The layers torchao leaves alone (norms, embeddings) stay in the training dtype, as without quantization.
    return {"quantization_config": classes.TorchAoConfig(config), dtype_key: weight_dtype}


BNB_WEIGHTS = ("Params4bit", "Int8Params")  # bitsandbytes' quantized weight classes (matched by name: no import)


def _bnb_kind(weight: torch.Tensor) -> str | None:
    kind = type(weight).__name__
    return kind if kind in BNB_WEIGHTS and type(weight).__module__.startswith("bitsandbytes") else None


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is one of torchao's quantized tensors or a quantized bitsandbytes weight."""
    if _bnb_kind(weight) is not None:
        return weight.dtype in (torch.uint8, torch.int8)  # quantized once moved to its device (int8: not fp16 kept)
    if importlib.util.find_spec("torchao") is None:
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The dense weight of a quantized one: torchao's ``dequantize()``; bitsandbytes' NF4 / FP4 blocks through
    ``dequantize_4bit`` (in the dtype it was quantized from); its int8 rows times their absmax scales / 127."""
    kind = _bnb_kind(weight)
    if kind == "Params4bit":
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Int8Params":
        return weight.data.float() * (weight.SCB.float().unsqueeze(1) / 127)  # (out, in) * (out, 1)
    return weight.dequantize()


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
        return dequantize(self.linear.weight)

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
