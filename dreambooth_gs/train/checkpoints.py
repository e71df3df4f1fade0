"""Resumable training state: crash-safe checkpoint folders, their pruning, and resumption.

A checkpoint is written into a hidden sibling ``.checkpoint-N.partial`` and renamed to ``checkpoint-N`` only once
every file is complete; its last file, ``checkpoint_manifest.json``, lists every file with its size and holds the
step. So a ``checkpoint-N`` folder is either complete or visibly not (a missing or short file), and a kill at any
moment leaves the previous checkpoint intact. Inside: the adapter (never the frozen UNet) in the project's adapter
format, accelerate's optimizer / scheduler / random states (its pickles, which it loads with ``weights_only=True``)
and every process's noise generator as a safetensors file.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ..adapters.serialization import load_adapter_weights, save_adapter
from ..fileio import WriteFailure, atomic_write_text, first_line, write_failure, write_failure_error

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"
MANIFEST_NAME = "checkpoint_manifest.json"
MANIFEST_FORMAT = 1
GENERATOR_FILE = "noise_generator_{rank}.safetensors"


class GeneratorState:
    """The torch.Generator of one process's noise and timesteps; each process saves and restores its own."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def save(self, directory: Path, rank: int) -> None:
        save_file({"state": self.generator.get_state()}, str(directory / GENERATOR_FILE.format(rank=rank)))

    def load(self, directory: Path, rank: int) -> None:
        self.generator.set_state(load_file(directory / GENERATOR_FILE.format(rank=rank))["state"])


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and what its manifest says."""

    path: Path
    step: int
    num_processes: int


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir`` (complete or not), smallest N first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    numbered = [p for p in found if p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(numbered, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def partial_saves(output_dir: Path) -> list[Path]:
    """Leftovers of checkpoint saves that were killed before their rename."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.glob(f".{CHECKPOINT_PREFIX}*{PARTIAL_SUFFIX}") if p.is_dir())


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path``; ValueError with one line naming what is missing or short when it is incomplete."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(
            f"checkpoint {path} is incomplete: it has no {MANIFEST_NAME} (its save was interrupted, or an older "
            "dreambooth-gs wrote it)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files, step, processes = manifest["files"], int(manifest["step"]), int(manifest["num_processes"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {path} is corrupt: {manifest_path} is unreadable ({first_line(err)})") from err
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is incomplete: {name} is missing")
        if file.stat().st_size != size:
            raise ValueError(
                f"checkpoint {path} is corrupt: {name} has {file.stat().st_size} bytes, its manifest says {size}"
            )
    return Checkpoint(path=path, step=step, num_processes=processes)


