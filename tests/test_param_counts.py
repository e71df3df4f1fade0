"""Trainable parameters on the UNet attention projections (meta device, no weights): Table 2 of the paper on
SD-2-base, and SDXL base 1.0's counts pinned from its architecture."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dreambooth_gs import GSOFTConfig, families, inject_adapter, trainable_parameters
from dreambooth_gs.methods.injection import is_target

CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "sd2_base_unet.json"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")

# (method, config kwargs, millions of trainable parameters in Table 2)
TABLE_2 = [
    ("gsoft", {"nblocks": 32}, 6.8),
    ("gsoft", {"nblocks": 16}, 13.6),
    ("gsoft", {"nblocks": 8}, 27.1),
    ("double_gsoft", {"nblocks": 64}, 6.5),
    ("double_gsoft", {"nblocks": 32}, 13.0),
    ("double_gsoft", {"nblocks": 16}, 25.9),
    ("boft", {"nblocks": 32, "n_butterfly_factor": 4}, 13.6),
    ("boft", {"nblocks": 32, "n_butterfly_factor": 6}, 20.4),
    ("boft", {"nblocks": 16, "n_butterfly_factor": 5}, 33.8),
]
TABLE_2_IDS = [(m, "-".join(map(str, k.values())), n) for m, k, n in TABLE_2]


def sd2_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in json.loads(CONFIG_PATH.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def expected_count(method: str, kwargs: dict, linears: list[nn.Linear]) -> int:
    """The count from the shapes alone: blocks of every factor plus the scale vector, per adapted Linear."""
    total = 0
    for linear in linears:
        d_in, d_out = linear.in_features, linear.out_features
        r = kwargs["nblocks"]
        if method == "gsoft":
            total += 2 * r * (d_in // r) ** 2
        elif method == "double_gsoft":
            total += 2 * r * (d_in // r) ** 2 + 2 * r * (d_out // r) ** 2
        else:
            total += kwargs["n_butterfly_factor"] * r * (d_in // r) ** 2
        total += d_out
    return total


@pytest.mark.filterwarnings("ignore:.*sparse")
@pytest.mark.parametrize(("method", "kwargs", "millions"), TABLE_2, ids=[f"{m}-{k}" for m, k, _ in TABLE_2_IDS])
def test_table_2_parameter_counts(method, kwargs, millions):
    unet = sd2_unet()
    linears = [m for n, m in unet.named_modules() if isinstance(m, nn.Linear) and is_target(n, ATTENTION)]
    assert len(linears) == 4 * 2 * 16  # 16 transformer blocks, self- and cross-attention, q/k/v/out
    names = inject_adapter(unet, GSOFTConfig(method=method, **kwargs))
    assert len(names) == len(linears)
    params = trainable_parameters(unet)
    count = sum(p.numel() for _, p in params)
    assert count == expected_count(method, kwargs, linears)
    assert abs(count / 1e6 - millions) <= 0.1, f"{count / 1e6:.2f}M vs {millions}M in Table 2"
    assert all(p.requires_grad for _, p in params)
    assert sum(p.requires_grad for p in unet.parameters()) == len(params)


# SDXL base 1.0: the counts follow from its architecture alone. Transformer blocks per width: 640 wide, 2 down
# attentions x 2 layers + 3 up attentions x 2 layers = 10; 1280 wide, (2 down + 3 up) x 10 layers + the mid block's
# 10 = 60. Each block has 8 projections: self-attention q / k / v / out and cross-attention q / out read the
# d-wide hidden states; cross-attention k / v read the 2048-wide text. Every projection writes d features.
SDXL_CONFIG_PATH = CONFIG_PATH.with_name("sdxl_base_unet.json")
SDXL_TEXT_WIDTH = 2048
SDXL_BLOCKS_PER_WIDTH = {640: 10, 1280: 60}


def sdxl_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in json.loads(SDXL_CONFIG_PATH.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def sdxl_count(per_linear) -> int:
    """Sum of ``per_linear(d_in, d_out)`` over SDXL's projections, from the block counts above (no model)."""
    total = 0
    for d, blocks in SDXL_BLOCKS_PER_WIDTH.items():
        total += blocks * (6 * per_linear(d, d) + 2 * per_linear(SDXL_TEXT_WIDTH, d))
    return total


