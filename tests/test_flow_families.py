"""The flow-matching transformer families on tiny SD3.5 and Flux.1-dev pipelines built offline from the shipped
configs (SD3Transformer2DModel / FluxTransformer2DModel, CLIP with the vocabulary open_clip ships, a tiny T5 with
ByT5's file-free tokenizer): prompt encoding as the pipelines encode, every weighting scheme's loss, the default
targets (joint attention's add_q_proj ...), GSOFT / Double GSOFT / LoRA training, exact resume, merged == unmerged
images through the pipelines, the evaluator, --cache_text_embeddings, --cache_latents, --offload and the one-line
refusals."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate_clip  # noqa: E402
from dreambooth_gs import families, load_adapter  # noqa: E402
from dreambooth_gs.adapters.sampling import generate_images, load_pipeline  # noqa: E402
from dreambooth_gs.resources import TINY_FLUX_CONFIG_DIR, TINY_SD3_CONFIG_DIR  # noqa: E402
from dreambooth_gs.tiny.pipelines import build_tiny_pipeline  # noqa: E402
from dreambooth_gs.train import models  # noqa: E402
from dreambooth_gs.train.objectives import LossSettings, flow_matching_loss  # noqa: E402
from train_dreambooth_gsoft import main, parse_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("tiny_cache")
FAMILY_NAMES = ("sd3", "flux")
CONFIG_DIRS = {"sd3": TINY_SD3_CONFIG_DIR, "flux": TINY_FLUX_CONFIG_DIR}
FAST = ["--train_batch_size", "2", "--report_to", "none", "--validation_prompt=", "--center_crop"]
FAST += ["--max_sequence_length", "16", "--class_name", "toy", "--learning_rate", "1e-2"]
FAST += ["--gsoft_nblocks", "4", "--boft_block_num", "8", "--oft_block_size", "8"]
SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_cache) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-models")
    return {name: build_tiny_pipeline(root / name, config_dir=CONFIG_DIRS[name]) for name in FAMILY_NAMES}


def pipeline(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train(model: Path, output_dir: Path, *extra: str) -> Path:
    flags = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir), *FAST]
    return main(parse_args([*flags, *extra]))


# -- detection and prompt encoding ------------------------------------------------------------------------------


def test_folders_are_detected_and_the_denoiser_is_the_transformer(tiny):
    for name in FAMILY_NAMES:
        family = families.detect(str(tiny[name]))
        assert family.name == name and family.denoiser_name == "transformer" and family.objective == "flow"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_prompts_are_encoded_as_the_pipeline_encodes_them(tiny, name):
    pipe = pipeline(tiny[name])
    family = families.get(name)
    encoders = [getattr(pipe, n) for n in family.text_encoder_names]
    tokenizers = [getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in family.text_encoder_names]
    prompts = ["a sks toy", "a dog on the beach"]
    settings = families.TextSettings(max_sequence_length=16, context_width=64)
    with torch.no_grad():
        ours = family.encode(tokenizers, encoders, prompts, settings)
        if name == "sd3":
            hidden, _, pooled, _ = pipe.encode_prompt(
                prompts, None, None, do_classifier_free_guidance=False, **family.sampling_kwargs(16)
            )
            assert ours.hidden_states.shape == (2, 77 + 16, 64)  # CLIP's 77 (zero-padded to T5's width), then T5's
        else:
            hidden, pooled, _ = pipe.encode_prompt(prompts, None, **family.sampling_kwargs(16))
            assert ours.hidden_states.shape == (2, 16, 64)
    torch.testing.assert_close(ours.hidden_states, hidden)
    torch.testing.assert_close(ours.pooled, pooled)


# -- the objective -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_weighting_scheme_gives_a_finite_loss_with_gradients(tiny, name, scheme):
    pipe = pipeline(tiny[name])
    family = families.get(name)
    latents = torch.randn(2, pipe.transformer.config.in_channels // (4 if name == "flux" else 1), 16, 16)
    conditioning = families.Conditioning(torch.randn(2, 16, 64), torch.randn(2, 64 if name == "sd3" else 32))
    parts = SimpleNamespace(family=family, noise_scheduler=pipe.scheduler, resolution=32)
    for precondition in (False, True):
        settings = LossSettings(weighting_scheme=scheme, precondition_outputs=precondition, prior_loss_weight=1.0)
        generator = torch.Generator().manual_seed(0)
        loss = flow_matching_loss(latents, conditioning, {}, parts, pipe.transformer, generator, settings)
        pipe.transformer.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and loss > 0
        assert all(torch.isfinite(p.grad).all() for p in pipe.transformer.parameters() if p.grad is not None)


def test_the_flux_prediction_unpacks_to_the_latent_shape(tiny):
    pipe = pipeline(tiny["flux"])
    conditioning = families.Conditioning(torch.randn(3, 16, 64), torch.randn(3, 32))
    with torch.no_grad():
        out = families.get("flux").predict(pipe.transformer, torch.randn(3, 4, 16, 12), torch.tensor([1.0, 500, 999]),
                                           conditioning, {}, 32, guidance_scale=3.5)  # fmt: skip
    assert out.shape == (3, 4, 16, 12)


# -- training end to end -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("method", ["gsoft", "double_gsoft", "lora"])
def test_methods_train_and_adapt_the_joint_attention_by_default(tiny, tmp_path, name, method):
    out = train(tiny[name], tmp_path / "out", "--adapter", method, "--max_train_steps", "2")
    info = json.loads((out / "training_args.json").read_text())
    assert info["method"] == method and info["steps"] == 2
    modules = json.loads((out / "adapter_config.json").read_text())["modules"]
    suffixes = {m.split("attn.", 1)[1] for m in modules}
    assert {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= suffixes
    assert not any(".attn2." in m for m in modules)  # SD3.5's second self-attention: left out, as diffusers does
    if name == "flux":  # the single-stream blocks' q / k / v are adapted too
        assert {f"single_transformer_blocks.{i}.attn.{p}" for i in (0, 1) for p in ("to_q", "to_k", "to_v")} <= set(
            modules
        )
    if name == "sd3":  # 8 projections in block 0, 7 in the context_pre_only last block (no to_add_out)
        assert len(modules) == 15
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.usefixtures("default_precision")
@pytest.mark.parametrize("name, method", [("sd3", "boft"), ("flux", "oft")])
def test_boft_and_oft_train_with_prior_preservation_in_bf16(tiny, tmp_path, name, method):
    flags = ["--adapter", method, "--max_train_steps", "1", "--with_prior_preservation", "--num_class_images", "2"]
    flags += ["--class_data_dir", str(tmp_path / "class"), "--validation_inference_steps", "2"]
    flags += ["--mixed_precision", "bf16", "--gradient_checkpointing"]
    out = train(tiny[name], tmp_path / "out", *flags)
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == ["class_00000.png", "class_00001.png"]
    assert json.loads((out / "training_args.json").read_text())["method"] == method
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_resume_is_exact(tiny, tmp_path, name):
    common = ["--max_train_steps", "3", "--checkpointing_steps", "2"]
    straight = load_file(train(tiny[name], tmp_path / "a", *common) / "adapter_model.safetensors")
    train(tiny[name], tmp_path / "b", "--max_train_steps", "2", "--checkpointing_steps", "2")
    resumed = train(tiny[name], tmp_path / "b", *common, "--resume_from_checkpoint", "latest")
    again = load_file(resumed / "adapter_model.safetensors")
    assert straight.keys() == again.keys()
    assert max((straight[k] - again[k]).abs().max().item() for k in straight) < 1e-6


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict[str, Path]:
    """One GSOFT run per family with validation, 2 steps."""
    root = tmp_path_factory.mktemp("flow-runs")
    flags = ["--max_train_steps", "2", "--validation_prompt", "a sks {class}", "--num_validation_images", "1"]
    flags += ["--validation_inference_steps", "2", "--validation_steps", "1"]
    return {name: train(tiny[name], root / name, *flags) for name in FAMILY_NAMES}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_adapter_loads_into_the_pipeline_merged_and_unmerged_alike(tiny, runs, name):
    from PIL import Image

    grid = runs[name] / "validation" / "step-000002.png"
    assert Image.open(grid).size == (32, 32)  # validation draws at the training resolution
    latents = {}
    for merge in (None, False, True):
        pipe = pipeline(tiny[name])
        if merge is not None:
            load_adapter(pipe, runs[name], merge=merge)  # three lines: from_pretrained, load_adapter, pipe(...)
        kwargs = {"height": 32, "width": 32, "output_type": "latent"}
        latents[merge] = torch.stack(generate_images(pipe, ["a sks toy"], [3], 2, 5.0, **kwargs))
    torch.testing.assert_close(latents[False], latents[True], rtol=1e-4, atol=1e-4)
    assert (latents[True] - latents[None]).abs().max() > 1e-4  # the adapter changes the images


EVAL_FLAGS = ["--clip_model", "tiny-random", "--dino_model", "none", "--images_per_prompt", "1", "--base_images", "1"]
EVAL_FLAGS += ["--max_prompts", "1", "--num_inference_steps", "2"]


def evaluate(output_dir: Path, runs: list[Path], *flags: str) -> Path:
    args = ["--runs", *map(str, runs), "--output_dir", str(output_dir), *EVAL_FLAGS, *flags]
    return Path(evaluate_clip.main(evaluate_clip.parse_args(args)))


def test_the_evaluator_scores_flow_runs_and_keeps_the_families_apart(runs, tmp_path):
    """GSOFT on SD3 and GSOFT on Flux, one subject: a summary row (and table) per family, never one pooled row."""
    out = evaluate(tmp_path, [runs["sd3"], runs["flux"]], "--resolution", "32")
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["family"], r["kind"]) for r in rows) == sorted(
        (f, k) for f in FAMILY_NAMES for k in ("base", "prompt")
    )
    assert {r["method"] for r in rows} == {"gsoft"}
    summary = (out / "summary.md").read_text()
    for name in FAMILY_NAMES:
        params = json.loads((runs[name] / "adapter_config.json").read_text())["num_parameters"]
        assert f"| gsoft | {name} | {params:,} | 1 |" in summary and f"## gsoft, {name} (" in summary


def test_the_evaluator_records_the_resolution_flux_draws(tiny, runs, tmp_path):
    """Flux's pipeline rounds a size down to its latent patches (VAE factor 8 x 2 = 16): --resolution 72 draws 64 x 64,
    and generation.json and summary.md say 64; an SD3 size above its position embedding is refused before drawing."""
    from diffusers import AutoencoderKL

    folder = shutil.copytree(tiny["flux"], tmp_path / "flux-vae8", ignore=shutil.ignore_patterns("vae"))
    config = json.loads((tiny["flux"] / "vae" / "config.json").read_text())
    config |= {"block_out_channels": [32] * 4, "down_block_types": ["DownEncoderBlock2D"] * 4}
    AutoencoderKL.from_config(config | {"up_block_types": ["UpDecoderBlock2D"] * 4}).save_pretrained(folder / "vae")
    out = evaluate(
        tmp_path / "eval", [runs["flux"]], "--resolution", "72", "--pretrained_model_name_or_path", str(folder)
    )
    images = list((out / "images").rglob("*.png"))
    assert len(images) == 2 and {Image.open(p).size for p in images} == {(64, 64)}
    (record,) = (out / "images").rglob("generation.json")
    assert json.loads(record.read_text())["resolution"] == 64
    summary = (out / "summary.md").read_text()
    assert '"resolution": 64,' in summary and '"requested_resolution": 72' in summary
    with pytest.raises(
        ValueError, match="every run failed .*--resolution 128 is above the largest the sd3 model can take: 64"
    ):
        evaluate(tmp_path / "eval-sd3", [runs["sd3"]], "--resolution", "128")
    assert not list((tmp_path / "eval-sd3").rglob("*.png"))


def test_the_evaluator_samples_with_the_run_s_t5_length_not_the_pipeline_s(tiny, runs, tmp_path):
    """The runs trained with --max_sequence_length 16; SD3's pipeline would draw with 256 T5 tokens by default."""
    import numpy as np
    from PIL import Image

    from dreambooth_gs.evaluate.plan import BASE, plan_jobs, resolve_run

    flags = ["--clip_model", "tiny-random", "--dino_model", "none", "--images_per_prompt", "1", "--base_images", "1"]
    flags += ["--max_prompts", "1", "--num_inference_steps", "2", "--resolution", "32"]
    args = evaluate_clip.parse_args(["--runs", str(runs["sd3"]), "--output_dir", str(tmp_path), *flags])
    evaluate_clip.main(args)
    run = resolve_run(str(runs["sd3"]), {})
    (job,) = [j for j in plan_jobs(run, tmp_path / "images", 1, 1) if j.kind == BASE]
    drawn = np.asarray(Image.open(job.path), dtype=np.float32)
    assert (
        run.max_sequence_length == 16
        and json.loads((job.path.parents[1] / "generation.json").read_text())["max_sequence_length"] == 16
    )
    pipe = pipeline(tiny["sd3"])
    load_adapter(pipe, runs["sd3"], merge=True)
    direct = {}
    for length in (16, 256):
        kwargs = {"height": 32, "width": 32, "pipeline_kwargs": {"max_sequence_length": length}}
        (image,) = generate_images(pipe, [job.prompt], [job.seed], 2, args.guidance_scale, **kwargs)
        direct[length] = np.asarray(image, dtype=np.float32)
    assert np.abs(drawn - direct[16]).max() <= 1.0
    assert np.abs(drawn - direct[256]).max() > 1.0


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_exports_load_in_plain_diffusers(tiny, runs, tmp_path, name):
    """The merged folder and a full-rank LoRA (``transformer.*`` keys, read by the pipeline's own
    load_lora_weights) give the adapter's images; the kohya layout is the UNet families' and is refused."""
    from dreambooth_gs.export.formats import export_adapter

    def latents(pipe):
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"height": 32, "width": 32, "output_type": "latent"}
        return torch.stack(generate_images(pipe, ["a sks toy"], [3], 2, 5.0, **kwargs))

    adapted = pipeline(tiny[name])
    load_adapter(adapted, runs[name])
    export_adapter(runs[name], "diffusers", tmp_path / "merged")
    export_adapter(runs[name], "lora", tmp_path / "lora", rank="full")
    with_lora = pipeline(tiny[name])
    with_lora.load_lora_weights(tmp_path / "lora")
    expected = latents(adapted)
    torch.testing.assert_close(latents(pipeline(tmp_path / "merged")), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latents(with_lora), expected, rtol=1e-4, atol=1e-4)
    assert (expected - latents(pipeline(tiny[name]))).abs().max() > 1e-4
    with pytest.raises(ValueError, match="--lora_format kohya is the UNet families' layout"):
        export_adapter(runs[name], "lora", tmp_path / "kohya", rank=2, lora_format="kohya")
    assert not (tmp_path / "kohya").exists()


