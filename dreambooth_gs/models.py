"""Stable Diffusion components for training: loading (hub id, local folder, single file or the offline demo),
the data checks that come before it, prompt encoding, the adapter for each method, and a pipeline around the
trained UNet."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from . import methods
from .data import find_images, tokenize_prompt
from .fileio import first_line
from .options import TrainingOptions

DEMO_SUBJECT_DIR = Path(__file__).resolve().parent.parent / "datasets" / "demo_subject"
SUBJECT_FILE = "subject.json"  # optional, beside instance images: {"class_name": "dog"}


@dataclass
class Components:
    """Everything the loop needs besides the trainable UNet: frozen models, tokenizer, scheduler and the data."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    model_id: str
    is_demo: bool
    instance_data_dir: Path
    class_name: str | None
    instance_prompt: str
    class_prompt: str
    resolution: int


def _resolve_model(options: TrainingOptions, accelerator: Accelerator) -> tuple[str, bool]:
    if options.pretrained_model_name_or_path:
        return options.pretrained_model_name_or_path, False
    from .tiny import build_tiny_pipeline, default_tiny_pipeline_dir

    with accelerator.main_process_first():
        return str(build_tiny_pipeline(default_tiny_pipeline_dir())), True


def _load_parts(model_id: str, revision: str | None, variant: str | None):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        if Path(model_id).is_file():  # a single-file checkpoint (.safetensors)
            pipe = StableDiffusionPipeline.from_single_file(model_id)
            scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            return pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler
        kwargs = {"revision": revision}
        return (
            CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer", **kwargs),
            CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", variant=variant, **kwargs),
            AutoencoderKL.from_pretrained(model_id, subfolder="vae", variant=variant, **kwargs),
            UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", variant=variant, **kwargs),
            DDPMScheduler.from_pretrained(model_id, subfolder="scheduler", **kwargs),
        )
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load Stable Diffusion from {model_id!r}: {first_line(err)} (give a local diffusers folder, a "
            "single-file .safetensors, or a hub id with network access)"
        ) from err


def _subject_class(options: TrainingOptions, instance_dir: Path) -> str | None:
    if options.class_name:
        return options.class_name
    subject_file = instance_dir / SUBJECT_FILE
    if subject_file.is_file():
        return json.loads(subject_file.read_text()).get("class_name")
    return None


def _fill_class(template: str, class_name: str | None, flag: str) -> str:
    if "{class}" in template and not class_name:
        raise ValueError(
            f"{flag} {template!r} needs --class_name (e.g. --class_name dog) or a prompt without {{class}}"
        )
    return template.replace("{class}", class_name or "")


@dataclass(frozen=True)
class SubjectData:
    """The checked instance folder and the prompts filled in with the class noun."""

    instance_data_dir: Path
    class_name: str | None
    instance_prompt: str
    class_prompt: str


def check_subject_data(options: TrainingOptions, accelerator: Accelerator) -> SubjectData:
    """Check the instance folder (it exists and holds readable images) and the prompts, before any model loads."""
    instance_dir = Path(options.instance_data_dir) if options.instance_data_dir else DEMO_SUBJECT_DIR
    if options.instance_data_dir is None and not instance_dir.is_dir():
        from .demo_data import make_demo_subject
        from .tiny import default_tiny_pipeline_dir

        instance_dir = default_tiny_pipeline_dir().parent / "demo_subject"
        with accelerator.main_process_first():
            make_demo_subject(instance_dir)
    if not instance_dir.is_dir():
        raise ValueError(f"--instance_data_dir {instance_dir} does not exist; pass the folder of subject photos")
    find_images(instance_dir)  # empty or unreadable folders are refused here, not after minutes of loading
    class_name = _subject_class(options, instance_dir)
    instance_prompt = _fill_class(options.instance_prompt, class_name, "--instance_prompt")
    class_prompt = options.class_prompt
    if options.with_prior_preservation:
        if options.class_data_dir is None:
            raise ValueError(
                "--with_prior_preservation needs --class_data_dir (a folder; missing images are generated)"
            )
        class_prompt = _fill_class(options.class_prompt, class_name, "--class_prompt")
    return SubjectData(instance_dir, class_name, instance_prompt, class_prompt)


