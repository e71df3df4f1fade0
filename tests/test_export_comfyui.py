"""LoRA exports under the names ComfyUI (and A1111) look up, text encoders included, which diffusers still loads whole.

ComfyUI's loader is not installed here: its key patterns are restated below from ``comfy/lora.py`` of
comfyanonymous/ComfyUI (``model_lora_keys_clip`` and ``model_lora_keys_unet``, read at commit 41444b5), and each
exported module name is checked against them. A key outside them is one ComfyUI skips ("lora key not loaded").
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dreambooth_gs import GSOFTConfig, families, inject_adapter, load_adapter, save_adapter
from dreambooth_gs.export.formats import LORA_FILES, export_adapter, load_merged
from dreambooth_gs.export.lora import clip_module_name, diffusers_name, kohya_name
from dreambooth_gs.resources import TINY_FLUX_CONFIG_DIR, TINY_SD3_CONFIG_DIR, TINY_SDXL_CONFIG_DIR
from dreambooth_gs.tiny.pipelines import build_tiny_pipeline

IDS = torch.tensor([[49406, 320, 1929, 49407]])
CONFIG_DIRS = {"sdxl": TINY_SDXL_CONFIG_DIR, "sd3": TINY_SD3_CONFIG_DIR, "flux": TINY_FLUX_CONFIG_DIR}

# -- ComfyUI's key patterns (comfy/lora.py) ---------------------------------------------------------------------
# model_lora_keys_clip: for each CLIP layer b and sub-module c of LORA_CLIP_MAP, the LoRA names it maps. One CLIP-L
# (SD 1.x, Flux): lora_te_ / lora_te1_ / the diffusers text_encoder.text_model name. CLIP-L + CLIP-G (SDXL, SD3):
# CLIP-L as before, CLIP-G as lora_te2_ / text_encoder_2.text_model.
COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}  # fmt: skip


def comfy_clip_keys(layers: int, clip_g: bool) -> set[str]:
    keys = set()
    for b in range(layers):
        for c, flat in COMFY_CLIP_MAP.items():
            keys |= {f"lora_te_text_model_encoder_layers_{b}_{flat}", f"lora_te1_text_model_encoder_layers_{b}_{flat}",
                     f"text_encoder.text_model.encoder.layers.{b}.{c}"}  # fmt: skip
            if clip_g:
                keys |= {f"lora_te2_text_model_encoder_layers_{b}_{flat}",
                         f"text_encoder_2.text_model.encoder.layers.{b}.{c}"}  # fmt: skip
    return keys


def comfy_unet_keys(unet: nn.Module) -> tuple[set[str], set[str]]:
    """``(kohya names, diffusers names)`` model_lora_keys_unet maps for an SD / SDXL UNet: ``lora_unet_`` + the
    diffusers parameter path ('.' -> '_'), and the old attention-processor names ``unet.<...>.processor.to_q`` /
    ``.processor.to_out`` (never PEFT's ``unet.<...>.to_q``)."""
    kohya, diffusers = set(), set()
    for name, _ in unet.named_parameters():
        if name.endswith(".weight"):
            module = name.removesuffix(".weight")
            kohya.add("lora_unet_" + module.replace(".", "_"))
            old = module.replace(".to_", ".processor.to_")
            diffusers.add(old.removesuffix(".0") if old.endswith(".to_out.0") else old)
    return kohya, {"unet." + k for k in diffusers} | diffusers


def module_names(path: Path) -> set[str]:
    """The LoRA file's module names: its keys without ``.lora_down.weight`` / ``.lora_A.weight`` / ``.alpha`` ..."""
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
    names = set()
    for key in load_file(path):
        suffix = next(s for s in suffixes if key.endswith(s))
        names.add(key.removesuffix(suffix))
    return names


# -- adapters with text encoders ----------------------------------------------------------------------------------


def _randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)


