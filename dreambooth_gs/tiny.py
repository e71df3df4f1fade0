"""Tiny pipelines with random weights, built offline from the shipped configs (resources/tiny_sd/ for SD,
resources/tiny_sdxl/ for SDXL), for tests and CPU demos.

The tokenizer is the real SD 1.x / 2.x CLIP tokenizer: its BPE vocabulary ships inside open_clip, so nothing is
downloaded. Weights are never committed: the pipeline is built at run time into a cache folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from .resources import TINY_SD_CONFIG_DIR as TINY_CONFIG_DIR

CLIP_CONTEXT_LENGTH = 77
# CLIP's BPE file: a header line, then merges; CLIP keeps the first 49152 - 256 - 2 of them so that
# 256 bytes + 256 end-of-word bytes + merges + 2 special tokens = 49408 tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
# Bump when the build changes in a way that makes an old cached pipeline stale.
BUILD_FORMAT = 1
MARKER_FILE = "dreambooth_gs_tiny.json"
REQUIRED_FILES = (
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
SDXL_FILES = ("text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer_2/tokenizer_config.json")
CONFIG_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")


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


def tiny_fingerprint(config_dir: str | os.PathLike, seed: int) -> str:
    """Hash of the configs, seed and build format: a cached pipeline with another fingerprint is stale."""
    digest = hashlib.sha256(f"format={BUILD_FORMAT};seed={seed}".encode())
    for name in CONFIG_NAMES:
        if name != "text_encoder_2" or _is_sdxl(Path(config_dir)):
            digest.update(json.dumps(_read_config(Path(config_dir), f"{name}.json"), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _is_sdxl(config_dir: Path) -> bool:
    return (config_dir / "text_encoder_2.json").is_file()


def is_complete_pipeline(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds every file a saved tiny pipeline needs (SDXL: the second encoder too)."""
    directory = Path(directory)
    index = directory / "model_index.json"
    sdxl = index.is_file() and "text_encoder_2" in json.loads(index.read_text())
    return all((directory / f).is_file() for f in REQUIRED_FILES + (SDXL_FILES if sdxl else ()))


def _read_fingerprint(directory: Path) -> str | None:
    marker = directory / MARKER_FILE
    return json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None


def make_tiny_pipeline(
    seed: int = 0, config_dir: str | os.PathLike | None = None, tokenizer_dir: str | os.PathLike | None = None
):
    """A StableDiffusionPipeline, or a StableDiffusionXLPipeline when ``config_dir`` has a ``text_encoder_2.json``
    (random weights, deterministic from ``seed``), from the tiny configs, in memory.

    The UNet, VAE and text encoder(s) are initialised from ``seed``, ``seed + 1``, ``seed + 2`` (and ``seed + 3``).
    ``tokenizer_dir`` is where the tokenizer files are written (a temporary folder when None).
    """
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config_dir = Path(config_dir) if config_dir is not None else TINY_CONFIG_DIR
    sdxl = _is_sdxl(config_dir)
    names = [n for n in CONFIG_NAMES if n != "text_encoder_2" or sdxl]
    configs = {n: _read_config(config_dir, f"{n}.json") for n in names}
    # fork_rng: seed each model's init without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(_public(configs["unet"]))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(_public(configs["vae"]))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**_public(configs["text_encoder"])))
        if sdxl:
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_public(configs["text_encoder_2"])))
    scheduler = DDPMScheduler.from_config(_public(configs["scheduler"]))
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_clip_tokenizer(tmp)
    else:
        tokenizer = build_clip_tokenizer(tokenizer_dir)
    if len(tokenizer) != text_encoder.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but text_encoder.json says vocab_size="
            f"{text_encoder.config.vocab_size}; set vocab_size to {len(tokenizer)}"
        )
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


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
            missing = [f for f in REQUIRED_FILES + SDXL_FILES if not (staging / f).is_file()]
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
