"""TrainingOptions: every setting of the DreamBooth trainer, with its help text (the CLI is generated from it).

Flag names follow diffusers' examples/dreambooth/train_dreambooth_lora.py wherever the meaning is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from ..families import FAMILIES
from ..methods.registry import DEFAULT_LEARNING_RATES, TRAINER_ADAPTERS
from .quantization import PRECISIONS, bnb_precision, check_precision

FAMILY_NAMES = tuple(FAMILIES)

ADAPTERS = TRAINER_ADAPTERS
DEFAULT_MAX_TRAIN_STEPS = 3000
DEMO_MAX_TRAIN_STEPS = 60  # the embedded random demo model: about a minute on 2 CPU cores
# The demo model's attention dims are 32 and 64: block counts that give dense GS matrices there (b >= r).
DEMO_DEFAULTS = {
    "gsoft_nblocks": 4,
    "boft_block_num": 8,
    "oft_block_size": 8,
    "validation_prompt": "a sks {class} on the beach",
    "validation_inference_steps": 10,
}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _choices(choices: tuple[str, ...], text: str) -> dict:
    return {"help": text, "choices": list(choices)}


@dataclass
class TrainingOptions:
    """What the trainer does; ``train_dreambooth_gsoft.py --help`` prints these help texts."""

    # -- model and data --------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "SD 1.x / 2.x, SDXL, SD3 / SD3.5 or Flux.1: a hub id, a local diffusers folder or a single-file "
            ".safetensors checkpoint "
            "(the family is detected from model_index.json or the file's keys). Default: a tiny random-weight demo "
            "pipeline built offline (for trying the tool, not for real images)."
        ),
    )
    model_family: str | None = field(
        default=None,
        metadata=_choices(
            FAMILY_NAMES,
            "Model family (sd: SD 1.x / 2.x, sdxl, sd3: SD3 / SD3.5, flux: Flux.1). Default: detected from the model.",
        ),
    )
    pretrained_vae_model_name_or_path: str | None = field(
        default=None,
        metadata=_help("A VAE to use instead of the model's own (e.g. SDXL's fp16-safe VAE): hub id or folder."),
    )
    revision: str | None = field(default=None, metadata=_help("Model revision on the hub."))
    variant: str | None = field(default=None, metadata=_help("Weights variant, e.g. fp16."))
    base_model_precision: str = field(
        default="no_change",
        metadata=_choices(
            PRECISIONS,
            "Quantize the frozen denoiser at load time (SimpleTuner's flag). no_change: as saved, in the training "
            "dtype; int8-torchao: int8 weights through torchao (CPU or GPU; not --adapter full, GS methods on the "
            "activation side); fp8-torchao: CUDA compute capability 8.9+; nf4-bnb / int8-bnb: bitsandbytes through "
            "diffusers' BitsAndBytesConfig (CUDA only). The saved adapter is the usual folder and loads into the "
            "full-precision pipeline.",
        ),
    )
    bnb_quantization_config_path: str | None = field(
        default=None,
        metadata=_help(
            "diffusers' flag: a JSON file of BitsAndBytesConfig arguments for the frozen denoiser, e.g. "
            '{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}; sets --base_model_precision to nf4-bnb or '
            "int8-bnb by what it asks (CUDA only)."
        ),
    )
    instance_data_dir: str | None = field(
        default=None, metadata=_help("Folder with the 3-5 subject photos. Default: the generated demo subject.")
    )
    class_name: str | None = field(
        default=None, metadata=_help("Class noun of the subject (dog, backpack, ...); fills {class} in prompts.")
    )
    instance_prompt: str = field(
        default="a photo of sks {class}", metadata=_help("Prompt of the subject photos; {class} = --class_name.")
    )
    class_data_dir: str | None = field(
        default=None, metadata=_help("Folder of class images for prior preservation (generated if short).")
    )
    class_prompt: str = field(default="a photo of {class}", metadata=_help("Prompt of the class images."))
    with_prior_preservation: bool = field(default=False, metadata=_help("Add the prior-preservation loss."))
    prior_loss_weight: float = field(default=1.0, metadata=_help("Weight of the prior-preservation loss."))
    num_class_images: int = field(
        default=100, metadata=_help("Class images wanted; missing ones are generated with the base model.")
    )
    sample_batch_size: int = field(default=4, metadata=_help("Batch size when generating class images."))
    output_dir: str = field(default="dreambooth-gsoft-out", metadata=_help("Where the adapter and checkpoints go."))
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help(
            "Start afresh even if output_dir holds an earlier run; its files are moved aside once the new run has "
            "passed every check and deleted when the new run writes its first checkpoint or adapter."
        ),
    )
    seed: int = field(default=0, metadata=_help("Random seed (data order, noise, timesteps)."))
    resolution: int | None = field(
        default=None, metadata=_help("Training resolution (multiple of 8). Default: the model's native size.")
    )
    center_crop: bool = field(default=False, metadata=_help("Center-crop instead of random-crop."))
    random_flip: bool = field(default=False, metadata=_help("Random horizontal flips."))
    # -- adapter ---------------------------------------------------------------------------------------------
    adapter: str = field(
        default="gsoft",
        metadata=_choices(
            ADAPTERS,
            "gsoft / double_gsoft (this toolkit), boft (on the GS core, every butterfly factor), lora / oft (PEFT), "
            "full (baseline, no adapter: trains the --target_modules Linears' own weights and biases, the rest of "
            "the UNet frozen).",
        ),
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata=_help(
            "Linear modules to adapt, or with --adapter full to train (names or name suffixes). Default: the "
            "family's attention projections (SD / SDXL: to_q to_k to_v to_out.0; SD3 / Flux: attn.to_q attn.to_k "
            "attn.to_v attn.to_out.0 attn.add_q_proj attn.add_k_proj attn.add_v_proj attn.to_add_out)."
        ),
    )
    train_text_encoder: bool = field(
        default=False,
        metadata=_help(
            "Also adapt every text encoder's attention projections (q_proj, k_proj, v_proj, out_proj) with the same "
            "method; saved in <output_dir>/text_encoder[_2]/ beside the UNet's adapter."
        ),
    )
    text_encoder_lr: float | None = field(
        default=None, metadata=_help("Learning rate of the text encoders' adapters. Default: the UNet's rate.")
    )
    gsoft_nblocks: int | None = field(default=None, metadata=_help("GSOFT blocks r (default 32)."))
    gsoft_block_size: int | None = field(default=None, metadata=_help("GSOFT block size instead of --gsoft_nblocks."))
    gsoft_no_scale: bool = field(default=False, metadata=_help("Do not train GSOFT's output scale vector."))
    gsoft_parametrization: Literal["cayley", "cayley_neumann", "exp"] = field(
        default="cayley",
        metadata=_help(
            "gsoft / double_gsoft: how each block is made orthogonal. cayley: exact (I + K)(I - K)^-1; "
            "cayley_neumann: PEFT OFT's default 5-term series, ~30% cheaper blocks on the CPU, orthogonal only up "
            "to 2|K|^4 (docs/gsoft.md); exp: the matrix exponential (7-16x slower). Saved with the adapter."
        ),
    )
    gsoft_forward_mode: Literal["auto", "activation", "weight"] = field(
        default="auto",
        metadata=_help(
            "gsoft / double_gsoft / boft: where training applies the rotation. auto: the faster side for each "
            "layer's shapes; activation: rotate the tokens (backward keeps the input and, for the scale's gradient, "
            "the output); weight: rotate the weight (keeps only the input, as LoRA, and pays one more weight-sized "
            "matmul). Results are the same."
        ),
    )
    gsoft_weight_side_modules: list[str] | None = field(
        default=None,
        metadata=_help(
            "gsoft / double_gsoft / boft with --gsoft_forward_mode auto: modules (names or suffixes) trained on the "
            "weight side whatever their shapes, a memory option: the activation side keeps each projection's output "
            "for the scale's gradient, which costs memory where nothing downstream keeps it anyway (SD / SDXL: "
            "to_out.0, whose output feeds the residual sum; SD3 / Flux gate theirs, which keeps it). The weight side "
            "costs step time on small token counts (docs/benchmarks.md). Default: none."
        ),
    )
    rank: int = field(
        default=4,
        metadata={"help": "LoRA rank (lora_alpha = rank); --lora_rank is the same flag.", "aliases": ["--lora_rank"]},
    )
    boft_block_num: int | None = field(default=None, metadata=_help("BOFT blocks (default 32)."))
    boft_block_size: int | None = field(default=None, metadata=_help("BOFT block size instead of --boft_block_num."))
    boft_n_butterfly_factor: int = field(default=4, metadata=_help("BOFT butterfly factors."))
    boft_backend: Literal["gsoft", "peft"] = field(
        default="gsoft",
        metadata=_help(
            "gsoft: BOFT on this toolkit's GS core (any device). peft: PEFT's BOFT, refused where its CUDA "
            "extension is missing (it would silently train one factor)."
        ),
    )
    oft_block_size: int | None = field(
        default=None, metadata=_help("OFT block size (PEFT OFTConfig.oft_block_size; default 32).")
    )
    # -- optimisation ----------------------------------------------------------------------------------------
    train_batch_size: int = field(default=4, metadata=_help("Batch size per device."))
    max_train_steps: int | None = field(
        default=None,
        metadata=_help(
            f"Optimizer steps (default {DEFAULT_MAX_TRAIN_STEPS}; {DEMO_MAX_TRAIN_STEPS} on the demo model)."
        ),
    )
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute UNet activations to save memory."))
    scale_lr: bool = field(
        default=False,
        metadata=_help("Multiply the learning rate by batch size x accumulation steps x processes (diffusers')."),
    )
    use_8bit_adam: bool = field(
        default=False,
        metadata=_help("bitsandbytes' 8-bit AdamW (CUDA; pip install bitsandbytes): less optimizer memory."),
    )
    snr_gamma: float | None = field(
        default=None,
        metadata=_help(
            "Min-SNR loss weighting min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction), on the instance "
            "loss as in diffusers; 5.0 is the paper's value (arXiv 2303.09556). Default: unweighted."
        ),
    )
    noise_offset: float = field(
        default=0.0, metadata=_help("Offset noise: add this times one N(0, 1) value per latent channel to the noise.")
    )
    # -- flow matching (SD3 / SD3.5, Flux.1), as diffusers' train_dreambooth_lora_sd3.py / _flux.py --------------
    weighting_scheme: Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"] | None = field(
        default=None,
        metadata=_help(
            "Flow matching: how timesteps are drawn (logit_normal, mode) or the loss weighted (sigma_sqrt, cosmap); "
            "none: uniform. Default: diffusers' per family (sd3 logit_normal, flux none)."
        ),
    )
    logit_mean: float = field(default=0.0, metadata=_help("Mean of the logit_normal timestep density."))
    logit_std: float = field(default=1.0, metadata=_help("Std of the logit_normal timestep density."))
    mode_scale: float = field(default=1.29, metadata=_help("Scale of the mode timestep density."))
    precondition_outputs: int | None = field(
        default=None,
        metadata={
            "help": "1: precondition the transformer's output as in EDM (predict the clean latents); 0: predict "
            "the flow (noise - latents). Default: diffusers' per family (sd3 1, flux 0).",
            "choices": [0, 1],
        },
    )
    max_sequence_length: int | None = field(
        default=None, metadata=_help("T5 prompt tokens (sd3, flux). Default: diffusers' per family (sd3 77, flux 512).")
    )
    guidance_scale: float = field(
        default=3.5, metadata=_help("Flux: the guidance input of guidance-distilled models (FLUX.1-dev) in training.")
    )
    # -- memory ------------------------------------------------------------------------------------------------
    cache_latents: bool = field(
        default=False,
        metadata=_help(
            "Encode the training images with the VAE once, before training (each step then samples from the "
            "cached latent distribution); random flips and crops are drawn once. Without validation or prior "
            "preservation the VAE is then freed."
        ),
    )
    offload: bool = field(
        default=False,
        metadata=_help(
            "Keep the VAE and text encoders on the CPU and move each to the GPU only while it runs (encoding a batch, "
            "validation): the GPU holds the denoiser alone between those calls."
        ),
    )
    estimate_memory: bool = field(
        default=False,
        metadata=_help(
            "Print what this run would hold on the GPU, per component (weights, adapter, optimizer states, text "
            "encoders, VAE, an estimate of the activations), and which GPU sizes it fits, from the model folder's "
            "configs without loading any weight; then exit, writing nothing."
        ),
    )
    learning_rate: float | None = field(
        default=None,
        metadata=_help(
            "AdamW learning rate. Defaults by adapter: "
            + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LEARNING_RATES.items())
            + " (full: the usual DreamBooth full fine-tuning rate, a literature default, not tuned)."
        ),
    )
    lr_scheduler: str = field(
        default="constant",
        metadata=_help("constant, constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial."),
    )
    lr_warmup_steps: int = field(default=0, metadata=_help("Warm-up steps of the schedule."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    adam_weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm."))
    # -- checkpoints, validation, logging --------------------------------------------------------------------
    checkpointing_steps: int = field(default=500, metadata=_help("Save a resumable checkpoint every N steps."))
    checkpoints_total_limit: int | None = field(default=None, metadata=_help("Keep at most this many checkpoints."))
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_help(
            "'latest' (the newest complete checkpoint in output_dir), a checkpoint name in output_dir "
            "(checkpoint-500) or a checkpoint folder's path."
        ),
    )
    validation_prompt: str | None = field(
        default=None, metadata=_help("Prompt for validation images ({class} allowed); none: no validation.")
    )
    num_validation_images: int = field(default=4, metadata=_help("Images per validation."))
    validation_steps: int = field(default=100, metadata=_help("Validate every N steps (and at the end)."))
    validation_inference_steps: int = field(default=25, metadata=_help("Denoising steps of validation images."))
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None,
        metadata=_help(
            "no, fp16 (CUDA only) or bf16 (CPU or GPU); adapter parameters stay fp32. Default: accelerate's config."
        ),
    )
    allow_tf32: bool = field(default=False, metadata=_help("Allow TF32 matmuls on Ampere+ GPUs."))
    report_to: str = field(default="tensorboard", metadata=_help("tensorboard, wandb, all or none."))
    logging_dir: str = field(default="logs", metadata=_help("Tracker folder, relative to output_dir."))
    pre_compute_text_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Encode the instance, class and validation prompts once, then free the text encoders (less "
            "memory: essential with T5-XXL); --cache_text_embeddings is the same flag.",
            "aliases": ["--cache_text_embeddings"],
        },
    )
    tokenizer_max_length: int | None = field(
        default=None, metadata=_help("Pad / truncate prompts to this many tokens. Default: the tokenizer's maximum.")
    )
    text_encoder_use_attention_mask: bool = field(
        default=False, metadata=_help("Pass the prompt's attention mask to the text encoder (padding ignored).")
    )
    push_to_hub: bool = field(
        default=False,
        metadata=_help("Upload the final adapter folder with a model card (checked before training starts)."),
    )
    hub_model_id: str | None = field(
        default=None, metadata=_help("Hub repository for --push_to_hub. Default: the output folder's name.")
    )
    hub_token: str | None = field(
        default=None, metadata=_help("Hub token for --push_to_hub. Default: the one `hf auth login` saved.")
    )
    dataloader_num_workers: int = field(default=0, metadata=_help("Data-loading worker processes."))
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata=_help("Use xformers attention (CUDA only; must be installed).")
    )

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; choose one of {', '.join(ADAPTERS)}")
        if self.bnb_quantization_config_path:  # diffusers' flag: the precision it implies
            self.base_model_precision = bnb_precision(self.bnb_quantization_config_path, self.base_model_precision)
        check_precision(self)  # --base_model_precision: what this machine and these options can train with
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.gsoft_nblocks is not None and self.gsoft_block_size is not None:
            raise ValueError("give --gsoft_nblocks or --gsoft_block_size, not both")
        if self.boft_block_num is not None and self.boft_block_size is not None:
            raise ValueError("give --boft_block_num or --boft_block_size, not both")
        for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"--max_train_steps must be at least 1, got {self.max_train_steps}")
        if self.rank < 1:
            raise ValueError(f"--rank must be at least 1, got {self.rank}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"--snr_gamma must be positive (5.0 is the usual value), got {self.snr_gamma}")
        if self.noise_offset < 0:
            raise ValueError(f"--noise_offset must be 0 or more (0.05-0.1 is usual), got {self.noise_offset}")
        if self.tokenizer_max_length is not None and self.tokenizer_max_length < 2:
            raise ValueError(f"--tokenizer_max_length must be at least 2, got {self.tokenizer_max_length}")
        if self.train_text_encoder and self.pre_compute_text_embeddings:
            raise ValueError(
                "--train_text_encoder trains the text encoders, so their embeddings cannot be precomputed; drop "
                "--pre_compute_text_embeddings or --train_text_encoder"
            )
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            raise ValueError("--text_encoder_lr is only used with --train_text_encoder; add it or drop the rate")
        if self.hub_model_id is not None and not self.push_to_hub:
            raise ValueError("--hub_model_id is only used with --push_to_hub; add --push_to_hub or drop it")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"--max_sequence_length must be at least 1, got {self.max_sequence_length}")
        if self.logit_std <= 0:
            raise ValueError(f"--logit_std must be positive, got {self.logit_std}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"--checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}")

    @property
    def resolved_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.adapter]


def with_demo_defaults(options: TrainingOptions) -> TrainingOptions:
    """Options for the tiny demo model: its small dims get block counts that fit, unless the user chose them."""
    changes = {}
    if options.max_train_steps is None:
        changes["max_train_steps"] = DEMO_MAX_TRAIN_STEPS
    if options.gsoft_nblocks is None and options.gsoft_block_size is None:
        changes["gsoft_nblocks"] = DEMO_DEFAULTS["gsoft_nblocks"]
    if options.boft_block_num is None and options.boft_block_size is None:
        changes["boft_block_num"] = DEMO_DEFAULTS["boft_block_num"]
    if options.oft_block_size is None:
        changes["oft_block_size"] = DEMO_DEFAULTS["oft_block_size"]
    if options.validation_prompt is None:
        changes["validation_prompt"] = DEMO_DEFAULTS["validation_prompt"]
        changes["validation_inference_steps"] = DEMO_DEFAULTS["validation_inference_steps"]
    return replace(options, **changes)