def newest_complete(output_dir: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest complete checkpoint of ``output_dir`` and the problems of the newer, incomplete ones it skipped."""
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return read_checkpoint(path), skipped
        except ValueError as err:
            skipped.append(str(err))
    return None, skipped


def resolve_resume(resume_from: str | None, output_dir: Path, print_fn=print) -> Checkpoint | None:
    """The checkpoint ``--resume_from_checkpoint`` names: ``latest``, a name inside ``output_dir`` or a path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoint, skipped = newest_complete(output_dir)
        for problem in skipped:
            print_fn(f"skipping {problem}")
        if checkpoint is None:
            print_fn(f"no complete checkpoint in {output_dir} to resume from; starting a new run")
        return checkpoint
    path = Path(resume_from)
    if not path.is_dir() and (output_dir / resume_from).is_dir():
        path = output_dir / resume_from
    if not path.is_dir():
        names = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none"
        raise ValueError(
            f"--resume_from_checkpoint {resume_from}: no such folder, nor a checkpoint of that name in {output_dir} "
            f"(there: {names}); pass 'latest', a checkpoint name or a path"
        )
    return read_checkpoint(path)


def write_error(output_dir: Path, what: str, err: BaseException) -> WriteFailure:
    """One line for a training run's failed write (full disk, read-only folder): what failed, what is intact, and
    how to go on (a resume from the newest checkpoint, which writes a missing final adapter without training)."""
    checkpoint, _ = newest_complete(output_dir)
    if checkpoint is not None:
        kept = (
            f"{checkpoint.path.name} is intact: make room (or fix the folder), then resume with "
            "--resume_from_checkpoint latest"
        )
    else:
        kept = "no checkpoint was written yet: make room (or fix the folder), then run again"
    return write_failure_error(f"{what} in {output_dir}", err, kept)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, noise: GeneratorState) -> Path:
    """Write ``checkpoint-<step>`` atomically (every process takes part); returns its path.

    A failure leaves no ``checkpoint-<step>`` folder behind; a full disk becomes one ValueError that says so.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / f".{final.name}{PARTIAL_SUFFIX}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        noise.save(partial, accelerator.process_index)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {p.relative_to(partial).as_posix(): p.stat().st_size for p in partial.rglob("*") if p.is_file()}
            manifest = {
                "format": MANIFEST_FORMAT,
                "step": step,
                "num_processes": accelerator.num_processes,
                "files": files,
            }
            atomic_write_text(partial / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
            if final.exists():  # an incomplete folder of the same step, skipped when this run resumed
                shutil.rmtree(final)
            partial.rename(final)
    except Exception as err:  # safetensors, torch and the OS each raise their own kind on a failed write
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        if write_failure(err):
            raise write_error(output_dir, f"checkpoint-{step}", err) from err
        raise
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete the oldest checkpoints so that at most ``keep`` remain (called after a new one is complete)."""
    if keep is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - keep)]:
        shutil.rmtree(old)


def load_checkpoint(accelerator: Accelerator, checkpoint: Checkpoint, noise: GeneratorState) -> int:
    """Restore every process's state from ``checkpoint``; returns its step."""
    if checkpoint.num_processes != accelerator.num_processes:
        raise ValueError(
            f"checkpoint {checkpoint.path} was written by {checkpoint.num_processes} process(es); resume it with "
            f"the same number (this run has {accelerator.num_processes})"
        )
    try:
        accelerator.load_state(str(checkpoint.path))
        noise.load(checkpoint.path, accelerator.process_index)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"checkpoint {checkpoint.path} cannot be read ({first_line(err, 200)})") from err
    return checkpoint.step


def bare_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without what ``accelerator.prepare`` put around it: DDP, the mixed-precision forward, and
    ``torch.compile``'s wrapper (``accelerate launch --dynamo_backend inductor``), whose ``_orig_mod.`` prefix would
    otherwise end up in every saved adapter key."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def register_adapter_hooks(
    accelerator: Accelerator,
    base_model: str,
    text_encoders: dict[str, torch.nn.Module] | None = None,
    unprepared_denoiser: torch.nn.Module | None = None,
) -> None:
    """Checkpoints save and load the adapters only, in the project's adapter format, never the frozen models: the
    denoiser's at the top of the checkpoint, each adapted text encoder's in a subfolder named after it. The
    denoiser is the one accelerate prepared, or ``unprepared_denoiser`` (a sharded one, which accelerate does not
    hold)."""
    text_encoders = text_encoders or {}
    own = [] if unprepared_denoiser is None else [unprepared_denoiser]

    def save_hook(models_to_save, weights, output_dir):
        if accelerator.is_main_process:
            for model in [*models_to_save, *own]:
                save_adapter(bare_model(accelerator, model), output_dir, base_model=base_model)
            for name, encoder in text_encoders.items():
                save_adapter(encoder, Path(output_dir) / name, base_model=base_model)
        while weights:
            weights.pop()

    def load_hook(models_to_load, input_dir):
        while models_to_load:
            load_adapter_weights(bare_model(accelerator, models_to_load.pop()), input_dir)
        for model in own:
            load_adapter_weights(model, input_dir)
        for name, encoder in text_encoders.items():
            load_adapter_weights(encoder, Path(input_dir) / name)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