def test_train_text_encoder_adapts_the_clip_encoders_of_sd3_not_t5(tiny, tmp_path):
    out = train(tiny["sd3"], tmp_path / "run", "--max_train_steps", "1", "--train_text_encoder")
    assert (out / "text_encoder" / "adapter_config.json").is_file()
    assert (out / "text_encoder_2" / "adapter_config.json").is_file()
    assert not (out / "text_encoder_3").exists()
    pipe = pipeline(tiny["sd3"])
    names = load_adapter(pipe, out)
    assert any(n.endswith("add_q_proj") for n in names) and any(n.endswith("self_attn.q_proj") for n in names)


# -- memory features ---------------------------------------------------------------------------------------------


def test_cache_text_embeddings_trains_the_same_adapter_and_frees_the_encoders(tiny, tmp_path, monkeypatch):
    freed = []
    precompute = models.TextConditioning.precompute

    def spy(self, prompts):
        precompute(self, prompts)
        freed.append(all(e is None for e in self.text_encoders))

    monkeypatch.setattr(models.TextConditioning, "precompute", spy)
    common = ["--max_train_steps", "2"]
    plain = load_file(train(tiny["flux"], tmp_path / "a", *common) / "adapter_model.safetensors")
    cached = load_file(
        train(tiny["flux"], tmp_path / "b", *common, "--cache_text_embeddings") / "adapter_model.safetensors"
    )
    assert freed == [True]
    assert max((plain[k] - cached[k]).abs().max().item() for k in plain) < 1e-6


