"""Folders written by an earlier release still load: the adapter folder of every method and a checkpoint (with a
text-encoder adapter), written by dreambooth_gs 0.1.0 before the subpackage move (tests/data/release-0.1, see its
README), loaded and resumed by this one."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_gs import load_adapter, read_adapter_config  # noqa: E402
from dreambooth_gs.adapters.serialization import describe_adapter  # noqa: E402
from train_dreambooth_gsoft import main, parse_args  # noqa: E402

RELEASE = ROOT / "tests" / "data" / "release-0.1"
METHODS = ["gsoft", "double_gsoft", "boft", "lora", "oft", "full"]
# The flags the release folders were written with (README there), less the step count.
FLAGS = ["--checkpointing_steps", "2", "--learning_rate", "1e-2", "--gsoft_nblocks", "4", "--train_batch_size", "2"]
FLAGS += ["--report_to", "none", "--validation_prompt=", "--center_crop", "--train_text_encoder"]


def test_the_release_folders_are_there():
    assert sorted(p.name for p in RELEASE.iterdir() if p.is_dir()) == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_folder_of_the_release_loads(tiny_dir, method):
    from diffusers import StableDiffusionPipeline

    folder = RELEASE / method
    assert read_adapter_config(folder)["method"] == method

    def fresh():
        return StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)

    unmerged = fresh()
    load_adapter(unmerged.unet, folder, merge=False)
    saved = load_file(folder / "adapter_model.safetensors")
    # a full fine-tuning folder holds the projections' weights, copied in: compare them with the model's own
    if method == "full":
        loaded = {key: unmerged.unet.state_dict()[key] for key in saved}
    else:
        loaded = describe_adapter(unmerged.unet)[2]
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)  # every tensor, exactly
    pipeline = fresh()
    base = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    load_adapter(pipeline, folder)  # merged, through the pipeline path (the text encoder's too, where trained)
    changed = [k for k, v in pipeline.unet.state_dict().items() if k in base and not torch.equal(v, base[k])]
    assert changed, "the merged adapter changed no weight"


@pytest.mark.usefixtures("tiny_cache")
def test_a_checkpoint_of_the_release_resumes_exactly(tmp_path):
    """The release's checkpoint-2 (a 2-step GSOFT run with a text-encoder adapter), resumed to 4 steps, equals 4
    straight steps of this release: the optimizer, schedule, random and noise states all load."""
    resumed = tmp_path / "resumed"
    shutil.copytree(RELEASE / "gsoft", resumed)
    main(
        parse_args(
            ["--output_dir", str(resumed), *FLAGS, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
        )
    )
    straight = main(parse_args(["--output_dir", str(tmp_path / "straight"), *FLAGS, "--max_train_steps", "4"]))
    for part in ("adapter_model.safetensors", "text_encoder/adapter_model.safetensors"):
        a, b = load_file(resumed / part), load_file(straight / part)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, part
    before = load_file(RELEASE / "gsoft" / "adapter_model.safetensors")
    after = load_file(resumed / "adapter_model.safetensors")
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 1e-4  # steps 3-4 moved it: can fail
