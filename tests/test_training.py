"""The DreamBooth trainer end to end on the tiny random-weight pipeline: every adapter, full fine-tuning of the
projections, resume, checkpoints, validation, prior preservation, two processes, and the one-line errors for bad
input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_dreambooth_gsoft import main, parse_args  # noqa: E402

FAST = ["--train_batch_size", "2", "--report_to", "none", "--validation_prompt=", "--center_crop"]


pytestmark = pytest.mark.usefixtures("tiny_cache")


def run(output_dir: Path, *extra: str) -> Path:
    return main(parse_args(["--output_dir", str(output_dir), *FAST, *extra]))


ADAPTER_CASES = [  # (flags, saved method, a tensor-name fragment the adapter file must hold)
    (["--adapter", "gsoft"], "gsoft", "gsoft_L"),
    (["--adapter", "double_gsoft", "--gsoft_nblocks", "2"], "double_gsoft", "gsoft_out_R"),
    (["--adapter", "boft"], "boft", "gsoft_butterfly"),
    (["--adapter", "lora", "--lora_rank", "2"], "lora", "lora_A"),
    (["--adapter", "oft"], "oft", "oft_R"),
]


@pytest.mark.parametrize("flags, method, fragment", ADAPTER_CASES, ids=[c[1] for c in ADAPTER_CASES])
def test_every_adapter_trains_and_saves(tmp_path, flags, method, fragment):
    out = run(tmp_path / "out", "--max_train_steps", "2", "--learning_rate", "1e-3", *flags)
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    assert config["method"] == method
    assert any(fragment in key for key in tensors), sorted(tensors)[:3]
    trained = [t for k, t in tensors.items() if fragment in k]
    if method != "lora":  # orthogonal adapters start at exactly zero: two steps must move them
        assert max(t.abs().max().item() for t in trained) > 0
    info = json.loads((out / "training_args.json").read_text())
    assert info["steps"] == 2 and info["method"] == method


def test_resume_continues_exactly(tmp_path):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-2", "--gsoft_nblocks", "4"]
    straight = load_file(run(tmp_path / "straight", *common) / "adapter_model.safetensors")
    run(tmp_path / "resumed", *common[:1], "2", *common[2:])
    resumed = run(tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest")
    other_seed = load_file(run(tmp_path / "seed1", *common, "--seed", "1") / "adapter_model.safetensors")
    resumed = load_file(resumed / "adapter_model.safetensors")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-5
    assert max((straight[k] - other_seed[k]).abs().max().item() for k in straight) > 1e-3  # the check can fail


@pytest.fixture
def default_precision():
    """A fresh accelerate state (one precision per process; another test may have set bf16 in this worker)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def test_full_trains_only_the_projections_and_loads_back(tmp_path, monkeypatch, default_precision):
    from diffusers import UNet2DConditionModel

    from dreambooth_gs import find_targets, load_adapter
    from dreambooth_gs.train import models

    kept = {}
    add_adapter = models.add_adapter

    def keep_unet(unet, options):  # the trained UNet itself, to compare every parameter with the base model
        kept["unet"], method = add_adapter(unet, options)
        return kept["unet"], method

    monkeypatch.setattr(models, "add_adapter", keep_unet)
    out = run(tmp_path / "out", "--adapter", "full", "--max_train_steps", "2", "--learning_rate", "1e-3")
    trained, info = kept["unet"], json.loads((out / "training_args.json").read_text())
    assert info["steps"] == 2 and info["method"] == "full"
    base = UNet2DConditionModel.from_pretrained(info["base_model"], subfolder="unet")
    targets = find_targets(base, ("to_q", "to_k", "to_v", "to_out.0"))
    projections = {f"{n}.{p}": v.numel() for n, linear in targets for p, v in linear.named_parameters(recurse=False)}
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == projections.keys()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == "full" and config["num_parameters"] == sum(projections.values()) == 53_568
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors.keys() == projections.keys()
    for key, value in base.state_dict().items():
        after = trained.state_dict()[key]
        if key in projections:
            assert not torch.equal(after, value) and torch.equal(tensors[key], after), key
        else:
            assert torch.equal(after, value), key  # frozen: bit-identical to the base model

    load_adapter(base, out, merge=False)  # merge has no meaning for full: the weights are copied in
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 5, 32, generator=g))
    with torch.no_grad():
        assert torch.equal(base.eval()(*inputs).sample, trained.eval()(*inputs).sample)


