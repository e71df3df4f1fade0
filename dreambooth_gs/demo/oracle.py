"""MiniBooth's attribute oracle at use: the network, its loader and its reading of pictures (the demo scores with it;
``benchmarks/minibooth/oracle.py`` trains it). Small classifiers of a picture's world attributes (shape, colour,
pattern, size, position, background colour and pattern), one linear head per attribute.

Saved as ``oracle_config.json`` (the attribute values, in head order, and the sizes) + ``oracle.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

CONFIG_NAME, WEIGHTS_NAME = "oracle_config.json", "oracle.safetensors"


class AttributeOracle(nn.Module):
    """Four 3x3 conv blocks (64 px -> 4 x 4 cells, so position survives), a shared hidden layer, one linear head per
    attribute. ``forward`` takes pixels in [-1, 1], (N, 3, R, R), and returns ``{attribute: logits (N, values)}``."""

    def __init__(self, values: dict[str, list[str]], width: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.values = values
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(channels[-1] * 16, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(v)) for name, v in values.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.hidden(self.features(pixels))  # (N, hidden)
        return {name: head(hidden) for name, head in self.heads.items()}


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, R, R, 3) -> float (N, 3, R, R) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def load_oracle(folder: str | Path) -> AttributeOracle:
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    oracle = AttributeOracle(config["values"], config["width"], config["hidden"])
    oracle.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return oracle.eval()


@torch.no_grad()
def predict(oracle: AttributeOracle, images: Sequence[Image.Image] | np.ndarray, batch_size: int = 256):
    """The oracle's reading of each picture: a list of ``{attribute: value}``."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(image.convert("RGB")) for image in images])  # (N, R, R, 3)
    readings: list[dict[str, str]] = []
    for start in range(0, len(images), batch_size):
        logits = oracle(to_pixels(images[start : start + batch_size]))
        chosen = {name: value.argmax(dim=1).tolist() for name, value in logits.items()}
        for k in range(len(next(iter(chosen.values())))):
            readings.append({name: oracle.values[name][chosen[name][k]] for name in chosen})
    return readings
