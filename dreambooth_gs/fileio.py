"""Small file helpers every writer uses: atomic writes with ordinary permissions (one file, several files that
change together, or a whole folder), the first line of an error, and telling a full disk or a read-only folder
from other errors."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
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


def _hidden_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{tag}")


def atomic_write_files(writers: Mapping[str | os.PathLike, Callable[[str], Any]]) -> list[Path]:
    """Write several files that belong together (an adapter's weights and config): a failure leaves either all the
    old files or all the new ones, never a mix (each file alone is always whole; a reader that looks between two
    renames may see one new file beside an old one).

    Each ``writer(tmp_path)`` fills a hidden temporary sibling of its file (same file system, so renames are
    atomic); only when every one of them is written are they renamed into place, in order. Should a rename fail,
    the files already renamed get their old versions back (kept as hard links, or copies, until the end). New files
    get the permissions of any other file the process writes (``open``'s 0o666 less the umask), not a temporary
    file's 0o600. Returns the paths.
    """
    paths = [Path(p) for p in writers]
    temporaries: dict[Path, Path] = {}
    backups: dict[Path, Path] = {}
    replaced: list[Path] = []
    try:
        for path, write in zip(paths, writers.values()):
            temporaries[path] = _hidden_sibling(path, "tmp")
            write(str(temporaries[path]))
            os.chmod(temporaries[path], default_file_mode())
        for path in paths[:-1]:  # the last rename is the last step: nothing after it can fail and need its old file
            if path.exists():
                backups[path] = _hidden_sibling(path, "old")
                try:
                    os.link(path, backups[path])
                except OSError:  # a file system without hard links
                    shutil.copy2(path, backups[path])
        for path in paths:
            os.replace(temporaries[path], path)
            replaced.append(path)
    except BaseException:
        for path in reversed(replaced):
            with contextlib.suppress(OSError):
                if path in backups:
                    os.replace(backups[path], path)
                else:
                    path.unlink()
        raise
    finally:
        for leftover in (*temporaries.values(), *backups.values()):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
    return paths


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never half
    (see :func:`atomic_write_files`; the result gets ``open``'s permissions, not a temporary file's 0o600)."""
    return atomic_write_files({path: write})[0]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@contextlib.contextmanager
def created_directories(directory: str | os.PathLike) -> Iterator[Path]:
    """Create ``directory`` and its missing parents; if the block fails, remove the folders this created (those
    left empty, deepest first), so a failed write leaves no new empty folder behind."""
    directory = Path(directory)
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield directory
    except BaseException:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _remove(path: Path) -> None:
    """Remove a file, a link or a folder tree, as far as possible (what is left is a hidden sibling)."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(output: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``output`` to fill; when the block succeeds, its files get ``open``'s
    permissions and it replaces ``output`` (an old one is removed).

    When anything fails, the old ``output`` is untouched (restored, should the final rename fail after it was moved
    aside) and nothing new is left: neither the staging folder nor parent folders this created.
    """
    output = Path(output)
    with created_directories(output.parent):
        staging = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield staging
            for file in staging.rglob("*"):  # writers such as safetensors' save_file create files 0o600
                if file.is_file() and not file.is_symlink():
                    os.chmod(file, default_file_mode())
            retired = None
            if output.exists() or output.is_symlink():
                retired = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(output, retired)
            try:
                os.replace(staging, output)
            except BaseException:
                if retired is not None:
                    os.replace(retired, output)
                raise
            if retired is not None:
                _remove(retired)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# A failed write that does not come as an OSError with an errno: safetensors' Rust IoError ("... No space left on
# device (os error 28)", or the debug form "Os { code: 28, kind: StorageFull, ... }") and torch's stream writer
# (PytorchStreamWriter / inline_container's "unexpected pos", "basic_ios::clear: iostream error", "file write
# failed"), which raise RuntimeError.
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")
_TORCH_WRITE_FAILURE = ("file write failed", "unexpected pos", "basic_ios::clear", "PytorchStreamWriter failed")
WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is too large for this file system",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
_TEXTS = {"No space left on device": errno.ENOSPC, "Read-only file system": errno.EROFS}
TORCH_WRITE_FAILURE = "a write failed (the disk is probably full)"


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _errno_of(err: BaseException) -> int | None:
    """The errno of an OSError, or the one a safetensors error quotes, or the one its text names."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    text = str(err)
    found = _ERRNO_IN_TEXT.search(text)
    if found:
        return int(found.group(1) or found.group(2))
    return next((code for marker, code in _TEXTS.items() if marker in text), None)


def write_failure(err: BaseException) -> str | None:
    """Why a write failed, in a few words ("the disk is full", "the file system is read-only", ...), when ``err``
    (or anything in its chain) is a failed write of the OS, safetensors or torch; None for any other error."""
    for link in _chain(err):
        code = _errno_of(link)
        if code in WRITE_FAILURES:
            return WRITE_FAILURES[code]
        if isinstance(link, RuntimeError) and any(marker in str(link) for marker in _TORCH_WRITE_FAILURE):
            return TORCH_WRITE_FAILURE
    return None


class WriteFailure(OSError):
    """A write that failed for a reason of the machine (full disk, read-only file system, no permission), with one
    line for the user that names what was being written and what is intact; ``errno`` is the failure's, if known."""


def write_failure_error(what: str, err: BaseException, kept: str | None = None) -> WriteFailure:
    """One line: ``writing <what> failed: <reason> (<first line>)[; <kept>]`` (``err`` must be a write failure)."""
    reason = write_failure(err) or "the write failed"
    message = f"writing {what} failed: {reason} ({first_line(err, 120)})"
    failure = WriteFailure(message + (f"; {kept}" if kept else ""))
    failure.errno = next((code for link in _chain(err) if (code := _errno_of(link)) in WRITE_FAILURES), None)
    return failure


@contextlib.contextmanager
def reporting_write_failures(what: str, kept: str | None = None) -> Iterator[None]:
    """Turn a failed write in the block (full disk, read-only folder, ...) into one :class:`WriteFailure` line that
    names ``what`` was being written and what is ``kept``; any other error passes unchanged."""
    try:
        yield
    except WriteFailure:
        raise
    except Exception as err:
        if write_failure(err) is None:
            raise
        raise write_failure_error(what, err, kept) from err
