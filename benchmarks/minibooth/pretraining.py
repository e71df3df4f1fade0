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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def sampled_latents(mean: torch.Tensor, std: torch.Tensor, seed: int) -> torch.Tensor:
    """Posterior samples of the first 4096 pictures (seeded): what the latent normalisations are measured on."""
    generator = torch.Generator().manual_seed(seed)
    return mean[:4096] + std[:4096] * torch.randn(mean[:4096].shape, generator=generator)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, seed: int) -> float:
    """SD's recipe: 1 / the standard deviation of sampled latents, so that scaled latents have unit variance."""
    return float(1.0 / sampled_latents(mean, std, seed).std())


def latent_shift_and_scale(mean: torch.Tensor, std: torch.Tensor, seed: int) -> tuple[float, float]:
    """SD3's recipe: ``(shift, scaling)`` with shift the sampled latents' mean and scaling 1 / their standard
    deviation around it, so that ``(x - shift) * scaling`` has zero mean and unit variance."""
    sample = sampled_latents(mean, std, seed)
    shift = float(sample.mean())
    return shift, float(1.0 / (sample - shift).std())


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


class LatentBatches:
    """Training batches of a MiniBooth denoiser: sampled VAE latents of random world pictures in the denoiser's
    space, ``(x - shift) * scaling``, with random partial captions (empty with probability ``caption_dropout``, for
    classifier-free guidance)."""

    def __init__(self, latent_mean, latent_std, shift: float, scaling: float, scenes, world, caption_dropout, seed):
        self.mean, self.std, self.shift, self.scaling = latent_mean, latent_std, shift, scaling
        self.scenes, self.world, self.caption_dropout = scenes, world, caption_dropout
        self.generator = torch.Generator().manual_seed(seed)
        self.caption_rng = random.Random(seed)

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        index = torch.randint(len(self.mean), (batch_size,), generator=self.generator)
        sample = self.mean[index] + self.std[index] * torch.randn(self.mean[index].shape, generator=self.generator)
        latents = (sample - self.shift) * self.scaling  # (B, C, h, w)
        captions = [
            ""
            if self.caption_rng.random() < self.caption_dropout
            else random_caption(self.scenes[int(i)], self.caption_rng, self.world)
            for i in index
        ]
        return latents, captions


def train_jointly(
    models: Sequence[torch.nn.Module],
    batch_loss: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    warmup_steps: int,
    ema_decay: float,
    name: str,
    log: Log = print,
    log_every: int = 100,
) -> list[float]:
    """AdamW on every parameter of ``models`` (warm-up + cosine, gradients clipped at 1) minimising ``batch_loss()``
    (a fresh batch per call); the models end with their EMA weights. Returns the loss per step."""
    params = [p for model in models for p in model.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup_steps))
    ema = [p.detach().clone() for p in params]
    losses, start = [], time.perf_counter()
    for model in models:
        model.train()
    for step in range(steps):
        loss = batch_loss()
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
            _log_progress(log, name, step + 1, steps, losses, start)
    with torch.no_grad():
        for param, averaged in zip(params, ema):
            param.copy_(averaged)
    for model in models:
        model.eval()
    return losses


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
    """Train the UNet and the text encoder together on noised latents of the world (:class:`LatentBatches`);
    epsilon loss with min-SNR-gamma weights. Both models end with their EMA weights. Returns the loss per step."""
    batches = LatentBatches(latent_mean, latent_std, 0.0, scaling_factor, scenes, world, caption_dropout, seed)
    tokens = CaptionTokens(tokenizer)
    alphas_cumprod = scheduler.alphas_cumprod  # (T,)

    def batch_loss() -> torch.Tensor:
        latents, captions = batches(batch_size)
        hidden = text_encoder(tokens(captions))[0]  # (B, L, D)
        timesteps = torch.randint(len(alphas_cumprod), (batch_size,), generator=batches.generator)
        noise = torch.randn(latents.shape, generator=batches.generator)
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])  # (B,)
        weight = torch.clamp(snr, max=min_snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        return (weight * per_sample).mean()

    models = (unet, text_encoder)
    return train_jointly(models, batch_loss, steps, lr, warmup_steps, ema_decay, "unet+text", log, log_every)


@dataclass(frozen=True)
class FlowParts:
    """What the trainer's flow-matching objective reads of its components (``dreambooth_gs.train.objectives``)."""

    family: Any
    noise_scheduler: Any
    resolution: int


def train_flow_denoiser(
    transformer,
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence,
    scheduler,
    batches: LatentBatches,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    ema_decay: float,
    log: Log = print,
    log_every: int = 100,
) -> list[float]:
    """Train SD3's transformer and its two CLIP encoders together with the objective the trainer fine-tunes SD3
    with (``dreambooth_gs.train.objectives.flow_matching_loss`` at SD3's defaults: logit-normal timesteps,
    preconditioned outputs), on prompts encoded as the trainer and the pipeline encode them (zeros in T5's place)."""
    from dreambooth_gs import families
    from dreambooth_gs.train.objectives import LossSettings, flow_matching_loss

    family = families.get("sd3")
    parts = FlowParts(family, scheduler, resolution=0)  # resolution: read by Flux's prediction only
    settings = LossSettings(
        weighting_scheme=family.default_weighting_scheme, precondition_outputs=family.default_precondition_outputs
    )
    text = families.TextSettings(context_width=transformer.config.joint_attention_dim)
    encoders = [*text_encoders, None]  # no T5

    def batch_loss() -> torch.Tensor:
        latents, captions = batches(batch_size)
        conditioning = family.encode([*tokenizers, None], encoders, captions, text)  # (B, 32 + 77, D), (B, P)
        return flow_matching_loss(latents, conditioning, {}, parts, transformer, batches.generator, settings)

    models = (transformer, *text_encoders)
    return train_jointly(models, batch_loss, steps, lr, warmup_steps, ema_decay, "transformer+text", log, log_every)


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


def make_sd3_pipeline(vae, text_encoders, tokenizer, transformer, scheduler):
    """A StableDiffusion3Pipeline of MiniBooth's flow parts: both CLIP encoders share the tokenizer; no T5."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def sample_grid(
    pipeline_dir: str | Path, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float
):
    """A labelled grid (one row per prompt, one column per seed) of a saved pipeline's pictures (its family's
    sampler: DDIM, or flow-matching Euler)."""
    from dreambooth_gs import families
    from dreambooth_gs.adapters.sampling import generate_images, labeled_grid, load_pipeline

    pipeline = load_pipeline(str(pipeline_dir))
    sampling = families.detect(str(pipeline_dir)).sampling_kwargs()  # as pretrained (SD3: 77 zero rows for T5)
    rows = []
    for prompt in prompts:
        images = generate_images(
            pipeline, [prompt] * len(seeds), list(seeds), steps, guidance_scale, len(seeds), pipeline_kwargs=sampling
        )
        rows.append(images)
    return labeled_grid([[image.resize((96, 96)) for image in row] for row in rows], prompts, label_width=330)