# (method, injection kwargs, trainable parameters per Linear (d_in, d_out), the pinned total)
SDXL_CASES = [
    ("gsoft", {"nblocks": 32}, lambda i, o: 2 * 32 * (i // 32) ** 2 + o, 75_765_760),
    ("gsoft", {"nblocks": 16}, lambda i, o: 2 * 16 * (i // 16) ** 2 + o, 150_865_920),
    ("double_gsoft", {"nblocks": 64}, lambda i, o: 2 * 64 * ((i // 64) ** 2 + (o // 64) ** 2) + o, 63_815_680),
    ("lora", {"rank": 4}, lambda i, o: 4 * (i + o), 5_806_080),
    ("lora", {"rank": 16}, lambda i, o: 16 * (i + o), 23_224_320),
]


@pytest.mark.filterwarnings("ignore:.*sparse")
@pytest.mark.parametrize(
    ("method", "kwargs", "per_linear", "pinned"),
    SDXL_CASES,
    ids=[f"{m}-{next(iter(k.values()))}" for m, k, *_ in SDXL_CASES],
)
def test_sdxl_parameter_counts(method, kwargs, per_linear, pinned):
    from dreambooth_gs.methods.baselines import inject_peft_adapter, make_peft_config

    unet = sdxl_unet()
    linears = [m for n, m in unet.named_modules() if isinstance(m, nn.Linear) and is_target(n, ATTENTION)]
    assert len(linears) == 8 * sum(SDXL_BLOCKS_PER_WIDTH.values())
    assert sorted({m.in_features for m in linears}) == [640, 1280, SDXL_TEXT_WIDTH]
    if method == "lora":
        names = inject_peft_adapter(unet, "lora", make_peft_config("lora", ATTENTION, **kwargs))
    else:
        names = inject_adapter(unet, GSOFTConfig(method=method, **kwargs))
    assert len(names) == len(linears)
    count = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert sdxl_count(per_linear) == pinned
    assert count == pinned, f"{count:,} trainable parameters, expected {pinned:,}"


# SD3.5 Medium / Large and FLUX.1-dev: the counts follow from the block counts and the width alone. The adapted
# projections are the attention Linears of every joint block, image side (to_q / to_k / to_v / to_out.0) and text
# side (add_q / add_k / add_v_proj, to_add_out; the last SD3 block is context_pre_only and has no to_add_out), plus
# FLUX's single blocks' to_q / to_k / to_v (they have no to_out: proj_out mixes attention and MLP). SD3.5 Medium's
# second, image-only attention attn2 (blocks 0..12) is left out. Every adapted projection is d x d.
TRANSFORMER_TARGETS = families.get("sd3").default_targets  # what the trainer adapts in SD3 and Flux
# name: (config file, width d = heads x head width, adapted projections from the block counts, attn2 Linears)
TRANSFORMERS = {
    "sd35_medium": ("sd35_medium_transformer.json", 24 * 64, 24 * 7 + 23, 13 * 4),
    "sd35_large": ("sd35_large_transformer.json", 38 * 64, 38 * 7 + 37, 0),
    "flux1_dev": ("flux1_dev_transformer.json", 24 * 128, 19 * 8 + 38 * 3, 0),
}


def transformer(name: str) -> nn.Module:
    import diffusers

    data = json.loads(CONFIG_PATH.with_name(TRANSFORMERS[name][0]).read_text())
    config = {k: v for k, v in data.items() if not k.startswith("_")}
    with torch.device("meta"):
        return getattr(diffusers, data["_class_name"]).from_config(config)


def gsoft_32(d: int) -> int:
    return 2 * 32 * (d // 32) ** 2 + d  # two factors of 32 blocks of (d / 32)^2, plus the scale vector


def lora_4(d: int) -> int:
    return 4 * (d + d)  # A (4 x d) and B (d x 4)


# (model, method, per-Linear count of a d x d projection, the pinned total)
TRANSFORMER_CASES = [
    ("sd35_medium", "gsoft", gsoft_32, 28_457_472),
    ("sd35_medium", "lora", lora_4, 2_347_008),
    ("sd35_large", "gsoft", gsoft_32, 112_745_088),
    ("sd35_large", "lora", lora_4, 5_895_168),
    ("flux1_dev", "gsoft", gsoft_32, 157_710_336),
    ("flux1_dev", "lora", lora_4, 6_537_216),
]


@pytest.mark.parametrize(
    ("name", "method", "per_linear", "pinned"), TRANSFORMER_CASES, ids=[f"{n}-{m}" for n, m, *_ in TRANSFORMER_CASES]
)
def test_transformer_parameter_counts(name, method, per_linear, pinned):
    from dreambooth_gs.methods import registry as methods
    from dreambooth_gs.methods.baselines import make_peft_config

    _, d, projections, attn2 = TRANSFORMERS[name]
    model = transformer(name)
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(n, TRANSFORMER_TARGETS)]
    assert len(linears) == projections
    assert {(m.in_features, m.out_features) for m in linears} == {(d, d)}
    assert sum(".attn2." in n for n, m in model.named_modules() if isinstance(m, nn.Linear)) == attn2
    if method == "lora":
        config = make_peft_config("lora", TRANSFORMER_TARGETS, rank=4)
    else:
        config = GSOFTConfig(method=method, nblocks=32, target_modules=TRANSFORMER_TARGETS)
    names = methods.get(method).inject(model, config)
    assert len(names) == projections and not any(".attn2." in n for n in names)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert projections * per_linear(d) == pinned
    assert count == pinned, f"{count:,} trainable parameters, expected {pinned:,}"
