"""A normal install works: a wheel built from the source tree, installed into a folder of its own, trains the demo
and evaluates it from outside the repository with the commands it installs (package data, not the source tree)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "outputs", "out", "__pycache__")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-1500:], result.stderr[-3000:])
    return result


def test_a_wheel_trains_and_evaluates_outside_the_repository(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=LEFT_OUT)  # a clean tree: no stale build/ folder can leak into the wheel
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"), str(source)])
    (wheel,) = (tmp_path / "wheels").glob("dreambooth_gs-*.whl")
    site = tmp_path / "site"
    _run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "DREAMBOOTH_GS_CACHE": str(tmp_path / "cache"),
    }
    where = _run([sys.executable, "-c", "import dreambooth_gs; print(dreambooth_gs.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(site))  # the installed copy, not the source tree
    train = [str(site / "bin" / "dreambooth-gs-train"), "--output_dir", "run", "--max_train_steps", "2"]
    _run([*train, "--train_batch_size", "2", "--report_to", "none", "--validation_prompt="], cwd=elsewhere, env=env)
    assert json.loads((elsewhere / "run" / "adapter_config.json").read_text())["method"] == "gsoft"
    evaluate = [str(site / "bin" / "dreambooth-gs-eval"), "--runs", "run", "--output_dir", "eval"]
    evaluate += ["--clip_model", "tiny-random", "--dino_model", "none", "--images_per_prompt", "1"]
    evaluate += ["--base_images", "1", "--max_prompts", "2", "--num_inference_steps", "2"]
    _run(evaluate, cwd=elsewhere, env=env)  # its default prompt sets and subjects come from the package
    rows = (elsewhere / "eval" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header, the base prompt and two contextual prompts of prompts/objects.txt
    assert _run([str(site / "bin" / "dreambooth-gs-export"), "--help"], cwd=elsewhere, env=env).stdout
