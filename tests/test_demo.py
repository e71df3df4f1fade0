"""The demo (`make demo`): the MiniBooth world model shipped with the package is the one its manifest records, is
built as the recipe says, loads offline and draws; a short demo run writes its grid and scores; the restricted
tokenizer reads the world's texts as the full one does."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from dreambooth_gs.demo.program import MODEL_DIR, parse_args, run_demo

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CONFIGS = ROOT / "benchmarks" / "minibooth" / "configs" / "full"
sys.path.insert(0, str(ROOT))


def test_the_shipped_files_are_the_ones_the_manifest_records():
    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    shipped = {str(p.relative_to(MODEL_DIR)) for p in MODEL_DIR.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert shipped - {"README.md"} == set(manifest["files"]) - {"README.md"}
    for name, entry in manifest["files"].items():
        data = (MODEL_DIR / name).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], name
    assert manifest["bytes"] < 25 * 2**20 and manifest["dtype"] == "float16" and "--smoke" not in manifest["recipe"]


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_the_shipped_configs_are_the_recipes(component):
    """MiniBooth's full configs, except the text encoder's vocabulary (cut to the world's tokens), the VAE's scaling
    factor (set by pretraining from its latents' spread) and the bookkeeping keys each library adds."""
    recipe = json.loads((RECIPE_CONFIGS / f"{component}.json").read_text())
    shipped = json.loads((MODEL_DIR / component / "config.json").read_text())
    skip = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "scaling_factor"}
    for key, value in recipe.items():
        if not key.startswith("_") and key not in skip:
            assert shipped[key] == (list(value) if isinstance(value, tuple) else value), key
    if component == "text_encoder":
        assert shipped["vocab_size"] == json.loads((MODEL_DIR / "manifest.json").read_text())["tokenizer_tokens"]


def test_the_shipped_model_loads_offline_and_draws_in_float32():
    from dreambooth_gs.adapters.sampling import generate_images, load_pipeline

    pipeline = load_pipeline(str(MODEL_DIR))
    assert {m.dtype for m in (pipeline.unet, pipeline.text_encoder, pipeline.vae)} == {torch.float32}  # stored fp16
    (image,) = generate_images(pipeline, ["a sks hexagon"], [0], 2, 5.0)
    assert image.size == (64, 64)
    unknown = pipeline.tokenizer.unk_token_id
    prompts = (ROOT / "benchmarks" / "minibooth" / "prompts.txt").read_text().splitlines()
    for prompt in [p.format(token="sks", **{"class": "hexagon"}) for p in prompts if p and not p.startswith("#")]:
        ids = pipeline.tokenizer(prompt).input_ids
        assert unknown not in ids[1:-1], prompt  # every word of the world's prompts is in the cut vocabulary


def test_a_short_demo_run_writes_its_grid_and_scores(tmp_path):
    from PIL import Image

    options = ["--output_dir", str(tmp_path), "--max_train_steps", "2", "--score_images", "2"]
    document = run_demo(parse_args([*options, "--num_inference_steps", "2", "--seeds", "1", "--compare", "lora"]))
    grid = Image.open(tmp_path / "demo.png")
    assert grid.width > 4 * 128 and grid.height > 3 * 128  # 4 prompts x 1 seed; pictures, base, gsoft, lora rows
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores == json.loads(json.dumps(document))
    assert set(scores["scores"]) == {"base", "gsoft", "lora"}
    assert all(0 <= s["subject_fidelity"] <= s["subject_color"] <= 1 for s in scores["scores"].values())
    assert (tmp_path / "gsoft" / "adapter_model.safetensors").is_file()
    again = run_demo(parse_args([*options, "--num_inference_steps", "2", "--seeds", "1"]))  # reuses the run
    assert again["scores"]["gsoft"]["train_seconds"] is None


def test_a_bad_method_is_one_clear_error(capsys):
    for flag in ("--adapter", "--compare"):
        with pytest.raises(SystemExit):
            parse_args([flag, "nope"])
        assert "nope" in capsys.readouterr().err


def test_the_restricted_tokenizer_reads_its_texts_as_the_full_one(tmp_path):
    from benchmarks.minibooth.demo_model import restricted_tokenizer
    from dreambooth_gs.tiny.pipelines import build_clip_tokenizer

    full_dir = tmp_path / "full"
    full = build_clip_tokenizer(full_dir)
    texts = ["a large striped hexagon on a checkered blue background, top left", "a sks circle", "zigzag!"]
    restricted, kept = restricted_tokenizer(full_dir, texts, tmp_path / "cut")  # checks every text itself
    assert len(kept) < 700 and len(restricted) == len(kept)
    old = full("a sks circle").input_ids
    assert restricted("a sks circle").input_ids == [kept.index(i) for i in old]
    outside = restricted("photograph").input_ids  # a word outside them: still read, as its letters
    assert len(full("photograph").input_ids) == 3 and len(outside) > 3  # in smaller pieces
