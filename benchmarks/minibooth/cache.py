"""Where MiniBooth keeps what it builds, and how a finished stage is recognised and reused.

A stage (the VAE, the Stable Diffusion pipeline, the CLIP) lives in ``<cache root>/<name>-<fingerprint>/``; the
fingerprint hashes every setting and config file the stage depends on, so other settings get another folder and
never a stale one. A stage is built in a temporary folder, its marker file written last, and renamed into place:
a folder with a matching marker is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

MARKER_FILE = "minibooth_stage.json"


def cache_root() -> Path:
    """``$DREAMBOOTH_GS_CACHE/minibooth``, else ``~/.cache/dreambooth_gs/minibooth``."""
    root = os.environ.get("DREAMBOOTH_GS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dreambooth_gs") / "minibooth"


def fingerprint(parts: dict) -> str:
    """16 hex digits of the sha256 of ``parts`` as sorted JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_marker(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / MARKER_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def is_complete(directory: str | os.PathLike, stage_fingerprint: str) -> bool:
    marker = read_marker(directory)
    return marker is not None and marker.get("fingerprint") == stage_fingerprint


def build_stage(directory: Path, stage_fingerprint: str, settings: dict, build: Callable[[Path], dict]) -> dict:
    """Return the marker of ``directory`` when it is complete; else run ``build(staging_folder)`` (which writes the
    stage's files and returns facts to record, e.g. timings), write the marker and move the folder into place."""
    marker = read_marker(directory)
    if marker is not None and marker.get("fingerprint") == stage_fingerprint:
        return marker
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        start = time.perf_counter()
        facts = build(staging)
        marker = {
            "fingerprint": stage_fingerprint,
            "settings": settings,
            "seconds": round(time.perf_counter() - start, 1),
            **facts,
        }
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2, default=str) + "\n")
        if directory.exists():  # an interrupted or foreign folder of the same name: replaced, never mixed
            retired = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(directory, retired)
            shutil.rmtree(retired, ignore_errors=True)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return marker


def file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
