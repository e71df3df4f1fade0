"""Shared by the benchmark scripts: what the comparisons are made of. UNet and transformer architectures, shared-weight
copies, the adapter table, single adapted Linears.

Every configuration of the paper's Table 2 (plus the PEFT baselines as they run on this machine) is one
:class:`Method`; :func:`apply_method` puts it into a model. Timed comparisons build ONE base UNet and give each
method a structural copy that shares the frozen base parameters (:func:`shared_copy`), so fifteen adapters on the
865M-parameter SD-2-base UNet cost one set of weights. How things are timed and counted is :mod:`benchmarks.measure`'s,
how they are written :mod:`benchmarks.report`'s.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dreambooth_gs import families

ROOT = Path(__file__).resolve().parents[1]
SD2_CONFIG_PATH = ROOT / "configs" / "sd2_base_unet.json"
SDXL_CONFIG_PATH = ROOT / "configs" / "sdxl_base_unet.json"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The real SD3.5 / Flux.1 transformers (meta device only: parameter counts), by the name bench_params.py takes.
TRANSFORMER_CONFIG_PATHS = {
    "sd35_medium": ROOT / "configs" / "sd35_medium_transformer.json",
    "sd35_large": ROOT / "configs" / "sd35_large_transformer.json",
    "flux1_dev": ROOT / "configs" / "flux1_dev_transformer.json",
}
# What the trainer adapts in a transformer: the family's default targets (every joint block's image- and text-side
# attention projections; in Flux they also match the single blocks' attn.to_q / to_k / to_v; SD3.5 Medium's attn2
# is not matched).
TRANSFORMER_TARGETS = families.get("sd3").default_targets

# A mid-size UNet with SD-2-base's widths (320 / 640, cross-attention from 1024) and one layer per block, so every
# Table 2 configuration divides its projections; ~10x smaller than SD-2-base, for the bf16 check and --quick runs.
MID_UNET_OVERRIDES = {
    "block_out_channels": [320, 640],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [5, 10],
    "layers_per_block": 1,
}


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def unet_config(size: str = "sd2") -> dict[str, Any]:
    """UNet2DConditionModel kwargs: ``"sd2"`` (SD-2-base), ``"mid"`` (SD-2-base widths, 2 levels, 1 layer) or
    ``"sdxl"`` (SDXL base 1.0)."""
    if size not in ("sd2", "mid", "sdxl"):
        raise ValueError(f"unknown UNet size {size!r}; use 'sd2', 'mid' or 'sdxl'")
    path = SDXL_CONFIG_PATH if size == "sdxl" else SD2_CONFIG_PATH
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    if size == "mid":
        config.update(MID_UNET_OVERRIDES)
    return config


def build_unet(size: str = "sd2", device: str = "cpu", seed: int = 0, fill: str = "uniform") -> nn.Module:
    """A random-weight UNet (frozen). ``device="meta"`` gives shapes only.

    Built on the meta device and filled in place (uniform +-1/sqrt(fan_in), norms 1, biases 0): the same scale as
    PyTorch's default init at a fraction of diffusers' construction time. Timing does not depend on the values.
    ``fill="constant"`` writes +1/(2 sqrt(fan_in)) instead (faster still; for memory measurements, where only the
    pages being resident matters).
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(size))
    unet.requires_grad_(False)
    if device == "meta":
        return unet
    return fill_on(unet, device, seed, fill)


def fill_on(meta_model: nn.Module, device: str = "cpu", seed: int = 0, fill: str = "uniform") -> nn.Module:
    """Materialise a meta-device model on ``device`` in place, filled as :func:`build_unet` describes (uniform
    +-1/sqrt(fan_in) or the constant, norms 1, biases 0). Buffers come out uninitialised: models with buffers that
    matter need them set again."""
    meta_model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in meta_model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                bound = param[0].numel() ** -0.5  # fan_in = every dim but the first
                if fill == "constant":
                    param.fill_(bound / 2)
                else:
                    param.uniform_(-bound, bound, generator=generator)
    return meta_model


def transformer_config(name: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, config) of one of :data:`TRANSFORMER_CONFIG_PATHS`' transformers."""
    if name not in TRANSFORMER_CONFIG_PATHS:
        raise ValueError(f"unknown transformer {name!r}; use one of {', '.join(TRANSFORMER_CONFIG_PATHS)}")
    data = json.loads(TRANSFORMER_CONFIG_PATHS[name].read_text())
    return data["_class_name"], {k: v for k, v in data.items() if not k.startswith("_")}


def build_transformer(name: str) -> nn.Module:
    """The transformer ``name`` on the meta device (shapes only, frozen): SD3Transformer2DModel or Flux's."""
    import diffusers

    class_name, config = transformer_config(name)
    with torch.device("meta"):
        model = getattr(diffusers, class_name).from_config(config)
    return model.requires_grad_(False)


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers ARE the original's (no weight memory)."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def unshare_projections(
    model: nn.Module, requires_grad: bool = False, targets: tuple[str, ...] = TARGETS
) -> list[nn.Parameter]:
    """Give ``model``'s projections their own copies of weight and bias (a shared copy may then merge or train them)."""
    params = []
    for _, linear in projection_linears(model, targets):
        for name in ("weight", "bias"):
            tensor = getattr(linear, name)
            if tensor is not None:
                setattr(linear, name, nn.Parameter(tensor.detach().clone(), requires_grad=requires_grad))
                params.append(getattr(linear, name))
    return params


def projection_linears(model: nn.Module, targets: tuple[str, ...] = TARGETS) -> list[tuple[str, nn.Linear]]:
    """The attention projections the adapters target (a UNet's to_q / to_k / to_v / to_out.0 by default)."""
    from dreambooth_gs.methods.injection import is_target

    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(n, targets)]


