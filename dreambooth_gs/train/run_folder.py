"""What a training run leaves in its output folder, and how a new run starts there without losing an earlier one.

A new run in a folder that holds an earlier run is refused unless ``--overwrite_output_dir`` is given; then the
earlier run's files are moved into a hidden ``.earlier-run-<time>`` folder once the new run has passed every check,
and deleted only when the new run has written its first checkpoint or its adapter. Until then a crash or a kill
leaves them recoverable, and the next start in the folder puts them back (:func:`restore_set_aside`) before it
decides anything, so a killed overwrite leaves the folder as it was before that start.

The final adapter is written last and as a whole (:func:`publish_final`): its files are staged in a hidden folder,
an older ``training_args.json`` is removed first and the new one renamed in last, so ``training_args.json`` beside
the adapter means the adapter is complete.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ..adapters.serialization import WEIGHTS_NAME
from ..fileio import default_file_mode
from .checkpoints import list_checkpoints, newest_complete, partial_saves

SET_ASIDE_PREFIX = ".earlier-run-"
FINAL_STAGING = ".final-{}.partial"
RUN_INFO = "training_args.json"  # written last: beside the adapter, it says the final save completed
# Files and folders a finished run writes beside its checkpoints (the tracker folder is added by the caller).
RUN_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    RUN_INFO,
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


def set_aside_folders(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.glob(f"{SET_ASIDE_PREFIX}*") if p.is_dir()) if output_dir.is_dir() else []


def has_saved_run(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds something a run saved: a complete checkpoint, or its final adapter."""
    return newest_complete(output_dir)[0] is not None or (output_dir / WEIGHTS_NAME).is_file()


def _conflicts(source: Path, target: Path, merge: set[str]) -> list[str]:
    """Names under ``source`` that moving it into ``target`` would overwrite (folders named in ``merge`` merge)."""
    found = []
    for entry in source.iterdir():
        there = target / entry.name
        if not there.exists():
            continue
        if entry.name in merge and entry.is_dir() and there.is_dir():
            found += _conflicts(entry, there, {p.name for p in entry.iterdir() if p.is_dir()})
        else:
            found.append(str(there))
    return found


def _move_into(source: Path, target: Path) -> None:
    """Move every entry of ``source`` into ``target`` (renames; folders that exist there merge), then drop it."""
    for entry in source.iterdir():
        there = target / entry.name
        if there.is_dir() and entry.is_dir():
            _move_into(entry, there)
        else:
            entry.rename(there)
    source.rmdir()


def restore_set_aside(output_dir: Path, logging_dir: str) -> list[str]:
    """Put back an earlier run that an interrupted ``--overwrite_output_dir`` start set aside; returns what to say.

    Set-aside folders outlive their run only when it was killed (or failed) before it saved, or while it deleted
    them. In the first case the folder holds nothing of the interrupted run but its logs and the leftovers of killed
    saves, so the earlier run goes back where it was (the leftovers are dropped, the logs merge): the folder is as
    it was before the interrupted start, and this start decides afresh. A set-aside run that cannot go back
    without overwriting a file, or one beside a run that has saved, is kept and named, never deleted.
    """
    asides = set_aside_folders(output_dir)
    if not asides:
        return []
    if has_saved_run(output_dir):
        return [
            f"{aside} holds an earlier run that an --overwrite_output_dir start set aside; that run has saved since, "
            "so it is no longer needed: delete the folder when you are sure"
            for aside in asides
        ]
    for leftover in partial_saves(output_dir):
        shutil.rmtree(leftover)
    said = []
    for aside in asides:
        clash = _conflicts(aside, output_dir, {logging_dir})
        if clash:
            said.append(
                f"kept the earlier run set aside in {aside} by an interrupted --overwrite_output_dir start: putting it "
                f"back would overwrite {clash[0]}; move its files back by hand, or delete it"
            )
            continue
        _move_into(aside, output_dir)
        said.append(
            f"restored the earlier run from {aside.name}: the --overwrite_output_dir start that set it aside stopped "
            "before it saved"
        )
    return said


def final_save_leftovers(output_dir: Path) -> list[Path]:
    """Staging folders of final saves that were killed before they finished (:func:`publish_final`)."""
    return sorted(p for p in output_dir.glob(FINAL_STAGING.format("*")) if p.is_dir()) if output_dir.is_dir() else []


def discard_set_aside(aside: Path | None) -> None:
    """Delete the earlier run this run set aside (once this run has saved)."""
    if aside is not None and aside.is_dir():
        shutil.rmtree(aside)


def publish_final(output_dir: Path, write: Callable[[Path], None]) -> None:
    """Write the final adapter and its record as a whole: ``write(staging)`` fills a hidden sibling folder with the
    files (``RUN_INFO`` among them), which then replace their namesakes in ``output_dir``, ``RUN_INFO`` last.

    A failure while writing leaves ``output_dir`` untouched; a kill while moving leaves no ``RUN_INFO``, so the
    folder visibly holds no complete final adapter and a resume writes it again.
    """
    staging = output_dir / FINAL_STAGING.format(uuid.uuid4().hex[:8])
    staging.mkdir(parents=True)
    try:
        write(staging)
        (output_dir / RUN_INFO).unlink(missing_ok=True)
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == RUN_INFO):
            there = output_dir / entry.name
            if entry.is_dir():
                for file in entry.rglob("*"):
                    if file.is_file():
                        os.chmod(file, default_file_mode())
                retired = output_dir / f".{entry.name}.old-{uuid.uuid4().hex[:8]}"
                if there.exists():
                    os.replace(there, retired)
                os.replace(entry, there)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.chmod(entry, default_file_mode())
                os.replace(entry, there)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