def test_cache_latents_trains_the_same_adapter(tiny, tmp_path):
    common = ["--max_train_steps", "2"]
    plain = load_file(train(tiny["sd3"], tmp_path / "a", *common) / "adapter_model.safetensors")
    cached = load_file(train(tiny["sd3"], tmp_path / "b", *common, "--cache_latents") / "adapter_model.safetensors")
    # The cache encodes one image at a time, the plain run a batch: equal up to the VAE's float rounding, which
    # Adam's first steps (lr 1e-2) carry into the adapter at ~1e-5 while the adapter itself moved by ~1e-2.
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-3, atol=2e-4)
    assert max(plain[k].abs().max().item() for k in plain if "gsoft_L" in k) > 1e-3


def test_offload_moves_the_frozen_models_only_while_they_run():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moves = []

        def to(self, device):
            self.moves.append(str(device))
            return self

    vae, encoder = Recorder(), Recorder()
    parts = SimpleNamespace(offload=True, device=torch.device("cuda"))
    with models.Components.on_device(parts, vae, None, encoder):
        assert vae.moves == ["cuda"] and encoder.moves == ["cuda"]
    assert vae.moves == ["cuda", "cpu"] and encoder.moves == ["cuda", "cpu"]
    parts.offload = False
    with models.Components.on_device(parts, vae):
        pass
    assert vae.moves == ["cuda", "cpu"]  # without --offload everything stays where it was loaded


