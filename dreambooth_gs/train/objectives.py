"""DreamBooth's training objectives, as diffusers' DreamBooth trainers compute them.

* ``ddpm`` (the UNet families): latents, noise (with optional offset noise), a uniform timestep, the noise or
  v-prediction loss with optional Min-SNR weighting (``train_dreambooth.py``).
* ``flow`` (SD3 / SD3.5, Flux.1): timesteps drawn from ``--weighting_scheme``'s density over the
  ``FlowMatchEulerDiscreteScheduler``'s training schedule, ``x_t = (1 - sigma) x_0 + sigma noise``, the flow
  ``noise - x_0`` as target (or, with ``--precondition_outputs``, the clean latents), the scheme's loss weighting
  (``train_dreambooth_lora_sd3.py`` / ``_flux.py``).

Both add the prior-preservation term (instance examples first, then class examples) and draw every random number
from the run's seeded generator, so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr


@dataclass(frozen=True)
class LossSettings:
    """The objective's flags (a :class:`~dreambooth_gs.train.options.TrainingOptions` after the family filled its
    defaults in)."""

    prior_loss_weight: float | None = None  # None: no prior preservation
    snr_gamma: float | None = None  # ddpm
    noise_offset: float = 0.0  # ddpm
    weighting_scheme: str = "none"  # flow
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    guidance_scale: float | None = None  # flux's guidance input

    @staticmethod
    def from_options(options) -> LossSettings:
        return LossSettings(
            prior_loss_weight=options.prior_loss_weight if options.with_prior_preservation else None,
            snr_gamma=options.snr_gamma,
            noise_offset=options.noise_offset,
            weighting_scheme=options.weighting_scheme or "none",
            logit_mean=options.logit_mean,
            logit_std=options.logit_std,
            mode_scale=options.mode_scale,
            precondition_outputs=bool(options.precondition_outputs),
            guidance_scale=options.guidance_scale,
        )


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


def _mean_squared_error(pred, target, weight: torch.Tensor | None = None, per_example: torch.Tensor | None = None):
    """Mean of ``weight * (pred - target)^2`` (``weight`` broadcasts, e.g. (B, 1, 1, 1)); ``per_example`` (B,)
    weights each example's mean before the batch mean. Unweighted, exactly ``F.mse_loss``."""
    if weight is None and per_example is None:
        return F.mse_loss(pred.float(), target.float())
    squared = (pred.float() - target.float()) ** 2
    if weight is not None:
        squared = weight.float() * squared
    per_item = squared.mean(dim=list(range(1, pred.ndim)))  # (B,)
    return (per_item if per_example is None else per_item * per_example).mean()


def encode_latent_parameters(vae: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) images -> the VAE's latent distribution as its (B, 2C, h, w) mean / log-variance tensor."""
    with torch.no_grad():
        return vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist.parameters


def training_latents(batch: dict, parts, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A sample of each example's latent distribution (from the VAE, or cached by ``--cache_latents``), shifted
    and scaled into the denoiser's space: (x - shift_factor) * scaling_factor, (B', C, h, w)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    parameters = batch.get("latent_parameters")
    if parameters is None:
        with parts.on_device(parts.vae):
            parameters = encode_latent_parameters(parts.vae, batch["pixel_values"])
    with torch.no_grad():
        latents = DiagonalGaussianDistribution(parameters.to(parts.device)).sample(generator=generator)
    shift, scale = parts.latent_shift_and_scale
    return ((latents - shift) * scale).to(dtype)


def training_loss(
    batch: dict, parts, text, denoiser: torch.nn.Module, generator: torch.Generator, dtype: torch.dtype, settings
) -> torch.Tensor:
    """The family's objective on one batch: DreamBooth's loss plus the prior-preservation term when
    ``settings.prior_loss_weight`` is set. ``parts`` holds the family, VAE and training scheduler; ``text``
    encodes the batch's prompts (with gradients for ``--train_text_encoder``)."""
    latents = training_latents(batch, parts, generator, dtype)  # (B', C, h, w)
    conditioning = text.encode(batch["prompts"]).to(denoiser.device)  # (B', L, C)
    loss = flow_matching_loss if parts.family.objective == "flow" else denoising_loss
    return loss(latents, conditioning, batch, parts, denoiser, generator, settings)


def _split_prior(pred, target, weight, settings):
    """``[(pred, target, weight)]`` for the instance half and, with prior preservation, the class half."""
    if settings.prior_loss_weight is None:
        return [(pred, target, weight)]
    weights = weight.chunk(2) if weight is not None else (None, None)
    return list(zip(pred.chunk(2), target.chunk(2), weights))


def denoising_loss(latents, conditioning, batch, parts, denoiser, generator, settings) -> torch.Tensor:
    """The DDPM objective (epsilon or v-prediction, as the scheduler says); Min-SNR weights only the instance
    examples' loss, as in diffusers' ``train_dreambooth.py``."""
    noise = sample_noise(latents, generator, settings.noise_offset)
    scheduler = parts.noise_scheduler
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    model_pred = parts.family.predict(denoiser, noisy_latents, timesteps, conditioning, batch, parts.resolution)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    halves = _split_prior(model_pred, target, None, settings)
    instance_pred, instance_target, _ = halves[0]
    snr = None
    if settings.snr_gamma is not None:
        snr = min_snr_weights(scheduler, timesteps[: instance_pred.shape[0]], settings.snr_gamma)
    loss = _mean_squared_error(instance_pred, instance_target, per_example=snr)
    if len(halves) == 2:
        loss = loss + settings.prior_loss_weight * _mean_squared_error(*halves[1][:2])
    return loss


def flow_timesteps(scheduler, batch_size: int, settings, generator: torch.Generator, device) -> tuple:
    """``(timesteps (B,), sigmas (B,))`` drawn from ``settings.weighting_scheme``'s density over the scheduler's
    training schedule (diffusers' ``compute_density_for_timestep_sampling``)."""
    u = compute_density_for_timestep_sampling(
        weighting_scheme=settings.weighting_scheme,
        batch_size=batch_size,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        mode_scale=settings.mode_scale,
        device=generator.device,
        generator=generator,
    )
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1).cpu()
    return scheduler.timesteps[indices].to(device), scheduler.sigmas[indices].to(device)


def flow_matching_loss(latents, conditioning, batch, parts, denoiser, generator, settings) -> torch.Tensor:
    """Rectified-flow matching: x_t = (1 - sigma) x_0 + sigma noise; the target is noise - x_0, or x_0 itself
    when the output is preconditioned (x_t - sigma * output, SD3's EDM-style default)."""
    noise = sample_noise(latents, generator)
    timesteps, sigmas = flow_timesteps(parts.noise_scheduler, latents.shape[0], settings, generator, latents.device)
    sigmas = sigmas.to(latents.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    noisy_latents = (1.0 - sigmas) * latents + sigmas * noise
    model_pred = parts.family.predict(
        denoiser, noisy_latents, timesteps, conditioning, batch, parts.resolution, settings.guidance_scale
    )
    if settings.precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_latents
        target = latents
    else:
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=settings.weighting_scheme, sigmas=sigmas)
    halves = [_mean_squared_error(p, t, w) for p, t, w in _split_prior(model_pred, target, weighting, settings)]
    return halves[0] if len(halves) == 1 else halves[0] + settings.prior_loss_weight * halves[1]
