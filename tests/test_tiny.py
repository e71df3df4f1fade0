"""The tiny random-weight SD pipeline: offline CLIP tokenizer, configs, build / reuse / reload, sampling."""

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from dreambooth_gs import GSOFTConfig, inject_adapter
from dreambooth_gs.tiny.pipelines import (
    MARKER_FILE,
    REQUIRED_FILES,
    TINY_CONFIG_DIR,
    build_clip_tokenizer,
    build_tiny_pipeline,
    clip_bpe_path,
    clip_vocab_and_merges,
    default_tiny_pipeline_dir,
    is_complete_pipeline,
)

SENTENCES = [
    "a photo of sks dog",
    "A Photo of a TOY on the beach, 4k!!",
    "naïve café — über-cool émigré's 123 ;)",
    "  spaces\tand\nnewlines  ",
    "a sks toy floating in an ocean of milk, with a city in the background",
    "emoji 🐶 and CJK 犬 and numbers 3.14159",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="session")
def open_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="session")
def pipeline(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_vocabulary_equals_open_clip(open_clip_tokenizer):
    vocab, merges = clip_vocab_and_merges(clip_bpe_path())
    theirs = dict(open_clip_tokenizer.encoder)  # open_clip names the specials <start_of_text> / <end_of_text>
    assert theirs.pop("<start_of_text>") == vocab.pop("<|startoftext|>") == 49406
    assert theirs.pop("<end_of_text>") == vocab.pop("<|endoftext|>") == 49407
    assert vocab == theirs
    assert len(merges) == 49152 - 256 - 2


@pytest.mark.parametrize("sentence", SENTENCES)
def test_tokenizer_ids_equal_open_clip(tokenizer, open_clip_tokenizer, sentence):
    expected = [
        open_clip_tokenizer.sot_token_id,
        *open_clip_tokenizer.encode(sentence),
        open_clip_tokenizer.eot_token_id,
    ]
    assert tokenizer(sentence).input_ids == expected


@pytest.mark.parametrize(
    "attribute, expected",
    [("vocab_size", 49408), ("bos_token_id", 49406), ("eos_token_id", 49407), ("model_max_length", 77)],
)
def test_tokenizer_special_values(tokenizer, attribute, expected):
    assert getattr(tokenizer, attribute) == expected


def test_tokenizer_pads_and_truncates_to_77(tokenizer):
    ids = tokenizer("word " * 200, padding="max_length", truncation=True, max_length=77).input_ids
    short = tokenizer("a toy", padding="max_length", truncation=True, max_length=77).input_ids
    assert len(ids) == len(short) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert short[:4] == [49406, 320, 5988, 49407] and set(short[4:]) == {49407}


def _config(name: str) -> dict:
    return json.loads((TINY_CONFIG_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize(
    "check",
    [
        lambda: _config("text_encoder")["hidden_size"] == _config("unet")["cross_attention_dim"],
        lambda: 2 ** (len(_config("vae")["block_out_channels"]) - 1) == 8,  # SD's vae_scale_factor
        lambda: _config("vae")["latent_channels"] == _config("unet")["in_channels"] == 4,
        lambda: _config("text_encoder")["max_position_embeddings"] == 77,
        lambda: _config("scheduler")["beta_schedule"] == "scaled_linear",
    ],
    ids=["cross_attention_dim", "vae_factor_8", "latent_channels", "context_77", "sd_schedule"],
)
def test_configs_fit_together(check):
    assert check()


def test_build_writes_a_complete_safetensors_pipeline(tiny_dir):
    assert is_complete_pipeline(tiny_dir) and (tiny_dir / MARKER_FILE).is_file()
    assert not list(tiny_dir.rglob("*.bin")) and not list(tiny_dir.rglob("*.pt"))
    assert not list(tiny_dir.parent.glob(f".{tiny_dir.name}.*"))  # no staging folder left behind
    model_index = json.loads((tiny_dir / "model_index.json").read_text())
    assert model_index["safety_checker"] == [None, None] and model_index["requires_safety_checker"] is False


def test_build_reuses_a_complete_pipeline(tiny_dir):
    before = {f: (tiny_dir / f).stat().st_mtime_ns for f in REQUIRED_FILES}
    assert build_tiny_pipeline(tiny_dir, seed=0) == tiny_dir
    assert {f: (tiny_dir / f).stat().st_mtime_ns for f in REQUIRED_FILES} == before


def test_build_replaces_a_stale_pipeline(tiny_dir, tmp_path):
    stale = shutil.copytree(tiny_dir, tmp_path / "tiny-sd")
    (stale / MARKER_FILE).write_text(json.dumps({"fingerprint": "from-older-configs"}))
    (stale / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"stale")
    assert build_tiny_pipeline(stale, seed=0) == stale
    assert (stale / MARKER_FILE).read_text() == (tiny_dir / MARKER_FILE).read_text()
    for name in REQUIRED_FILES:
        assert (stale / name).read_bytes() == (tiny_dir / name).read_bytes(), name  # same seed, same bytes
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd"]  # the old copy and the staging folder are gone


def test_build_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("not a pipeline")
    with pytest.raises(ValueError, match="not a tiny pipeline built by dreambooth_gs"):
        build_tiny_pipeline(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_default_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMBOOTH_GS_CACHE", str(tmp_path))
    assert default_tiny_pipeline_dir() == tmp_path / "tiny-sd"
    monkeypatch.delenv("DREAMBOOTH_GS_CACHE")
    assert default_tiny_pipeline_dir() == Path.home() / ".cache" / "dreambooth_gs" / "tiny-sd"


def test_weights_are_deterministic_from_seed(pipeline):
    from diffusers import UNet2DConditionModel

    # The UNet is built from seed 0 first (see make_tiny_pipeline): rebuilding it the same way gives the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = {k: v for k, v in _config("unet").items() if not k.startswith("_")}
        unet = UNet2DConditionModel.from_config(config)
    for (name, expected), actual in zip(unet.state_dict().items(), pipeline.unet.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_reloaded_pipeline_generates(pipeline):
    assert pipeline.vae_scale_factor == 8 and pipeline.safety_checker is None
    images = pipeline(
        "a photo of sks toy",
        num_inference_steps=1,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 32, 32, 3)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


@pytest.mark.parametrize(
    "method, nblocks", [("gsoft", 1), ("gsoft", 2), ("gsoft", 4), ("gsoft", 8), ("double_gsoft", 8), ("boft", 8)]
)
def test_adapters_fit_every_attention_linear(pipeline, method, nblocks):
    unet = copy.deepcopy(pipeline.unet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # b < r sparsity notes for nblocks 8 on width 32
        wrapped = inject_adapter(unet, GSOFTConfig(method=method, nblocks=nblocks))
    assert (
        len(wrapped) == 4 * 8
    )  # 4 transformers (down 1, mid 1, up 2) x (attn1 + attn2) x (to_q, to_k, to_v, to_out.0)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = unet(sample, 10, torch.randn(1, 77, 32)).sample
    assert out.shape == sample.shape
