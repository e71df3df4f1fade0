"""Model families on tiny pipelines built offline from configs/: detection (folders, single files, the override and
the unsupported-family message), SDXL's conditioning, and SDXL end to end: every method trains, resume is exact,
the adapter loads into StableDiffusionXLPipeline merged and unmerged alike, and the evaluator scores it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate_clip  # noqa: E402
from dreambooth_gs import families, load_adapter  # noqa: E402
from dreambooth_gs.resources import TINY_SDXL_CONFIG_DIR  # noqa: E402
from dreambooth_gs.tiny.pipelines import build_tiny_pipeline  # noqa: E402
from train_dreambooth_gsoft import main, parse_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("tiny_cache")
FAST = ["--train_batch_size", "2", "--report_to", "none", "--validation_prompt=", "--center_crop"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory, tiny_cache) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", config_dir=TINY_SDXL_CONFIG_DIR)


@pytest.fixture(scope="module")
def tiny_sd(tiny_cache) -> Path:
    from dreambooth_gs.tiny.pipelines import default_tiny_pipeline_dir

    return build_tiny_pipeline(default_tiny_pipeline_dir())


def train_sdxl(model: Path, output_dir: Path, *extra: str) -> Path:
    flags = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir), *FAST]
    flags += ["--gsoft_nblocks", "4", "--boft_block_num", "8", "--oft_block_size", "8", "--learning_rate", "1e-2"]
    return main(parse_args([*flags, *extra]))


# -- detection ---------------------------------------------------------------------------------------------------


def test_folders_are_detected_from_their_pipeline_class(tiny_sd, tiny_sdxl, tmp_path):
    assert families.detect(str(tiny_sd)).name == "sd"
    assert families.detect(str(tiny_sdxl)).name == "sdxl"
    assert families.detect(str(tiny_sdxl), override="sdxl").name == "sdxl"
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    supported = "supported families: sd .*, sdxl .*, sd3 .*, flux "
    with pytest.raises(ValueError, match=f"is a KandinskyV22Pipeline pipeline; {supported}"):
        families.detect(str(other))
    assert families.detect(str(other), override="sd").name == "sd"  # a class we do not know: the override names it


def test_an_override_that_contradicts_the_folder_is_refused(tiny_sdxl):
    with pytest.raises(ValueError, match=r"--model_family sd does not match .*StableDiffusionXLPipeline \(sdxl\)"):
        families.detect(str(tiny_sdxl), override="sd")


@pytest.mark.parametrize(
    "key, shape, family",
    [
        ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", (4,), "sdxl"),
        ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", (4, 1024), "sd"),  # v2
        ("model.diffusion_model.output_blocks.11.0.skip_connection.weight", (4, 4), "sd"),  # v1
    ],
    ids=["sdxl", "sd2", "sd1"],
)
def test_single_files_are_detected_from_their_keys(tmp_path, key, shape, family):
    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(shape)}, str(path))
    assert families.detect(str(path)).name == family


def test_an_unsupported_model_is_one_line_from_the_trainer(tmp_path):
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError, match="KandinskyV22Pipeline"):
        train_sdxl(other, tmp_path / "out", "--max_train_steps", "1", "--class_name", "toy")
    assert not (tmp_path / "out").exists()


# -- SDXL conditioning -------------------------------------------------------------------------------------------


def test_sdxl_conditioning_and_time_ids(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    family = families.get("sdxl")
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    with torch.no_grad():
        cond = family.encode(tokenizers, encoders, ["a toy", "a dog"], families.TextSettings())
        expected, _, pooled, _ = pipe.encode_prompt(["a toy", "a dog"], do_classifier_free_guidance=False)
    assert cond.hidden_states.shape == (2, 77, 64)  # both encoders' penultimate states side by side
    torch.testing.assert_close(cond.hidden_states, expected)  # as the pipeline itself encodes
    torch.testing.assert_close(cond.pooled, pooled)
    batch = {"original_sizes": torch.tensor([[100, 80], [64, 64]]), "crop_top_lefts": torch.tensor([[3, 0], [0, 0]])}
    time_ids = family.unet_kwargs(cond, batch, 64)["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[100, 80, 3, 0, 64, 64], [64, 64, 0, 0, 64, 64]]


# -- SDXL end to end ---------------------------------------------------------------------------------------------

SDXL_METHODS = ["gsoft", "double_gsoft", "boft", "lora", "oft", "full"]


@pytest.mark.parametrize("method", SDXL_METHODS)
def test_every_method_trains_on_sdxl(tiny_sdxl, tmp_path, method):
    extra = ["--gsoft_nblocks", "2"] if method == "double_gsoft" else []
    out = train_sdxl(tiny_sdxl, tmp_path / "out", "--adapter", method, "--max_train_steps", "2", *extra)
    info = json.loads((out / "training_args.json").read_text())
    assert info["method"] == method and info["steps"] == 2 and info["base_model"] == str(tiny_sdxl)
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())


def test_sdxl_resume_is_exact(tiny_sdxl, tmp_path):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
    straight = load_file(train_sdxl(tiny_sdxl, tmp_path / "a", *common) / "adapter_model.safetensors")
    train_sdxl(tiny_sdxl, tmp_path / "b", "--max_train_steps", "2", "--checkpointing_steps", "2")
    resumed = train_sdxl(tiny_sdxl, tmp_path / "b", *common, "--resume_from_checkpoint", "latest")
    resumed = load_file(resumed / "adapter_model.safetensors")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-5


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl, tmp_path_factory) -> Path:
    flags = ["--max_train_steps", "2", "--validation_prompt", "a sks {class}", "--num_validation_images", "1"]
    return train_sdxl(tiny_sdxl, tmp_path_factory.mktemp("sdxl") / "run", *flags, "--validation_inference_steps", "2")


def test_sdxl_adapter_loads_merged_and_unmerged_alike(tiny_sdxl, sdxl_run):
    from diffusers import StableDiffusionXLPipeline

    from dreambooth_gs.adapters.sampling import generate_images

    assert (sdxl_run / "validation" / "step-000002.png").is_file()
    latents = {}
    for merge in (None, False, True):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.set_progress_bar_config(disable=True)
        if merge is not None:
            load_adapter(pipe, sdxl_run, merge=merge)  # three lines: from_pretrained, load_adapter, pipe(...)
        latents[merge] = torch.stack(generate_images(pipe, ["a sks toy"], [3], 2, 5.0, output_type="latent"))
    torch.testing.assert_close(latents[False], latents[True], rtol=1e-4, atol=1e-4)
    assert (latents[True] - latents[None]).abs().max() > 1e-4  # the adapter changes the images


def test_the_evaluator_scores_sdxl_runs(sdxl_run, tmp_path):
    flags = ["--clip_model", "tiny-random", "--dino_model", "none", "--images_per_prompt", "1", "--base_images", "1"]
    flags += ["--max_prompts", "1", "--num_inference_steps", "2", "--resolution", "64"]
    out = evaluate_clip.main(evaluate_clip.parse_args(["--runs", str(sdxl_run), "--output_dir", str(tmp_path), *flags]))
    rows = (Path(out) / "results.csv").read_text().splitlines()
    assert len(rows) >= 3 and "gsoft" in rows[1]


# -- --train_text_encoder ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_text_run(tiny_sdxl, tmp_path_factory) -> Path:
    flags = [
        "--max_train_steps",
        "2",
        "--train_text_encoder",
        "--text_encoder_lr",
        "5e-2",
        "--checkpointing_steps",
        "1",
    ]
    return train_sdxl(tiny_sdxl, tmp_path_factory.mktemp("sdxl-te") / "run", *flags)


def test_train_text_encoder_adapts_both_encoders_and_loads_into_the_pipeline(tiny_sdxl, sdxl_text_run):
    from diffusers import StableDiffusionXLPipeline

    for name in ("text_encoder", "text_encoder_2"):
        document = json.loads((sdxl_text_run / name / "adapter_config.json").read_text())
        assert document["method"] == "gsoft" and all(m.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))
                                                     for m in document["modules"])  # fmt: skip
        assert (sdxl_text_run / "checkpoint-2" / name / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[49406, 320, 1929, 49407]])
    outputs = {}
    for merge in (None, False, True):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        if merge is not None:
            load_adapter(pipe, sdxl_text_run, merge=merge)
        with torch.no_grad():
            outputs[merge] = [pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0]]
    for trained, base, unmerged in zip(outputs[True], outputs[None], outputs[False]):
        assert (trained - base).abs().max() > 1e-4  # the trained adapter changes each encoder's output
        torch.testing.assert_close(trained, unmerged, rtol=1e-4, atol=1e-5)


def test_train_text_encoder_resumes_exactly(tiny_sdxl, sdxl_text_run, tmp_path):
    import shutil

    shutil.copytree(sdxl_text_run / "checkpoint-1", tmp_path / "run" / "checkpoint-1")
    flags = ["--max_train_steps", "2", "--train_text_encoder", "--text_encoder_lr", "5e-2"]
    resumed = train_sdxl(tiny_sdxl, tmp_path / "run", *flags, "--resume_from_checkpoint", "latest")
    for name in ("", "text_encoder", "text_encoder_2"):
        straight = load_file(sdxl_text_run / name / "adapter_model.safetensors")
        again = load_file(resumed / name / "adapter_model.safetensors")
        assert max((straight[k] - again[k]).abs().max().item() for k in straight) < 1e-5, name
