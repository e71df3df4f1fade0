"""Stable Diffusion 3 / 3.5: two CLIP encoders with projection and a T5 encoder; an MMDiT transformer trained with
flow matching reads their sequence (CLIP's penultimate states side by side, zero-padded to T5's width, then T5's
states) and the two pooled embeddings side by side, as ``StableDiffusion3Pipeline.encode_prompt`` builds them.
A pipeline saved without T5 (``text_encoder_3=None``) gets zeros in T5's place, as diffusers does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Conditioning, TextSettings, vae_scale_factor
from .flow import FlowFamily, clip_hidden_and_pooled, t5_hidden


class StableDiffusion3(FlowFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    single_file_types = ("sd3", "sd35_medium", "sd35_large")
    transformer_class = "SD3Transformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    default_weighting_scheme = "logit_normal"
    default_precondition_outputs = True
    default_max_sequence_length = 77

    def encode(self, tokenizers, text_encoders, prompts, settings: TextSettings) -> Conditioning:
        clip = [clip_hidden_and_pooled(t, e, prompts) for t, e in zip(tokenizers[:2], text_encoders[:2])]
        clip_hidden = torch.cat([hidden for hidden, _ in clip], dim=-1)  # (N, 77, C_1 + C_2)
        pooled = torch.cat([p for _, p in clip], dim=-1)  # (N, P_1 + P_2)
        length = self.max_sequence_length(settings)
        if text_encoders[2] is None:
            t5 = clip_hidden.new_zeros((len(prompts), length, settings.context_width))  # (N, L, D)
        else:
            t5 = t5_hidden(tokenizers[2], text_encoders[2], prompts, length).to(clip_hidden.dtype)  # (N, L, D)
        clip_hidden = F.pad(clip_hidden, (0, t5.shape[-1] - clip_hidden.shape[-1]))  # (N, 77, D)
        return Conditioning(torch.cat([clip_hidden, t5], dim=-2), pooled)  # (N, 77 + L, D), (N, P_1 + P_2)

    def max_resolution(self, denoiser, vae) -> tuple[int, str] | None:
        """The transformer's position embedding covers pos_embed_max_size x pos_embed_max_size latent patches."""
        patches = getattr(denoiser.config, "pos_embed_max_size", None)
        if patches is None:
            return None
        patch_size, factor = denoiser.config.patch_size, vae_scale_factor(vae)
        why = f"pos_embed_max_size {patches} x patch_size {patch_size} x the VAE's factor {factor}"
        return patches * patch_size * factor, why

    def predict(self, denoiser, noisy_latents, timesteps, conditioning, batch, resolution, guidance_scale=None):
        return denoiser(
            hidden_states=noisy_latents,
            timestep=timesteps,
            encoder_hidden_states=conditioning.hidden_states,
            pooled_projections=conditioning.pooled,
            return_dict=False,
        )[0]  # (B, C, h, w)
