"""Pipeline + adapter -> images: shared by the trainer's validation and the evaluator."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw


@contextlib.contextmanager
def quiet_loading():
    """No per-file loading bars from diffusers / transformers while a pipeline loads (the caller shows progress)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    modules = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in modules:
            module.enable_progress_bar()


def load_pipeline(
    base_model: str,
    adapter_dir: str | os.PathLike | None = None,
    merge: bool = True,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    model_family: str | None = None,
    adapter_scale: float = 1.0,
):
    """The family's pipeline (its sampler: DDIM for the UNet families, flow-matching Euler for SD3 / Flux; no
    safety checker) from a hub id, a local diffusers folder or a single-file checkpoint, with the adapter of
    ``adapter_dir`` loaded (merged into the weights by default) at strength ``adapter_scale`` (``load_adapter``'s
    ``scale``: 1 is the trained adapter, 0 the base model; PEFT's BOFT and a constrained OFT take 1 only)."""
    from .. import families
    from ..families.base import null_components
    from .serialization import load_adapter

    family = families.detect(base_model, override=model_family)
    family.check_folder(base_model)
    # always said: diffusers loads its models in float32 by default, but transformers 5 keeps a text encoder in the
    # dtype it was saved in (a float16 folder would give a float16 encoder beside a float32 UNet)
    kwargs = dict(family.pipeline_load_kwargs) | {"dtype": torch_dtype}  # diffusers 0.42 name (torch_dtype warns)
    pipeline_class = family.pipeline_class()
    try:
        with quiet_loading():
            if Path(base_model).is_file():
                pipeline = pipeline_class.from_single_file(base_model, **kwargs)
            else:
                pipeline = pipeline_class.from_pretrained(base_model, **(null_components(base_model) | kwargs))
    except (OSError, ValueError) as err:
        raise family.load_error(base_model, err) from err
    pipeline.scheduler = family.make_sampler(pipeline.scheduler)
    pipeline.set_progress_bar_config(disable=True)
    if adapter_dir is not None:
        # merging computes in float32 and casts to the weights' dtype; scale 1 takes load_adapter's plain path
        load_adapter(pipeline, adapter_dir, merge=merge, scale=adapter_scale)
    return pipeline.to(device)


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
    output_type: str = "pil",
    text_kwargs: dict[str, torch.Tensor] | None = None,
    pipeline_kwargs: dict | None = None,
) -> list:
    """One image per (prompt, seed) pair, in order; each image's noise comes from its own seed (batch-independent).

    ``output_type="latent"`` returns the final latents, one (C, h, w) tensor per image, for exact comparisons.
    ``text_kwargs`` (the pipeline's ``prompt_embeds``, ``negative_prompt_embeds``, ... with one row per image)
    replace the pipeline's own prompt encoding (e.g. for a pipeline whose text encoders were freed); ``prompts``
    then only count the images. ``pipeline_kwargs`` go to every pipeline call (the family's ``sampling_kwargs``).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")
    images: list = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[chunk]]
        text = {"prompt": list(prompts[chunk])}
        if text_kwargs is not None:
            text = {name: value[chunk] for name, value in text_kwargs.items()}
        result = pipeline(
            **text,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=height,
            width=width,
            output_type=output_type,
            **(pipeline_kwargs or {}),
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


def labeled_grid(
    rows: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str] | None = None,
    label_width: int = 120,
    max_label_lines: int = 4,
) -> Image.Image:
    """Rows of images (``None`` leaves a blank cell) with a text label left of each row and above each column
    (column labels are wrapped to the column width, at most ``max_label_lines`` lines)."""
    import textwrap

    cells = [image for row in rows for image in row if image is not None]
    if not cells:
        raise ValueError("no images to put in a grid")
    width, height = cells[0].size
    columns = max(len(row) for row in rows)
    chars = max(4, width // 6)  # the default bitmap font is about 6 px wide and 11 px high
    wrapped = [textwrap.wrap(text, chars)[:max_label_lines] for text in (column_labels or [])]
    top = 4 + 12 * max((len(lines) for lines in wrapped), default=0)
    grid = Image.new("RGB", (label_width + columns * width, top + len(rows) * height), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(wrapped):
        draw.multiline_text((label_width + c * width + 2, 2), "\n".join(lines), fill="black", spacing=1)
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        y = top + r * height
        draw.text((4, y + height // 2 - 6), text[: max(1, label_width // 6)], fill="black")
        for c, image in enumerate(row):
            if image is not None:
                grid.paste(image.convert("RGB").resize((width, height)), (label_width + c * width, y))
    return grid
