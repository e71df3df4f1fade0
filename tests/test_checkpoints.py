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

from dreambooth_gs.train import checkpoints  # noqa: E402
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
from dreambooth_gs.train import checkpoints
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
    (out / "training_args.json").unlink()  # killed before its final save completed (else there is nothing to resume)
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
    # what torch.save raised at three of four disk sizes in the attack (issue 30): no errno, no "space" in the text
    RuntimeError("basic_ios::clear: iostream error"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1012"),
]


@pytest.mark.parametrize("error", DISK_FULL_ERRORS, ids=["ENOSPC", "torch-stream", "iostream", "unexpected-pos"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(after_two, monkeypatch, error):
    import accelerate.checkpointing

    before = snapshot(after_two / "checkpoint-2")

    def full_disk(*args, **kwargs):
        raise error

    monkeypatch.setattr(accelerate.checkpointing.torch, "save", full_disk)  # accelerate's RNG-state writer
    with pytest.raises(OSError, match="writing checkpoint-4 in .* failed: .*; checkpoint-2 is intact.*resume"):
        run(after_two, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert [p.name for p in checkpoints.list_checkpoints(after_two)] == ["checkpoint-2"]
    assert not checkpoints.partial_saves(after_two)
    assert snapshot(after_two / "checkpoint-2") == before


def test_a_read_only_folder_during_a_checkpoint_is_one_line_from_the_command(after_two, monkeypatch, capsys):
    from dreambooth_gs.adapters import serialization
    from train_dreambooth_gsoft import run as command

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(serialization, "save_file", read_only)
    before = snapshot(after_two)
    argv = ["--output_dir", str(after_two), *COMMON, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        command(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("train_dreambooth_gsoft.py: error: writing checkpoint-4")
    assert "the file system is read-only" in lines[-1] and "checkpoint-2 is intact" in lines[-1]
    assert "Traceback" not in "\n".join(lines)
    assert snapshot(after_two) == before


def test_a_full_disk_at_the_final_save_is_one_line(after_two, monkeypatch):
    from dreambooth_gs.adapters import serialization

    before = snapshot(after_two)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "save_file", full_disk)
    with pytest.raises(OSError, match="writing the final adapter .* checkpoint-2 is intact"):
        run(after_two, "--max_train_steps", "3", "--checkpointing_steps", "5", "--resume_from_checkpoint", "latest")
    assert snapshot(after_two) == before  # the earlier final adapter and its record, untouched


@pytest.mark.parametrize("failing", ["adapter", "record"])
def test_a_failed_final_save_without_checkpoints_leaves_no_half_adapter(tmp_path, monkeypatch, failing):
    from dreambooth_gs.adapters import serialization
    from dreambooth_gs.train import run_outputs

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(
        *((serialization, "save_file") if failing == "adapter" else (run_outputs, "write_run_info")), full_disk
    )
    out = tmp_path / "out"
    with pytest.raises(OSError, match="writing the final adapter .* no checkpoint was written yet") as raised:
        run(out, "--max_train_steps", "2", "--checkpointing_steps", "5")
    assert "resume" not in str(raised.value)  # nothing to resume from: the advice is to run again
    assert not (out / "adapter_model.safetensors").exists() and not (out / "training_args.json").exists()
    assert not list(out.glob(".final-*"))


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    """Three steps with two batches an epoch (issue 30: a resume trained a 4th step and rewrote the adapter)."""
    out = tmp_path / "out"
    run(out, "--max_train_steps", "3", "--checkpointing_steps", "3")
    finished = snapshot(out)
    for _ in range(2):
        capsys.readouterr()
        run(out, "--max_train_steps", "3", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
        printed = capsys.readouterr()
        assert "already holds the final adapter of this run (3 steps" in printed.out
        assert "training" not in printed.err  # no progress bar: nothing was trained
        assert snapshot(out) == finished


def test_a_resume_after_a_killed_final_save_writes_the_adapter_without_training(tmp_path):
    out = tmp_path / "out"
    run(out, "--max_train_steps", "3", "--checkpointing_steps", "3")
    finished = adapter(out)
    (out / "training_args.json").unlink()  # a kill between the final save's renames: the record goes last
    (out / "adapter_model.safetensors").unlink()
    run(out, "--max_train_steps", "3", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")
    assert max_diff(adapter(out), finished) == 0.0  # no 4th step (safetensors' header order varies between saves)
    assert json.loads((out / "training_args.json").read_text())["steps"] == 3


def test_resume_refuses_a_checkpoint_past_the_budget_and_an_adapter_without_checkpoints(tmp_path):
    out = tmp_path / "out"
    run(out, "--max_train_steps", "2", "--checkpointing_steps", "5")  # an adapter, no checkpoint
    before = snapshot(out)
    with pytest.raises(ValueError, match="holds a saved adapter but no complete checkpoint"):
        run(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert snapshot(out) == before
    other = tmp_path / "other"
    run(other, "--max_train_steps", "4")  # checkpoint-2, checkpoint-4
    (other / "training_args.json").unlink()  # not finished (a finished run says so and changes nothing)
    with pytest.raises(ValueError, match="checkpoint-4 is at step 4, past --max_train_steps 3"):
        run(other, "--max_train_steps", "3", "--resume_from_checkpoint", "checkpoint-4")


KILL_AFTER_SET_ASIDE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from dreambooth_gs.train import loop as training
original = training.set_aside
def set_aside_then_die(output_dir, files):
    moved = original(output_dir, files)
    os.kill(os.getpid(), signal.SIGKILL)
training.set_aside = set_aside_then_die
from train_dreambooth_gsoft import main, parse_args
main(parse_args(sys.argv[1:]))
"""


def test_a_killed_overwrite_gives_the_earlier_run_back(after_two, tmp_path, capsys):
    run(after_two, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")  # its final adapter too
    earlier = snapshot(after_two)
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILL_AFTER_SET_ASIDE.format(root=str(ROOT))))
    argv = ["--output_dir", str(after_two), *COMMON, "--max_train_steps", "2", "--overwrite_output_dir"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env, timeout=240)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (aside,) = after_two.glob(".earlier-run-*")
    assert snapshot(aside) == earlier and not checkpoints.list_checkpoints(after_two)
    capsys.readouterr()
    run(after_two, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    printed = capsys.readouterr().out
    assert f"restored the earlier run from {aside.name}" in printed
    assert "already holds the final adapter" in printed
    assert snapshot(after_two) == earlier  # every file back, byte-identical; nothing trained over it


def test_a_set_aside_run_that_cannot_go_back_is_kept_and_named(tmp_path):
    from dreambooth_gs.train import run_folder

    out = tmp_path / "out"
    aside = out / ".earlier-run-20260101-000000"
    (aside / "logs" / "a").mkdir(parents=True)
    (aside / "logs" / "a" / "events.1").write_text("old")
    (aside / "adapter_config.json").write_text("old config")
    (out / "logs" / "b").mkdir(parents=True)
    (out / "logs" / "b" / "events.2").write_text("new")  # the interrupted run's own logs merge with the earlier ones
    said = run_folder.restore_set_aside(out, "logs")
    assert said and said[0].startswith("restored the earlier run")
    assert snapshot(out) == {
        "adapter_config.json": b"old config",
        "logs/a/events.1": b"old",
        "logs/b/events.2": b"new",
    }
    (aside / "adapter_config.json").parent.mkdir(parents=True)
    (aside / "adapter_config.json").write_text("older config")  # would overwrite a file: kept and named
    (said,) = run_folder.restore_set_aside(out, "logs")
    assert said.startswith(f"kept the earlier run set aside in {aside}") and "adapter_config.json" in said
    assert (aside / "adapter_config.json").read_text() == "older config"
    assert (out / "adapter_config.json").read_text() == "old config"


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


def test_a_compiled_denoiser_saves_and_loads_under_its_own_names(tmp_path, make_unet):
    """``accelerate launch --dynamo_backend inductor`` prepares a ``torch.compile`` wrapper: checkpoints and the final
    adapter must still name the UNet's layers (no ``_orig_mod.`` prefix), and resume must find them."""
    from accelerate import Accelerator

    from dreambooth_gs import GSOFTConfig, inject_adapter
    from dreambooth_gs.adapters.serialization import load_adapter_weights, save_adapter

    unet = make_unet()
    inject_adapter(unet, GSOFTConfig(nblocks=4))
    compiled = torch.compile(unet)  # what the dynamo backend prepares; nothing compiles until it is called
    bare = checkpoints.bare_model(Accelerator(cpu=True), compiled)
    assert bare is unet
    save_adapter(bare, tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys and not any("_orig_mod" in key for key in keys)
    load_adapter_weights(checkpoints.bare_model(Accelerator(cpu=True), compiled), tmp_path)
