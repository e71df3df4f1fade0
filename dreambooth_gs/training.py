"""The DreamBooth training run: models, adapter, data, the diffusion loss and the accelerate loop.

Everything takes explicit arguments (a :class:`TrainingOptions`); the script only parses flags and calls
:func:`train`. Checkpoints hold the adapter (not the frozen UNet), the optimizer, the schedule, accelerate's RNG
states and our own noise generator, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from . import models
from .checkpoints import (
    CHECKPOINT_PREFIX,
    GeneratorState,
    checkpoint_step,
    list_checkpoints,
    prune_checkpoints,
    register_adapter_hooks,
    resolve_resume,
)
from .data import DreamBoothDataset, collate_examples, generate_class_images
from .options import DEFAULT_MAX_TRAIN_STEPS, TrainingOptions, with_demo_defaults
from .sampling import generate_images, image_grid
from .serialization import save_adapter


def diffusion_loss(
    batch: dict[str, torch.Tensor],
    parts: models.Components,
    unet: torch.nn.Module,
    generator: torch.Generator,
    weight_dtype: torch.dtype,
    prior_loss_weight: float | None,
) -> torch.Tensor:
    """DreamBooth's denoising loss (plus the prior-preservation term when ``prior_loss_weight`` is given)."""
    pixel_values = batch["pixel_values"].to(device=unet.device, dtype=weight_dtype)  # (B', 3, R, R)
    with torch.no_grad():
        latents = parts.vae.encode(pixel_values).latent_dist.sample(generator=generator)
        latents = latents * parts.vae.config.scaling_factor  # (B', 4, R/8, R/8)
        encoder_hidden_states = parts.text_encoder(batch["input_ids"].to(unet.device))[0]  # (B', L, C)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    scheduler = parts.noise_scheduler
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    if prior_loss_weight is None:
        return F.mse_loss(model_pred.float(), target.float())
    pred_instance, pred_prior = model_pred.float().chunk(2)  # instance examples first, then class examples
    target_instance, target_prior = target.float().chunk(2)
    return F.mse_loss(pred_instance, target_instance) + prior_loss_weight * F.mse_loss(pred_prior, target_prior)


def validate(
    options: TrainingOptions, parts: models.Components, unet, accelerator: Accelerator, step: int, output_dir: Path
) -> Path | None:
    """Draw validation images, save them as one PNG grid and log them to the trackers."""
    if not options.validation_prompt or not accelerator.is_main_process:
        return None
    pipeline = models.make_pipeline(parts, accelerator.unwrap_model(unet))
    prompt = options.validation_prompt.format(**{"class": parts.class_name or ""})
    n = options.num_validation_images
    was_training = unet.training
    unet.eval()
    with torch.autocast(accelerator.device.type, enabled=accelerator.mixed_precision != "no"):
        images = generate_images(
            pipeline, [prompt] * n, [options.seed + i for i in range(n)], options.validation_inference_steps
        )
    unet.train(was_training)
    folder = output_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    image_grid(images).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            stacked = np.stack([np.asarray(image) for image in images])  # (n, H, W, 3)
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
    return path


