"""Pretrain MiniBooth's base models on the procedural world, once (cached by a fingerprint of every setting):

1. an AutoencoderKL (on 32 px crops of the world's 64 px pictures),
2. a UNet2DConditionModel and a CLIPTextModel together on its latents -> a diffusers StableDiffusionPipeline folder
   (SD's CLIP tokenizer, no safety checker) that ``train_dreambooth_gsoft.py --pretrained_model_name_or_path`` takes;
   with ``--family sd3``, an SD3Transformer2DModel and two CLIP encoders with flow matching instead -> a
   StableDiffusion3Pipeline folder without T5 (the flow profile),
3. an open_clip CLIP trained contrastively on the same world -> ``evaluate_clip.py --clip_model local-dir:<folder>``,
4. the attribute oracle (oracle.py): classifiers of every world attribute, the judge of subject and context fidelity.

    python benchmarks/minibooth/pretrain.py            # full size (see docs/minibooth.md for the time), cached
    python benchmarks/minibooth/pretrain.py --smoke    # tiny sizes, a few steps: seconds, learns nothing
    python benchmarks/minibooth/pretrain.py --family sd3 --world_file benchmarks/minibooth/world_v2.json  # flow

Folders go to $DREAMBOOTH_GS_CACHE/minibooth (default ~/.cache/dreambooth_gs/minibooth): vae-<fp>, sd-<fp> or
sd3-<fp> (with samples.png, the base model's sample grid), clip-<fp> and oracle-<fp>. A finished stage is reused
by later runs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402

from benchmarks.minibooth import architectures as arch  # noqa: E402
from benchmarks.minibooth.cache import build_stage, cache_root, fingerprint  # noqa: E402
from benchmarks.minibooth.stages import (  # noqa: E402
    HELD_OUT_CHECK,
    WorldData,
    build_clip,
    build_oracle,
    build_sd,
    build_sd3,
    build_vae,
    stage_settings,
    write_fidelity,
    write_samples,
)
from benchmarks.minibooth.world import WORLD_FILE, load_world  # noqa: E402
from dreambooth_gs.cli import parse_options, run_cli  # noqa: E402


@dataclass
class PretrainOptions:
    """Sizes come from the JSON files of --config_dir; step counts and learning rates from these flags."""

    cache_dir: str | None = field(
        default=None, metadata={"help": "Cache root. Default: $DREAMBOOTH_GS_CACHE/minibooth."}
    )
    config_dir: str | None = field(
        default=None,
        metadata={"help": "Model configs (vae, unet, text_encoder, scheduler, clip .json). Default: full."},
    )
    smoke: bool = field(
        default=False, metadata={"help": "Tiny configs and a few steps (seconds): checks the plumbing."}
    )
    family: str = field(
        default="sd",
        metadata={
            "help": (
                "The base model's denoiser: sd (UNet2DConditionModel, DDPM) or sd3 (SD3Transformer2DModel with two "
                "CLIP encoders, flow matching: the configs' sd3/ folder). The VAE, CLIP and oracle stages are shared."
            )
        },
    )
    world_file: str = field(
        default=str(WORLD_FILE), metadata={"help": "The world (world.json; MiniBooth v2: world_v2.json)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the world, the initialisations and the training."})
    resolution: int = field(default=64, metadata={"help": "Picture size in pixels."})
    num_images: int = field(default=16000, metadata={"help": "World pictures to train on (rendered once per process)."})
    vae_steps: int = field(default=3000, metadata={"help": "VAE optimizer steps."})
    vae_batch_size: int = field(default=32, metadata={"help": "VAE batch size (crops)."})
    vae_crop: int = field(default=32, metadata={"help": "VAE training crop in pixels (a multiple of 8)."})
    vae_lr: float = field(default=2e-3, metadata={"help": "VAE learning rate (AdamW, warm-up + cosine)."})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "Weight of the VAE's KL term (SD: 1e-6)."})
    unet_steps: int = field(default=4000, metadata={"help": "Denoiser (UNet or transformer) + text encoder steps."})
    unet_batch_size: int = field(default=32, metadata={"help": "Denoiser batch size."})
    unet_lr: float = field(default=5e-4, metadata={"help": "Denoiser + text encoder learning rate (AdamW)."})
    unet_warmup_steps: int = field(default=200, metadata={"help": "Linear warm-up steps, then cosine to 10%."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the saved UNet and text encoder weights."})
    caption_dropout: float = field(
        default=0.1, metadata={"help": "Empty-caption probability (classifier-free guidance)."}
    )
    min_snr_gamma: float = field(default=5.0, metadata={"help": "Min-SNR-gamma loss weighting (sd; sd3 uses SD3's)."})
    clip_steps: int = field(default=1500, metadata={"help": "CLIP optimizer steps."})
    clip_batch_size: int = field(default=128, metadata={"help": "CLIP batch size (pairs)."})
    clip_lr: float = field(default=5e-4, metadata={"help": "CLIP learning rate (AdamW)."})
    clip_warmup_steps: int = field(default=100, metadata={"help": "CLIP warm-up steps."})
    clip_caption_keep_scale: float = field(
        default=0.5, metadata={"help": "Scales the world's attribute-drop probabilities for CLIP captions (1: same)."}
    )
    oracle_images: int = field(default=16000, metadata={"help": "World pictures the attribute oracle trains on."})
    oracle_steps: int = field(default=1500, metadata={"help": "Attribute-oracle optimizer steps."})
    oracle_batch_size: int = field(default=128, metadata={"help": "Attribute-oracle batch size."})
    oracle_lr: float = field(
        default=2e-3, metadata={"help": "Attribute-oracle learning rate (AdamW, warm-up + cosine)."}
    )
    oracle_width: int = field(
        default=16, metadata={"help": "Channels of the oracle's first conv block (x2, x4 after)."}
    )
    sample_prompts: str = field(
        default=str(HERE / "sample_prompts.txt"), metadata={"help": "Prompts of the base model's sample grid."}
    )
    sample_seeds: int = field(default=4, metadata={"help": "Columns (seeds) of the sample grid."})
    sample_steps: int = field(default=25, metadata={"help": "DDIM steps of the sample grid."})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance of the sample grid."})
    fidelity_pictures: int = field(
        default=64,
        metadata={"help": "Held-out scenes drawn by the base model for the prompt-fidelity check (0: skip)."},
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads. Default: torch's choice."})
    log_every: int = field(default=100, metadata={"help": "Print the loss every N steps."})
    stages: list[str] = field(
        default_factory=lambda: ["vae", "denoiser", "clip", "oracle"],
        metadata={
            "help": (
                "Stages to build (the denoiser needs the VAE): vae, denoiser, clip, oracle. The demo's shipped model "
                "needs vae denoiser oracle; the base model's sample grid and prompt-fidelity check run only with all."
            )
        },
    )

    def __post_init__(self) -> None:
        if self.family not in arch.FAMILIES:
            raise ValueError(f"--family must be one of {', '.join(arch.FAMILIES)}, got {self.family!r}")
        names = ("num_images", "vae_batch_size", "unet_batch_size", "clip_batch_size", "oracle_batch_size")
        for name in (*names, "oracle_images", "oracle_steps", "sample_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.fidelity_pictures <= HELD_OUT_CHECK:
            raise ValueError(f"--fidelity_pictures must be in [0, {HELD_OUT_CHECK}], got {self.fidelity_pictures}")
        if self.oracle_width < 8 or self.oracle_width % 8:
            raise ValueError(f"--oracle_width must be a multiple of 8 (group norm of 8), got {self.oracle_width}")
        if not Path(self.world_file).is_file():
            raise ValueError(f"--world_file {self.world_file} does not exist")
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown or not self.stages:
            raise ValueError(f"--stages takes some of {' '.join(STAGES)}, got {' '.join(self.stages) or 'none'}")
        if "denoiser" in self.stages and "vae" not in self.stages:
            raise ValueError("--stages denoiser needs vae too (the denoiser trains on the VAE's latents)")
        if self.vae_crop % 8 or not 8 <= self.vae_crop <= self.resolution:
            raise ValueError(f"--vae_crop must be a multiple of 8 in [8, {self.resolution}], got {self.vae_crop}")


STAGES = ("vae", "denoiser", "clip", "oracle")
SMOKE_SETTINGS = {  # --smoke: these replace the defaults (values the user set explicitly are kept)
    "num_images": 64,
    "vae_steps": 2,
    "vae_batch_size": 4,
    "unet_steps": 2,
    "unet_batch_size": 4,
    "unet_warmup_steps": 1,
    "clip_steps": 2,
    "clip_batch_size": 8,
    "clip_warmup_steps": 1,
    "oracle_images": 64,
    "oracle_steps": 2,
    "oracle_batch_size": 8,
    "sample_seeds": 2,
    "sample_steps": 2,
    "fidelity_pictures": 4,
    "log_every": 1,
}


def resolved(options: PretrainOptions) -> PretrainOptions:
    """Fill the defaults that depend on --smoke (config folder, step counts, sizes)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainOptions)}
    changes = {}
    if options.smoke:
        changes = {k: v for k, v in SMOKE_SETTINGS.items() if getattr(options, k) == defaults[k]}
    if options.config_dir is None:
        changes["config_dir"] = str(arch.CONFIG_ROOT / ("smoke" if options.smoke else "full"))
    if options.cache_dir is None:
        changes["cache_dir"] = str(cache_root())
    return dataclasses.replace(options, **changes)


