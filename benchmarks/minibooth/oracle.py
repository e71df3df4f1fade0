"""MiniBooth's attribute oracle: small classifiers that read a picture's world attributes (shape, colour, pattern,
size, position, background colour and pattern), trained on rendered world pictures.

The world's renderer knows every picture's attributes, so unlike the MiniBooth CLIP (which only ranks captions) the
oracle says, per generated picture, whether it carries the subject's colour, pattern and shape, and whether a
contextual prompt's background, size, position or colour change made it into the picture. One small CNN with a
linear head per attribute; it is trained on the whole world, held-out (shape, colour) pairs included (it is the
judge, not the model being judged), with blur and noise so that it also reads the base model's softer pictures.

Saved as ``oracle_config.json`` (the attribute values, in head order, and the sizes) + ``oracle.safetensors``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from dreambooth_gs.demo.oracle import CONFIG_NAME, WEIGHTS_NAME, AttributeOracle, to_pixels

from .world import World, render_world

JUDGED_ATTRIBUTES = ("shape", "color", "pattern", "size", "position", "background_pattern", "background_color")
SEED_OFFSET = 1000  # the oracle's world pictures: another seed than the pretraining pictures'


def attribute_values(world: World) -> dict[str, list[str]]:
    """Each attribute's values, in the order of the oracle's head outputs (and of the CLIP fidelity check's)."""
    values = {
        "shape": list(world.shapes),
        "color": sorted(world.colors),
        "pattern": list(world.object_patterns),
        "size": sorted(world.sizes),
        "position": sorted(world.positions),
        "background_pattern": list(world.background_patterns),
        "background_color": sorted(world.colors),
    }
    return {name: values[name] for name in JUDGED_ATTRIBUTES}


def judged_world(world: World) -> World:
    """The world the oracle is trained and checked on: ``world`` with its held-out pairs drawn again."""
    return replace(world, held_out=frozenset())


def scene_truth(scenes) -> list[dict[str, str]]:
    """What the oracle should read in each scene's picture: ``{attribute: value}``."""
    return [{name: getattr(scene, name) for name in JUDGED_ATTRIBUTES} for scene in scenes]


def label_tensor(scenes, values: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """``{attribute: (N,) long}``: each scene's value index per attribute."""
    return {name: torch.tensor([v.index(getattr(s, name)) for s in scenes]) for name, v in values.items()}


def soften(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation: half the pictures blurred (3 x 3 box), every picture with Gaussian noise of a random
    strength up to 0.1 (the base model's pictures are softer and noisier than the renderer's)."""
    n = pixels.shape[0]
    blurred = F.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
    pick = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5).float()
    mixed = pick * blurred + (1 - pick) * pixels
    strength = 0.1 * torch.rand(n, 1, 1, 1, generator=generator)
    return mixed + strength * torch.randn(mixed.shape, generator=generator)


def train_oracle(
    world: World,
    num_images: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    resolution: int = 64,
    width: int = 16,
    log: Callable[[str], None] = print,
    log_every: int = 100,
) -> tuple[AttributeOracle, list[float]]:
    """An oracle trained on ``num_images`` renders of ``world`` with its held-out pairs put back; AdamW, warm-up and
    cosine decay, the sum of the heads' cross-entropies."""
    judged = judged_world(world)
    values = attribute_values(judged)
    log(f"rendering {num_images} world pictures for the oracle")
    images, scenes = render_world(num_images, seed + SEED_OFFSET, judged, resolution)
    pixels, labels = to_pixels(images), label_tensor(scenes, values)
    torch.manual_seed(seed)
    oracle = AttributeOracle(values, width)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    oracle.train()
    for step in range(steps):
        index = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        logits = oracle(soften(pixels[index], generator))
        loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in values)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"oracle step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.3f}")
    return oracle.eval(), losses


def save_oracle(oracle: AttributeOracle, folder: str | Path, resolution: int) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    width = oracle.features[0].out_channels
    config = {"values": oracle.values, "width": width, "hidden": oracle.hidden[0].out_features}
    (folder / CONFIG_NAME).write_text(json.dumps(config | {"resolution": resolution}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(folder / WEIGHTS_NAME))


def accuracy(readings: Sequence[dict[str, str]], expected: Sequence[dict[str, str]]) -> dict[str, float]:
    """Per attribute, the fraction of pictures whose reading matches what was expected of them; an attribute counts
    only over the pictures that expect something of it."""
    hits: dict[str, list[int]] = {}
    for reading, wanted in zip(readings, expected, strict=True):
        for name, value in wanted.items():
            hits.setdefault(name, []).append(int(reading[name] == value))
    return {name: sum(h) / len(h) for name, h in hits.items()}