def _save_with_text_encoders(base: str, folder: Path) -> Path:
    """The folder ``--train_text_encoder`` writes for the family of ``base``: the denoiser's adapter, and that of
    each text encoder the trainer adapts (CLIP's, never T5) in a subfolder of its name."""
    from diffusers import DiffusionPipeline

    family = families.detect(base)
    pipe = DiffusionPipeline.from_pretrained(base)
    denoiser = getattr(pipe, family.denoiser_name)
    inject_adapter(denoiser, GSOFTConfig(nblocks=4, target_modules=family.default_targets))
    _randomise(denoiser, 0)
    save_adapter(denoiser, folder, base_model=base)
    for i, name in enumerate(family.trainable_text_encoders):
        encoder = getattr(pipe, name)
        inject_adapter(encoder, GSOFTConfig(nblocks=4, target_modules=family.text_encoder_targets))
        _randomise(encoder, i + 1)
        save_adapter(encoder, folder / name, base_model=base)
    return folder


@pytest.fixture(scope="module")
def family_adapter(tiny_dir, tmp_path_factory):
    """family name -> an adapter folder on its tiny pipeline with text-encoder adapters, built on first use."""
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            if name == "sd":
                base = str(tiny_dir)
            else:
                base = str(build_tiny_pipeline(tmp_path_factory.mktemp("models") / name, config_dir=CONFIG_DIRS[name]))
            cache[name] = _save_with_text_encoders(base, tmp_path_factory.mktemp(f"{name}-te"))
        return cache[name]

    return get


def _base(adapter: Path) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model"]