def test_an_sd3_folder_without_t5_trains_on_zeros_in_its_place_samples_and_exports(tiny, tmp_path):
    folder = shutil.copytree(tiny["sd3"], tmp_path / "no-t5")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder_3")
    out = train(folder, tmp_path / "out", "--max_train_steps", "1")
    assert (out / "adapter_model.safetensors").is_file()
    pipe = load_pipeline(str(folder), out)  # the evaluator's loader passes the null components as None
    assert pipe.text_encoder_3 is None
    (image,) = generate_images(pipe, ["a sks toy"], [0], 2, 5.0, height=32, width=32, pipeline_kwargs={})
    assert image.size == (32, 32)
    from dreambooth_gs.export.formats import export_adapter  # the exporter's loader passes them as None too

    export_adapter(out, "diffusers", tmp_path / "merged")
    from diffusers import DiffusionPipeline  # it saves T5 as null too: diffusers loads it passing None, as for SD3

    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged", text_encoder_3=None, tokenizer_3=None)
    merged.set_progress_bar_config(disable=True)
    kwargs = {"height": 32, "width": 32, "output_type": "latent"}
    (expected,) = generate_images(pipe, ["a sks toy"], [0], 2, 5.0, **kwargs)
    (exported,) = generate_images(merged, ["a sks toy"], [0], 2, 5.0, **kwargs)
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-4)


