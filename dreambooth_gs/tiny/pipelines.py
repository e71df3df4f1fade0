"""Tiny pipelines with random weights, built offline from the shipped configs (resources/tiny_sd/ for SD,
tiny_sdxl/ for SDXL, tiny_sd3/ for SD3 / SD3.5, tiny_flux/ for Flux.1), for tests and CPU demos.

A config folder holds ``pipeline.json`` (the pipeline class) and one JSON per component, named as the pipeline
names it (``unet.json`` or ``transformer.json``, ``vae.json``, ``text_encoder[_2|_3].json``, ``scheduler.json``),
each with the ``_class_name`` of a diffusers or transformers class. The CLIP tokenizer is the real SD / SDXL / SD3 /
Flux one: its BPE vocabulary ships inside open_clip; a T5 encoder gets ByT5's tokenizer, which needs no file. So
nothing is downloaded. Weights are never committed: the pipeline is built at run time into a cache folder.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from ..resources import TINY_SD_CONFIG_DIR as TINY_CONFIG_DIR

CLIP_CONTEXT_LENGTH = 77
# CLIP's BPE file: a header line, then merges; CLIP keeps the first 49152 - 256 - 2 of them so that
# 256 bytes + 256 end-of-word bytes + merges + 2 special tokens = 49408 tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Bump when the build changes in a way that makes an old cached pipeline stale.
BUILD_FORMAT = 1
MARKER_FILE = "dreambooth_gs_tiny.json"
PIPELINE_FILE = "pipeline.json"  # in a config folder: {"_class_name": "StableDiffusion3Pipeline", ...}
# Components in the order their weights are seeded (seed, seed + 1, ...); a folder has a subset of them.
MODEL_NAMES = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
REQUIRED_FILES = (  # what every saved SD pipeline holds (other families: see required_files)
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)


def default_tiny_pipeline_dir() -> Path:
    """Cache folder for the tiny pipeline: ``$DREAMBOOTH_GS_CACHE/tiny-sd`` or ``~/.cache/dreambooth_gs/tiny-sd``."""
    root = os.environ.get("DREAMBOOTH_GS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dreambooth_gs") / "tiny-sd"


def clip_bpe_path() -> Path:
    """The CLIP BPE vocabulary file that open_clip ships (``bpe_simple_vocab_16e6.txt.gz``)."""
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


def clip_vocab_and_merges(bpe_path: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """Token -> id map and merge list of the CLIP tokenizer, built exactly as CLIP / open_clip build them."""
    from open_clip.tokenizer import bytes_to_unicode

    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]  # line 0 is a header
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += list(CLIP_SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, len(vocab)
    return vocab, merges


def write_clip_tokenizer_files(directory: str | os.PathLike, bpe_path: str | os.PathLike | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (Hugging Face CLIP format) into ``directory``; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_path if bpe_path is not None else clip_bpe_path())
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def build_clip_tokenizer(directory: str | os.PathLike, bpe_path: str | os.PathLike | None = None):
    """A ``transformers.CLIPTokenizer`` equal to SD's, built offline from open_clip's BPE file via ``directory``."""
    from transformers import CLIPTokenizer

    # from_pretrained reads vocab.json / merges.txt in every transformers version; keyword file arguments to the
    # constructor are silently ignored by the tokenizers-backed CLIPTokenizer of transformers 5.
    write_clip_tokenizer_files(directory, bpe_path)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=CLIP_CONTEXT_LENGTH)


def _read_config(config_dir: Path, name: str) -> dict:
    path = config_dir / name
    if not path.is_file():
        raise ValueError(f"tiny pipeline config {path} not found; pass config_dir= a folder with {name}")
    return json.loads(path.read_text())


def _public(config: dict) -> dict:
    """Drop the ``_class_name`` / ``_comment`` bookkeeping keys before handing a config to a constructor."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def component_names(config_dir: str | os.PathLike) -> list[str]:
    """The models of ``config_dir`` in seeding order, then ``scheduler``."""
    config_dir = Path(config_dir)
    names = [n for n in MODEL_NAMES if (config_dir / f"{n}.json").is_file()]
    if not names:
        raise ValueError(f"{config_dir} holds no tiny pipeline configs (unet.json or transformer.json, vae.json, ...)")
    return [*names, "scheduler"]


