"""MiniBooth's models from the JSON configs of a config folder (``configs/full`` or ``configs/smoke``): the diffusers
AutoencoderKL / UNet2DConditionModel / DDPMScheduler, the transformers CLIPTextModel with SD's CLIP tokenizer (built
offline from open_clip's vocabulary), and the open_clip CLIP used to score generations. The flow profile's denoiser
side lives in the folder's ``sd3/`` (SD3Transformer2DModel, two CLIPTextModelWithProjection, the flow-matching
scheduler); it shares the VAE, the tokenizer's vocabulary and the CLIP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
CONFIG_NAMES = ("vae", "unet", "text_encoder", "scheduler", "clip")
FAMILIES = ("sd", "sd3")  # the denoiser a MiniBooth base model is pretrained with (pretrain.py --family)
SD3_PARTS = ("sd3/transformer", "sd3/text_encoder", "sd3/text_encoder_2", "sd3/scheduler")


def read_config(config_dir: str | os.PathLike, name: str) -> dict:
    """``<config_dir>/<name>.json`` without its bookkeeping keys (``_class_name``, ``_comment``)."""
    path = Path(config_dir) / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"model config {path} not found; a config folder holds {', '.join(CONFIG_NAMES)} (.json)")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def make_vae(config_dir: str | os.PathLike, seed: int):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL.from_config(read_config(config_dir, "vae"))


def make_unet(config_dir: str | os.PathLike, seed: int):
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel.from_config(read_config(config_dir, "unet"))


def make_text_encoder(config_dir: str | os.PathLike, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(**read_config(config_dir, "text_encoder")))


def make_scheduler(config_dir: str | os.PathLike):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(read_config(config_dir, "scheduler"))


def make_model(config_dir: str | os.PathLike, name: str, seed: int):
    """The diffusers or transformers model (or diffusers scheduler) of ``<config_dir>/<name>.json``, named by its
    ``_class_name``, with random weights drawn from ``seed``."""
    from dreambooth_gs.tiny.pipelines import make_model as model_from_config

    path = Path(config_dir) / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"model config {path} not found; the flow profile reads {', '.join(SD3_PARTS)} (.json)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_from_config(json.loads(path.read_text()))


def make_tokenizer(directory: str | os.PathLike, max_length: int):
    """SD's CLIP tokenizer (written into ``directory``), padding and truncating at ``max_length`` tokens."""
    from dreambooth_gs.tiny.pipelines import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(directory)
    tokenizer.model_max_length = max_length
    return tokenizer


def make_clip(config_dir: str | os.PathLike, seed: int):
    """``(model, model_cfg)``: an untrained open_clip CLIP from ``clip.json``."""
    import open_clip

    model_cfg = read_config(config_dir, "clip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(**model_cfg), model_cfg


def check_compatible(config_dir: str | os.PathLike, resolution: int, family: str = "sd") -> None:
    """One-line ValueErrors for config folders whose parts do not fit together."""
    vae, unet = read_config(config_dir, "vae"), read_config(config_dir, "unet")
    text, clip = read_config(config_dir, "text_encoder"), read_config(config_dir, "clip")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if unet["sample_size"] * factor != resolution:
        raise ValueError(
            f"{config_dir}: unet sample_size {unet['sample_size']} x VAE factor {factor} != resolution {resolution}"
        )
    if unet["in_channels"] != vae["latent_channels"] or unet["out_channels"] != vae["latent_channels"]:
        raise ValueError(f"{config_dir}: unet in/out_channels must equal the VAE's latent_channels")
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise ValueError(f"{config_dir}: unet cross_attention_dim must equal text_encoder hidden_size")
    if clip["vision_cfg"]["image_size"] != resolution:
        raise ValueError(f"{config_dir}: clip vision_cfg image_size must be the resolution {resolution}")
    if family == "sd3":
        check_sd3_compatible(config_dir, vae, resolution // factor)


def check_sd3_compatible(config_dir: str | os.PathLike, vae: dict, latent_size: int) -> None:
    transformer = read_config(config_dir, "sd3/transformer")
    encoders = [read_config(config_dir, name) for name in ("sd3/text_encoder", "sd3/text_encoder_2")]
    if transformer["sample_size"] != latent_size:
        raise ValueError(f"{config_dir}: sd3 transformer sample_size must be the latent size {latent_size}")
    if transformer["in_channels"] != vae["latent_channels"] or transformer["out_channels"] != vae["latent_channels"]:
        raise ValueError(f"{config_dir}: sd3 transformer in/out_channels must equal the VAE's latent_channels")
    if sum(e["hidden_size"] for e in encoders) > transformer["joint_attention_dim"]:
        raise ValueError(f"{config_dir}: the two sd3 text encoders' hidden sizes exceed joint_attention_dim")
    if sum(e["projection_dim"] for e in encoders) != transformer["pooled_projection_dim"]:
        raise ValueError(f"{config_dir}: sd3 pooled_projection_dim must be the sum of the encoders' projection_dim")
