"""EvaluationOptions: every setting of evaluate_clip.py with its help text (the CLI is generated from it).

The defaults are the GSOFT paper's protocol: 10 images per contextual prompt, 30 of the base prompt, DDIM 50 steps,
guidance 7.0, CLIP ViT-B/32 with the OpenAI weights, DINO ViT-S/16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..resources import SUBJECTS_FILE
from .metrics import DEFAULT_DINO_MODEL
from .plan import BASE_PROMPT, DATASET_DIR


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class EvaluationOptions:
    """What evaluate_clip.py does; ``--help`` prints these help texts."""

    runs: list[str] = field(
        metadata=_help(
            "Run folders written by train_dreambooth_gsoft.py (adapter_config.json, training_args.json). "
            "LABEL=FOLDER names the run's method in the tables (default: the adapter's method)."
        )
    )
    output_dir: str = field(default="out/eval", metadata=_help("Images, results.csv, summary.md, plots and grids."))
    subject: str | None = field(
        default=None, metadata=_help("Subject of every run (a name in --subjects_file). Default: each run's own.")
    )
    subjects_file: str = field(default=str(SUBJECTS_FILE), metadata=_help("Subjects: class noun and prompt set."))
    dataset_dir: str = field(
        default=str(DATASET_DIR), metadata=_help("Real images per subject (<dir>/<subject>/), used with --subject.")
    )
    prompt_set: str | None = field(
        default=None, metadata=_help("objects, live or a .txt file of templates. Default: the subject's, else objects.")
    )
    token: str | None = field(
        default=None, metadata=_help("Placeholder token. Default: from the run's instance prompt, else sks.")
    )
    base_prompt: str = field(default=BASE_PROMPT, metadata=_help("Template of the base prompt."))
    images_per_prompt: int = field(default=10, metadata=_help("Images per prompt of the prompt set."))
    base_images: int = field(default=30, metadata=_help("Images of the base prompt (0: none)."))
    max_prompts: int | None = field(default=None, metadata=_help("Use only the first N prompts (quick checks)."))
    num_inference_steps: int = field(default=50, metadata=_help("DDIM steps."))
    guidance_scale: float = field(default=7.0, metadata=_help("Classifier-free guidance scale."))
    resolution: int | None = field(default=None, metadata=_help("Image size. Default: the model's native size."))
    batch_size: int = field(default=4, metadata=_help("Images per pipeline call."))
    seed: int = field(default=0, metadata=_help("Mixed into every image's seed."))
    paired_seeds: bool = field(
        default=False,
        metadata=_help("Derive seeds from the subject instead of the run: every method starts from the same noise."),
    )
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = field(
        default="auto", metadata=_help("Pipeline dtype. auto: fp16 on CUDA, fp32 otherwise.")
    )
    pretrained_model_name_or_path: str | None = field(
        default=None, metadata=_help("Base model of every run. Default: the one each run was trained on.")
    )
    clip_model: str = field(
        default="ViT-B-32", metadata=_help("open_clip model name, hf-hub:org/repo, local-dir:/path, or tiny-random.")
    )
    clip_pretrained: str = field(
        default="openai", metadata=_help("open_clip pretrained tag, or a local open_clip_pytorch_model.bin file.")
    )
    dino_model: str = field(
        default=DEFAULT_DINO_MODEL,
        metadata=_help(
            "DINO ViT-S/16 (hub id or local folder), tiny-random, or none. Skipped with a note if unavailable."
        ),
    )
    score_batch_size: int = field(default=32, metadata=_help("Images per CLIP / DINO forward pass."))
    grid_prompts: int = field(default=6, metadata=_help("Prompts per subject grid (one row per method)."))
    adapter_scale: list[float] = field(
        default_factory=lambda: [1.0],
        metadata=_help(
            "Adapter strengths: each run is drawn and scored at each (e.g. 0 0.25 0.5 0.75 1 1.25, the same seeds at "
            "every strength), with a CLIP-I vs CLIP-T curve along strength. 1: the trained adapter, 0: the base model."
        ),
    )

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("give at least one run folder in --runs")
        for name in ("images_per_prompt", "num_inference_steps", "batch_size", "score_batch_size", "grid_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.base_images < 0:
            raise ValueError(f"--base_images must be 0 or more, got {self.base_images}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"--max_prompts must be at least 1, got {self.max_prompts}")
        if not self.adapter_scale or not all(math.isfinite(s) for s in self.adapter_scale):
            raise ValueError(f"--adapter_scale takes one or more finite numbers, got {self.adapter_scale}")
        self.adapter_scale = list(dict.fromkeys(float(s) + 0.0 for s in self.adapter_scale))  # -0.0 is 0.0, once
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