def train(options: TrainingOptions) -> Path:
    """Run DreamBooth fine-tuning as ``options`` says; returns the folder with the final adapter."""
    output_dir = Path(options.output_dir)
    resume_path = resolve_resume(options, output_dir)
    if options.overwrite_output_dir and resume_path is None and int(os.environ.get("RANK", "0")) == 0:
        for stale in list_checkpoints(output_dir):  # a fresh run must not later resume an old run's state
            shutil.rmtree(stale)
    # Several processes without CUDA (accelerate launch --multi_gpu / torchrun on CPU machines): DDP over gloo.
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_process_cpu,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        mixed_precision=options.mixed_precision,
        log_with=None if options.report_to == "none" else options.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / options.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(options.seed)
    if options.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    parts = models.load_components(options, accelerator, weight_dtype)
    if parts.is_demo:
        options = with_demo_defaults(options)
    if options.with_prior_preservation:
        _ensure_class_images(options, parts, accelerator)
    unet, method = models.add_adapter(parts.unet, options)
    params = [p for p in unet.parameters() if p.requires_grad]
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    dataset = DreamBoothDataset(
        instance_data_dir=parts.instance_data_dir,
        instance_prompt=parts.instance_prompt,
        tokenizer=parts.tokenizer,
        resolution=parts.resolution,
        center_crop=options.center_crop,
        random_flip=options.random_flip,
        class_data_dir=options.class_data_dir if options.with_prior_preservation else None,
        class_prompt=parts.class_prompt if options.with_prior_preservation else None,
        num_class_images=options.num_class_images if options.with_prior_preservation else None,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=options.train_batch_size,
        shuffle=True,
        collate_fn=lambda examples: collate_examples(examples, options.with_prior_preservation),
        num_workers=options.dataloader_num_workers,
    )
    max_steps = options.max_train_steps or DEFAULT_MAX_TRAIN_STEPS
    optimizer = torch.optim.AdamW(
        params,
        lr=options.resolved_learning_rate,
        betas=(options.adam_beta1, options.adam_beta2),
        weight_decay=options.adam_weight_decay,
        eps=options.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        options.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=options.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    noise = GeneratorState(options.seed + accelerator.process_index, accelerator.device)
    accelerator.register_for_checkpointing(noise)
    register_adapter_hooks(accelerator, parts.model_id)

    steps_per_epoch = math.ceil(len(dataloader) / options.gradient_accumulation_steps)
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    global_step = 0
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        global_step = checkpoint_step(resume_path) if resume_path.name.startswith(CHECKPOINT_PREFIX) else 0
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in asdict(options).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("dreambooth-gs", config=tracker_config)
        accelerator.print(
            f"{method}: {sum(p.numel() for p in params):,} trainable parameters, {len(dataset)} examples, "
            f"{max_steps} steps at lr {options.resolved_learning_rate:g} on {accelerator.num_processes} process(es)"
            + (
                " -- using the tiny RANDOM-WEIGHT demo model (for trying the tool, not for real images)"
                if parts.is_demo
                else ""
            )
        )

    progress = tqdm(
        total=max_steps, initial=global_step, desc="training", disable=not accelerator.is_local_main_process
    )
    first_epoch, skip_batches = divmod(global_step, steps_per_epoch)
    unet.train()
    for epoch in range(first_epoch, num_epochs):
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(dataloader, skip_batches * options.gradient_accumulation_steps)
        for batch in batches:
            with accelerator.accumulate(unet):
                prior_weight = options.prior_loss_weight if options.with_prior_preservation else None
                loss = diffusion_loss(batch, parts, unet, noise.generator, weight_dtype, prior_weight)
                if not bool(torch.isfinite(accelerator.gather(loss.detach())).all()):
                    last = list_checkpoints(output_dir)
                    raise ValueError(
                        f"the loss became non-finite at step {global_step + 1}; stopping (lower --learning_rate or "
                        f"use --mixed_precision no). Last good checkpoint: {last[-1] if last else 'none'}"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, options.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if global_step % options.checkpointing_steps == 0:
                if accelerator.is_main_process:
                    prune_checkpoints(output_dir, options.checkpoints_total_limit)
                accelerator.save_state(str(output_dir / f"{CHECKPOINT_PREFIX}{global_step}"))
            if global_step % options.validation_steps == 0 and global_step < max_steps:
                validate(options, parts, unet, accelerator, global_step, output_dir)
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(unet), output_dir, base_model=parts.model_id)
        _write_run_info(output_dir, options, parts, method, global_step)
        grid = validate(options, parts, unet, accelerator, global_step, output_dir)
        accelerator.print(f"adapter saved to {output_dir}" + (f"; validation grid {grid}" if grid else ""))
    accelerator.end_training()
    return output_dir


def _ensure_class_images(options: TrainingOptions, parts: models.Components, accelerator: Accelerator) -> None:
    """Generate the missing prior-preservation class images with the base model (main process; resumable)."""
    if options.class_data_dir is None:
        raise ValueError("--with_prior_preservation needs --class_data_dir (a folder; missing images are generated)")
    if accelerator.is_main_process:
        made = generate_class_images(
            models.make_pipeline(parts, parts.unet),
            options.class_data_dir,
            parts.class_prompt,
            options.num_class_images,
            batch_size=options.sample_batch_size,
            num_inference_steps=options.validation_inference_steps,
            seed=options.seed,
            resolution=parts.resolution,
        )
        if made:
            accelerator.print(f"generated {made} class images in {options.class_data_dir}")
    accelerator.wait_for_everyone()


def _write_run_info(
    output_dir: Path, options: TrainingOptions, parts: models.Components, method: str, step: int
) -> None:
    """``training_args.json`` beside the adapter: what was trained, on what, for how long (for the evaluator)."""
    info = {
        "method": method,
        "base_model": parts.model_id,
        "class_name": parts.class_name,
        "instance_prompt": parts.instance_prompt,
        "instance_data_dir": str(parts.instance_data_dir),
        "steps": step,
        "options": asdict(options),
    }
    (output_dir / "training_args.json").write_text(json.dumps(info, indent=2) + "\n")
