"""Subject-driven generation metrics: CLIP-I, CLIP-T and DINO, their scorers, and cached reference embeddings.

- CLIP-I: mean cosine similarity between the CLIP image embeddings of generated and real subject images, over every
  (generated, real) pair.
- CLIP-T: mean cosine similarity between each generated image's CLIP embedding and the CLIP text embedding of its
  prompt with the placeholder token removed ("a sks dog in the snow" -> "a dog in the snow").
- DINO: CLIP-I with the CLS embedding of a self-supervised DINO ViT (facebook/dino-vits16) instead of CLIP.

Scorers wrap open_clip (any model / pretrained tag, a local checkpoint file, or ``tiny-random`` for offline tests)
and a transformers DINO model. Embeddings of the real images are cached in memory and on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..fileio import atomic_write, first_line

TINY_RANDOM = "tiny-random"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
NO_DINO = ("", "none")
# A small randomly initialised open_clip CLIP for offline tests: the real CLIP tokenizer (vocab 49408, shipped with
# open_clip), one transformer layer per tower. Its scores are meaningless; it exercises the code path.
TINY_RANDOM_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_RANDOM_DINO_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
MISSING_WEIGHTS_HINT = (
    "give a local checkpoint with --clip_pretrained /path/to/open_clip_pytorch_model.bin or run once with network "
    "access (weights are cached)"
)


# -- formulas -------------------------------------------------------------------------------------------------------


def remove_token(prompt: str, token: str) -> str:
    """The prompt CLIP-T scores against: ``token`` removed as a whole word, spaces collapsed."""
    if not token:
        return " ".join(prompt.split())
    without = re.sub(rf"(?<![\w-]){re.escape(token)}(?![\w-])", " ", prompt)
    return " ".join(without.split())


def normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32."""
    embeddings = embeddings.float()
    return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_pairwise_cosine(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity over all (generated, reference) pairs: CLIP-I and DINO. Shapes (N, D) and (M, D)."""
    if generated.ndim != 2 or reference.ndim != 2 or generated.shape[1] != reference.shape[1]:
        raise ValueError(
            f"need (N, D) and (M, D) embeddings, got {tuple(generated.shape)} and {tuple(reference.shape)}"
        )
    if not len(generated) or not len(reference):
        raise ValueError("mean_pairwise_cosine needs at least one embedding on each side")
    return float((normalize(generated) @ normalize(reference).T).mean())  # (N, M) -> scalar


def mean_cosine_to(embeddings: torch.Tensor, target: torch.Tensor) -> float:
    """Mean cosine similarity of each row of ``embeddings`` (N, D) to one ``target`` (D,): CLIP-T."""
    return mean_pairwise_cosine(embeddings, target.reshape(1, -1))


# -- scorers --------------------------------------------------------------------------------------------------------


class ClipScorer:
    """Unit-norm CLIP image and text embeddings from an open_clip model (float32, on the CPU)."""

    def __init__(self, model, preprocess, tokenizer, device: str | torch.device = "cpu", batch_size: int = 32, key=""):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.key = key or "clip"

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start : start + self.batch_size]])
            chunks.append(self.model.encode_image(pixels.to(self.device)).float().cpu())  # (B, D)
        return normalize(torch.cat(chunks))  # (N, D)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)  # (N, context_length)
        return normalize(self.model.encode_text(tokens).float().cpu())  # (N, D)


class DinoScorer:
    """Unit-norm DINO CLS embeddings (the last hidden state's first token) from a transformers ViT."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", batch_size: int = 32, key=""):
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.key = key or "dino"

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
            hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state  # (B, 1 + patches, D)
            chunks.append(hidden[:, 0].float().cpu())  # (B, D): the CLS token
        return normalize(torch.cat(chunks))


def _model_files(location: str) -> tuple[Path, list[Path]] | None:
    """``(root, files)`` behind a model location: a file, a folder (``local-dir:`` too) or a hub id's cached
    snapshot; None for a name with nothing on disk (an open_clip pretrained tag such as ``openai``)."""
    path = Path(location.removeprefix("local-dir:"))
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        return path, sorted(p for p in path.rglob("*") if p.is_file())
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(location.removeprefix("hf-hub:"), local_files_only=True))
    except Exception:  # not a hub id, or not cached: nothing on disk to key on
        return None
    return snapshot, sorted(p for p in snapshot.rglob("*") if p.is_file())


def weights_fingerprint(location: str | None) -> str:
    """Names, sizes and modification times of every file behind ``location`` (hub snapshots: the resolved blobs),
    so that weights replaced in the same folder give another fingerprint."""
    found = _model_files(location) if location else None
    if found is None:
        return ""
    root, files = found
    lines = [str(root.resolve())]
    for file in files:
        stat = file.stat()  # follows the hub cache's symlinks to the blob itself
        lines.append(f"{file.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}")
    return "\n".join(lines)


def _scorer_key(kind: str, model: str, pretrained: str | None) -> str:
    """Readable, file-name-safe cache key that changes whenever the weights behind ``model`` / ``pretrained`` do."""
    detail = "\n".join([f"{model}|{pretrained}", weights_fingerprint(model), weights_fingerprint(pretrained)])
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}-{pretrained}" if pretrained else model)[-60:]
    return f"{kind}-{readable}-{hashlib.sha256(detail.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip logs its download failures on the root logger; we raise one clear error instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def _check_clip_name(model_name: str, pretrained: str | None) -> None:
    import open_clip

    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if model_name.replace("/", "-") not in known:
        raise ValueError(
            f"unknown CLIP model {model_name!r}; use an open_clip model name (e.g. ViT-B-32, ViT-L-14, ViT-H-14; "
            f"{len(known)} known), 'hf-hub:org/repo', 'local-dir:/path' or '{TINY_RANDOM}' (random weights, tests)"
        )
    if not pretrained or os.path.isfile(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
    if pretrained not in tags:
        looks_like_path = os.sep in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))
        what = "file not found" if looks_like_path else f"known tags: {', '.join(tags) or 'none'}"
        raise ValueError(
            f"--clip_pretrained {pretrained!r} is neither a checkpoint file nor a tag of {model_name} "
            f"({what}); {MISSING_WEIGHTS_HINT}"
        )


