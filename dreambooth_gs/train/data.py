"""Subject images for DreamBooth: loading, the instance / class dataset, batching, and class-image generation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..fileio import atomic_write

# Files that sit beside images without being images (a dataset's README, its prompts): skipped without a warning.
NON_IMAGE_SUFFIXES = frozenset({".md", ".txt", ".json", ".yaml", ".yml", ".toml", ".csv", ".py"})
# Single-channel integer modes PIL opens 16-bit grayscale as (PNG, TIFF; "I" holds 32-bit integers); PIL's own
# convert("RGB") clips their 0..65535 values at 255 instead of scaling them, so they are scaled here. 16-bit RGB(A)
# PNGs need nothing: PIL opens them as 8-bit "RGB" / "RGBA", keeping each sample's high byte.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_warned: set[str] = set()  # messages already printed by this process (see warn_once)


def warn_once(message: str) -> None:
    """Print ``warning: <message>`` on one line of stderr, once per process: the trainer's checks and its dataset
    scan the same folder, and the evaluator scans a subject's folder once per run."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def to_eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (:data:`SIXTEEN_BIT_MODES`) as 8-bit "L", 0..65535 scaled to 0..255; any other
    image unchanged."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.float64)  # (H, W), 0..65535 (big- or little-endian on disk)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))  # (H, W) uint8: mode "L"


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode one image file fully, apply its EXIF orientation and convert it to 8-bit RGB (16-bit images scaled).

    The one loader of training, class and reference images alike.
    """
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_eight_bit(image).convert("RGB")


def _candidate_files(directory: Path) -> list[Path]:
    """Regular, non-hidden files that are not known non-image documents, sorted by name."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in NON_IMAGE_SUFFIXES
    )


