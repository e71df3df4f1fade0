"""fileio: telling a failed write (full disk, read-only folder, torch's stream writer) from other errors, and writes
that leave the old files or the new ones, never a mix, a temporary file or a new empty folder."""

import errno
import os
from pathlib import Path

import pytest
from safetensors import SafetensorError

from dreambooth_gs.fileio import (
    WriteFailure,
    atomic_write_files,
    created_directories,
    default_file_mode,
    reporting_write_failures,
    staged_directory,
    write_failure,
)

FULL, QUOTA, READ_ONLY, DENIED = (
    "the disk is full",
    "the disk quota is exceeded",
    "the file system is read-only",
    "permission denied",
)
TORCH = "a write failed (the disk is probably full)"


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as err:
            raise outer from err
    except BaseException as err:
        return err


# (id, error, write_failure's reason: None for an error that is not a failed write)
CASES = [
    ("enospc", OSError(errno.ENOSPC, "No space left on device"), FULL),
    ("edquot", OSError(errno.EDQUOT, "Disk quota exceeded"), QUOTA),
    ("erofs", OSError(errno.EROFS, "Read-only file system"), READ_ONLY),
    ("eacces", PermissionError(errno.EACCES, "Permission denied"), DENIED),
    ("efbig", OSError(errno.EFBIG, "File too large"), "the file is too large for this file system"),
    ("safetensors-enospc", SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) '
                                           'at path "/out/.tmpab12"'), FULL),
    ("safetensors-erofs", SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)"),
     READ_ONLY),
    ("safetensors-debug-form", SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                               'message: "No space left on device" })'), FULL),
    ("text-only", RuntimeError("write: No space left on device"), FULL),
    ("torch-unexpected-pos", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
     TORCH),
    ("torch-file-write", RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed "
                                      "writing file data/0: file write failed"), TORCH),
    ("chained", _chained(ValueError("saving failed"), OSError(errno.EROFS, "Read-only file system")), READ_ONLY),
    ("enoent", FileNotFoundError(errno.ENOENT, "No such file or directory"), None),
    ("safetensors-enoent", SafetensorError("Error while serializing: I/O error: No such file or directory "
                                           "(os error 2)"), None),
    ("oom", RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), None),
    ("http-code", ValueError("the hub answered with status code: 13"), None),
    ("value", ValueError("--rank must be positive"), None),
    ("key", KeyError("unet"), None),
]  # fmt: skip


@pytest.mark.parametrize(("err", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_write_failure_names_the_reason(err, reason):
    assert write_failure(err) == reason


def test_reporting_write_failures_is_one_line_that_keeps_the_errno():
    with pytest.raises(WriteFailure) as info, reporting_write_failures("the LoRA export out/x", "out/x is unchanged"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)\nmore")
    assert str(info.value) == (
        "writing the LoRA export out/x failed: the disk is full (Error while serializing: I/O error: No space left "
        "on device (os error 28)); out/x is unchanged"
    )
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.__cause__, SafetensorError)
    with pytest.raises(ValueError, match="^other$"), reporting_write_failures("x"):  # not a write: unchanged
        raise ValueError("other")


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _old_pair(folder: Path) -> dict[str, bytes]:
    (folder / "a.bin").write_bytes(b"old a")
    (folder / "b.json").write_bytes(b"old b")
    return {name: (folder / name).read_bytes() for name in ("a.bin", "b.json")}


def _write(data: bytes):
    return lambda tmp: Path(tmp).write_bytes(data)


def _enospc(tmp):
    Path(tmp).write_bytes(b"half")  # a partial temporary file, as a full disk leaves it
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_files_writes_every_file_with_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_files({tmp_path / "a.bin": _write(b"new a"), tmp_path / "b.json": _write(b"new b")})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.bin").read_bytes() == b"new a" and (tmp_path / "b.json").read_bytes() == b"new b"
    assert all((tmp_path / n).stat().st_mode & 0o777 == 0o644 for n in ("a.bin", "b.json"))
    assert _siblings(tmp_path) == ["a.bin", "b.json"]


@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new"])
def test_atomic_write_files_failing_writer_changes_nothing(tmp_path, existing):
    old = _old_pair(tmp_path) if existing else {}
    with pytest.raises(OSError, match="No space left"):
        atomic_write_files({tmp_path / "a.bin": _write(b"new a"), tmp_path / "b.json": _enospc})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # no new file, no temporary file


@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new"])
def test_atomic_write_files_failing_second_rename_restores_the_first_file(tmp_path, monkeypatch, existing):
    """The first file is already renamed into place when the second rename fails: it gets its old version back
    (or is removed if it is new), so the folder never holds new weights beside an old config."""
    old = _old_pair(tmp_path) if existing else {}
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "b.json" and Path(src).name.endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Read-only"):
        atomic_write_files({tmp_path / "a.bin": _write(b"new a"), tmp_path / "b.json": _write(b"new b")})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def test_created_directories_removes_only_what_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError), created_directories(tmp_path / "kept" / "new" / "deeper") as folder:
        assert folder.is_dir()
        raise OSError(errno.ENOSPC, "No space left on device")
    assert _siblings(tmp_path) == ["kept"] and _siblings(tmp_path / "kept") == []


def _fill(staging: Path) -> None:
    (staging / "sub").mkdir()
    (staging / "sub" / "weights.safetensors").write_bytes(b"new")
    os.chmod(staging / "sub" / "weights.safetensors", 0o600)  # as safetensors' save_file leaves its files


def test_staged_directory_publishes_with_ordinary_permissions(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    previous = os.umask(0o022)
    try:
        with staged_directory(tmp_path / "out") as staging:
            _fill(staging)
    finally:
        os.umask(previous)
    assert _siblings(tmp_path) == ["out"] and _siblings(tmp_path / "out") == ["sub"]
    assert (tmp_path / "out" / "sub" / "weights.safetensors").stat().st_mode & 0o777 == 0o644 == default_file_mode()


def _fail_on_publish(monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in Path(src).name:  # the staging folder's rename into place; moving the old output aside works
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("failure", ["in-block", "on-publish"])
@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new"])
def test_staged_directory_failure_keeps_the_old_output_and_leaves_nothing(tmp_path, monkeypatch, failure, existing):
    output = tmp_path / "new-parent" / "out"
    if existing:
        output.mkdir(parents=True)
        (output / "old.txt").write_text("old")
    if failure == "on-publish":
        _fail_on_publish(monkeypatch)
    with pytest.raises(OSError), staged_directory(output) as staging:
        _fill(staging)
        if failure == "in-block":
            raise OSError(errno.ENOSPC, "No space left on device")
    if existing:
        assert _siblings(output.parent) == ["out"] and _siblings(output) == ["old.txt"]
        assert (output / "old.txt").read_text() == "old"
    else:
        assert _siblings(tmp_path) == []  # neither the output nor the parent folder it created