# ---------------------------------------------------------------------------------------------------------------
# The adapter table
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a label, how to build it, the paper's Table 2 count (millions) if given."""

    label: str
    kind: str  # floor | full | gsoft | double_gsoft | boft | lora | oft | peft_boft_fallback
    options: dict[str, Any] = field(default_factory=dict)  # oft: block_size, or nblocks (PEFT's r)
    paper_millions: float | None = None


FLOOR = Method("no adapter (frozen UNet, input grad only)", "floor")
FULL = Method("full fine-tuning of the projections", "full")
LORA = [Method(f"LoRA r={r} (PEFT)", "lora", {"rank": r}) for r in (4, 32, 128)]
BOFT = [
    Method(f"BOFT ({r},{m}) (GS core, {m} factors)", "boft", {"nblocks": r, "n_butterfly_factor": m}, paper)
    for r, m, paper in ((32, 4, 13.6), (32, 6, 20.4), (16, 5, 33.8))
]
GSOFT = [Method(f"GSOFT r={r}", "gsoft", {"nblocks": r}, paper) for r, paper in ((32, 6.8), (16, 13.6), (8, 27.1))]
DOUBLE = [
    Method(f"Double GSOFT r={r}", "double_gsoft", {"nblocks": r}, paper)
    for r, paper in ((64, 6.5), (32, 13.0), (16, 25.9))
]
# GSOFT r=32 with --gsoft_weight_side_modules to_out.0: the memory option (its to_out.0 always on the weight side)
GSOFT_WEIGHT_SIDE_OUT = Method(
    "GSOFT r=32, to_out.0 on the weight side", "gsoft", {"nblocks": 32, "weight_side_modules": ("to_out.0",)}
)
PEFT_OFT = Method("OFT b=32 (PEFT)", "oft", {"block_size": 32})
PEFT_OFT_32_BLOCKS = Method("OFT r=32 blocks (PEFT)", "oft", {"nblocks": 32})  # the layer benchmark's OFT
PEFT_BOFT = Method(
    "PEFT BOFT (32,4) as run here: 1 factor after CUDA fallback",
    "peft_boft_fallback",
    {"nblocks": 32, "n_butterfly_factor": 4},
)
TABLE_2 = [*LORA, *BOFT, *GSOFT, *DOUBLE, FULL]
ALL_METHODS = [FLOOR, *TABLE_2, PEFT_OFT, PEFT_BOFT]
BY_LABEL = {m.label: m for m in [*ALL_METHODS, GSOFT_WEIGHT_SIDE_OUT]}
REFERENCE = LORA[0]  # LoRA r=4: the yardstick


def apply_method(model: nn.Module, method: Method, targets: tuple[str, ...] = TARGETS) -> list[nn.Parameter]:
    """Put ``method`` into ``model``'s ``targets`` (in place; everything else frozen); return its trainable parameters.

    ``full`` clones the projection weights first, so a shared copy never trains the base model's tensors.
    """
    from peft import BOFTConfig, OFTConfig, inject_adapter_in_model

    from dreambooth_gs import GSOFTConfig, inject_adapter, trainable_parameters
    from dreambooth_gs.methods.baselines import inject_peft_adapter, make_peft_config

    model.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GSOFT's b < r notes, PEFT's CUDA-fallback warning (the label says it)
        if method.kind == "floor":
            return []
        if method.kind == "full":
            return unshare_projections(model, requires_grad=True, targets=targets)
        if method.kind in ("gsoft", "double_gsoft", "boft"):
            inject_adapter(model, GSOFTConfig(method=method.kind, target_modules=targets, **method.options))
            return [p for _, p in trainable_parameters(model)]
        if method.kind == "oft" and "nblocks" in method.options:  # a block count: make_peft_config takes sizes
            config = OFTConfig(
                r=method.options["nblocks"], oft_block_size=0, target_modules=list(targets), use_cayley_neumann=False
            )
            inject_peft_adapter(model, "oft", config)
        elif method.kind in ("lora", "oft"):
            inject_peft_adapter(model, method.kind, make_peft_config(method.kind, targets, **method.options))
        elif method.kind == "peft_boft_fallback":  # PEFT's BOFT exactly as it runs here (one factor on CPU)
            config = BOFTConfig(
                boft_block_num=method.options["nblocks"],
                boft_block_size=0,
                boft_n_butterfly_factor=method.options["n_butterfly_factor"],
                target_modules=list(targets),
            )
            inject_adapter_in_model(config, model)
        else:
            raise ValueError(f"unknown method kind {method.kind!r}")
    return [p for p in model.parameters() if p.requires_grad]


def randomize_adapter(params: list[nn.Parameter], std: float = 0.02, seed: int = 0) -> None:
    """Move adapter parameters off their identity / zero initialisation (merging then changes the weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


# ---------------------------------------------------------------------------------------------------------------
# One adapted Linear (the layer benchmarks)
# ---------------------------------------------------------------------------------------------------------------


def adapted_linear(linear: nn.Linear, forward_mode: str = "auto", **config) -> nn.Module:
    """``nn.Sequential`` of a copy of ``linear`` with a GSOFT-family adapter (``GSOFTConfig(**config)``) on it."""
    from dreambooth_gs import GSOFTConfig, inject_adapter

    model = nn.Sequential(copy.deepcopy(linear))
    inject_adapter(model, GSOFTConfig(target_modules=("0",), forward_mode=forward_mode, **config))
    return model


def peft_linear(linear: nn.Linear, peft_config) -> nn.Module:
    """``nn.Sequential`` of a copy of ``linear`` with a PEFT adapter (``peft_config`` targets ``"0"``) on it."""
    from peft import get_peft_model

    return get_peft_model(nn.Sequential(copy.deepcopy(linear)), peft_config)
