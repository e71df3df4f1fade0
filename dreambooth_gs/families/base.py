"""The interface every model family implements, and the CLIP text-encoding steps the UNet families share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..gs.config import GSOFTConfig


@dataclass
class Conditioning:
    """A batch's text conditioning: the denoiser's cross-attention input and, where the family has one, the pooled
    prompt embedding."""

    hidden_states: torch.Tensor  # (B, L, C)
    pooled: torch.Tensor | None = None  # (B, P)

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def rows(self, index) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled[index]
        return Conditioning(self.hidden_states[index], pooled)

    def to(self, device, dtype=None) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return Conditioning(self.hidden_states.to(device, dtype), pooled)

    @staticmethod
    def stack(items: list[Conditioning]) -> Conditioning:
        """Single-prompt conditionings (L, C) / (P,) -> one batch."""
        pooled = None if items[0].pooled is None else torch.stack([c.pooled for c in items])
        return Conditioning(torch.stack([c.hidden_states for c in items]), pooled)


@dataclass(frozen=True)
class TextSettings:
    """How prompts are encoded: CLIP's token count and padding mask (the UNet families' ``--tokenizer_max_length``,
    ``--text_encoder_use_attention_mask``), T5's token count (``--max_sequence_length``) and the denoiser's text
    width (SD3 pads CLIP's hidden states to it, and stands in zeros for a left-out T5)."""

    max_length: int | None = None
    use_attention_mask: bool = False
    max_sequence_length: int | None = None
    context_width: int | None = None


@dataclass
class LoadedParts:
    """What a family's loader returns: frozen models and the training noise scheduler."""

    tokenizers: list
    text_encoders: list[torch.nn.Module]
    vae: torch.nn.Module
    denoiser: torch.nn.Module
    noise_scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)


