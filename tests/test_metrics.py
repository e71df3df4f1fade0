"""CLIP-I / CLIP-T / DINO: the formulas on hand-made embeddings, placeholder removal, the scorers (tiny random models,
local folders, clear errors for unknown names and missing weights) and the reference-embedding cache."""

from __future__ import annotations

import math
import os

import open_clip
import pytest
import torch
from PIL import Image

from dreambooth_gs.evaluate import metrics
from dreambooth_gs.evaluate.metrics import (
    TINY_RANDOM,
    ReferenceEmbeddings,
    load_clip_scorer,
    load_dino_scorer,
    mean_cosine_to,
    mean_pairwise_cosine,
    remove_token,
)

R2 = 1 / math.sqrt(2)
COSINE_CASES = [  # (generated (N, D), reference (M, D), mean cosine over all pairs)
    ([[1, 0]], [[1, 0]], 1.0),
    ([[1, 0]], [[0, 1]], 0.0),
    ([[1, 0]], [[-1, 0]], -1.0),
    ([[3, 0]], [[0.5, 0]], 1.0),  # norms do not matter
    ([[1, 1]], [[1, 0]], R2),
    ([[1, 0], [0, 1]], [[1, 0]], 0.5),
    ([[1, 0], [0, 1]], [[1, 1]], R2),
    ([[1, 0], [0, 1]], [[1, 0], [0, 1]], 0.5),  # (1 + 0 + 0 + 1) / 4
    ([[1, 0, 0]], [[1, 0, 0], [0, 1, 0], [-1, 0, 0]], 0.0),  # (1 + 0 - 1) / 3
]


@pytest.mark.parametrize("generated, reference, expected", COSINE_CASES)
def test_mean_pairwise_cosine_known_values(generated, reference, expected):
    assert mean_pairwise_cosine(torch.tensor(generated, dtype=torch.float), torch.tensor(reference).float()) == (
        pytest.approx(expected, abs=1e-6)
    )


@pytest.mark.parametrize(
    "images, text, expected",
    [([[1, 0], [0, 1]], [1, 0], 0.5), ([[2, 2], [1, 1]], [1, 1], 1.0), ([[1, 0], [-1, 0]], [0, 5], 0.0)],
)
def test_mean_cosine_to_one_text(images, text, expected):
    assert mean_cosine_to(torch.tensor(images).float(), torch.tensor(text).float()) == pytest.approx(expected)


@pytest.mark.parametrize("shapes", [((2, 3), (2, 4)), ((3,), (2, 3)), ((0, 3), (2, 3))])
def test_mean_pairwise_cosine_rejects_bad_shapes(shapes):
    with pytest.raises(ValueError, match="embedding"):
        mean_pairwise_cosine(torch.ones(shapes[0]), torch.ones(shapes[1]))


REMOVE_TOKEN_CASES = [  # (prompt, token, CLIP-T text)
    ("a sks dog in the snow", "sks", "a dog in the snow"),
    ("a photo of sks dog", "sks", "a photo of dog"),
    ("a red sks backpack", "sks", "a red backpack"),
    ("sks dog", "sks", "dog"),
    ("a  sks   stuffed animal ", "sks", "a stuffed animal"),
    ("a sks dog, sks style", "sks", "a dog, style"),
    ("a sksdog and a dog-sks", "sks", "a sksdog and a dog-sks"),  # only whole words
    ("a dog in the snow", "sks", "a dog in the snow"),
    ("a v* toy", "v*", "a toy"),  # regex characters are literal
    ("a sks toy", "", "a sks toy"),
]


@pytest.mark.parametrize("prompt, token, expected", REMOVE_TOKEN_CASES)
def test_remove_token(prompt, token, expected):
    assert remove_token(prompt, token) == expected


def _images(n: int, size: int = 40) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (40 * i % 256, 90, 200 - 30 * i)) for i in range(n)]


