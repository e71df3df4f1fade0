"""What the flow-matching transformer families (SD3 / SD3.5, Flux.1) share: loading a pipeline folder whose
denoiser is ``pipe.transformer`` (or a single file), the CLIP and T5 prompt encoders, the flow-matching sampler and
the checks of their text settings. The objective itself lives in :mod:`dreambooth_gs.train.objectives`."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import (
    Family,
    LoadedParts,
    TextSettings,
    clip_tokenize,
    load_vae,
    read_model_index,
    tokenizer_name,
    vae_scale_factor,
)


class FlowFamily(Family):
    """A family whose denoiser is an MMDiT transformer trained with flow matching."""

    denoiser_name = "transformer"
    objective = "flow"
    sampler = "FlowMatchEulerDiscreteScheduler"
    transformer_class: str = ""  # the diffusers model class of pipe.transformer
    encoder_classes: tuple[str, ...] = ()  # the transformers class of each text encoder, in text_encoder_names order
    # diffusers' trainers' defaults (train_dreambooth_lora_sd3.py / _flux.py)
    default_weighting_scheme: str = "none"
    default_precondition_outputs: bool = False
    default_max_sequence_length: int = 77
    # in every joint block (Flux: also its single blocks' to_q / to_k / to_v), as diffusers' LoRA trainers
    default_targets = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    )

    def sharding_units(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """Every transformer block (SD3's joint blocks; Flux's double- then single-stream blocks)."""
        return [block for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for block in child]

    def load_parts(
        self,
        model_id: str,
        revision: str | None,
        variant: str | None,
        vae_path: str | None,
        denoiser_kwargs: dict | None = None,
        text_encoder_kwargs: dict[str, dict] | None = None,
    ) -> LoadedParts:
        import diffusers
        import transformers

        try:
            if Path(model_id).is_file():
                pipe = self.pipeline_class().from_single_file(model_id)
                tokenizers = [getattr(pipe, tokenizer_name(n)) for n in self.text_encoder_names]
                encoders = [getattr(pipe, n) for n in self.text_encoder_names]
                vae, transformer, config = pipe.vae, pipe.transformer, pipe.scheduler.config
                scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
            else:
                kwargs = {"revision": revision}
                index = read_model_index(model_id, revision)  # null entries: left out (SD3 without T5)
                present = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
                tokenizers, encoders = [], []
                for name, class_name in zip(self.text_encoder_names, self.encoder_classes):
                    if name not in present:  # e.g. SD3 saved without T5 (text_encoder_3=None)
                        tokenizers.append(None)
                        encoders.append(None)
                        continue
                    tokenizers.append(
                        transformers.AutoTokenizer.from_pretrained(model_id, subfolder=tokenizer_name(name), **kwargs)
                    )
                    encoder_class = getattr(transformers, class_name)
                    quantized = (text_encoder_kwargs or {}).get(name, {})
                    encoders.append(
                        encoder_class.from_pretrained(model_id, subfolder=name, variant=variant, **kwargs, **quantized)
                    )
                vae = diffusers.AutoencoderKL.from_pretrained(model_id, subfolder="vae", variant=variant, **kwargs)
                transformer = getattr(diffusers, self.transformer_class).from_pretrained(
                    model_id, subfolder="transformer", variant=variant, **kwargs, **(denoiser_kwargs or {})
                )
                scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
                    model_id, subfolder="scheduler", **kwargs
                )
        except (OSError, ValueError) as err:
            raise self.load_error(model_id, err) from err
        vae = load_vae(vae_path, revision) if vae_path else vae
        return LoadedParts(tokenizers, encoders, vae, transformer, scheduler)

    def check_text_settings(self, settings: TextSettings) -> None:
        if settings.max_length is not None or settings.use_attention_mask:
            raise ValueError(
                f"--tokenizer_max_length and --text_encoder_use_attention_mask apply to the UNet families; {self.name} "
                "encodes CLIP at its 77 tokens without a mask, as its pipeline does (--max_sequence_length sets T5's)"
            )

    def max_sequence_length(self, settings: TextSettings) -> int:
        return settings.max_sequence_length or self.default_max_sequence_length

    def sampling_kwargs(self, max_sequence_length: int | None = None) -> dict:
        # The pipelines' own default (SD3: 256 T5 tokens) is not the trainer's (77): a model trained with 77
        # tokens, or with 77 zero rows standing in for a left-out T5, would be sampled on another sequence.
        return {"max_sequence_length": self.max_sequence_length(TextSettings(max_sequence_length=max_sequence_length))}

    def resolution_multiple(self, denoiser: torch.nn.Module, vae: torch.nn.Module) -> int:
        return vae_scale_factor(vae) * 2  # 2 x 2 latent patches (SD3's patch_size 2, Flux's packing)

    def make_pipeline(self, parts, denoiser: torch.nn.Module, scheduler):
        components = {"transformer": denoiser, "vae": parts.vae, "scheduler": scheduler}
        for name, tokenizer, encoder in zip(self.text_encoder_names, parts.tokenizers, parts.text_encoders):
            components[name] = encoder
            components[tokenizer_name(name)] = tokenizer
        return self.pipeline_class()(**components)


def clip_hidden_and_pooled(tokenizer, encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's penultimate hidden states (N, 77, C) and its pooled output (N, P): the projected one of a
    ``CLIPTextModelWithProjection`` (SD3), the plain pooler output of a ``CLIPTextModel`` (Flux)."""
    ids, _ = clip_tokenize(tokenizer, prompts, None)  # (N, 77)
    out = encoder(ids.to(encoder.device), output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.hidden_states[-2], pooled


def t5_hidden(tokenizer, encoder, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """T5's last hidden state (N, max_sequence_length, C), padded and truncated as the pipelines do."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids  # (N, L)
    return encoder(ids.to(encoder.device))[0]