def load_components(
    options: TrainingOptions, accelerator: Accelerator, weight_dtype: torch.dtype, subject: SubjectData
) -> Components:
    """Load and freeze the models (in ``weight_dtype`` on the accelerator's device) for the checked ``subject``."""
    model_id, is_demo = _resolve_model(options, accelerator)
    tokenizer, text_encoder, vae, unet, scheduler = _load_parts(model_id, options.revision, options.variant)
    if options.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available() or accelerator.device.type != "cuda":
            raise ValueError(
                "--enable_xformers_memory_efficient_attention needs xformers and a CUDA GPU; install xformers "
                "(pip install xformers) on a GPU machine or drop the flag"
            )
        unet.enable_xformers_memory_efficient_attention()
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)
        if weight_dtype != torch.float32:  # frozen weights in the training dtype; adapters stay float32
            model.to(dtype=weight_dtype)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return Components(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        unet=unet,
        noise_scheduler=scheduler,
        model_id=model_id,
        is_demo=is_demo,
        instance_data_dir=subject.instance_data_dir,
        class_name=subject.class_name,
        instance_prompt=subject.instance_prompt,
        class_prompt=subject.class_prompt,
        resolution=options.resolution or unet.config.sample_size * vae_scale,
    )


def add_adapter(unet: torch.nn.Module, options: TrainingOptions) -> tuple[torch.nn.Module, str]:
    """Inject the requested adapter into ``unet`` (trainable parameters in float32); returns ``(unet, method)``.

    ``full`` injects nothing: the targeted projections' own weights and biases become the trainable parameters.
    """
    method, config = methods.for_options(options)
    method.inject(unet, config)
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return unet, method.name


def make_pipeline(parts: Components, unet: torch.nn.Module):
    """A StableDiffusionPipeline (DDIM sampler) around ``unet`` and the frozen components, for sampling."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(parts.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class TextConditioning:
    """Prompts -> the text encoder's hidden states (B, L, C) as the UNet's cross-attention input.

    ``max_length`` pads / truncates every prompt (default: the tokenizer's maximum); ``use_attention_mask`` hands
    the encoder the padding mask. After :meth:`precompute` the encoder is freed and only the prompts given there
    can be encoded (from a table keyed by their token ids), as diffusers' ``--pre_compute_text_embeddings`` does.
    """

    def __init__(self, tokenizer, text_encoder, max_length: int | None = None, use_attention_mask: bool = False):
        limit = getattr(text_encoder.config, "max_position_embeddings", None)
        if max_length is not None and limit is not None and max_length > limit:
            raise ValueError(
                f"--tokenizer_max_length {max_length} exceeds the text encoder's {limit} positions; use {limit} or less"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        self.use_attention_mask = use_attention_mask
        self._table: dict[tuple[int, ...], torch.Tensor] | None = None

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)``, each (N, L)."""
        pairs = [tokenize_prompt(self.tokenizer, prompt, self.max_length) for prompt in prompts]
        return torch.stack([ids for ids, _ in pairs]), torch.stack([mask for _, mask in pairs])

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, C) hidden states."""
        if self._table is not None:
            try:
                return torch.stack([self._table[tuple(row.tolist())] for row in input_ids])
            except KeyError:
                raise ValueError("a prompt outside the precomputed ones reached the text encoder") from None
        device = self.text_encoder.device
        mask = attention_mask.to(device) if self.use_attention_mask and attention_mask is not None else None
        return self.text_encoder(input_ids.to(device), attention_mask=mask)[0]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(N,) prompts -> (N, L, C) hidden states."""
        return self.encode_ids(*self.tokenize(prompts))

    def precompute(self, prompts: list[str]) -> None:
        """Encode ``prompts`` once, keep their embeddings and drop the text encoder (its memory is freed)."""
        ids, _ = self.tokenize(prompts)
        embeddings = self.encode(prompts)  # (N, L, C)
        self._table = {tuple(row.tolist()): embedding for row, embedding in zip(ids, embeddings)}
        self.text_encoder = None

    @property
    def encoder_freed(self) -> bool:
        return self.text_encoder is None
