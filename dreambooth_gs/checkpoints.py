"""Resumable training state: checkpoint folders, their pruning and resumption, and accelerate's save / load hooks
that store the adapter (for ``full``: the trained projections; never the frozen UNet) in the project's adapter
format."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from .options import TrainingOptions
from .serialization import load_adapter_weights, save_adapter

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"


class GeneratorState:
    """A torch.Generator that accelerate saves and restores with each checkpoint (noise and timesteps)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, oldest (smallest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted((p for p in found if p.name[len(CHECKPOINT_PREFIX) :].isdigit()), key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete the oldest checkpoints so that at most ``keep - 1`` remain (room for the one about to be saved)."""
    if keep is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - keep + 1)]:
        shutil.rmtree(old)


def resolve_resume(options: TrainingOptions, output_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None; refuses to silently mix a new run into an old one."""
    if options.resume_from_checkpoint is None:
        if list_checkpoints(output_dir) and not options.overwrite_output_dir:
            raise ValueError(
                f"{output_dir} holds checkpoints of an earlier run; pass --resume_from_checkpoint latest to continue "
                "it, --overwrite_output_dir to start afresh, or another --output_dir"
            )
        return None
    if options.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("no checkpoint in %s to resume from; starting a new run", output_dir)
            return None
        return checkpoints[-1]
    path = Path(options.resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {path} is not a checkpoint folder (or pass 'latest')")
    return path


def register_adapter_hooks(accelerator: Accelerator, base_model: str) -> None:
    """Checkpoints save and load the adapter only, in the project's adapter format, never the frozen UNet."""

    def save_hook(models_to_save, weights, output_dir):
        if accelerator.is_main_process:
            for model in models_to_save:
                save_adapter(accelerator.unwrap_model(model), output_dir, base_model=base_model)
        while weights:
            weights.pop()

    def load_hook(models_to_load, input_dir):
        while models_to_load:
            load_adapter_weights(accelerator.unwrap_model(models_to_load.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