@dataclass(frozen=True)
class Pretrained:
    pipeline_dir: Path
    clip_dir: Path
    oracle_dir: Path
    markers: dict


def pretrain(options: PretrainOptions, log=print) -> Pretrained:
    """Build (or reuse) the four stages; returns the pipeline, CLIP and oracle folders."""
    options = resolved(options)
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    arch.check_compatible(options.config_dir, options.resolution, options.family)
    world = load_world(options.world_file)
    data = WorldData(options, world, log)
    settings = stage_settings(options, world)
    root = Path(options.cache_dir)
    dirs = {name: root / f"{name}-{fingerprint(value)}" for name, value in settings.items()}
    denoiser_builders = {"sd": build_sd, "sd3": build_sd3}
    builders = {
        "vae": lambda staging: build_vae(staging, options, data, log),
        options.family: lambda staging: denoiser_builders[options.family](staging, options, dirs["vae"], data, log),
        "clip": lambda staging: build_clip(staging, options, data, log),
        "oracle": lambda staging: build_oracle(staging, options, world, log),
    }
    wanted = {options.family if stage == "denoiser" else stage for stage in options.stages}
    markers = {}
    for name, build in builders.items():
        if name not in wanted:
            continue
        log(f"stage {name}: {dirs[name]}")
        markers[name] = build_stage(dirs[name], fingerprint(settings[name]), settings[name], build)
    pipeline_dir = dirs[options.family]
    everything = len(wanted) == len(STAGES)
    samples = pipeline_dir / "samples.png"
    if everything and not samples.is_file():
        write_samples(options, pipeline_dir, samples, log)
    if everything and options.fidelity_pictures:
        markers["fidelity"] = write_fidelity(options, dirs, data, log)
    log(f"pipeline: {pipeline_dir}\nclip: local-dir:{dirs['clip']}\noracle: {dirs['oracle']}")
    return Pretrained(pipeline_dir=pipeline_dir, clip_dir=dirs["clip"], oracle_dir=dirs["oracle"], markers=markers)


def parse_args(input_args: list[str] | None = None) -> PretrainOptions:
    return parse_options(PretrainOptions, input_args, "pretrain.py", __doc__)


def main(args: PretrainOptions) -> Pretrained:
    return pretrain(args, log=lambda message: print(f"[minibooth] {message}", flush=True))


if __name__ == "__main__":
    run_cli(main, parse_args(), "pretrain.py")