def tiny_random_clip(seed: int = 0):
    """``(model, preprocess, tokenizer)`` of a small random-weight CLIP built from TINY_RANDOM_CLIP_CONFIG."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_RANDOM_CLIP_CONFIG)
    preprocess = open_clip.image_transform(TINY_RANDOM_CLIP_CONFIG["vision_cfg"]["image_size"], is_train=False)
    return model, preprocess, open_clip.SimpleTokenizer(context_length=77)


def load_clip_scorer(
    model_name: str = "ViT-B-32", pretrained: str | None = "openai", device="cpu", batch_size: int = 32
) -> ClipScorer:
    """A :class:`ClipScorer` for an open_clip model; unknown names and missing weights raise one clear ValueError."""
    if model_name == TINY_RANDOM:
        model, preprocess, tokenizer = tiny_random_clip()
        return ClipScorer(model, preprocess, tokenizer, device, batch_size, key=f"clip-{TINY_RANDOM}")
    import open_clip

    _check_clip_name(model_name, pretrained)
    try:
        with _quiet_root_logger():
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
            tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, OSError, ValueError) as err:
        raise ValueError(
            f"cannot load CLIP {model_name} weights {pretrained!r} ({first_line(err, 160)}); {MISSING_WEIGHTS_HINT}"
        ) from err
    return ClipScorer(model, preprocess, tokenizer, device, batch_size, key=_scorer_key("clip", model_name, pretrained))


def tiny_random_dino(seed: int = 0):
    """``(model, processor)`` of a small random-weight ViT built from TINY_RANDOM_DINO_CONFIG."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(ViTConfig(**TINY_RANDOM_DINO_CONFIG), add_pooling_layer=False)
    size = TINY_RANDOM_DINO_CONFIG["image_size"]
    return model, ViTImageProcessor(size={"height": size, "width": size})


def load_dino_scorer(
    model_name: str | None = DEFAULT_DINO_MODEL, device="cpu", batch_size: int = 32
) -> tuple[DinoScorer | None, str | None]:
    """``(scorer, None)``, or ``(None, note)`` when DINO is disabled or its weights cannot be loaded (never raises)."""
    if model_name is None or model_name.strip().lower() in NO_DINO:
        return None, "DINO disabled (--dino_model none)"
    if model_name == TINY_RANDOM:
        model, processor = tiny_random_dino()
        note = "DINO is tiny-random: a small RANDOM-WEIGHT ViT for smoke runs; its scores mean nothing"
        return DinoScorer(model, processor, device, batch_size, key=f"dino-{TINY_RANDOM}"), note
    from transformers import AutoImageProcessor, AutoModel

    try:
        processor = AutoImageProcessor.from_pretrained(model_name)
        try:  # ViT checkpoints carry no pooler: ask for none instead of a randomly initialised one
            model = AutoModel.from_pretrained(model_name, add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_pretrained(model_name)
    except (OSError, ValueError, KeyError) as err:
        return None, (
            f"DINO skipped: cannot load {model_name} ({first_line(err, 160)}); run once with network access or pass "
            "--dino_model /path/to/a/local/dino-vits16 folder"
        )
    return DinoScorer(model, processor, device, batch_size, key=_scorer_key("dino", model_name, None)), None


# -- reference embeddings -------------------------------------------------------------------------------------------


class ReferenceEmbeddings:
    """Embeddings of real subject images, computed once per (scorer, image set): in memory and, with a
    ``cache_dir``, as safetensors files keyed by the scorer and the files' paths, sizes and modification times."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, torch.Tensor] = {}

    @staticmethod
    def key(scorer, paths: Sequence[str | os.PathLike]) -> str:
        digest = hashlib.sha256()
        for path in paths:
            stat = os.stat(path)
            # the path's own bytes: a name that is not UTF-8 (os.fsdecode's surrogate escapes) hashes as it is stored
            digest.update(os.fsencode(os.path.abspath(path)) + f"|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return f"{scorer.key}-{digest.hexdigest()[:16]}"

    def get(self, scorer, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """(M, D) unit-norm embeddings of the images at ``paths`` under ``scorer``."""
        from ..train.data import load_image

        key = self.key(scorer, paths)
        if key in self._memory:
            return self._memory[key]
        file = self.cache_dir / f"{key}.safetensors" if self.cache_dir is not None else None
        embeddings = None
        if file is not None and file.is_file():
            try:
                embeddings = load_file(file)["embeddings"]
            except Exception:  # a damaged cache entry is recomputed, never trusted
                embeddings = None
        if embeddings is None or len(embeddings) != len(paths):
            embeddings = scorer.image_embeddings([load_image(p) for p in paths])
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(file, lambda tmp: save_file({"embeddings": embeddings.contiguous()}, tmp))
        self._memory[key] = embeddings
        return embeddings
