"""DreamBooth's training objective: latents, noise (with optional offset noise), the denoising loss with optional
Min-SNR weighting, and the prior-preservation term, as diffusers' DreamBooth trainers compute them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """N(0, 1) noise shaped like ``latents``; with ``noise_offset`` one extra N(0, offset^2) value per example and
    channel is added to every position (offset noise: lets the model shift an image's mean brightness)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        batch, channels = latents.shape[:2]
        offset = torch.randn((batch, channels, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset  # (B, C, 1, 1) broadcast over (h, w)
    return noise


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) loss weights min(SNR, gamma) / SNR for epsilon prediction, min(SNR, gamma) / (SNR + 1) for
    v-prediction (Hang et al. 2023, arXiv 2303.09556, as diffusers' trainers apply it)."""
    snr = compute_snr(scheduler, timesteps)  # (B,)
    divisor = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return torch.clamp(snr, max=gamma) / divisor


def _mse_per_example(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))  # (B,)


def diffusion_loss(
    batch: dict[str, torch.Tensor],
    parts,
    text,
    unet: torch.nn.Module,
    generator: torch.Generator,
    weight_dtype: torch.dtype,
    prior_loss_weight: float | None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """DreamBooth's denoising loss (plus the prior-preservation term when ``prior_loss_weight`` is given).

    ``parts`` holds the family, the frozen VAE and the training noise scheduler; ``text`` encodes the batch's
    prompts (a :class:`~dreambooth_gs.models.TextConditioning`). With ``snr_gamma`` the instance examples' losses
    are Min-SNR weighted; the prior term stays unweighted, as in diffusers' ``train_dreambooth.py``.
    """
    pixel_values = batch["pixel_values"].to(device=unet.device, dtype=parts.vae.dtype)  # (B', 3, R, R)
    with torch.no_grad():
        latents = parts.vae.encode(pixel_values).latent_dist.sample(generator=generator)
        latents = (latents * parts.vae.config.scaling_factor).to(weight_dtype)  # (B', 4, R/8, R/8)
    conditioning = text.encode(batch["prompts"]).to(unet.device)  # (B', L, C); with gradients for --train_text_encoder
    noise = sample_noise(latents, generator, noise_offset)
    scheduler = parts.noise_scheduler
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    extra = parts.family.unet_kwargs(conditioning, batch, parts.resolution)  # SDXL: pooled embeds and time ids
    model_pred = unet(noisy_latents, timesteps, conditioning.hidden_states, **extra).sample
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    prior_loss = None
    if prior_loss_weight is not None:  # instance examples first, then class examples
        model_pred, pred_prior = model_pred.chunk(2)
        target, target_prior = target.chunk(2)
        timesteps = timesteps.chunk(2)[0]
        prior_loss = F.mse_loss(pred_prior.float(), target_prior.float())
    if snr_gamma is None:
        loss = F.mse_loss(model_pred.float(), target.float())
    else:
        loss = (_mse_per_example(model_pred, target) * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()
    return loss if prior_loss is None else loss + prior_loss_weight * prior_loss
