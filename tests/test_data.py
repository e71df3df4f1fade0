"""Subject images: loading, DreamBoothDataset, collate ordering, resumable class-image generation, demo subject."""

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_gs.resources import DEMO_SUBJECT_DIR
from dreambooth_gs.tiny.demo_subject import make_demo_subject
from dreambooth_gs.train.data import (
    DreamBoothDataset,
    collate_examples,
    crop_to_tensor,
    find_images,
    generate_class_images,
    image_to_tensor,
    load_images,
)

REPO = Path(__file__).resolve().parent.parent
DEMO_SUBJECT = DEMO_SUBJECT_DIR
RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))


@pytest.fixture(scope="session")
def pipeline(tiny_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_dir))


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: crops and flips show up in the corner pixels."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(Image.new("RGB", (width // 2, height), BLUE), (width // 2, 0))
    return image


# ---------------------------------------------------------------- load_images


@pytest.mark.parametrize(
    "name, mode, kwargs",
    [
        ("a.png", "RGBA", {}),
        ("b.jpg", "RGB", {"quality": 95}),
        ("c.webp", "RGB", {}),
        ("d.png", "L", {}),
        ("e.gif", "P", {}),
        ("f.bmp", "RGB", {}),
        ("g.tiff", "CMYK", {}),
    ],
)
def test_load_images_reads_any_pil_format_as_rgb(tmp_path, name, mode, kwargs):
    _save(tmp_path / name, Image.new(mode, (12, 10)), **kwargs)
    (images,) = load_images(tmp_path)
    assert images.mode == "RGB" and images.size == (12, 10)


def test_load_images_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    _save(tmp_path / "rotated.jpg", Image.new("RGB", (16, 8), RED), exif=exif)
    assert Image.open(tmp_path / "rotated.jpg").size == (16, 8)
    (image,) = load_images(tmp_path)
    assert image.size == (8, 16)


