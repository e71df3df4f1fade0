"""Stable Diffusion 1.x / 2.x: one CLIP tokenizer and text encoder, a UNet conditioned on its last hidden state."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import (
    Conditioning,
    Family,
    LoadedParts,
    TextSettings,
    check_max_length,
    clip_tokenize,
    load_unet_vae_scheduler,
    load_vae,
)


class StableDiffusion(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    single_file_types = ("v1", "v2")
    text_encoder_names = ("text_encoder",)
    pipeline_load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def load_parts(
        self,
        model_id: str,
        revision: str | None,
        variant: str | None,
        vae_path: str | None,
        denoiser_kwargs: dict | None = None,
        text_encoder_kwargs: dict[str, dict] | None = None,
    ) -> LoadedParts:
        from diffusers import DDPMScheduler, StableDiffusionPipeline
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            if Path(model_id).is_file():
                pipe = StableDiffusionPipeline.from_single_file(model_id)
                tokenizer, encoder, vae, denoiser = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
                scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
                vae = load_vae(vae_path, revision) if vae_path else vae
            else:
                kwargs = {"revision": revision}
                tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer", **kwargs)
                quantized = (text_encoder_kwargs or {}).get("text_encoder", {})
                encoder = CLIPTextModel.from_pretrained(
                    model_id, subfolder="text_encoder", variant=variant, **kwargs, **quantized
                )
                vae, denoiser, scheduler = load_unet_vae_scheduler(
                    model_id, revision, variant, vae_path, denoiser_kwargs
                )
        except (OSError, ValueError) as err:
            raise self.load_error(model_id, err) from err
        return LoadedParts([tokenizer], [encoder], vae, denoiser, scheduler)

    def encode(self, tokenizers, text_encoders, prompts, settings: TextSettings) -> Conditioning:
        check_max_length(text_encoders, settings.max_length)
        max_length, use_mask = settings.max_length, settings.use_attention_mask
        ids, mask = clip_tokenize(tokenizers[0], prompts, max_length)  # (N, L), (N, L)
        encoder = text_encoders[0]
        mask = mask.to(encoder.device) if use_mask else None
        return Conditioning(encoder(ids.to(encoder.device), attention_mask=mask)[0])  # (N, L, C)

    def make_pipeline(self, parts, denoiser: torch.nn.Module, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            tokenizer=parts.tokenizers[0],
            unet=denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
