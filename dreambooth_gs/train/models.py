"""The training run's components: the data checks that come before any model loads, loading through the model
family (hub id, local folder, single file or the offline demo), prompt encoding, the adapter for each method, and a
pipeline around the trained UNet. Nothing here knows a family: :mod:`dreambooth_gs.families` does."""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from .. import families
from ..families import Conditioning, Family, TextSettings
from ..methods import registry as methods
from ..methods.baselines import check_oft_block_size
from ..methods.injection import remove_adapter
from ..resources import DEMO_SUBJECT_DIR
from .data import find_images
from .options import TrainingOptions
from .quantization import (
    GS_ADAPTERS,
    denoiser_kwargs,
    expose_dequantized_weights,
    quantized_text_encoders,
    text_encoder_kwargs,
)

SUBJECT_FILE = "subject.json"  # optional, beside instance images: {"class_name": "dog"}


@dataclass
class Components:
    """Everything the loop needs besides the trainable UNet: the family, frozen models, tokenizers, scheduler and
    the data."""

    family: Family
    tokenizers: list
    text_encoders: list  # a family's encoders in order (None once --pre_compute_text_embeddings freed them)
    vae: torch.nn.Module | None  # None once --cache_latents freed it
    denoiser: torch.nn.Module
    noise_scheduler: object
    model_id: str
    is_demo: bool
    instance_data_dir: Path
    class_name: str | None
    instance_prompt: str
    class_prompt: str
    resolution: int
    device: torch.device  # where the denoiser trains
    offload: bool = False  # --offload: the VAE and text encoders wait on the CPU
    latent_shift_and_scale: tuple[float, float] = (0.0, 1.0)  # the VAE's (shift_factor, scaling_factor)

    @contextlib.contextmanager
    def on_device(self, *modules: torch.nn.Module | None):
        """With ``--offload``, move ``modules`` to the training device for the block, then back to the CPU."""
        moved = [m for m in modules if m is not None] if self.offload and self.device.type != "cpu" else []
        for module in moved:
            module.to(self.device)
        try:
            yield
        finally:
            for module in moved:
                module.to("cpu")


def _resolve_model(options: TrainingOptions, accelerator: Accelerator) -> tuple[str, bool]:
    if options.pretrained_model_name_or_path:
        return options.pretrained_model_name_or_path, False
    from ..tiny.pipelines import build_tiny_pipeline, default_tiny_pipeline_dir

    with accelerator.main_process_first():
        return str(build_tiny_pipeline(default_tiny_pipeline_dir())), True


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
        from ..tiny.demo_subject import make_demo_subject
        from ..tiny.pipelines import default_tiny_pipeline_dir

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
    options: TrainingOptions,
    accelerator: Accelerator,
    weight_dtype: torch.dtype,
    subject: SubjectData,
    sharded: bool = False,
) -> Components:
    """Load and freeze the models (in ``weight_dtype`` on the accelerator's device) for the checked ``subject``; a
    denoiser to be ``sharded`` stays on the CPU (sharding moves each process's share over, unit by unit)."""
    model_id, is_demo = _resolve_model(options, accelerator)
    family = families.detect(model_id, options.revision, options.model_family)
    precision, bnb_path = options.base_model_precision, options.bnb_quantization_config_path
    quantization = denoiser_kwargs(precision, weight_dtype, bnb_path)
    quantized_encoders = quantized_text_encoders(options, family)
    encoder_quantization = {name: text_encoder_kwargs(precision, weight_dtype, bnb_path) for name in quantized_encoders}
    vae_path = options.pretrained_vae_model_name_or_path
    loaded = family.load(model_id, options.revision, options.variant, vae_path, quantization, encoder_quantization)
    vae, denoiser = loaded.vae, loaded.denoiser
    quantized_models = [denoiser] if quantization else []
    quantized_models += [
        encoder
        for name, encoder in zip(family.text_encoder_names, loaded.text_encoders)
        if name in quantized_encoders and encoder is not None
    ]
    if options.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available() or accelerator.device.type != "cuda":
            raise ValueError(
                "--enable_xformers_memory_efficient_attention needs xformers and a CUDA GPU; install xformers "
                "(pip install xformers) on a GPU machine or drop the flag"
            )
        denoiser.enable_xformers_memory_efficient_attention()
    # Frozen weights in the training dtype (adapters stay float32); SDXL's own VAE stays float32 (fp16 overflows).
    # With --offload the VAE and text encoders stay on the CPU until they run.
    keep_vae_fp32 = family.vae_in_fp32 and not loaded.extra.get("custom_vae")
    for model in (*loaded.text_encoders, vae, denoiser):
        if model is None:  # a text encoder the folder leaves out (SD3 without T5)
            continue
        model.requires_grad_(False)
        if (model is denoiser and not (denoiser_waits_for_prompts(options) or sharded)) or (
            model is not denoiser and not options.offload
        ):
            model.to(accelerator.device)
        if (
            model.dtype != weight_dtype  # also a float16 folder trained in float32: transformers keeps its dtype
            and not (model is vae and keep_vae_fp32)
            and not any(model is quantized for quantized in quantized_models)
        ):
            model.to(dtype=weight_dtype)
    resolution = options.resolution or family.default_resolution(denoiser, vae)
    family.check_resolution(resolution, denoiser, vae)  # a multiple of the latent patches, within SD3's positions
    return Components(
        family=family,
        tokenizers=loaded.tokenizers,
        text_encoders=[None if encoder is None else encoder.eval() for encoder in loaded.text_encoders],
        vae=vae.eval(),
        denoiser=denoiser,
        noise_scheduler=loaded.noise_scheduler,
        model_id=model_id,
        is_demo=is_demo,
        instance_data_dir=subject.instance_data_dir,
        class_name=subject.class_name,
        instance_prompt=subject.instance_prompt,
        class_prompt=subject.class_prompt,
        resolution=resolution,
        device=accelerator.device,
        offload=options.offload,
        latent_shift_and_scale=(vae.config.get("shift_factor") or 0.0, vae.config.scaling_factor),
    )