# -- one-line refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, flags, message",
    [
        ("flux", ["--snr_gamma", "5"], "--snr_gamma 5.0 applies to the DDPM objective"),
        ("sd3", ["--tokenizer_max_length", "32"], "--tokenizer_max_length and --text_encoder_use_attention_mask"),
        ("sd3", ["--gsoft_nblocks", "3"], "attn.to_q"),
        ("flux", ["--offload", "--train_text_encoder"], "--offload moves the text encoders"),
        (
            "sd3",
            ["--model_family", "flux"],
            "--model_family flux does not match .* a StableDiffusion3Pipeline \\(sd3\\)",
        ),
        ("sd3", ["--resolution", "72"], "above the largest the sd3 model can take: 64 \\(pos_embed_max_size 16 x "),
    ],
    ids=["snr", "clip-length", "blocks", "offload-te", "family-mismatch", "sd3-too-large"],
)
def test_bad_flags_are_one_line_and_write_nothing(tiny, tmp_path, capfd, name, flags, message):
    with pytest.raises(ValueError, match=message) as info:
        train(tiny[name], tmp_path / "out", "--max_train_steps", "1", *flags)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert "LOAD REPORT" not in capfd.readouterr().err  # no model was loaded as another family's


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_folder_without_its_transformer_is_named_before_anything_loads(tiny, tmp_path, name):
    folder = shutil.copytree(tiny[name], tmp_path / "model", ignore=shutil.ignore_patterns("transformer"))
    message = f"{folder} is not a complete .* folder: its subfolder transformer/ is missing"
    with pytest.raises(ValueError, match=message):
        train(folder, tmp_path / "out", "--max_train_steps", "1")
    with pytest.raises(ValueError, match=message):
        load_pipeline(str(folder))  # the evaluator's loader
    assert not (tmp_path / "out").exists()


def test_resolutions_must_fit_the_vae_and_the_latent_patches():
    real_vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512]))  # factor 8
    assert [families.get(n).resolution_multiple(None, real_vae) for n in ("sd", "sdxl", "sd3", "flux")] == [
        8,
        8,
        16,
        16,
    ]


def test_flow_flags_are_refused_on_the_unet_families(tmp_path):
    with pytest.raises(ValueError, match="--weighting_scheme applies to the flow-matching families"):
        main(
            parse_args(["--output_dir", str(tmp_path / "out"), "--weighting_scheme", "mode", "--max_train_steps", "1"])
        )
    assert not (tmp_path / "out").exists()
