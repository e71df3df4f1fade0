"""Pipeline + adapter -> images: shared by the trainer's validation and the evaluator."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image


@torch.no_grad()
def generate_images(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 50,
    guidance_scale: float = 7.0,
    batch_size: int = 4,
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in order; each image's noise comes from its own seed (batch-independent)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk_prompts = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        result = pipeline(
            chunk_prompts,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=height,
            width=width,
        )
        images.extend(result.images)
    return images


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste images into a grid (row-major); all images are resized to the first one's size."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(
            image.convert("RGB").resize((width, height)), ((index % columns) * width, (index // columns) * height)
        )
    return grid