def denoiser_waits_for_prompts(options: TrainingOptions) -> bool:
    """Whether the denoiser stays on the CPU until the prompts are encoded and the text encoders freed
    (``--cache_text_embeddings`` without class images to draw first): the text encoders (T5-XXL: 9 GB in bf16) and
    the denoiser are then never on the GPU together. The loop moves it with :func:`place_denoiser`."""
    return options.pre_compute_text_embeddings and not options.with_prior_preservation


def place_denoiser(denoiser: torch.nn.Module, accelerator: Accelerator) -> None:
    denoiser.to(accelerator.device)


def family_options(options: TrainingOptions, family: Family) -> TrainingOptions:
    """``options`` with the family's defaults filled in (targets; flow matching's weighting, preconditioning and
    T5 length); refuses flags the family's objective does not have (one line)."""
    changes = {}
    if options.target_modules is None:
        changes["target_modules"] = list(family.default_targets)
    if family.objective == "flow":
        for flag, value, ddpm_only in (
            ("--snr_gamma", options.snr_gamma, options.snr_gamma is not None),
            ("--noise_offset", options.noise_offset, options.noise_offset > 0),
        ):
            if ddpm_only:
                raise ValueError(
                    f"{flag} {value} applies to the DDPM objective of the UNet families; {family.name} trains with "
                    "flow matching (use --weighting_scheme)"
                )
        if options.weighting_scheme is None:
            changes["weighting_scheme"] = family.default_weighting_scheme
        if options.precondition_outputs is None:
            changes["precondition_outputs"] = int(family.default_precondition_outputs)
    else:
        for flag in ("weighting_scheme", "precondition_outputs", "max_sequence_length"):
            if getattr(options, flag) is not None:
                raise ValueError(
                    f"--{flag} applies to the flow-matching families (sd3, flux); {family.name} trains with the DDPM "
                    "objective: drop it"
                )
    if options.offload and options.train_text_encoder:
        raise ValueError(
            "--offload moves the text encoders off the GPU between uses, but --train_text_encoder trains them; "
            "drop one of the two"
        )
    return replace(options, **changes)


def text_settings(options: TrainingOptions, denoiser: torch.nn.Module) -> TextSettings:
    return TextSettings(
        max_length=options.tokenizer_max_length,
        use_attention_mask=options.text_encoder_use_attention_mask,
        max_sequence_length=options.max_sequence_length,
        context_width=denoiser.config.get("joint_attention_dim"),
    )