def test_unreadable_files_are_skipped_with_one_clean_line_once(tmp_path, capsys):
    """The trainer scans the folder twice (its checks, then its dataset): one line on stderr, no Python warning
    with its source line."""
    _save(tmp_path / "good.png", Image.new("RGB", (8, 8)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "notes.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "README.md").write_text("# my subject")  # documents and hidden files are not images: no warning
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = load_images(tmp_path)
        assert len(find_images(tmp_path)) == len(images) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: skipped 2 file(s) in {tmp_path} that PIL cannot read as images: ")
    assert "broken.png" in line and "notes.bin" in line and "README" not in line and "DS_Store" not in line


def test_readable_directory_loads_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_images(DEMO_SUBJECT)) == 4  # README.md beside the PNGs is ignored


def _png_16bit(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (PIL writes 16-bit grayscale, not 16-bit RGB): (H, W) gray or (H, W, 3)."""
    height, width = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


GRADIENT = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))  # (8, 256): black to white
SIXTEEN_BIT = [  # (file, writer of GRADIENT-based pixels, pixels)
    ("gray.png", lambda path, a: Image.fromarray(a).save(path), GRADIENT),  # PIL: mode I;16
    ("gray_big_endian.tif", lambda path, a: Image.fromarray(a.astype(">u2")).save(path), GRADIENT),  # I;16B
    ("gray_int32.tif", lambda path, a: Image.fromarray(a.astype(np.int32)).save(path), GRADIENT),  # I
    ("rgb.png", _png_16bit, np.stack([GRADIENT, 65535 - GRADIENT, GRADIENT // 4], axis=-1)),  # 48-bit RGB
]


@pytest.mark.parametrize("name, write, pixels", SIXTEEN_BIT, ids=[name for name, _, _ in SIXTEEN_BIT])
def test_16_bit_images_are_scaled_to_8_bit(tmp_path, name, write, pixels):
    """A 16-bit gradient loads as the same gradient in 8 bits (PIL's convert clips gray at 255: almost white)."""
    write(tmp_path / name, pixels)
    expected = np.broadcast_to((pixels / 257.0)[..., None] if pixels.ndim == 2 else pixels / 257.0, (8, 256, 3))
    (image,) = load_images(tmp_path)
    loaded = np.asarray(image, dtype=np.float64)  # (8, 256, 3)
    assert image.mode == "RGB" and np.abs(loaded - expected).max() <= 1.0
    assert loaded.min() == 0 and loaded.max() == 255 and abs(loaded.mean() - expected.mean()) < 0.5
    pixels_8bit = (
        DreamBoothDataset(tmp_path, "a sks toy", resolution=8, center_crop=True)[0]["instance_images"] + 1
    ) * 127.5
    assert abs(pixels_8bit.mean().item() - expected[:, 124:132].mean()) < 8  # the middle of the gradient, not white


@pytest.mark.parametrize(
    "size, resolution, warned",
    [((1, 1), 64, True), ((31, 200), 64, True), ((32, 32), 64, False), ((64, 48), 64, False), ((8, 8), 16, False)],
)
def test_images_much_smaller_than_the_resolution_are_named_in_one_line(tmp_path, capsys, size, resolution, warned):
    _save(tmp_path / "subject" / "tiny.png", Image.new("RGB", size, RED))
    _save(tmp_path / "subject" / "fine.png", Image.new("RGB", (resolution, resolution), BLUE))
    dataset = DreamBoothDataset(tmp_path / "subject", "a sks toy", resolution=resolution, center_crop=True)
    assert dataset[0]["instance_images"].shape == (3, resolution, resolution)
    lines = capsys.readouterr().err.splitlines()
    if warned:
        (line,) = lines
        assert line == (
            f"warning: 1 image(s) in {tmp_path / 'subject'} have a shorter side under half the training resolution "
            f"{resolution} px and are upscaled to it: tiny.png ({min(size)} px)"
        )
    else:
        assert lines == []


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "is empty"),
        (lambda d: (d.mkdir(), (d / "x.jpg").write_bytes(b"junk")), "holds no readable image"),
        (lambda d: (d.mkdir(), (d / "README.md").write_text("hi")), "holds no readable image"),
    ],
    ids=["missing", "empty", "only_unreadable", "only_documents"],
)
def test_directory_without_images_raises(tmp_path, setup, message):
    directory = tmp_path / "subject"
    setup(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=message):
            find_images(directory)


# ---------------------------------------------------------------- transforms and dataset


@pytest.mark.parametrize(
    "size, resolution, center_crop",
    [((64, 64), 32, True), ((96, 64), 32, True), ((64, 96), 32, False), ((20, 30), 64, True), ((100, 40), 16, False)],
)
def test_image_to_tensor_shape_and_range(size, resolution, center_crop):
    tensor = image_to_tensor(Image.effect_noise(size, 80).convert("RGB"), resolution, center_crop=center_crop)
    assert tensor.shape == (3, resolution, resolution) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1


