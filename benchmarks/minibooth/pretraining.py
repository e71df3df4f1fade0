"""Pretraining MiniBooth's Stable Diffusion on the world: the VAE first (on crops), then the UNet and the CLIP text
encoder together on the VAE's latents, then saving a standard diffusers pipeline folder.

Every function takes its settings as arguments and draws its randomness from a seeded generator: the same
arguments give the same models on the same machine.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.memory import resident_mib

from .world import Scene, World, random_caption

Log = Callable[[str], None]


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, R, R, 3) -> float (B, 3, R, R) in [-1, 1], as the trainer feeds the VAE."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _log_progress(log: Log, name: str, step: int, total: int, losses: list[float], start: float) -> None:
    recent = losses[-50:]
    log(
        f"{name} step {step}/{total}: loss {sum(recent) / len(recent):.4f} ({time.perf_counter() - start:.0f}s, "
        f"resident {resident_mib() / 1024:.1f} GiB)"
    )


def train_vae(
    vae,
    images: np.ndarray,
    steps: int,
    batch_size: int,
    crop: int,
    lr: float,
    kl_weight: float,
    seed: int,
    log: Log = print,
    log_every: int = 100,
) -> list[float]:
    """Train ``vae`` as an autoencoder (L1 + MSE reconstruction + ``kl_weight`` x KL) on random ``crop`` px crops
    (multiples of 8 px, so latent cells line up) of ``images`` (N, R, R, 3); returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, min(100, steps)))
    resolution = images.shape[1]
    cells = (resolution - crop) // 8 + 1
    losses, start = [], time.perf_counter()
    vae.train()
    for step in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator).numpy()
        offsets = torch.randint(cells, (batch_size, 2), generator=generator).numpy() * 8
        crops = np.stack([images[i, y : y + crop, x : x + crop] for i, (y, x) in zip(index, offsets)])
        pixels = to_pixels(crops)  # (B, 3, crop, crop)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample  # (B, 3, crop, crop)
        loss = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels)
        loss = loss + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            _log_progress(log, "vae", step + 1, steps, losses, start)
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the VAE posterior of every picture, each (N, C, R/8, R/8), unscaled."""
    means, stds = [], []
    for begin in range(0, len(images), batch_size):
        posterior = vae.encode(to_pixels(images[begin : begin + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, seed: int) -> float:
    """SD's recipe: 1 / the standard deviation of sampled latents, so that scaled latents have unit variance."""
    generator = torch.Generator().manual_seed(seed)
    sample = mean[:4096] + std[:4096] * torch.randn(mean[:4096].shape, generator=generator)
    return float(1.0 / sample.std())


class CaptionTokens:
    """Token ids of captions, remembered: the world has few distinct captions, so tokenising each once is enough."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.known: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.known]
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids  # (M, L)
            self.known.update(zip(missing, ids))
        return torch.stack([self.known[c] for c in captions])  # (B, L)


def train_denoiser(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling_factor: float,
    scenes: Sequence[Scene],
    world: World,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    ema_decay: float,
    caption_dropout: float,
    min_snr_gamma: float,
    seed: int,
    log: Log = print,
    log_every: int = 100,
) -> list[float]:
    """Train the UNet and the text encoder together on noised latents of the world with random partial captions
    (empty with probability ``caption_dropout``, for classifier-free guidance); epsilon loss with min-SNR-gamma
    weights. Both models end with their EMA weights. Returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    caption_rng = random.Random(seed)
    tokens = CaptionTokens(tokenizer)
    params = [p for model in (unet, text_encoder) for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup_steps))
    ema = [p.detach().clone() for p in params]
    alphas_cumprod = scheduler.alphas_cumprod  # (T,)
    losses, start = [], time.perf_counter()
    unet.train()
    text_encoder.train()
    for step in range(steps):
        index = torch.randint(len(latent_mean), (batch_size,), generator=generator)
        noise_free = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator)
        latents = noise_free * scaling_factor  # (B, C, h, w)
        captions = [
            "" if caption_rng.random() < caption_dropout else random_caption(scenes[int(i)], caption_rng, world)
            for i in index
        ]
        hidden = text_encoder(tokens(captions))[0]  # (B, L, D)
        timesteps = torch.randint(len(alphas_cumprod), (batch_size,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])  # (B,)
        weight = torch.clamp(snr, max=min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = (weight * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            _log_progress(log, "unet+text", step + 1, steps, losses, start)
    with torch.no_grad():
        for param, averaged in zip(params, ema):
            param.copy_(averaged)
    unet.eval()
    text_encoder.eval()
    return losses


def make_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline of MiniBooth's parts, without safety checker (what save_pretrained writes)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sample_grid(
    pipeline_dir: str | Path, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float
):
    """A labelled grid (one row per prompt, one column per seed) of a saved pipeline's pictures, DDIM sampler."""
    from dreambooth_gs.sampling import generate_images, labeled_grid, load_pipeline

    pipeline = load_pipeline(str(pipeline_dir))
    rows = []
    for prompt in prompts:
        rows.append(generate_images(pipeline, [prompt] * len(seeds), list(seeds), steps, guidance_scale, len(seeds)))
    return labeled_grid([[image.resize((96, 96)) for image in row] for row in rows], prompts, label_width=330)
