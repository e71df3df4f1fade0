"""What a training run leaves in its output folder, and how a new run starts there without losing an earlier one.

A new run in a folder that holds an earlier run is refused unless ``--overwrite_output_dir`` is given; then the
earlier run's files are moved into a hidden ``.earlier-run-<time>`` folder once the new run has passed every check,
and deleted only when the new run has written its first checkpoint or its adapter. Until then a crash or a kill
leaves them recoverable.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .checkpoints import list_checkpoints, partial_saves

SET_ASIDE_PREFIX = ".earlier-run-"
# Files and folders a finished run writes beside its checkpoints (the tracker folder is added by the caller).
RUN_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "training_args.json",
    "README.md",
    "validation",
    "text_encoder",  # --train_text_encoder's adapters
    "text_encoder_2",
)


def earlier_run_files(output_dir: Path, logging_dir: str) -> list[Path]:
    """What an earlier run left in ``output_dir``: checkpoints, killed saves, its adapter, record and images."""
    named = [output_dir / name for name in (*RUN_FILES, logging_dir)]
    return list_checkpoints(output_dir) + partial_saves(output_dir) + [p for p in named if p.exists()]


def check_fresh_start(output_dir: Path, logging_dir: str, overwrite: bool) -> list[Path]:
    """The earlier run's files a new run will set aside; refuses (changing nothing) when ``overwrite`` is off."""
    found = earlier_run_files(output_dir, logging_dir)
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(
            f"{output_dir} holds an earlier run ({names}); pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to start afresh (its files are kept until the new run saves), or another "
            "--output_dir"
        )
    return found


def set_aside(output_dir: Path, files: list[Path]) -> Path | None:
    """Move ``files`` into a new hidden folder of ``output_dir`` (a rename each: nothing is copied or lost)."""
    if not files:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = output_dir / f"{SET_ASIDE_PREFIX}{stamp}", 1
    while target.exists():
        target, n = output_dir / f"{SET_ASIDE_PREFIX}{stamp}-{n}", n + 1
    target.mkdir()
    for path in files:
        path.rename(target / path.name)
    return target


def discard_set_aside(output_dir: Path) -> list[Path]:
    """Delete every set-aside earlier run of ``output_dir`` (once the new run has saved); returns what went."""
    gone = sorted(p for p in output_dir.glob(f"{SET_ASIDE_PREFIX}*") if p.is_dir())
    for path in gone:
        shutil.rmtree(path)
    return gone