@pytest.mark.parametrize("colour, value", [((0, 0, 0), -1.0), ((255, 255, 255), 1.0), ((255, 0, 0), None)])
def test_image_to_tensor_normalises_to_minus_one_one(colour, value):
    tensor = image_to_tensor(Image.new("RGB", (8, 8), colour), 8, center_crop=True)
    expected = torch.tensor([c / 127.5 - 1 for c in colour]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(tensor, expected)


def test_center_crop_keeps_the_middle():
    # 128 x 64 -> resized to 64 x 32 -> center crop x in [16, 48): red on the left, blue on the right
    tensor = image_to_tensor(_halves(128, 64), 32, center_crop=True)
    assert tensor[:, :, 0].tolist() == [[1.0] * 32, [-1.0] * 32, [-1.0] * 32]
    assert tensor[:, :, -1].tolist() == [[-1.0] * 32, [-1.0] * 32, [1.0] * 32]


def test_random_crop_moves_and_stays_inside():
    torch.manual_seed(0)
    gradient = Image.linear_gradient("L").rotate(90).convert("RGB").resize((256, 64))  # brightness varies along x
    crops = [image_to_tensor(gradient, 64)[0, 0, 0].item() for _ in range(20)]
    assert len(set(crops)) > 3


def test_random_flip_gives_the_image_or_its_mirror():
    torch.manual_seed(0)
    plain = image_to_tensor(_halves(32, 32), 32, center_crop=True)
    draws = [image_to_tensor(_halves(32, 32), 32, center_crop=True, random_flip=True) for _ in range(16)]
    flipped = [torch.equal(d, plain.flip(-1)) for d in draws]
    assert all(f or torch.equal(d, plain) for f, d in zip(flipped, draws))
    assert 0 < sum(flipped) < len(draws)


def test_dataset_items():
    dataset = DreamBoothDataset(DEMO_SUBJECT, "a photo of sks toy", resolution=32, center_crop=True)
    assert len(dataset) == 4 and not dataset.with_prior_preservation
    item = dataset[1]
    keys = {"instance_images", "instance_prompt", "instance_original_size", "instance_crop_top_left"}
    assert set(item) == keys and item["instance_prompt"] == "a photo of sks toy"
    assert item["instance_images"].shape == (3, 32, 32)
    assert -1 <= item["instance_images"].min() < item["instance_images"].max() <= 1


@pytest.mark.parametrize(
    "size, center_crop, expected_crop",
    [((128, 64), True, (0, 16)), ((64, 128), True, (16, 0)), ((64, 64), False, (0, 0))],
    ids=["wide", "tall", "square"],
)
def test_crop_records_the_original_size_and_the_crop(size, center_crop, expected_crop):
    """SDXL's micro-conditioning: (height, width) before resizing and the crop's (top, left) after it."""
    pixels, original, crop = crop_to_tensor(Image.new("RGB", size, "red"), 32, center_crop=center_crop)
    assert pixels.shape == (3, 32, 32) and original == (size[1], size[0]) and crop == expected_crop


def test_dataset_with_class_images_cycles_the_shorter_list(tmp_path, tokenizer):
    for k in range(6):
        _save(tmp_path / "class" / f"{k}.png", Image.new("RGB", (40, 40), (k * 40, 0, 0)))
    dataset = DreamBoothDataset(
        DEMO_SUBJECT,
        "a photo of sks toy",
        resolution=16,
        class_data_dir=tmp_path / "class",
        class_prompt="a photo of toy",
        center_crop=True,
    )
    assert len(dataset) == 6 and dataset.with_prior_preservation
    torch.testing.assert_close(dataset[5]["instance_images"], dataset[1]["instance_images"])
    assert dataset[5]["class_images"][0, 0, 0] == pytest.approx(5 * 40 / 127.5 - 1)
    assert dataset[0]["class_prompt"] == "a photo of toy"
    limited = DreamBoothDataset(
        DEMO_SUBJECT,
        "p",
        resolution=16,
        class_data_dir=tmp_path / "class",
        class_prompt="q",
        num_class_images=2,
    )
    assert len(limited) == 4 and len(limited.class_images) == 2


@pytest.mark.parametrize("resolution", [0, -8, 12, 100, 513, 64.0, "512"])
def test_resolution_must_be_a_positive_multiple_of_8(resolution):
    with pytest.raises(ValueError, match="positive multiple of 8"):
        DreamBoothDataset(DEMO_SUBJECT, "p", resolution=resolution)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_data_dir": DEMO_SUBJECT}, "needs both class_data_dir and class_prompt"),
        ({"class_prompt": "a photo of toy"}, "needs both class_data_dir and class_prompt"),
        ({"class_data_dir": DEMO_SUBJECT, "class_prompt": "q", "num_class_images": 0}, "positive count"),
    ],
)
def test_class_arguments_must_agree(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DreamBoothDataset(DEMO_SUBJECT, "p", resolution=16, **kwargs)


# ---------------------------------------------------------------- collate


def _example(k: int, with_class: bool) -> dict:
    example = {}
    for kind, sign in (("instance", 1), ("class", -1))[: 2 if with_class else 1]:
        example |= {
            f"{kind}_images": torch.full((3, 8, 8), sign * float(k)),
            f"{kind}_prompt": f"{kind} {k}",
            f"{kind}_original_size": torch.tensor([k, k]),
            f"{kind}_crop_top_left": torch.tensor([0, sign * k]),
        }
    return example


@pytest.mark.parametrize(
    "with_prior, expected_order", [(False, [1, 2, 3]), (True, [1, 2, 3, -1, -2, -3])], ids=["instance", "prior"]
)
def test_collate_puts_instances_first_then_classes(with_prior, expected_order):
    batch = collate_examples([_example(k, with_prior) for k in (1, 2, 3)], with_prior_preservation=with_prior)
    assert (
        batch["pixel_values"].shape == (len(expected_order), 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    )
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == expected_order
    assert batch["prompts"] == [f"{'instance' if k > 0 else 'class'} {abs(k)}" for k in expected_order]
    assert batch["crop_top_lefts"][:, 1].tolist() == expected_order and batch["original_sizes"].shape[1] == 2


def test_collate_with_prior_needs_class_examples():
    with pytest.raises(ValueError, match="no class_images"):
        collate_examples([_example(1, False)], with_prior_preservation=True)


def test_dataloader_end_to_end(tmp_path):
    make_demo_subject(tmp_path / "class", n_images=2, size=32, seed=1)
    dataset = DreamBoothDataset(
        DEMO_SUBJECT,
        "a photo of sks toy",
        resolution=32,
        random_flip=True,
        class_data_dir=tmp_path / "class",
        class_prompt="a photo of toy",
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, shuffle=True, collate_fn=lambda e: collate_examples(e, with_prior_preservation=True)
    )
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["pixel_values"].shape == (4, 3, 32, 32)
    assert batches[0]["prompts"] == ["a photo of sks toy"] * 2 + ["a photo of toy"] * 2


# ---------------------------------------------------------------- class images


def test_generate_class_images_resumes(tmp_path, pipeline):
    directory = tmp_path / "class"
    kwargs = {"num_inference_steps": 2, "resolution": 32, "batch_size": 2, "progress": False}
    assert generate_class_images(pipeline, directory, "a photo of toy", 2, **kwargs) == 2
    assert generate_class_images(pipeline, directory, "a photo of toy", 3, **kwargs) == 1
    assert generate_class_images(pipeline, directory, "a photo of toy", 3, **kwargs) == 0
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["class_00000.png", "class_00001.png", "class_00002.png"]  # no temporary files left
    assert all(Image.open(directory / n).size == (32, 32) for n in names)
    # image k is seeded seed + k: the resumed third image equals the third of one uninterrupted run
    fresh = tmp_path / "fresh"
    assert generate_class_images(pipeline, fresh, "a photo of toy", 3, **kwargs) == 3
    for name in names:
        assert Image.open(directory / name).tobytes() == Image.open(fresh / name).tobytes()


def test_generate_class_images_never_overwrites(tmp_path, pipeline):
    directory = tmp_path / "class"
    _save(directory / "class_00000.png", Image.new("RGB", (32, 32), RED))
    _save(directory / "photo.jpg", Image.new("RGB", (32, 32), BLUE))
    kwargs = {"num_inference_steps": 1, "resolution": 32, "progress": False}
    assert generate_class_images(pipeline, directory, "a photo of toy", 3, **kwargs) == 1
    assert sorted(p.name for p in directory.iterdir()) == ["class_00000.png", "class_00001.png", "photo.jpg"]
    assert Image.open(directory / "class_00000.png").getpixel((0, 0)) == RED


# ---------------------------------------------------------------- demo subject


def test_demo_subject_is_reproducible(tmp_path):
    paths = make_demo_subject(tmp_path, n_images=4, size=64, seed=0)
    committed = sorted(DEMO_SUBJECT.glob("*.png"))
    assert [p.name for p in paths] == [p.name for p in committed]
    for ours, theirs in zip(paths, committed):
        assert Image.open(ours).tobytes() == Image.open(theirs).tobytes()
    assert sum(p.stat().st_size for p in committed) < 100_000
    other = make_demo_subject(tmp_path / "other", n_images=2, size=64, seed=1)
    assert Image.open(other[0]).tobytes() != Image.open(paths[0]).tobytes()