def _text_outputs(pipe, names: tuple[str, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [getattr(pipe, n)(IDS)[0] for n in names]


# -- the names ------------------------------------------------------------------------------------------------------

NAMES = [  # (component, module as transformers 5 / 4 name it, diffusers key, kohya key (SD), kohya key (SDXL))
    ("text_encoder", "encoder.layers.3.self_attn.q_proj", "text_encoder.text_model.encoder.layers.3.self_attn.q_proj",
     "lora_te_text_model_encoder_layers_3_self_attn_q_proj", "lora_te1_text_model_encoder_layers_3_self_attn_q_proj"),
    ("text_encoder", "text_model.encoder.layers.0.mlp.fc1", "text_encoder.text_model.encoder.layers.0.mlp.fc1",
     "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te1_text_model_encoder_layers_0_mlp_fc1"),
    ("text_encoder_2", "text_model.encoder.layers.1.self_attn.out_proj",
     "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj",
     "lora_te2_text_model_encoder_layers_1_self_attn_out_proj",
     "lora_te2_text_model_encoder_layers_1_self_attn_out_proj"),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"),
]  # fmt: skip


@pytest.mark.parametrize(("component", "module", "diffusers", "kohya", "kohya_sdxl"), NAMES)
def test_text_encoder_names_carry_the_text_model_level(component, module, diffusers, kohya, kohya_sdxl):
    """transformers 4 names (text_model.) and transformers 5 names (without) give the same key."""
    assert diffusers_name(component, module) == diffusers
    assert kohya_name(component, module) == kohya
    assert kohya_name(component, module, two_text_encoders=True) == kohya_sdxl
    assert clip_module_name("transformer", "encoder.layers.0.attn") == "encoder.layers.0.attn"  # only text encoders


# (family, layout): every module name of the export is one ComfyUI maps; diffusers' layout of an SD UNet is not
CASES = [("sd", "kohya"), ("sdxl", "kohya"), ("sd", "diffusers")]


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_exported_names_are_those_comfyui_maps(family_adapter, tmp_path, family, layout):
    from diffusers import UNet2DConditionModel

    adapter = family_adapter(family)
    sdxl = family == "sdxl"
    export_adapter(adapter, "lora", tmp_path / "lora", rank="full", lora_format=layout)
    names = module_names(tmp_path / "lora" / LORA_FILES[layout])
    unet_kohya, unet_diffusers = comfy_unet_keys(UNet2DConditionModel.from_pretrained(_base(adapter), subfolder="unet"))
    text = {n for n in names if n.startswith(("lora_te", "text_encoder"))}
    assert len(text) == 2 * 4 * (2 if sdxl else 1)  # 2 layers x q, k, v, out per encoder
    assert text <= comfy_clip_keys(layers=2, clip_g=sdxl), sorted(text - comfy_clip_keys(2, sdxl))[:3]
    unet = names - text
    assert unet and len(unet) == len(json.loads((adapter / "adapter_config.json").read_text())["modules"])
    if layout == "kohya":
        assert unet <= unet_kohya, sorted(unet - unet_kohya)[:3]
    else:  # ComfyUI maps no PEFT-named unet.* key of an SD / SDXL UNet: those users take --lora_format kohya
        assert all(n.startswith("unet.") for n in unet) and not unet & unet_diffusers


def test_transformer_families_write_names_comfyui_maps(family_adapter, tmp_path):
    """SD3 (CLIP-L + CLIP-G) and Flux (CLIP-L; T5 stays frozen): transformer.* keys, which ComfyUI maps for both, and
    the text encoders under model_lora_keys_clip's diffusers names."""
    for family, clip_g in (("sd3", True), ("flux", False)):
        export_adapter(family_adapter(family), "lora", tmp_path / family, rank="full")
        names = module_names(tmp_path / family / LORA_FILES["diffusers"])
        text = {n for n in names if n.startswith("text_encoder")}
        assert len(text) == 2 * 4 * (2 if clip_g else 1) and text <= comfy_clip_keys(2, clip_g), family
        assert names - text and all(n.startswith("transformer.") for n in names - text), family


# -- diffusers still loads every key --------------------------------------------------------------------------------

LOADS = [("sd", "diffusers"), ("sd", "kohya"), ("sdxl", "diffusers"), ("sdxl", "kohya"), ("flux", "diffusers")]


@pytest.mark.parametrize(("family", "layout"), LOADS, ids=[f"{f}-{k}" for f, k in LOADS])
def test_load_lora_weights_reads_every_text_encoder_key(family_adapter, tmp_path, family, layout):
    """diffusers' load_lora_weights of the full-rank export gives the text encoders load_adapter gives (a skipped
    key would leave its projection at the base weight), with a LoRA layer on every adapted projection."""
    from diffusers import DiffusionPipeline

    adapter = family_adapter(family)
    names = families.get(family).trainable_text_encoders
    export_adapter(adapter, "lora", tmp_path / "lora", rank="full", lora_format=layout)
    pipes = [DiffusionPipeline.from_pretrained(_base(adapter)) for _ in range(3)]
    load_adapter(pipes[1], adapter)
    pipes[2].load_lora_weights(tmp_path / "lora", weight_name=LORA_FILES[layout])
    base, merged, lora = (_text_outputs(p, names) for p in pipes)
    for name, b, m, x in zip(names, base, merged, lora):
        assert (m - b).abs().max() > 1e-4, name
        torch.testing.assert_close(x, m, rtol=1e-4, atol=1e-5)
        with_lora = [n for n, mod in getattr(pipes[2], name).named_modules() if hasattr(mod, "lora_A")]
        expected = json.loads((adapter / name / "adapter_config.json").read_text())["modules"]
        assert len(with_lora) == len(expected), name


def test_text_encoders_follow_the_scale(family_adapter, tmp_path):
    """--scale reaches the text encoders too: the half-strength LoRA gives load_merged(strength=0.5)'s encoders."""
    from diffusers import DiffusionPipeline

    adapter = family_adapter("sdxl")
    names = families.get("sdxl").trainable_text_encoders
    export_adapter(adapter, "lora", tmp_path / "lora", rank="full", lora_format="kohya", scale=0.5)
    pipe = DiffusionPipeline.from_pretrained(_base(adapter))
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILES["kohya"])
    half, full = (_text_outputs(load_merged(adapter, strength=s).pipeline, names) for s in (0.5, 1.0))
    base = _text_outputs(DiffusionPipeline.from_pretrained(_base(adapter)), names)
    for lora, h, f, b in zip(_text_outputs(pipe, names), half, full, base):
        torch.testing.assert_close(lora, h, rtol=1e-4, atol=1e-5)
        assert 0 < (h - b).norm() < (f - b).norm()
