"""diffusers' trainer flags on the tiny pipeline, each changing what it should: Min-SNR weighting, offset noise,
--scale_lr, --rank, 8-bit Adam, --push_to_hub, precomputed text embeddings, the tokenizer length and attention
mask; and mixed precision on a CPU (fp16 refused before anything is written, bf16 end to end with validation)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_gs.train import loop as training  # noqa: E402
from dreambooth_gs.train import models, objectives  # noqa: E402
from train_dreambooth_gsoft import main, parse_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("tiny_cache")
FAST = ["--train_batch_size", "2", "--report_to", "none", "--validation_prompt=", "--center_crop"]
TWO_STEPS = ["--max_train_steps", "2", "--learning_rate", "1e-2", *FAST]


def run(output_dir: Path, *extra: str) -> Path:
    return main(parse_args(["--output_dir", str(output_dir), *TWO_STEPS, *extra]))


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Two steps with no extra flag: the run every flag is compared against (same seed)."""
    return adapter(run(tmp_path_factory.mktemp("plain") / "out"))


# -- the loss ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    timesteps = torch.tensor([0, 10, 300, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    weights = objectives.min_snr_weights(scheduler, timesteps, gamma=5.0)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=0)
    assert weights[0] < weights[-1] or prediction_type == "v_prediction"  # low-noise steps are down-weighted


def test_noise_offset_shifts_each_channel_by_one_draw():
    latents = torch.zeros(2, 4, 8, 8)
    plain_noise = objectives.sample_noise(latents, torch.Generator().manual_seed(0))
    offset = objectives.sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=0.1)
    shift = offset - plain_noise  # (2, 4, 8, 8), constant over (h, w)
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift), rtol=0, atol=1e-6)
    generator = torch.Generator().manual_seed(0)
    torch.randn(latents.shape, generator=generator)
    expected = 0.1 * torch.randn((2, 4, 1, 1), generator=generator)[..., 0, 0]
    torch.testing.assert_close(shift[..., 0, 0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "flags",
    [["--snr_gamma", "1.0"], ["--noise_offset", "0.5"], ["--text_encoder_use_attention_mask"]],
    ids=["snr_gamma", "noise_offset", "attention_mask"],
)
def test_each_loss_flag_changes_the_trained_adapter(tmp_path, plain, flags):
    assert max_diff(adapter(run(tmp_path / "out", *flags)), plain) > 1e-4


def test_snr_gamma_with_prior_preservation_trains(tmp_path):
    flags = ["--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"), "--num_class_images", "2"]
    out = run(tmp_path / "out", *flags, "--snr_gamma", "5", "--validation_inference_steps", "2")
    assert all(torch.isfinite(t).all() for t in adapter(out).values())


# -- optimizer and learning rate ---------------------------------------------------------------------------------


def test_scale_lr_multiplies_by_the_samples_per_step(tmp_path):
    out = run(tmp_path / "out", "--scale_lr", "--gradient_accumulation_steps", "2")
    info = json.loads((out / "training_args.json").read_text())
    assert info["learning_rate"] == pytest.approx(1e-2 * 2 * 2)  # batch 2 x accumulation 2 x 1 process


def test_gradient_accumulation_computes_the_blocks_once_per_optimizer_step(tmp_path, monkeypatch):
    # counted: the orthogonal blocks' solves under autograd (training forwards), with the blocks reused across the
    # micro-steps of each optimizer step and, for comparison, computed in every micro-step as before
    from dreambooth_gs.gs import functional as gsf

    solves = []
    real = gsf.orthogonal_blocks_at_strength
    monkeypatch.setattr(
        gsf, "orthogonal_blocks_at_strength", lambda *a: solves.append(torch.is_grad_enabled()) or real(*a)
    )
    reused = adapter(run(tmp_path / "reused", "--gradient_accumulation_steps", "2"))
    reused_solves = sum(solves)
    solves.clear()
    monkeypatch.setattr(training, "reuses_blocks_per_step", lambda options, accelerator: False)
    fresh = adapter(run(tmp_path / "fresh", "--gradient_accumulation_steps", "2"))
    assert reused_solves > 0 and sum(solves) == 2 * reused_solves
    assert max_diff(reused, fresh) < 1e-5  # the same gradients, summed in another order


@pytest.mark.parametrize("flag", ["--rank", "--lora_rank"])
def test_rank_sets_the_lora_rank(tmp_path, flag):
    tensors = adapter(run(tmp_path / "out", "--adapter", "lora", flag, "3"))
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {3}


def test_8bit_adam_is_refused_on_a_cpu_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="--use_8bit_adam needs a CUDA GPU"):
        run(tmp_path / "out", "--use_8bit_adam")
    assert not (tmp_path / "out").exists()


def test_8bit_adam_uses_bitsandbytes_adamw8bit(monkeypatch):
    class AdamW8bit(torch.optim.AdamW):
        pass

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    options = parse_args(["--use_8bit_adam"])
    optimizer = training.make_optimizer(options, [torch.nn.Parameter(torch.zeros(2))], 1e-4)
    assert type(optimizer) is AdamW8bit and optimizer.defaults["lr"] == 1e-4


# -- text conditioning -------------------------------------------------------------------------------------------