def clip_tokenize(tokenizer, prompts: list[str], max_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` (N, L), padded to and truncated at ``max_length`` (default: the tokenizer's)."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=max_length or tokenizer.model_max_length,
        return_tensors="pt",
    )
    return tokens.input_ids, tokens.attention_mask


def load_unet_vae_scheduler(
    model_id: str, revision: str | None, variant: str | None, vae_path: str | None, denoiser_kwargs: dict | None = None
):
    """``(vae, denoiser, noise_scheduler)`` of a diffusers folder or hub id (the UNet families share this layout);
    ``vae_path`` swaps in another VAE (a hub id or folder of its own); ``denoiser_kwargs`` go to the UNet's
    ``from_pretrained`` (``--base_model_precision``'s ``quantization_config`` and ``torch_dtype``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    kwargs = {"revision": revision}
    vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", variant=variant, **kwargs)
    denoiser = UNet2DConditionModel.from_pretrained(
        model_id, subfolder="unet", variant=variant, **kwargs, **(denoiser_kwargs or {})
    )
    scheduler = DDPMScheduler.from_pretrained(model_id, subfolder="scheduler", **kwargs)
    return load_vae(vae_path, revision) if vae_path else vae, denoiser, scheduler


def load_vae(vae_path: str, revision: str | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_path, revision=revision)


def read_model_index(model_id: str, revision: str | None = None) -> dict:
    """A diffusers pipeline's ``model_index.json`` (a local folder's, or the hub's through diffusers)."""
    index = Path(model_id) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text())
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(model_id, revision=revision)


def null_components(model_id: str, revision: str | None = None) -> dict[str, None]:
    """``{name: None}`` for each component a pipeline folder saved as null (SD3 without T5: ``text_encoder_3``);
    ``from_pretrained`` refuses such a folder unless each of them is passed as None."""
    index = read_model_index(model_id, revision)
    return {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}


def read_component_config(model_id: str, subfolder: str, revision: str | None = None) -> dict | None:
    """A component's ``config.json`` (a local folder's, or a hub id's through diffusers) without loading weights;
    None for a single file, a folder without that subfolder, or a hub id that cannot be reached."""
    path = Path(model_id)
    if path.is_file():
        return None
    local = path / subfolder / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if path.is_dir():
        return None
    from diffusers import AutoencoderKL  # any model class reads a subfolder's config.json

    try:
        return dict(AutoencoderKL.load_config(model_id, subfolder=subfolder, revision=revision))
    except (OSError, ValueError):
        return None


def config_stand_ins(model_id: str, denoiser_name: str, revision: str | None = None) -> tuple | None:
    """``(denoiser, vae)`` stand-ins holding only the components' configs (``.config``), for what a family derives
    from them (resolution multiple and limit) before any weight loads; None where a config cannot be read."""
    from diffusers.configuration_utils import FrozenDict

    configs = [read_component_config(model_id, name, revision) for name in (denoiser_name, "vae")]
    if any(config is None for config in configs):
        return None
    return tuple(SimpleNamespace(config=FrozenDict(config)) for config in configs)


def tokenizer_name(text_encoder_name: str) -> str:
    """The pipeline attribute of a text encoder's tokenizer: ``text_encoder_2`` -> ``tokenizer_2``."""
    return text_encoder_name.replace("text_encoder", "tokenizer")


def vae_scale_factor(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_max_length(text_encoders: list[torch.nn.Module], max_length: int | None) -> None:
    for encoder in text_encoders:
        limit = getattr(encoder.config, "max_position_embeddings", None)
        if max_length is not None and limit is not None and max_length > limit:
            raise ValueError(
                f"--tokenizer_max_length {max_length} exceeds the text encoder's {limit} positions; use {limit} or less"
            )


class Family:
    """One family of diffusion models; subclasses fill in the class attributes and the methods."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()  # model_index.json _class_name values (the first one is used)
    single_file_types: tuple[str, ...] = ()  # diffusers' infer_diffusers_model_type names
    denoiser_name: str = "unet"  # the pipeline attribute holding the denoiser (the adapted model)
    objective: str = "ddpm"  # "ddpm" (noise / v prediction) or "flow" (flow matching, see objectives.py)
    sampler: str = "DDIMScheduler"  # the diffusers scheduler validation and evaluation sample with
    default_targets: tuple[str, ...] = GSOFTConfig().target_modules  # the UNet's attention projections
    text_encoder_names: tuple[str, ...] = ("text_encoder",)  # pipeline attributes, in order
    trainable_text_encoders: tuple[str, ...] = ("text_encoder",)  # those --train_text_encoder adapts (CLIP's)
    text_encoder_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention
    pipeline_load_kwargs: dict = {}  # from_pretrained arguments for sampling pipelines (e.g. no safety checker)
    vae_in_fp32: bool = False  # keep the VAE in float32 under mixed precision (SDXL's VAE overflows in fp16)

    def load(
        self,
        model_id: str,
        revision: str | None,
        variant: str | None,
        vae_path: str | None,
        denoiser_kwargs: dict | None = None,
        text_encoder_kwargs: dict[str, dict] | None = None,
    ) -> LoadedParts:
        """The pipeline's parts; ``denoiser_kwargs`` go to the denoiser's ``from_pretrained`` (a folder or hub id),
        ``text_encoder_kwargs[name]`` to that text encoder's. A missing component subfolder is named first, before
        anything loads."""
        self.check_folder(model_id, revision)
        return self.load_parts(model_id, revision, variant, vae_path, denoiser_kwargs, text_encoder_kwargs or {})

    def load_parts(
        self,
        model_id: str,
        revision: str | None,
        variant: str | None,
        vae_path: str | None,
        denoiser_kwargs: dict | None = None,
        text_encoder_kwargs: dict[str, dict] | None = None,
    ) -> LoadedParts:
        """What :meth:`load` does for this family once the folder is checked."""
        raise NotImplementedError

    def encode(self, tokenizers, text_encoders, prompts: list[str], settings: TextSettings) -> Conditioning:
        raise NotImplementedError

    def check_text_settings(self, settings: TextSettings) -> None:
        """Refuse text settings this family cannot honour (one line), before anything is written."""
        if settings.max_sequence_length is not None:
            raise ValueError(f"--max_sequence_length sets T5's prompt length; the {self.name} family has no T5")

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        batch: dict[str, torch.Tensor],
        resolution: int,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The denoiser's output for (B, C, h, w) noisy latents at ``timesteps`` (B,), shaped like the latents."""
        extra = self.unet_kwargs(conditioning, batch, resolution)  # SDXL: pooled embeds and time ids
        return denoiser(noisy_latents, timesteps, conditioning.hidden_states, **extra).sample

    def negative(self, encode, count: int) -> Conditioning:
        """The unconditional (empty prompt) conditioning used for classifier-free guidance at sampling time."""
        return encode([""] * count)

    def unet_kwargs(self, conditioning: Conditioning, batch: dict[str, torch.Tensor], resolution: int) -> dict:
        """Extra keyword arguments of the denoiser's call for a training batch (none for SD 1.x / 2.x)."""
        return {}

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def make_pipeline(self, parts, denoiser: torch.nn.Module, scheduler):
        raise NotImplementedError

    def sampling_kwargs(self, max_sequence_length: int | None = None) -> dict:
        """The pipeline call's arguments that make it encode prompts as training did (``max_sequence_length``:
        the run's ``--max_sequence_length``, None for the family's default); none for the UNet families."""
        return {}

    def pipeline_text_kwargs(self, conditioning: Conditioning, negative: Conditioning) -> dict:
        """The pipeline's precomputed-prompt arguments (with the pooled ones where the family has them)."""
        kwargs = {"prompt_embeds": conditioning.hidden_states, "negative_prompt_embeds": negative.hidden_states}
        if conditioning.pooled is not None:
            kwargs["pooled_prompt_embeds"] = conditioning.pooled
            kwargs["negative_pooled_prompt_embeds"] = negative.pooled
        return kwargs

    def default_resolution(self, denoiser: torch.nn.Module, vae: torch.nn.Module) -> int:
        return denoiser.config.sample_size * vae_scale_factor(vae)

    def resolution_multiple(self, denoiser: torch.nn.Module, vae: torch.nn.Module) -> int:
        """Training resolutions must be multiples of this (the VAE's factor, times the latent patch size)."""
        return vae_scale_factor(vae)

    def max_resolution(self, denoiser: torch.nn.Module, vae: torch.nn.Module) -> tuple[int, str] | None:
        """``(largest resolution, why)`` the denoiser can take, or None where it has no limit."""
        return None

    def check_resolution(self, resolution: int, denoiser: torch.nn.Module, vae: torch.nn.Module) -> None:
        """Refuse a training resolution the model cannot take (one line), before any data loads."""
        multiple = self.resolution_multiple(denoiser, vae)
        if resolution % multiple:
            raise ValueError(
                f"--resolution {resolution} is not a multiple of {multiple} (the {self.name} VAE's factor x its latent "
                f"patches); use {resolution - resolution % multiple or multiple}"
            )
        self._check_limit(resolution, denoiser, vae)

    def _check_limit(self, resolution: int, denoiser, vae) -> None:
        limit = self.max_resolution(denoiser, vae)
        if limit is not None and resolution > limit[0]:
            raise ValueError(
                f"--resolution {resolution} is above the largest the {self.name} model can take: {limit[0]} "
                f"({limit[1]}); use {limit[0]} or less"
            )

    def sampling_resolution(self, model_id: str, requested: int | None, revision: str | None = None) -> int | None:
        """The size this family's pipeline draws when asked for ``requested`` x ``requested`` (None: the model's
        own size): rounded down to :meth:`resolution_multiple`, as Flux's pipeline rounds it (SD3's would refuse
        it). One line refuses a size below one multiple or above :meth:`max_resolution`. Read from the model's
        configs; a single file (diffusers builds it from standard configs) is taken at its word."""
        stand_ins = None if requested is None else config_stand_ins(model_id, self.denoiser_name, revision)
        if stand_ins is None:
            return requested
        multiple = self.resolution_multiple(*stand_ins)
        if requested < multiple:
            raise ValueError(f"--resolution {requested} is below the smallest size {self.name} draws ({multiple})")
        drawn = requested - requested % multiple
        self._check_limit(drawn, *stand_ins)
        return drawn

    def required_folders(self, model_id: str, revision: str | None = None) -> list[str]:
        """The component subfolders a pipeline folder of this family holds (those saved as null excepted)."""
        names = [self.denoiser_name, "vae", "scheduler"]
        for encoder in self.text_encoder_names:
            names += [encoder, tokenizer_name(encoder)]
        nulls = null_components(model_id, revision) if (Path(model_id) / "model_index.json").is_file() else {}
        return [name for name in names if name not in nulls]

    def check_folder(self, model_id: str, revision: str | None = None) -> None:
        """Refuse a local pipeline folder that lacks a component's subfolder (one line naming it), before anything
        loads; diffusers would report a config.json missing at the folder's root."""
        folder = Path(model_id)
        if not folder.is_dir():
            return
        missing = [f"{name}/" for name in self.required_folders(model_id, revision) if not (folder / name).is_dir()]
        if missing:
            what = f"subfolder {missing[0]} is" if len(missing) == 1 else f"subfolders {', '.join(missing)} are"
            raise ValueError(
                f"{model_id} is not a complete {self.pipeline_classes[0]} ({self.name}) folder: its {what} missing "
                "(a diffusers pipeline folder holds one subfolder per component)"
            )

    def sharding_units(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules FSDP2 shards one by one (:mod:`..train.distributed`); the rest of the
        denoiser is the root unit. A UNet's down / mid / up blocks are few and uneven (SDXL's largest holds a
        quarter of the weights), so each of their resnets, attention transformers and samplers is a unit."""
        blocks = [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]
        return [
            unit
            for block in blocks
            if block is not None
            for part in block.children()
            if isinstance(part, torch.nn.ModuleList)
            for unit in part
        ]

    def make_sampler(self, noise_scheduler):
        """The scheduler to sample with, from the training scheduler's config (DDIM for the UNet families)."""
        import diffusers

        return getattr(diffusers, self.sampler).from_config(noise_scheduler.config)

    def load_error(self, model_id: str, err: BaseException) -> ValueError:
        from ..fileio import first_line

        kind = "single-file checkpoint" if Path(model_id).is_file() else "model"
        return ValueError(
            f"cannot load {self.pipeline_classes[0]} ({self.name}) {kind} {model_id!r}: {first_line(err)} (give a "
            "local diffusers folder, a single-file .safetensors, or a hub id with network access)"
        )