def scan_images(directory: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """``(readable, unreadable)`` image files of ``directory`` (hidden files and documents are neither)."""
    readable, unreadable = [], []
    for path in _candidate_files(Path(directory)):
        try:
            load_image(path)
        except Exception:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error... on bad files
            unreadable.append(path)
        else:
            readable.append(path)
    return readable, unreadable


def find_images(directory: str | os.PathLike) -> list[Path]:
    """Sorted paths of the readable images in ``directory``; unreadable files are skipped with one warning.

    Raises ValueError when the directory is missing, empty, or holds no readable image.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"image directory {directory} does not exist; pass a folder of subject images")
    readable, unreadable = scan_images(directory)
    if unreadable:
        warn_once(
            f"skipped {len(unreadable)} file(s) in {directory} that PIL cannot read as images: "
            + ", ".join(p.name for p in unreadable)
        )
    if not readable:
        what = "holds no readable image" if any(directory.iterdir()) else "is empty"
        raise ValueError(f"image directory {directory} {what}; add PNG / JPEG / WebP images of the subject to it")
    return readable


def load_images(directory: str | os.PathLike) -> list[Image.Image]:
    """Every readable image of ``directory`` as RGB with EXIF orientation applied (see :func:`find_images`)."""
    return [load_image(p) for p in find_images(directory)]


def warn_small_images(paths: list[Path], resolution: int) -> None:
    """One warning line naming the images whose shorter side is under half of ``resolution``: training upscales
    them more than twice (a 1 x 1 image becomes a flat colour)."""
    small = []
    for path in paths:
        with Image.open(path) as image:  # the header only: the size does not need the pixels
            short_side = min(image.size)
        if 2 * short_side < resolution:
            small.append(f"{path.name} ({short_side} px)")
    if small:
        shown = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        warn_once(
            f"{len(small)} image(s) in {paths[0].parent} have a shorter side under half the training resolution "
            f"{resolution} px and are upscaled to it: {shown}"
        )


def crop_to_tensor(
    image: Image.Image, resolution: int, center_crop: bool = False, random_flip: bool = False
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Shorter side to ``resolution`` (bilinear), center / random square crop, optional flip.

    Returns ``(pixels, original_size, crop_top_left)``: (3, R, R) in [-1, 1], the image's (height, width) before
    resizing and the crop's (top, left) in the resized image (SDXL's micro-conditioning, as diffusers records it).
    Random crop and flip draw from torch's global RNG, so DataLoader worker seeding makes them reproducible.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, int(width * scale)), max(resolution, int(height * scale)))
    image = image.resize(new_size, Image.BILINEAR)
    if center_crop:
        left = int(round((new_size[0] - resolution) / 2.0))
        top = int(round((new_size[1] - resolution) / 2.0))
    else:
        left = int(torch.randint(0, new_size[0] - resolution + 1, ()).item())
        top = int(torch.randint(0, new_size[1] - resolution + 1, ()).item())
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and torch.rand(()).item() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (R, R, 3) uint8
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0, (height, width), (top, left)  # (3, R, R) in [-1, 1]


def image_to_tensor(
    image: Image.Image, resolution: int, center_crop: bool = False, random_flip: bool = False
) -> torch.Tensor:
    """(3, R, R) pixels in [-1, 1] of :func:`crop_to_tensor`."""
    return crop_to_tensor(image, resolution, center_crop, random_flip)[0]


class DreamBoothDataset(Dataset):
    """Instance images of the subject (and, for prior preservation, class images) with their prompts.

    Items are dicts: ``instance_images`` (3, R, R) in [-1, 1], ``instance_prompt`` (the text: each model family
    tokenizes it its own way), ``instance_original_size`` and ``instance_crop_top_left`` (2,), plus the same four
    ``class_*`` entries when ``class_data_dir`` is given. With class images the length is max(#instance, #class)
    and the shorter list cycles. Images are decoded when an item is read.
    """

    def __init__(
        self,
        instance_data_dir: str | os.PathLike,
        instance_prompt: str,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        class_data_dir: str | os.PathLike | None = None,
        class_prompt: str | None = None,
        num_class_images: int | None = None,
    ):
        if not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
            raise ValueError(
                f"resolution={resolution!r} must be a positive multiple of 8 (the VAE downsamples by 8), e.g. 512"
            )
        if (class_data_dir is None) != (class_prompt is None):
            raise ValueError(
                "prior preservation needs both class_data_dir and class_prompt; pass both or neither "
                f"(got class_data_dir={class_data_dir!r}, class_prompt={class_prompt!r})"
            )
        if num_class_images is not None and num_class_images < 1:
            raise ValueError(f"num_class_images={num_class_images}; pass a positive count or None for all")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.instance_images = find_images(instance_data_dir)
        self.instance_prompt = instance_prompt
        self.class_images: list[Path] = []
        self.class_prompt = class_prompt
        if class_data_dir is not None:
            self.class_images = find_images(class_data_dir)[:num_class_images]
        for paths in (self.instance_images, self.class_images):
            warn_small_images(paths, resolution)

    @property
    def with_prior_preservation(self) -> bool:
        return self.class_prompt is not None

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def _example(self, kind: str, path: Path, prompt: str) -> dict:
        pixels, original_size, crop_top_left = crop_to_tensor(
            load_image(path), self.resolution, self.center_crop, self.random_flip
        )
        return {
            f"{kind}_images": pixels,
            f"{kind}_prompt": prompt,
            f"{kind}_original_size": torch.tensor(original_size),
            f"{kind}_crop_top_left": torch.tensor(crop_top_left),
        }

    def __getitem__(self, index: int) -> dict:
        example = self._example(
            "instance", self.instance_images[index % len(self.instance_images)], self.instance_prompt
        )
        if self.with_prior_preservation:
            example |= self._example("class", self.class_images[index % len(self.class_images)], self.class_prompt)
        return example


def collate_examples(examples: list[dict], with_prior_preservation: bool) -> dict:
    """Batch dataset items: ``pixel_values`` (B or 2B, 3, R, R) (or, for items cached by ``--cache_latents``,
    ``latent_parameters`` (B or 2B, 2C, h, w)), ``prompts`` (a list), ``original_sizes`` and ``crop_top_lefts``
    (B or 2B, 2).

    With prior preservation the B instance examples come first, then the B class examples, so the loss can
    ``chunk(2)`` the model output into instance and prior halves (as diffusers' DreamBooth does).
    """
    cached = "instance_latents" in examples[0]  # --cache_latents: VAE latent distributions instead of images
    image_key = "latents" if cached else "images"
    if with_prior_preservation and any(f"class_{image_key}" not in e for e in examples):
        raise ValueError("with_prior_preservation=True but the examples have no class_images; pass class_data_dir")
    kinds = ("instance", "class") if with_prior_preservation else ("instance",)
    ordered = [(kind, e) for kind in kinds for e in examples]
    stacked = torch.stack([e[f"{kind}_{image_key}"] for kind, e in ordered])  # (B', 3, R, R) or (B', 2C, h, w)
    if cached:
        images = {"latent_parameters": stacked}
    else:
        images = {"pixel_values": stacked.to(memory_format=torch.contiguous_format).float()}
    return {
        **images,
        "prompts": [e[f"{kind}_prompt"] for kind, e in ordered],
        "original_sizes": torch.stack([e[f"{kind}_original_size"] for kind, e in ordered]),  # (B', 2)
        "crop_top_lefts": torch.stack([e[f"{kind}_crop_top_left"] for kind, e in ordered]),  # (B', 2)
    }


def _free_names(directory: Path, count: int, prefix: str = "class", suffix: str = ".png") -> list[str]:
    """``count`` file names ``{prefix}_{k:05d}{suffix}`` with the smallest k not already taken in ``directory``."""
    taken = {p.name for p in directory.iterdir()}
    names, k = [], 0
    while len(names) < count:
        name = f"{prefix}_{k:05d}{suffix}"
        if name not in taken:
            names.append(name)
        k += 1
    return names


def generate_class_images(
    pipeline,
    class_data_dir: str | os.PathLike,
    class_prompt: str,
    num_class_images: int,
    batch_size: int = 4,
    num_inference_steps: int = 50,
    seed: int = 0,
    progress: bool = True,
    resolution: int | None = None,
    guidance_scale: float = 7.5,
    write: bool = True,
) -> int:
    """Fill ``class_data_dir`` up to ``num_class_images`` images of ``class_prompt`` drawn by ``pipeline``.

    Resumable: readable images already there count, and only the missing ones are generated, ``batch_size`` at a
    time. Image k (counting existing ones) uses a CPU generator seeded ``seed + k``, so an interrupted and resumed
    run draws the same pictures as an uninterrupted one. Each PNG is written to a hidden temporary file and renamed
    into place. Returns the number of images generated. ``write=False`` draws the same images and drops them: the
    other processes of a sharded denoiser, which take part in every forward of the one that writes.
    """
    if num_class_images < 0 or batch_size < 1 or num_inference_steps < 1:
        raise ValueError(
            f"num_class_images={num_class_images}, batch_size={batch_size}, num_inference_steps="
            f"{num_inference_steps}: need num_class_images >= 0 and batch_size, num_inference_steps >= 1"
        )
    class_data_dir = Path(class_data_dir)
    class_data_dir.mkdir(parents=True, exist_ok=True)
    existing = len(scan_images(class_data_dir)[0])
    missing = num_class_images - existing
    if missing <= 0:
        return 0
    names = _free_names(class_data_dir, missing)
    saved_progress_config = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(disable=True)  # one bar over images, not one per denoising loop
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    try:
        with tqdm(total=missing, desc="class images", disable=not progress, unit="img") as bar:
            for start in range(0, missing, batch_size):
                batch_names = names[start : start + batch_size]
                generators = [
                    torch.Generator("cpu").manual_seed(seed + existing + start + i) for i in range(len(batch_names))
                ]
                images = pipeline(
                    [class_prompt] * len(batch_names),
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=generators,
                    output_type="pil",
                    **size,
                ).images
                for name, image in zip(batch_names, images if write else []):
                    atomic_write(class_data_dir / name, lambda tmp, image=image: image.save(tmp, format="PNG"))
                bar.update(len(batch_names))
    finally:
        pipeline._progress_bar_config = saved_progress_config
    return missing