def test_precomputed_text_embeddings_train_the_same_adapter_and_free_the_encoder(tmp_path, plain, monkeypatch):
    kept = {}
    precompute = models.TextConditioning.precompute

    def keep(self, prompts):
        precompute(self, prompts)
        kept["text"] = self

    monkeypatch.setattr(models.TextConditioning, "precompute", keep)
    flags = ["--pre_compute_text_embeddings", "--validation_prompt", "a sks {class}", "--num_validation_images", "1"]
    out = run(tmp_path / "out", *flags, "--validation_inference_steps", "2")
    assert kept["text"].encoder_freed
    assert max_diff(adapter(out), plain) < 1e-6
    assert (out / "validation" / "step-000002.png").is_file()  # validation runs on the precomputed prompts


def test_tokenizer_max_length(tmp_path):
    assert adapter(run(tmp_path / "short", "--tokenizer_max_length", "16"))
    with pytest.raises(ValueError, match="exceeds the text encoder's 77 positions"):
        run(tmp_path / "long", "--tokenizer_max_length", "100")
    assert not (tmp_path / "long").exists()


# -- Hub ---------------------------------------------------------------------------------------------------------


def test_push_to_hub_offline_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="--push_to_hub: cannot reach the Hub with this token .* Nothing was written"):
        run(tmp_path / "out", "--push_to_hub", "--hub_model_id", "me/dog")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_uploads_the_adapter_with_a_model_card(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token=None: {"name": "me"})
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.update(kw))
    out = run(tmp_path / "out", "--push_to_hub", "--hub_model_id", "me/dog", "--checkpointing_steps", "1")
    assert calls["repo_id"] == "me/dog" and Path(calls["folder_path"]) == out
    assert "checkpoint-*" in calls["ignore_patterns"]
    card = (out / "README.md").read_text()
    base = json.loads((out / "adapter_config.json").read_text())["base_model"]
    assert card.startswith("---\n") and f"base_model: {base}" in card and "load_adapter(pipe" in card


# -- mixed precision on a CPU ------------------------------------------------------------------------------------


def test_fp16_on_a_cpu_is_refused_before_anything_is_written(tmp_path, default_precision):
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU .* bf16"):
        run(tmp_path / "out", "--mixed_precision", "fp16")
    assert not (tmp_path / "out").exists()


def test_bf16_on_a_cpu_trains_validates_and_saves(tmp_path, default_precision):
    flags = ["--mixed_precision", "bf16", "--validation_prompt", "a sks {class}", "--num_validation_images", "1"]
    out = run(tmp_path / "out", *flags, "--validation_inference_steps", "2", "--validation_steps", "1")
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["step-000001.png", "step-000002.png"]
    assert {t.dtype for t in adapter(out).values()} == {torch.float32}


def test_a_refused_run_creates_no_hub_repository(tmp_path, monkeypatch):
    import huggingface_hub

    created = []
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token=None: {"name": "me"})
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: created.append(repo_id))
    with pytest.raises(ValueError, match="valid block counts"):
        run(tmp_path / "out", "--push_to_hub", "--gsoft_nblocks", "3")
    assert created == [] and not (tmp_path / "out").exists()


# -- --train_text_encoder on SD ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("te") / "out", "--train_text_encoder", "--text_encoder_lr", "5e-2")


def test_train_text_encoder_refuses_precomputed_embeddings():
    with pytest.raises(SystemExit):
        parse_args(["--train_text_encoder", "--pre_compute_text_embeddings"])


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_text_encoder_adapters_export_to_lora_exactly(text_run, tmp_path, layout):
    """load_adapter and diffusers' load_lora_weights of the full-rank export give the same text encoder."""
    from diffusers import StableDiffusionPipeline

    from dreambooth_gs import export_adapter, load_adapter

    base = json.loads((text_run / "adapter_config.json").read_text())["base_model"]
    export_adapter(text_run, "lora", tmp_path / "lora", rank="full", lora_format=layout)
    ids = torch.tensor([[49406, 320, 1929, 49407]])
    outputs = []
    for load in (lambda p: None, lambda p: load_adapter(p, text_run), lambda p: p.load_lora_weights(tmp_path / "lora")):
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
        load(pipe)
        with torch.no_grad():
            outputs.append(pipe.text_encoder(ids)[0])
    base_out, merged, lora = outputs
    assert (merged - base_out).abs().max() > 1e-4
    torch.testing.assert_close(lora, merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "flags", "expected"),
    [("sd", [], ()), ("flux", [], ()), ("sd", ["--gsoft_weight_side_modules", "to_out.0"], ("to_out.0",)),
     ("sd", ["--gsoft_weight_side_modules", "none"], ()),
     ("flux", ["--gsoft_weight_side_modules", "attn.to_out.0", "attn.to_add_out"],
      ("attn.to_out.0", "attn.to_add_out"))],
)  # fmt: skip
@pytest.mark.parametrize("adapter", ["gsoft", "double_gsoft", "boft"])
def test_weight_side_modules_are_opt_in(tmp_path, family, flags, expected, adapter):
    """--gsoft_weight_side_modules (a memory option: it costs step time on small token counts) reaches the
    adapter's config; unset or 'none', no module is forced to the weight side."""
    from dreambooth_gs import families
    from dreambooth_gs.methods import registry as methods

    argv = ["--pretrained_model_name_or_path", "x", "--instance_data_dir", str(tmp_path), "--instance_prompt", "a sks",
            "--output_dir", str(tmp_path / "out"), "--adapter", adapter, *flags]  # fmt: skip
    options = models.family_options(parse_args(argv), families.get(family))
    _, config = methods.for_options(options)
    assert config.weight_side_modules == expected
