"""Stable Diffusion XL: two CLIP text encoders (the second with a projection), the UNet conditioned on their
penultimate hidden states side by side plus the second's pooled embedding and the micro-conditioning time ids
(original size, crop top-left, target size), as diffusers' ``train_dreambooth_lora_sdxl.py`` builds them."""

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


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    single_file_types = ("xl_base",)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = text_encoder_names
    vae_in_fp32 = True  # SDXL's own VAE overflows in fp16; users swap in an fp16-safe one with --pretrained_vae_...

    def load_parts(
        self,
        model_id: str,
        revision: str | None,
        variant: str | None,
        vae_path: str | None,
        denoiser_kwargs: dict | None = None,
        text_encoder_kwargs: dict[str, dict] | None = None,
    ) -> LoadedParts:
        from diffusers import DDPMScheduler, StableDiffusionXLPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        try:
            if Path(model_id).is_file():
                pipe = StableDiffusionXLPipeline.from_single_file(model_id)
                tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
                vae, denoiser, scheduler = pipe.vae, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
                vae = load_vae(vae_path, revision) if vae_path else vae
            else:
                kwargs = {"revision": revision}
                tokenizers = [CLIPTokenizer.from_pretrained(model_id, subfolder=f, **kwargs) for f in TOKENIZERS]
                quantized = text_encoder_kwargs or {}
                encoders = [
                    encoder_class.from_pretrained(
                        model_id, subfolder=name, variant=variant, **kwargs, **quantized.get(name, {})
                    )
                    for name, encoder_class in zip(
                        self.text_encoder_names, (CLIPTextModel, CLIPTextModelWithProjection)
                    )
                ]
                vae, denoiser, scheduler = load_unet_vae_scheduler(
                    model_id, revision, variant, vae_path, denoiser_kwargs
                )
        except (OSError, ValueError) as err:
            raise self.load_error(model_id, err) from err
        return LoadedParts(tokenizers, encoders, vae, denoiser, scheduler, extra={"custom_vae": vae_path is not None})

    def encode(self, tokenizers, text_encoders, prompts, settings: TextSettings) -> Conditioning:
        check_max_length(text_encoders, settings.max_length)
        max_length, use_mask = settings.max_length, settings.use_attention_mask
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            ids, mask = clip_tokenize(tokenizer, prompts, max_length)  # (N, L), (N, L)
            mask = mask.to(encoder.device) if use_mask else None
            out = encoder(ids.to(encoder.device), attention_mask=mask, output_hidden_states=True)
            pooled = out[0]  # the last encoder's projected pooled embedding (N, P) is the one SDXL uses
            hidden.append(out.hidden_states[-2])  # (N, L, C_i): SDXL reads the penultimate layer
        return Conditioning(torch.cat(hidden, dim=-1), pooled)  # (N, L, C_1 + C_2)

    def negative(self, encode, count: int) -> Conditioning:
        """SDXL's pipelines use zeros for an empty negative prompt (force_zeros_for_empty_prompt)."""
        like = encode([""])
        return Conditioning(
            torch.zeros((count, *like.hidden_states.shape[1:]), dtype=like.hidden_states.dtype),
            torch.zeros((count, *like.pooled.shape[1:]), dtype=like.pooled.dtype),
        )

    def unet_kwargs(self, conditioning: Conditioning, batch: dict[str, torch.Tensor], resolution: int) -> dict:
        """``added_cond_kwargs``: pooled text embedding and time ids (orig h, w, crop top, left, target h, w)."""
        target = torch.tensor([resolution, resolution]).expand(len(conditioning), 2)  # (B, 2)
        time_ids = torch.cat([batch["original_sizes"], batch["crop_top_lefts"], target], dim=1)  # (B, 6)
        device, dtype = conditioning.hidden_states.device, conditioning.hidden_states.dtype
        return {"added_cond_kwargs": {"text_embeds": conditioning.pooled, "time_ids": time_ids.to(device, dtype)}}

    def make_pipeline(self, parts, denoiser: torch.nn.Module, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            text_encoder_2=parts.text_encoders[1],
            tokenizer=parts.tokenizers[0],
            tokenizer_2=parts.tokenizers[1],
            unet=denoiser,
            scheduler=scheduler,
        )


TOKENIZERS = ("tokenizer", "tokenizer_2")
