"""Small file helpers every writer uses: atomic writes with ordinary permissions, the first line of an error, and
telling a full disk from other write failures."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error message, cut at ``limit`` characters (a sentence end when there is one)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    if len(line) > limit:
        end = line.rfind(". ", 0, limit)
        line = line[: end + 1] if end > 0 else line[:limit] + "..."
    return line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file here: 0o666 less the process umask."""
    return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never half.

    The temporary file is a hidden sibling (same file system, so the rename is atomic) and the result gets the
    permissions of any other file the process writes (``open``'s 0o666 less the umask), not a temp file's 0o600.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def is_disk_full(err: BaseException) -> bool:
    """True for a write that failed because the disk (or quota) is full: ENOSPC / EDQUOT, or torch's stream writer
    reporting a failed write (it raises RuntimeError without an errno), anywhere in the exception's chain."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or (isinstance(err, RuntimeError) and "file write failed" in text):
            return True
        err = err.__cause__ or err.__context__
    return False
