"""Crash-safe checkpoints on the tiny pipeline: a kill -9 during a save, truncated and corrupt checkpoints, resume by
name and from a renamed folder, a full disk, refused and accepted --overwrite_output_dir, the learning rate of a
resumed run, and exact resume with two processes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_gs import checkpoints  # noqa: E402
from train_dreambooth_gsoft import main, parse_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("tiny_cache")
FAST = ["--train_batch_size", "2", "--report_to", "none", "--validation_prompt=", "--center_crop"]
COMMON = ["--checkpointing_steps", "2", "--learning_rate", "1e-2", "--gsoft_nblocks", "4", *FAST]


def run(output_dir: Path, *extra: str) -> Path:
    return main(parse_args(["--output_dir", str(output_dir), *COMMON, *extra]))


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Four uninterrupted steps: what every interrupted-and-resumed run must reproduce."""
    return adapter(run(tmp_path_factory.mktemp("straight") / "out", "--max_train_steps", "4"))


@pytest.fixture
def after_two(tmp_path) -> Path:
    """An output folder holding checkpoint-2 of a run stopped there."""
    out = tmp_path / "out"
    run(out, "--max_train_steps", "2")
    return out


def test_checkpoint_has_a_manifest_and_no_pickle_is_loaded_unsafely(after_two):
    ckpt = checkpoints.read_checkpoint(after_two / "checkpoint-2")
    assert ckpt.step == 2 and ckpt.num_processes == 1
    manifest = json.loads((after_two / "checkpoint-2" / checkpoints.MANIFEST_NAME).read_text())
    assert {"adapter_model.safetensors", "optimizer.bin", "noise_generator_0.safetensors"} <= manifest["files"].keys()
    assert not list((after_two / "checkpoint-2").glob("custom_checkpoint_*.pkl"))  # loaded with weights_only=False
    assert not list(after_two.glob(".checkpoint-*"))


