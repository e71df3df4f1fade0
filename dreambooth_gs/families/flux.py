"""Flux.1: a CLIP encoder (its pooled output only) and a T5 encoder (the text sequence); an MMDiT transformer with
double- and single-stream blocks trained with flow matching on 2 x 2-packed latents, with image and text position
ids and, in the guidance-distilled models (FLUX.1-dev), a guidance input, as diffusers'
``train_dreambooth_lora_flux.py`` feeds it."""

from __future__ import annotations

import torch

from .base import Conditioning, TextSettings
from .flow import FlowFamily, clip_hidden_and_pooled, t5_hidden


class Flux(FlowFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    single_file_types = ("flux-dev", "flux-schnell")
    transformer_class = "FluxTransformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    trainable_text_encoders = ("text_encoder",)  # CLIP; T5-XXL (4.7B) stays frozen, as in diffusers' trainer
    default_weighting_scheme = "none"
    default_precondition_outputs = False
    default_max_sequence_length = 512
    default_guidance_scale = 3.5  # diffusers' training default for the guidance-distilled FLUX.1-dev

    def encode(self, tokenizers, text_encoders, prompts, settings: TextSettings) -> Conditioning:
        _, pooled = clip_hidden_and_pooled(tokenizers[0], text_encoders[0], prompts)  # (N, P)
        hidden = t5_hidden(tokenizers[1], text_encoders[1], prompts, self.max_sequence_length(settings))  # (N, L, D)
        return Conditioning(hidden, pooled.to(hidden.dtype))

    def negative(self, encode, count: int) -> Conditioning | None:
        """Flux samples without classifier-free guidance (the distilled guidance is an input instead)."""
        return None

    def predict(self, denoiser, noisy_latents, timesteps, conditioning, batch, resolution, guidance_scale=None):
        from diffusers import FluxPipeline

        batch_size, channels, height, width = noisy_latents.shape
        packed = FluxPipeline._pack_latents(noisy_latents, batch_size, channels, height, width)  # (B, hw/4, 4C)
        device, dtype = noisy_latents.device, noisy_latents.dtype
        image_ids = FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(conditioning.hidden_states.shape[1], 3, device=device, dtype=dtype)  # (L, 3)
        guidance = None
        if denoiser.config.guidance_embeds:
            scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
            guidance = torch.full((batch_size,), scale, device=device, dtype=torch.float32)  # (B,)
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,  # Flux's transformer multiplies by 1000 itself
            guidance=guidance,
            pooled_projections=conditioning.pooled,
            encoder_hidden_states=conditioning.hidden_states,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]  # (B, hw/4, 4C)
        return FluxPipeline._unpack_latents(out, height, width, 1)  # (B, C, h, w); heights in latent pixels

    def default_resolution(self, denoiser, vae) -> int:
        return vae.config.sample_size  # the transformer's config has no sample size; the VAE's is FLUX's 1024

    def pipeline_text_kwargs(self, conditioning: Conditioning, negative: Conditioning | None) -> dict:
        return {"prompt_embeds": conditioning.hidden_states, "pooled_prompt_embeds": conditioning.pooled}