def add_adapter(denoiser: torch.nn.Module, options: TrainingOptions) -> tuple[torch.nn.Module, str]:
    """Inject the requested adapter into ``denoiser`` (trainable parameters in float32); returns ``(denoiser, method)``.

    ``full`` injects nothing: the targeted projections' own weights and biases become the trainable parameters.
    """
    if options.base_model_precision != "no_change" and options.adapter in GS_ADAPTERS:
        options = replace(options, gsoft_forward_mode="activation")  # the weight side is refused on quantized bases
    method, config = methods.for_options(options)
    with warnings.catch_warnings():  # PEFT's rounding of an OFT block size is refused below, in one line
        warnings.filterwarnings("ignore", message="Invalid `oft_block_size`")
        method.inject(denoiser, config)
    if method.name == "oft" and config.oft_block_size:
        try:
            check_oft_block_size(denoiser, config.oft_block_size)
        except ValueError:
            remove_adapter(denoiser)
            raise
    expose_dequantized_weights(denoiser)  # quantized base layers: the GS kernels read a dequantized weight
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return denoiser, method.name


def add_text_encoder_adapters(parts: Components, options: TrainingOptions) -> dict[str, torch.nn.Module]:
    """``--train_text_encoder``: the same method on every text encoder's attention projections (trainable
    parameters in float32); returns the adapted encoders by their pipeline names (``text_encoder``, ...)."""
    text_options = replace(options, target_modules=list(parts.family.text_encoder_targets))
    adapted = {}
    for name, encoder in zip(parts.family.text_encoder_names, parts.text_encoders):
        if name in parts.family.trainable_text_encoders and encoder is not None:
            add_adapter(encoder, text_options)
            adapted[name] = encoder
    return adapted


def make_pipeline(parts: Components, denoiser: torch.nn.Module):
    """The family's pipeline (its sampler: DDIM, or flow-matching Euler) around ``denoiser`` and the frozen
    components, for sampling."""
    pipeline = parts.family.make_pipeline(parts, denoiser, parts.family.make_sampler(parts.noise_scheduler))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class TextConditioning:
    """Prompts -> the family's text conditioning (hidden states (B, L, C), pooled embeddings where it has them).

    ``settings`` say how (CLIP's length and mask, T5's length; see :class:`~dreambooth_gs.families.TextSettings`).
    After :meth:`precompute` the encoders are freed and only the prompts given there can be encoded (from a table
    keyed by the prompt), as diffusers' ``--pre_compute_text_embeddings`` does.
    """

    def __init__(self, parts: Components, settings: TextSettings | None = None, trainable: bool = False):
        self.family = parts.family
        self.trainable = trainable  # --train_text_encoder: encode with gradients
        self.tokenizers = parts.tokenizers
        self.text_encoders = list(parts.text_encoders)
        self.settings = settings or TextSettings()
        self._on_device = parts.on_device
        self._table: dict[str, Conditioning] | None = None
        self.family.check_text_settings(self.settings)
        if self.settings.max_length is not None:
            self.encode([""])  # refuses a length the encoders cannot take, before anything is written

    def encode(self, prompts: list[str]) -> Conditioning:
        """(N,) prompts -> their conditioning (N rows); with gradients only when the encoders are trained."""
        if self._table is not None:
            missing = [p for p in prompts if p not in self._table]
            if missing:
                raise ValueError(f"prompt {missing[0]!r} was not among the precomputed ones")
            return Conditioning.stack([self._table[p] for p in prompts])
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()), self._on_device(*self.text_encoders):
            return self.family.encode(self.tokenizers, self.text_encoders, list(prompts), self.settings)

    def negative(self, count: int) -> Conditioning | None:
        """The empty-prompt conditioning for classifier-free guidance (``count`` rows)."""
        return self.family.negative(self.encode, count)

    def precompute(self, prompts: list[str]) -> None:
        """Encode ``prompts`` once, keep their conditioning and drop the text encoders (their memory is freed)."""
        encoded = self.encode(prompts)
        self._table = {prompt: encoded.rows(i) for i, prompt in enumerate(prompts)}
        self.text_encoders = [None] * len(self.text_encoders)

    @property
    def encoder_freed(self) -> bool:
        return self._table is not None