KILL_AT_SAVE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from dreambooth_gs import checkpoints
original = checkpoints.GeneratorState.save
def save_then_die(self, directory, rank):
    original(self, directory, rank)
    if directory.name.startswith(".checkpoint-4"):  # the optimizer and adapter are written, the manifest is not
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.GeneratorState.save = save_then_die
from train_dreambooth_gsoft import main, parse_args
main(parse_args(sys.argv[1:]))
"""


def test_kill_during_a_checkpoint_then_latest_resumes_exactly(tmp_path, straight):
    out = tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILL_AT_SAVE.format(root=str(ROOT))))
    argv = ["--output_dir", str(out), *COMMON, "--max_train_steps", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env, timeout=240)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"]
    assert [p.name for p in checkpoints.partial_saves(out)] == [".checkpoint-4.partial"]
    resumed = run(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert not checkpoints.partial_saves(out)  # the killed save's leftovers are gone
    assert max_diff(adapter(resumed), straight) < 1e-5


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: (c / "optimizer.bin").write_bytes(b""), "optimizer.bin has 0 bytes"),
        (lambda c: (c / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        (lambda c: (c / checkpoints.MANIFEST_NAME).unlink(), "has no checkpoint_manifest.json"),
        (lambda c: (c / checkpoints.MANIFEST_NAME).write_text("{"), "is corrupt"),
    ],
    ids=["truncated", "missing-file", "no-manifest", "bad-manifest"],
)
def test_latest_skips_a_broken_checkpoint_and_naming_it_is_one_line(tmp_path, straight, capsys, damage, message):
    out = tmp_path / "out"
    run(out, "--max_train_steps", "4")  # checkpoint-2 and checkpoint-4
    damage(out / "checkpoint-4")
    with pytest.raises(ValueError, match=message):
        run(out, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-4")
    capsys.readouterr()
    resumed = run(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    printed = capsys.readouterr().out
    assert "skipping checkpoint" in printed and message in printed and "at step 2" in printed
    assert max_diff(adapter(resumed), straight) < 1e-5  # from checkpoint-2, over the broken checkpoint-4


def test_resume_by_name_and_from_a_renamed_folder(after_two, tmp_path, straight):
    by_name = run(after_two, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-2")
    assert max_diff(adapter(by_name), straight) < 1e-5
    renamed = tmp_path / "kept" / "my-state"
    (after_two / "checkpoint-2").rename(renamed.parent.mkdir() or renamed)
    other = tmp_path / "other"
    resumed = run(other, "--max_train_steps", "4", "--resume_from_checkpoint", str(renamed))
    assert json.loads((resumed / "training_args.json").read_text())["steps"] == 4  # the step came from the manifest
    assert max_diff(adapter(resumed), straight) < 1e-5
    with pytest.raises(ValueError, match="no such folder, nor a checkpoint of that name"):
        run(other, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-9")


DISK_FULL_ERRORS = [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError(
        "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed"
    ),
]


@pytest.mark.parametrize("error", DISK_FULL_ERRORS, ids=["ENOSPC", "torch-stream"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(after_two, monkeypatch, error):
    import accelerate.checkpointing

    before = snapshot(after_two / "checkpoint-2")

    def full_disk(*args, **kwargs):
        raise error

    monkeypatch.setattr(accelerate.checkpointing.torch, "save", full_disk)  # accelerate's RNG-state writer
    with pytest.raises(ValueError, match="the disk is full: writing checkpoint-4 .* checkpoint-2 is intact"):
        run(after_two, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert [p.name for p in checkpoints.list_checkpoints(after_two)] == ["checkpoint-2"]
    assert not checkpoints.partial_saves(after_two)
    assert snapshot(after_two / "checkpoint-2") == before


def test_a_full_disk_at_the_final_save_is_one_line(after_two, monkeypatch):
    from dreambooth_gs import serialization

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "save_file", full_disk)
    with pytest.raises(ValueError, match="writing the final adapter .* checkpoint-2 is intact"):
        run(after_two, "--max_train_steps", "3", "--checkpointing_steps", "5", "--resume_from_checkpoint", "latest")


def test_a_refused_overwrite_changes_no_file(after_two):
    run(after_two, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")  # adds the final adapter files
    before = snapshot(after_two)
    for bad in (["--gsoft_nblocks", "7"], ["--target_modules", "to_qq"], ["--instance_data_dir", "/nonexistent"]):
        with pytest.raises(ValueError):
            run(after_two, "--max_train_steps", "2", "--overwrite_output_dir", *bad)
        assert snapshot(after_two) == before, bad
    with pytest.raises(ValueError, match="holds an earlier run"):
        run(after_two, "--max_train_steps", "2")  # neither resume nor overwrite: refused
    assert snapshot(after_two) == before


def test_overwrite_keeps_the_earlier_run_until_the_new_one_saves(after_two):
    earlier = snapshot(after_two)
    with pytest.raises(ValueError, match="non-finite"):  # dies at step 1, before its first checkpoint
        run(after_two, "--max_train_steps", "2", "--overwrite_output_dir", "--learning_rate", "1e30")
    (aside,) = after_two.glob(".earlier-run-*")
    assert snapshot(aside) == earlier  # recoverable: every file of the earlier run, unchanged
    run(after_two, "--max_train_steps", "2", "--overwrite_output_dir")
    assert not list(after_two.glob(".earlier-run-*"))  # deleted once the new run saved
    assert [p.name for p in checkpoints.list_checkpoints(after_two)] == ["checkpoint-2"]


def test_a_resumed_run_says_which_learning_rate_it_uses(after_two, capsys):
    capsys.readouterr()
    out = run(after_two, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--learning_rate", "5e-3")
    printed = capsys.readouterr().out
    assert "resuming with the checkpoint's learning rate 0.01, not the requested 0.005" in printed
    info = json.loads((out / "training_args.json").read_text())
    assert info["learning_rate"] == pytest.approx(1e-2)


def _launch_two(output_dir: Path, *flags: str) -> str:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [str(ROOT / "train_dreambooth_gsoft.py"), "--output_dir", str(output_dir), *COMMON, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_two_processes_train_and_resume_exactly(tmp_path):
    """Six straight steps on two processes; then a copy of their checkpoint-3 resumed to six gives the same adapter."""
    import shutil

    flags = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--train_batch_size", "1"]
    assert "on 2 process(es)" in _launch_two(tmp_path / "straight", *flags)
    assert json.loads((tmp_path / "straight" / "adapter_config.json").read_text())["method"] == "gsoft"
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", checkpoint)
    generators = [load_file(checkpoint / f"noise_generator_{r}.safetensors")["state"] for r in (0, 1)]
    assert not torch.equal(*generators)  # each rank's own noise is saved
    _launch_two(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    straight, resumed = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert max_diff(straight, resumed) < 1e-5
    assert max_diff(adapter(checkpoint), resumed) > 1e-4  # the post-resume steps moved the adapter: the check can fail
