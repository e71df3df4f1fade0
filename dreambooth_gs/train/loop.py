"""The DreamBooth training run: every check first, then models, adapter, data and the accelerate loop.

Everything takes explicit arguments (a :class:`TrainingOptions`); the script only parses flags and calls
:func:`train`. The order matters: options, the instance folder, the output folder, the hardware, the model and its
targets are all checked before anything is written, so a refused run changes no file. Checkpoints are atomic
(:mod:`.checkpoints`) and hold every process's state, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DynamoBackend, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..adapters.serialization import WEIGHTS_NAME
from ..gs.layers import flush_reused_blocks, set_block_reuse
from ..methods.injection import disable_adapters
from . import models
from .checkpoints import (
    Checkpoint,
    GeneratorState,
    load_checkpoint,
    newest_complete,
    partial_saves,
    prune_checkpoints,
    register_adapter_hooks,
    resolve_resume,
    save_checkpoint,
)
from .data import DreamBoothDataset, collate_examples
from .distributed import (
    ShardingRequest,
    autocast_forward,
    average_gradients,
    check_shardable,
    requested_sharding,
    shard_denoiser,
    with_sharding_options,
    without_accelerate_fsdp,
)
from .objectives import LossSettings, training_loss
from .options import DEFAULT_MAX_TRAIN_STEPS, DEMO_MAX_TRAIN_STEPS, TrainingOptions, with_demo_defaults
from .run_folder import (
    RUN_INFO,
    check_fresh_start,
    discard_set_aside,
    final_save_leftovers,
    restore_set_aside,
    set_aside,
)
from .run_outputs import cache_latents, ensure_class_images, save_final, validate, validation_prompt


def _make_accelerator(options: TrainingOptions, output_dir: Path) -> tuple[Accelerator, ShardingRequest | None]:
    """The Accelerator, and the FSDP2 sharding that accelerate's launch settings ask for (done by
    :mod:`.distributed`, not by accelerate; None with one process, where there is nothing to shard)."""
    sharding = requested_sharding(os.environ)
    # Several processes without CUDA (accelerate launch --multi_gpu / torchrun on CPU machines): DDP over gloo.
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    with without_accelerate_fsdp(os.environ):
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
    if sharding is not None and accelerator.num_processes == 1:
        accelerator.print("FSDP settings with one process: nothing to shard, training unsharded")
        sharding = None
    return accelerator, sharding


def check_hardware(options: TrainingOptions, accelerator: Accelerator) -> None:
    """Refuse settings this machine cannot run, before anything loads or is written."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
        raise ValueError(
            f"--mixed_precision fp16 needs a CUDA GPU (this run is on {accelerator.device.type}); on a CPU use "
            "--mixed_precision bf16 or no (check `accelerate config` if you did not pass the flag)"
        )
    if options.use_8bit_adam:
        if accelerator.device.type != "cuda":
            raise ValueError("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW); drop it on this machine")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None


def make_optimizer(options: TrainingOptions, params: list, learning_rate: float):
    """AdamW, or bitsandbytes' AdamW8bit with ``--use_8bit_adam`` (checked by :func:`check_hardware`); ``params``
    are tensors or parameter groups (dicts with their own ``lr``)."""
    optimizer_class = torch.optim.AdamW
    if options.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    return optimizer_class(
        params,
        lr=learning_rate,
        betas=(options.adam_beta1, options.adam_beta2),
        weight_decay=options.adam_weight_decay,
        eps=options.adam_epsilon,
    )


def requested_learning_rate(options: TrainingOptions, num_processes: int) -> float:
    """The rate the flags ask for; ``--scale_lr`` multiplies it by the samples per optimizer step (diffusers')."""
    rate = options.resolved_learning_rate
    if options.scale_lr:
        rate *= options.train_batch_size * options.gradient_accumulation_steps * num_processes
    return rate


def _prepare_output_dir(accelerator: Accelerator, output_dir: Path, earlier: list[Path]) -> Path | None:
    """Move an earlier run aside (recoverable until this run saves; returns where) and drop leftovers of killed
    saves."""
    moved = None
    if accelerator.is_main_process:
        moved = set_aside(output_dir, earlier)
        if moved is not None:
            accelerator.print(
                f"moved the earlier run in {output_dir} aside to {moved.name}; it is deleted once this run saves"
            )
        for leftover in partial_saves(output_dir) + final_save_leftovers(output_dir):
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    return moved


