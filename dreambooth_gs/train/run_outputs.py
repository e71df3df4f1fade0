"""What a training run draws, caches and writes around its steps: validation grids, prior-preservation class images,
the latent cache, and the final adapter with its record (``training_args.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..adapters.sampling import generate_images, image_grid
from ..adapters.serialization import save_adapter
from ..fileio import atomic_write, write_failure
from . import models
from .checkpoints import bare_model, write_error
from .data import DreamBoothDataset, generate_class_images
from .objectives import encode_latent_parameters
from .options import TrainingOptions
from .run_folder import RUN_INFO, publish_final


def validate(
    options: TrainingOptions,
    parts: models.Components,
    text: models.TextConditioning,
    denoiser,
    accelerator: Accelerator,
    step: int,
    output_dir: Path,
    sharded: bool = False,
) -> Path | None:
    """Draw validation images, save them as one PNG grid and log them to the trackers (the main process; every
    process draws when the denoiser is ``sharded``, since each runs its share of every forward)."""
    if not options.validation_prompt or not (accelerator.is_main_process or sharded):
        return None
    pipeline = models.make_pipeline(parts, accelerator.unwrap_model(denoiser))
    prompt = validation_prompt(options, parts)
    n = options.num_validation_images
    was_training = denoiser.training
    denoiser.eval()
    with torch.no_grad():
        text_kwargs = parts.family.pipeline_text_kwargs(text.encode([prompt] * n), text.negative(n))
    autocast = torch.autocast(accelerator.device.type, enabled=accelerator.mixed_precision != "no")
    with autocast, parts.on_device(parts.vae):
        images = generate_images(
            pipeline,
            [prompt] * n,
            [options.seed + i for i in range(n)],
            options.validation_inference_steps,
            height=parts.resolution,
            width=parts.resolution,
            text_kwargs=text_kwargs,
        )
    denoiser.train(was_training)
    if not accelerator.is_main_process:
        return None
    folder = output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    atomic_write(path, lambda tmp: image_grid(images).save(tmp, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            stacked = np.stack([np.asarray(image) for image in images])  # (n, H, W, 3)
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
    return path


def validation_prompt(options: TrainingOptions, parts: models.Components) -> str:
    return options.validation_prompt.format(**{"class": parts.class_name or ""})


def cache_latents(dataset: DreamBoothDataset, parts: models.Components, accelerator: Accelerator) -> list[dict]:
    """Every example's instance (and class) image through the VAE once: ``{kind}_latents`` (2C, h, w), the mean
    and log-variance each step samples from, in place of ``{kind}_images`` (a list the DataLoader reads as is)."""
    examples = []
    with parts.on_device(parts.vae):
        for index in tqdm(range(len(dataset)), desc="caching latents", disable=not accelerator.is_local_main_process):
            example = dict(dataset[index])
            for kind in ("instance", "class"):
                image = example.pop(f"{kind}_images", None)
                if image is not None:
                    example[f"{kind}_latents"] = encode_latent_parameters(parts.vae, image[None])[0].cpu()
            examples.append(example)
    return examples


def save_final(
    accelerator: Accelerator,
    denoiser,
    text_encoders: dict[str, torch.nn.Module],
    output_dir: Path,
    options: TrainingOptions,
    parts: models.Components,
    method: str,
    step: int,
    learning_rate: float,
) -> None:
    """The final adapter and its record, published as a whole (:func:`.run_folder.publish_final`); a failed write
    (full disk, read-only folder) is one clear error that leaves the folder and the last checkpoint as they were."""

    def write(staging: Path) -> None:
        save_adapter(bare_model(accelerator, denoiser), staging, base_model=parts.model_id)
        for name, encoder in text_encoders.items():
            save_adapter(encoder, staging / name, base_model=parts.model_id)
        write_run_info(staging, options, parts, method, step, learning_rate)

    try:
        publish_final(output_dir, write)
    except Exception as err:
        if write_failure(err):
            raise write_error(output_dir, "the final adapter", err) from err
        raise


def ensure_class_images(
    options: TrainingOptions, parts: models.Components, denoiser, accelerator: Accelerator, sharded: bool = False
) -> None:
    """Generate the missing prior-preservation class images with the base model (main process; resumable). A
    ``sharded`` denoiser needs every process in every forward: they all draw, the main process writes."""
    if accelerator.is_main_process or sharded:
        made = generate_class_images(
            models.make_pipeline(parts, denoiser),
            options.class_data_dir,
            parts.class_prompt,
            options.num_class_images,
            batch_size=options.sample_batch_size,
            num_inference_steps=options.validation_inference_steps,
            seed=options.seed,
            resolution=parts.resolution,
            progress=accelerator.is_local_main_process,
            write=accelerator.is_main_process,
        )
        if made:
            accelerator.print(f"generated {made} class images in {options.class_data_dir}")
    accelerator.wait_for_everyone()


def write_run_info(
    output_dir: Path,
    options: TrainingOptions,
    parts: models.Components,
    method: str,
    step: int,
    learning_rate: float,
) -> None:
    """``training_args.json`` beside the adapter: what was trained, on what, for how long (for the evaluator)."""
    info = {
        "method": method,
        "base_model": parts.model_id,
        "class_name": parts.class_name,
        "instance_prompt": parts.instance_prompt,
        "instance_data_dir": str(parts.instance_data_dir),
        "steps": step,
        "learning_rate": learning_rate,  # the rate really used: after --scale_lr, or the resumed checkpoint's
        "options": asdict(options),
    }
    (output_dir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")  # into publish_final's staging folder
