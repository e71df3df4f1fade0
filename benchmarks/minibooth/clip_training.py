"""MiniBooth's CLIP: an open_clip CLIP trained contrastively on the world's (picture, caption) pairs, saved as an
open_clip custom model that ``open_clip.create_model_and_transforms("local-dir:<folder>")`` (and so
``evaluate_clip.py --clip_model local-dir:<folder>``) loads offline.

The folder holds ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``), ``open_clip_model.safetensors``,
and ``minibooth_clip.json`` (the bare model config, for ``open_clip.add_model_config``).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .pretraining import Log, _log_progress, warmup_cosine
from .world import Scene, World, random_caption

MODEL_NAME = "minibooth_clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# Pictures go in as [-1, 1] (mean 0.5, std 0.5 after ToTensor), the same for training and for open_clip's transform.
PREPROCESS_MEAN = (0.5, 0.5, 0.5)
PREPROCESS_STD = (0.5, 0.5, 0.5)
MAX_LOGIT_SCALE = math.log(100)  # CLIP caps the logit scale at 100


def clip_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, R, R, 3) -> (B, 3, R, R) normalised exactly as open_clip's eval transform does at size R."""
    mean = torch.tensor(PREPROCESS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_STD).view(1, 3, 1, 1)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, captions: Sequence[str]):
    """Symmetric InfoNCE in which identical captions in a batch are all positives (soft targets), not negatives."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T  # (B, B)
    ids = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([ids[c] for c in captions])
    same = (labels[:, None] == labels[None, :]).float()  # (B, B)
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train_clip(
    model,
    tokenizer,
    images: np.ndarray,
    scenes: Sequence[Scene],
    world: World,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    caption_keep_scale: float,
    seed: int,
    log: Log = print,
    log_every: int = 100,
) -> list[float]:
    """Contrastive training of ``model`` (open_clip CLIP) on random (picture, partial caption) batches."""
    generator = torch.Generator().manual_seed(seed)
    caption_rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup_steps))
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator).numpy()
        captions = [random_caption(scenes[i], caption_rng, world, caption_keep_scale) for i in index]
        # Tokenized afresh every step: a cache of one small tensor per distinct caption (there are many) pinned
        # the heap between the step's large temporaries and grew the process by ~10 MB a step (23 GB at 1300).
        tokens = tokenizer(captions)  # (B, context_length)
        loss = contrastive_loss(
            model.encode_image(clip_pixels(images[index])), model.encode_text(tokens), model.logit_scale, captions
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            _log_progress(log, "clip", step + 1, steps, losses, start)
    model.eval()
    return losses


def save_clip(model, model_cfg: dict, directory: str | Path) -> Path:
    """Write the open_clip custom-model folder (config, preprocessing, safetensors weights) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = {
        "size": model_cfg["vision_cfg"]["image_size"],
        "mean": list(PREPROCESS_MEAN),
        "std": list(PREPROCESS_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (directory / CONFIG_FILE).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n"
    )
    (directory / f"{MODEL_NAME}.json").write_text(json.dumps(model_cfg, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    return directory


def load_clip(directory: str | Path):
    """``(model, preprocess, tokenizer)`` of a saved MiniBooth CLIP, through open_clip's public loaders."""
    import open_clip

    name = f"local-dir:{Path(directory).resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, images: np.ndarray, captions: Sequence[str]) -> float:
    """Fraction of pictures whose own (full) caption scores highest among the batch's captions: a sanity check."""
    image_features = F.normalize(model.encode_image(clip_pixels(images)), dim=-1)
    text_features = F.normalize(model.encode_text(tokenizer(list(captions))), dim=-1)
    best = (image_features @ text_features.T).argmax(dim=1)  # (N,)
    return float((best == torch.arange(len(captions))).float().mean())