def test_full_resumes_exactly(tmp_path, default_precision):
    common = ["--adapter", "full", "--checkpointing_steps", "1", "--learning_rate", "1e-3"]
    straight = load_file(run(tmp_path / "straight", *common, "--max_train_steps", "2") / "adapter_model.safetensors")
    run(tmp_path / "resumed", *common, "--max_train_steps", "1")
    checkpoint = tmp_path / "resumed" / "checkpoint-1"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["method"] == "full"
    after_one = load_file(checkpoint / "adapter_model.safetensors")
    resumed = run(tmp_path / "resumed", *common, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    resumed = load_file(resumed / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6
    assert max((after_one[k] - resumed[k]).abs().max().item() for k in straight) > 1e-4  # the check can fail


def test_checkpoint_limit_and_validation_grid(tmp_path):
    out = tmp_path / "out"
    main(
        parse_args(
            ["--output_dir", str(out), "--max_train_steps", "3", "--checkpointing_steps", "1"]
            + ["--checkpoints_total_limit", "2", "--validation_steps", "2", "--num_validation_images", "2"]
            + ["--validation_prompt", "a sks {class} in the snow", "--validation_inference_steps", "2"]
            + ["--report_to", "tensorboard", "--train_batch_size", "2"]
        )
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    grids = sorted((out / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-000002.png", "step-000003.png"]
    assert Image.open(grids[0]).size == (128, 64)  # two 64 px images side by side
    assert list((out / "logs").rglob("events.out.tfevents*"))


def test_prior_preservation_generates_then_reuses_class_images(tmp_path):
    class_dir = tmp_path / "class"
    flags = ["--with_prior_preservation", "--class_data_dir", str(class_dir), "--num_class_images", "3"]
    flags += ["--sample_batch_size", "2", "--validation_inference_steps", "2", "--max_train_steps", "1"]
    run(tmp_path / "a", *flags)
    first = {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")}
    assert len(first) == 3
    run(tmp_path / "b", *flags)
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")} == first


def _cli(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train_dreambooth_gsoft.py"), "--output_dir", str(tmp_path / "o"), *FAST]
    return subprocess.run(command + list(flags), capture_output=True, text=True, timeout=120)


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    result = _cli(tmp_path, "--instance_data_dir", "/nonexistent/photos")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("train_dreambooth_gsoft.py: error:")
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resolution", "60"], "multiple of 8"),
        (["--adapter", "dora"], "invalid choice"),
        (["--max_train_steps", "0"], "at least 1"),
    ],
)
def test_bad_flags_are_rejected_by_the_parser(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _broken_image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not an image")
    return folder


def _image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    return folder


BAD_INPUTS = [
    (lambda t: ["--instance_data_dir", str(t / "missing")], "does not exist"),
    (lambda t: ["--instance_data_dir", str((t / "empty").mkdir() or t / "empty"), "--class_name", "dog"], "is empty"),
    (lambda t: ["--instance_data_dir", str(_broken_image_dir(t)), "--class_name", "dog"], "no readable image"),
    (lambda t: ["--instance_data_dir", str(_broken_image_dir(t))], "no readable image"),  # before --class_name
    (lambda t: ["--instance_data_dir", str(_image_dir(t))], "--class_name"),
    (lambda t: ["--gsoft_nblocks", "3"], "valid block counts"),
    (lambda t: ["--target_modules", "to_qq"], "to_qq"),
    (lambda t: ["--adapter", "lora", "--target_modules", "to_qq"], "to_qq"),
    (lambda t: ["--adapter", "full", "--target_modules", "to_qq"], "no nn.Linear matches"),
    (lambda t: ["--enable_xformers_memory_efficient_attention"], "xformers"),
    (lambda t: ["--adapter", "boft", "--boft_backend", "peft"], "butterfly"),
]


@pytest.mark.parametrize("make_flags, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_raises_clear_error(tmp_path, make_flags, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run(out, "--max_train_steps", "1", *make_flags(tmp_path))
    assert not (out / "adapter_model.safetensors").exists()


def test_refuses_to_mix_runs(tmp_path):
    out = tmp_path / "out"
    run(out, "--max_train_steps", "1", "--checkpointing_steps", "1")
    saved = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        run(out, "--max_train_steps", "2")
    assert (out / "adapter_model.safetensors").read_bytes() == saved


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="non-finite at step 2.*checkpoint-1"):
        run(out, "--max_train_steps", "3", "--checkpointing_steps", "1", "--learning_rate", "1e30")
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a diverged run
    kept = load_file(out / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())


@pytest.mark.usefixtures("default_precision")  # accelerate keeps one precision per process: reset before and after
def test_bf16_mixed_precision_with_checkpointing_keeps_fp32_adapter(tmp_path):
    out = run(tmp_path / "bf16", "--max_train_steps", "2", "--mixed_precision", "bf16", "--gradient_checkpointing")
    out = out / "adapter_model.safetensors"
    tensors = load_file(out)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_unloadable_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the pipeline class of 'nobody/no-such-model'"):
        run(tmp_path / "x", "--pretrained_model_name_or_path", "nobody/no-such-model", "--class_name", "dog")


def test_a_float16_folder_trains_and_draws_in_float32(tmp_path, tiny_dir):
    """transformers 5 keeps a text encoder in the dtype it was saved in: a float16 folder (an fp16 variant, the
    demo's shipped model) must still give float32 models to a float32 run and to the sampler."""
    from diffusers import StableDiffusionPipeline

    from dreambooth_gs.adapters.sampling import load_pipeline

    folder = tmp_path / "fp16"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)
    loaded = load_pipeline(str(folder))
    assert {m.dtype for m in (loaded.unet, loaded.text_encoder, loaded.vae)} == {torch.float32}
    out = run(tmp_path / "out", "--pretrained_model_name_or_path", str(folder), "--max_train_steps", "1")
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("prior", [False, True])
def test_cached_prompts_are_encoded_before_the_denoiser_is_placed(tmp_path, monkeypatch, prior):
    """--cache_text_embeddings: the prompts are encoded (and the encoders freed) before the denoiser goes to the
    accelerator's device, so T5-XXL and the transformer are never on the GPU together; with prior preservation the
    class images need the denoiser there first."""
    from dreambooth_gs.train import models

    events = []
    precompute, place = models.TextConditioning.precompute, models.place_denoiser
    monkeypatch.setattr(models.TextConditioning, "precompute", lambda *a: (events.append("encode"), precompute(*a)))
    monkeypatch.setattr(models, "place_denoiser", lambda *a: (events.append("place"), place(*a)))
    flags = ["--max_train_steps", "1", "--cache_text_embeddings"]
    if prior:
        flags += ["--with_prior_preservation", "--num_class_images", "2", "--class_data_dir", str(tmp_path / "cls")]
    run(tmp_path / "out", *flags)
    assert events == (["encode"] if prior else ["encode", "place"])