def test_tiny_random_clip_embeds_unit_vectors_deterministically():
    first, second = load_clip_scorer(TINY_RANDOM), load_clip_scorer(TINY_RANDOM)
    images = first.image_embeddings(_images(3))  # (3, 32)
    texts = first.text_embeddings(["a dog", "a cat in the snow"])  # (2, 32)
    assert images.shape == (3, 32) and texts.shape == (2, 32)
    torch.testing.assert_close(images.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(images, second.image_embeddings(_images(3)))
    assert not torch.allclose(texts[0], texts[1])


def test_local_dir_clip_checkpoint_loads_offline(tmp_path):
    """A model folder with open_clip_config.json + weights (what open_clip's local-dir: schema reads) needs no hub."""
    import json

    model, _, _ = metrics.tiny_random_clip(seed=3)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": metrics.TINY_RANDOM_CLIP_CONFIG}))
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    scorer = load_clip_scorer(f"local-dir:{tmp_path}", None)
    with torch.no_grad():
        expected = model.encode_image(torch.stack([scorer.preprocess(im) for im in _images(2)]))
    torch.testing.assert_close(scorer.image_embeddings(_images(2)), metrics.normalize(expected))


def test_clip_pretrained_file_is_passed_to_open_clip(tmp_path, monkeypatch):
    checkpoint = tmp_path / "open_clip_pytorch_model.bin"
    checkpoint.write_bytes(b"weights")
    calls = []

    def fake_create(name, pretrained=None, **kwargs):
        calls.append((name, pretrained))
        return metrics.tiny_random_clip()[0], None, metrics.tiny_random_clip()[1]

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    load_clip_scorer("ViT-B-32", str(checkpoint))
    assert calls == [("ViT-B-32", str(checkpoint))]


CLIP_ERRORS = [  # (model, pretrained, part of the one-line message)
    ("ViT-Q-99", "openai", "unknown CLIP model 'ViT-Q-99'"),
    ("ViT-B-32", "/nonexistent/open_clip_pytorch_model.bin", "file not found"),
    ("ViT-B-32", "no_such_tag", "known tags: openai"),
]


@pytest.mark.parametrize("model, pretrained, message", CLIP_ERRORS, ids=[c[2][:20] for c in CLIP_ERRORS])
def test_clip_errors_are_one_clear_line(model, pretrained, message):
    with pytest.raises(ValueError, match=message) as info:
        load_clip_scorer(model, pretrained)
    assert "\n" not in str(info.value)


def test_missing_clip_weights_say_how_to_provide_them():
    try:
        load_clip_scorer("ViT-B-32", "openai")
    except ValueError as err:
        assert "--clip_pretrained /path/to/open_clip_pytorch_model.bin" in str(err) and "network" in str(err)
    else:
        pytest.skip("the OpenAI ViT-B-32 weights are cached on this machine")


def test_dino_from_a_local_folder(tmp_path):
    model, processor = metrics.tiny_random_dino(seed=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    scorer, note = load_dino_scorer(str(tmp_path))
    assert note is None
    embeddings = scorer.image_embeddings(_images(3))
    assert embeddings.shape == (3, 32)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize(
    "name, note", [("none", "DINO disabled"), ("/nonexistent/dino", "DINO skipped"), (TINY_RANDOM, "RANDOM-WEIGHT")]
)
def test_dino_unavailable_or_disabled_gives_a_note(name, note):
    scorer, text = load_dino_scorer(name)
    assert note in text and "\n" not in text
    assert (scorer is not None) == (name == TINY_RANDOM)


class CountingScorer:
    key = "counting"

    def __init__(self):
        self.calls = 0

    def image_embeddings(self, images):
        self.calls += 1
        return metrics.normalize(torch.arange(len(images) * 4, dtype=torch.float).reshape(len(images), 4) + 1)


def test_reference_embeddings_are_computed_once(tmp_path):
    paths = []
    for i, image in enumerate(_images(2)):
        paths.append(tmp_path / f"real{i}.png")
        image.save(paths[-1])
    scorer = CountingScorer()
    first = ReferenceEmbeddings(tmp_path / "cache").get(scorer, paths)
    again = ReferenceEmbeddings(tmp_path / "cache")  # a new process: read from disk
    torch.testing.assert_close(again.get(scorer, paths), first)
    again.get(scorer, paths)  # from memory
    assert scorer.calls == 1 and first.shape == (2, 4)
    os.utime(paths[0], ns=(1, 1))  # a changed image is embedded again
    again.get(scorer, paths)
    assert scorer.calls == 2
    for cached in (tmp_path / "cache").glob("*.safetensors"):
        cached.write_bytes(b"damaged")
    ReferenceEmbeddings(tmp_path / "cache").get(scorer, paths)  # damaged cache entries are recomputed
    assert scorer.calls == 3


def test_references_are_embedded_again_when_the_scorer_weights_change_in_place(tmp_path):
    """A DINO folder whose weights were replaced must not be scored against the old weights' cached references."""
    folder, paths = tmp_path / "dino", []
    for i, image in enumerate(_images(2)):
        paths.append(tmp_path / f"real{i}.png")
        image.save(paths[-1])
    for seed in (1, 2):  # the same folder, other weights
        model, processor = metrics.tiny_random_dino(seed=seed)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        scorer, _ = load_dino_scorer(str(folder))
        cached = ReferenceEmbeddings(tmp_path / "cache").get(scorer, paths)  # a new process each time
        torch.testing.assert_close(cached, scorer.image_embeddings([Image.open(p) for p in paths]))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_weights_fingerprint_follows_files_not_names(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"one")
    first = metrics.weights_fingerprint(str(tmp_path))
    assert first == metrics.weights_fingerprint(f"local-dir:{tmp_path}")
    (tmp_path / "model.safetensors").write_bytes(b"three")
    assert metrics.weights_fingerprint(str(tmp_path)) != first
    assert metrics.weights_fingerprint("openai") == "" and metrics.weights_fingerprint(None) == ""