def tiny_fingerprint(config_dir: str | os.PathLike, seed: int) -> str:
    """Hash of the configs, seed and build format: a cached pipeline with another fingerprint is stale."""
    digest = hashlib.sha256(f"format={BUILD_FORMAT};seed={seed}".encode())
    for name in component_names(config_dir):
        digest.update(json.dumps(_read_config(Path(config_dir), f"{name}.json"), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def required_files(directory: str | os.PathLike) -> list[str]:
    """The files a saved pipeline in ``directory`` must hold, from its ``model_index.json`` (each model's config
    and weights, each tokenizer's and the scheduler's config)."""
    directory = Path(directory)
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        return ["model_index.json"]
    files = ["model_index.json"]
    for name, entry in json.loads(index_path.read_text()).items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if name.startswith("tokenizer"):
            files.append(f"{name}/tokenizer_config.json")
        elif name == "scheduler":
            files.append(f"{name}/scheduler_config.json")
        else:
            weights = "model.safetensors" if entry[0] == "transformers" else "diffusion_pytorch_model.safetensors"
            files += [f"{name}/config.json", f"{name}/{weights}"]
    return files


def is_complete_pipeline(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds every file its saved pipeline needs (see :func:`required_files`)."""
    directory = Path(directory)
    files = required_files(directory)
    return len(files) > 1 and all((directory / f).is_file() for f in files)


def _read_fingerprint(directory: Path) -> str | None:
    marker = directory / MARKER_FILE
    return json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None


def make_model(config: dict):
    """A diffusers or transformers model (random weights) from a config holding its ``_class_name``."""
    import diffusers
    import transformers

    class_name = config.get("_class_name", "")
    if hasattr(diffusers, class_name):
        return getattr(diffusers, class_name).from_config(_public(config))
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise ValueError(f"unknown model class {class_name!r} in a tiny config")
    return model_class(model_class.config_class(**_public(config)))


def _tokenizer_for(encoder: torch.nn.Module, clip_tokenizer):
    """The tokenizer a text encoder is paired with: the CLIP tokenizer, or ByT5's (no files) for a T5."""
    if encoder.config.model_type == "t5":
        from transformers import ByT5Tokenizer

        tokenizer = ByT5Tokenizer()
    else:
        tokenizer = clip_tokenizer
    if len(tokenizer) != encoder.config.vocab_size:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has {len(tokenizer)} tokens but the {encoder.config.model_type} "
            f"text encoder's config says vocab_size={encoder.config.vocab_size}; set vocab_size to {len(tokenizer)}"
        )
    return tokenizer


def make_tiny_pipeline(
    seed: int = 0, config_dir: str | os.PathLike | None = None, tokenizer_dir: str | os.PathLike | None = None
):
    """The pipeline of ``config_dir`` (its ``pipeline.json`` class; default: tiny SD) with random weights,
    deterministic from ``seed``, in memory.

    The models are initialised from ``seed``, ``seed + 1``, ... in :data:`MODEL_NAMES` order (the denoiser, the
    VAE, then the text encoders). ``tokenizer_dir`` is where the CLIP tokenizer files are written (a temporary
    folder when None).
    """
    import tempfile

    import diffusers

    from ..families.base import tokenizer_name

    config_dir = Path(config_dir) if config_dir is not None else TINY_CONFIG_DIR
    names = component_names(config_dir)
    configs = {n: _read_config(config_dir, f"{n}.json") for n in names}
    components = {}
    # fork_rng: seed each model's init without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        for offset, name in enumerate(names[:-1]):
            torch.manual_seed(seed + offset)
            components[name] = make_model(configs[name])
    components["scheduler"] = getattr(diffusers, configs["scheduler"]["_class_name"]).from_config(
        _public(configs["scheduler"])
    )
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            clip_tokenizer = build_clip_tokenizer(tmp)
    else:
        clip_tokenizer = build_clip_tokenizer(tokenizer_dir)
    for name in [n for n in names if n.startswith("text_encoder")]:
        components[tokenizer_name(name)] = _tokenizer_for(components[name], clip_tokenizer)
    pipeline_class = getattr(diffusers, _read_config(config_dir, PIPELINE_FILE)["_class_name"])
    parameters = inspect.signature(pipeline_class.__init__).parameters
    for name, parameter in parameters.items():  # e.g. SD's safety_checker / feature_extractor: none
        if name not in components and name != "self" and parameter.default is inspect.Parameter.empty:
            components[name] = None
    if "requires_safety_checker" in parameters:
        components["requires_safety_checker"] = False
    return pipeline_class(**components)


def build_tiny_pipeline(
    directory: str | os.PathLike, seed: int = 0, config_dir: str | os.PathLike | None = None
) -> Path:
    """Build the tiny pipeline once into ``directory`` (safetensors) and return it; reuse it when already there.

    The pipeline is saved into a temporary folder beside ``directory`` and renamed into place, so ``directory``
    is either absent or complete. A pipeline this function built with other configs or another seed is rebuilt;
    anything else already in ``directory`` is left alone and raises ValueError.
    """
    directory = Path(directory)
    config_dir = Path(config_dir) if config_dir is not None else TINY_CONFIG_DIR
    fingerprint = tiny_fingerprint(config_dir, seed)
    if directory.exists():
        if is_complete_pipeline(directory) and _read_fingerprint(directory) == fingerprint:
            return directory
        is_ours = _read_fingerprint(directory) is not None
        if not is_ours and any(directory.iterdir()):
            raise ValueError(
                f"{directory} exists and is not a tiny pipeline built by dreambooth_gs; delete it or pass another "
                "directory"
            )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pipeline = make_tiny_pipeline(seed=seed, config_dir=config_dir, tokenizer_dir=staging / "tokenizer")
        pipeline.save_pretrained(staging, safe_serialization=True)
        marker = {"fingerprint": fingerprint, "seed": seed, "config_dir": str(config_dir), "format": BUILD_FORMAT}
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if not is_complete_pipeline(staging):
            missing = [f for f in required_files(staging) if not (staging / f).is_file()]
            raise RuntimeError(f"save_pretrained did not write {missing} into {staging}")
        _swap_into_place(staging, directory, fingerprint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _swap_into_place(staging: Path, directory: Path, fingerprint: str) -> None:
    """Rename ``staging`` to ``directory``; an old (stale or empty) ``directory`` is moved aside first."""
    if is_complete_pipeline(directory) and _read_fingerprint(directory) == fingerprint:
        return  # another process built the same pipeline meanwhile: keep it, drop ours
    retired = None
    if directory.exists():
        retired = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(directory, retired)
    try:
        os.replace(staging, directory)
    except OSError:
        # Another process finished the same build first: keep its result when it is what we wanted.
        if not (is_complete_pipeline(directory) and _read_fingerprint(directory) == fingerprint):
            raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