def reuses_blocks_per_step(options: TrainingOptions, accelerator: Accelerator) -> bool:
    """Whether GS layers compute their orthogonal blocks once per optimizer step (``gs.layers.set_block_reuse``):
    with gradient accumulation, in one process, not compiled. Under DDP the reducer expects each parameter's
    gradient during the synchronising backward (the flush comes after it), and a compiled denoiser would trace the
    reuse's Python-side state; there the blocks are computed every micro-step as before."""
    return (
        options.gradient_accumulation_steps > 1
        and accelerator.num_processes == 1
        and accelerator.state.dynamo_plugin.backend == DynamoBackend.NO
    )


def requested_max_steps(options: TrainingOptions) -> int:
    """``--max_train_steps``, or its default (the demo model's when no model is named)."""
    if options.max_train_steps is not None:
        return options.max_train_steps
    return DEFAULT_MAX_TRAIN_STEPS if options.pretrained_model_name_or_path else DEMO_MAX_TRAIN_STEPS


def finished_steps(output_dir: Path) -> int | None:
    """The steps of the complete final adapter in ``output_dir`` (its ``training_args.json``, written last), if any."""
    info = output_dir / RUN_INFO
    if not (info.is_file() and (output_dir / WEIGHTS_NAME).is_file()):
        return None
    try:
        return int(json.loads(info.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_resume(options: TrainingOptions, output_dir: Path, checkpoint: Checkpoint | None) -> str | None:
    """What a resumed start should do besides training: a line to say when the run is already finished (then
    nothing is trained or written); refuses a checkpoint past ``--max_train_steps`` and a ``latest`` that finds no
    checkpoint beside a saved adapter (starting afresh there would replace it)."""
    if options.resume_from_checkpoint is None:
        return None
    max_steps = requested_max_steps(options)
    done = finished_steps(output_dir)
    if done is not None and done >= max_steps:
        return (
            f"{output_dir} already holds the final adapter of this run ({done} steps; --max_train_steps {max_steps}): "
            "nothing to resume, nothing changed (raise --max_train_steps to train on, or pass --overwrite_output_dir "
            "to start afresh)"
        )
    if checkpoint is not None and checkpoint.step > max_steps:
        raise ValueError(
            f"{checkpoint.path} is at step {checkpoint.step}, past --max_train_steps {max_steps}; resume it with "
            f"--max_train_steps {checkpoint.step} or more"
        )
    if checkpoint is None and not options.overwrite_output_dir and (output_dir / WEIGHTS_NAME).is_file():
        raise ValueError(
            f"{output_dir} holds a saved adapter but no complete checkpoint to resume; pass --overwrite_output_dir to "
            "train afresh there (its files are kept until the new run saves), or another --output_dir"
        )
    return None


def train(options: TrainingOptions) -> Path:
    """Run DreamBooth fine-tuning as ``options`` says; returns the folder with the final adapter."""
    output_dir = Path(options.output_dir)
    accelerator, sharding = _make_accelerator(options, output_dir)
    options = with_sharding_options(options, sharding)
    check_hardware(options, accelerator)
    if accelerator.is_main_process:  # an overwrite killed before it saved: its set-aside run goes back first
        for line in restore_set_aside(output_dir, options.logging_dir):
            accelerator.print(line)
    accelerator.wait_for_everyone()
    checkpoint = resolve_resume(options.resume_from_checkpoint, output_dir, accelerator.print)
    finished = check_resume(options, output_dir, checkpoint)
    if finished is not None:
        accelerator.print(finished)
        return output_dir
    earlier = []
    if checkpoint is None:  # 'latest' with nothing complete to resume starts afresh, keeping the old files aside
        start_afresh = options.overwrite_output_dir or options.resume_from_checkpoint == "latest"
        earlier = check_fresh_start(output_dir, options.logging_dir, start_afresh)
    subject = models.check_subject_data(options, accelerator)
    if options.push_to_hub and accelerator.is_main_process:
        from .hub import check_hub_access

        check_hub_access(options.hub_token)

    set_seed(options.seed)
    if options.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    parts = models.load_components(options, accelerator, weight_dtype, subject, sharded=sharding is not None)
    if parts.is_demo:
        options = with_demo_defaults(options)
    options = models.family_options(options, parts.family)  # the family's targets and objective defaults
    denoiser, method = models.add_adapter(parts.denoiser, options)  # refuses bad targets and block counts
    text_encoders = models.add_text_encoder_adapters(parts, options) if options.train_text_encoder else {}
    text = models.TextConditioning(parts, models.text_settings(options, parts.denoiser), trainable=bool(text_encoders))
    if sharding is not None:
        check_shardable(denoiser, method)

    repo_id = None
    if options.push_to_hub and accelerator.is_main_process:
        from .hub import create_hub_repo

        repo_id = create_hub_repo(options.hub_model_id or output_dir.resolve().name, options.hub_token)

    # -- every check passed: from here on the run writes ------------------------------------------------------------
    set_aside_run = _prepare_output_dir(accelerator, output_dir, earlier)
    waits_for_prompts = models.denoiser_waits_for_prompts(options)
    if sharding is not None and not waits_for_prompts:  # before the class images: a big denoiser draws them sharded
        _shard(denoiser, parts, accelerator, sharding)
    if options.with_prior_preservation:
        with contextlib.ExitStack() as base_model:  # the class images come from the base model
            for model in (denoiser, *text_encoders.values()):
                base_model.enter_context(disable_adapters(model))
            ensure_class_images(options, parts, denoiser, accelerator, sharded=sharding is not None)
    if options.pre_compute_text_embeddings:
        prompts = [parts.instance_prompt, ""]
        prompts += [parts.class_prompt] if options.with_prior_preservation else []
        prompts += [validation_prompt(options, parts)] if options.validation_prompt else []
        text.precompute(prompts)
        parts.text_encoders = [None] * len(parts.text_encoders)
        _free_memory()
    if waits_for_prompts:  # only now: never on the GPU beside the text encoders
        if sharding is None:
            models.place_denoiser(denoiser, accelerator)
        else:
            _shard(denoiser, parts, accelerator, sharding)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    text_params = [p for encoder in text_encoders.values() for p in encoder.parameters() if p.requires_grad]
    if options.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for encoder in text_encoders.values():
            encoder.gradient_checkpointing_enable()

    dataset = DreamBoothDataset(
        instance_data_dir=parts.instance_data_dir,
        instance_prompt=parts.instance_prompt,
        resolution=parts.resolution,
        center_crop=options.center_crop,
        random_flip=options.random_flip,
        class_data_dir=options.class_data_dir if options.with_prior_preservation else None,
        class_prompt=parts.class_prompt if options.with_prior_preservation else None,
        num_class_images=options.num_class_images if options.with_prior_preservation else None,
    )
    if options.cache_latents:
        dataset = cache_latents(dataset, parts, accelerator)
        if not options.validation_prompt:
            parts.vae = None  # training reads the cache; nothing decodes
            _free_memory()
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=options.train_batch_size,
        shuffle=True,
        collate_fn=lambda examples: collate_examples(examples, options.with_prior_preservation),
        num_workers=options.dataloader_num_workers,
    )
    max_steps = requested_max_steps(options)
    learning_rate = requested_learning_rate(options, accelerator.num_processes)
    groups = [{"params": params, "lr": learning_rate}]
    if text_params:
        groups.append({"params": text_params, "lr": options.text_encoder_lr or learning_rate})
    optimizer = make_optimizer(options, groups, learning_rate)
    lr_scheduler = get_scheduler(
        options.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=options.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    if sharding is None:
        denoiser, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            denoiser, optimizer, dataloader, lr_scheduler
        )
    else:  # sharded: accelerate would wrap it in DDP; its adapter's gradients are averaged below
        optimizer, dataloader, lr_scheduler = accelerator.prepare(optimizer, dataloader, lr_scheduler)
        autocast_forward(denoiser, accelerator)  # what prepare gives the models it wraps
    unsynced_params = text_params + (params if sharding is not None else [])  # no DDP wrapper averages these
    noise = GeneratorState(options.seed + accelerator.process_index, accelerator.device)
    register_adapter_hooks(
        accelerator, parts.model_id, text_encoders, unprepared_denoiser=denoiser if sharding is not None else None
    )
    adapted = [denoiser, *text_encoders.values()]
    set_block_reuse(adapted, reuses_blocks_per_step(options, accelerator))

    steps_per_epoch = math.ceil(len(dataloader) / options.gradient_accumulation_steps)
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    global_step = 0
    if checkpoint is not None:
        accelerator.print(f"resuming from {checkpoint.path} at step {checkpoint.step}")
        global_step = load_checkpoint(accelerator, checkpoint, noise)
        learning_rate = _learning_rate_after_resume(accelerator, lr_scheduler, learning_rate)
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in asdict(options).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("dreambooth-gs", config={**tracker_config, "learning_rate": learning_rate})
        accelerator.print(
            f"{method}: {sum(p.numel() for p in params):,} trainable parameters, {len(dataset)} examples, "
            f"{max_steps} steps at lr {learning_rate:g} on {accelerator.num_processes} process(es)"
            + (
                " -- using the tiny RANDOM-WEIGHT demo model (for trying the tool, not for real images)"
                if parts.is_demo
                else ""
            )
        )

    with tqdm(
        total=max_steps, initial=global_step, desc="training", disable=not accelerator.is_local_main_process
    ) as progress:  # closed (its line ended) also when a step or a save fails
        first_epoch, skip_batches = divmod(global_step, steps_per_epoch)
        loss_settings = LossSettings.from_options(options)
        denoiser.train()
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_steps:  # resumed at the budget (a final save that did not finish): train nothing
                break
            if hasattr(dataloader, "set_epoch"):
                dataloader.set_epoch(epoch)
            batches = dataloader
            if epoch == first_epoch and skip_batches:
                batches = accelerator.skip_first_batches(dataloader, skip_batches * options.gradient_accumulation_steps)
            for batch in batches:
                with accelerator.accumulate(denoiser):
                    loss = training_loss(batch, parts, text, denoiser, noise.generator, weight_dtype, loss_settings)
                    if not bool(torch.isfinite(accelerator.gather(loss.detach())).all()):
                        last, _ = newest_complete(output_dir)
                        raise ValueError(
                            f"the loss became non-finite at step {global_step + 1}; stopping (lower --learning_rate or "
                            f"use --mixed_precision no). Last good checkpoint: {last.path if last else 'none'}"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        flush_reused_blocks(adapted)  # the blocks' gradients of every micro-step, into the parameters
                        average_gradients(unsynced_params, accelerator.num_processes)
                        accelerator.clip_grad_norm_(params + text_params, options.max_grad_norm)
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
                    save_checkpoint(accelerator, output_dir, global_step, noise)
                    if accelerator.is_main_process:
                        prune_checkpoints(output_dir, options.checkpoints_total_limit)
                        discard_set_aside(set_aside_run)
                if global_step % options.validation_steps == 0 and global_step < max_steps:
                    validate(options, parts, text, denoiser, accelerator, global_step, output_dir, sharding is not None)
                if global_step >= max_steps:
                    break
            if global_step >= max_steps:
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(accelerator, denoiser, text_encoders, output_dir, options, parts, method, global_step, learning_rate)
        discard_set_aside(set_aside_run)
    grid = validate(options, parts, text, denoiser, accelerator, global_step, output_dir, sharding is not None)
    if accelerator.is_main_process:
        accelerator.print(f"adapter saved to {output_dir}" + (f"; validation grid {grid}" if grid else ""))
        if repo_id is not None:
            from .hub import push_adapter_folder

            push_adapter_folder(output_dir, repo_id, options.hub_token, grid)
            accelerator.print(f"uploaded {output_dir} to the Hub repository {repo_id}")
    accelerator.end_training()
    return output_dir


def _shard(
    denoiser: torch.nn.Module, parts: models.Components, accelerator: Accelerator, sharding: ShardingRequest
) -> None:
    units = parts.family.sharding_units(denoiser)
    shard_denoiser(denoiser, units, accelerator.device, accelerator.num_processes, sharding)
    accelerator.print(
        f"FSDP2: the frozen denoiser sharded over {accelerator.num_processes} processes in {len(units) + 1} units, "
        "the adapter replicated"
    )


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _learning_rate_after_resume(accelerator: Accelerator, lr_scheduler, requested: float) -> float:
    """The schedule's base rate restored from the checkpoint; says so when it is not the one the flags ask for."""
    restored = float(getattr(lr_scheduler, "scheduler", lr_scheduler).base_lrs[0])
    if not math.isclose(restored, requested, rel_tol=1e-9):
        accelerator.print(
            f"resuming with the checkpoint's learning rate {restored:g}, not the requested {requested:g} (a resumed "
            "run keeps its optimizer and schedule; start a new run to change the rate)"
        )
    return restored
