"""A procedural demo subject (a striped toy robot) so that DreamBooth runs end to end without downloaded data.

``make_demo_subject`` draws the same toy in varied positions, sizes and backgrounds, deterministically from a seed;
``dreambooth_gs/resources/demo_subject/`` holds its output (class noun: "toy").
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..fileio import atomic_write

SUPERSAMPLE = 4  # draw at 4x and downscale: smooth edges, still deterministic
BACKGROUNDS = (  # (top colour, bottom colour) of a vertical gradient
    ((235, 228, 210), (196, 180, 150)),  # sand
    ((200, 225, 245), (120, 170, 215)),  # sky
    ((215, 240, 215), (120, 175, 120)),  # grass
    ((245, 215, 225), (190, 140, 170)),  # rose
    ((225, 225, 230), (150, 150, 160)),  # concrete
    ((250, 240, 200), (230, 190, 110)),  # wood
)
BODY_RED = (205, 40, 45)
STRIPE_YELLOW = (250, 205, 40)
HEAD_BLUE = (40, 90, 200)
EYE_WHITE = (250, 250, 250)
PUPIL = (20, 20, 30)
ANTENNA_GREEN = (40, 170, 80)
WHEEL_GREY = (60, 60, 70)


def _gradient(size: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    column = Image.new("RGB", (1, size))
    for y in range(size):
        t = y / max(size - 1, 1)
        column.putpixel((0, y), tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return column.resize((size, size), Image.NEAREST)


def draw_toy(draw: ImageDraw.ImageDraw, cx: float, cy: float, unit: float) -> None:
    """The subject: red body with yellow stripes, blue round head with eyes, green antenna, grey wheels.

    ``(cx, cy)`` is the body centre and ``unit`` a tenth of the toy's height, in pixels.
    """
    body = (cx - 2.5 * unit, cy - 2 * unit, cx + 2.5 * unit, cy + 2 * unit)
    for wx in (cx - 1.6 * unit, cx + 1.6 * unit):  # wheels behind the body
        draw.ellipse((wx - unit, cy + 1.2 * unit, wx + unit, cy + 3.2 * unit), fill=WHEEL_GREY)
    draw.rounded_rectangle(body, radius=0.6 * unit, fill=BODY_RED)
    for k in range(3):  # three horizontal stripes
        y0 = cy - 1.4 * unit + k * 1.2 * unit
        draw.rectangle((body[0], y0, body[2], y0 + 0.45 * unit), fill=STRIPE_YELLOW)
    head_cy = cy - 3.4 * unit
    draw.line(
        (cx, head_cy - 1.4 * unit, cx + 0.8 * unit, head_cy - 2.6 * unit),
        fill=ANTENNA_GREEN,
        width=max(1, round(0.35 * unit)),
    )
    draw.ellipse((cx + 0.5 * unit, head_cy - 3.0 * unit, cx + 1.2 * unit, head_cy - 2.3 * unit), fill=ANTENNA_GREEN)
    draw.ellipse((cx - 1.6 * unit, head_cy - 1.5 * unit, cx + 1.6 * unit, head_cy + 1.5 * unit), fill=HEAD_BLUE)
    for ex in (cx - 0.65 * unit, cx + 0.65 * unit):
        draw.ellipse((ex - 0.45 * unit, head_cy - 0.55 * unit, ex + 0.45 * unit, head_cy + 0.35 * unit), fill=EYE_WHITE)
        draw.ellipse((ex - 0.2 * unit, head_cy - 0.3 * unit, ex + 0.2 * unit, head_cy + 0.1 * unit), fill=PUPIL)


def render_demo_image(size: int, rng: random.Random, background: int) -> Image.Image:
    """One ``size`` x ``size`` RGB picture of the toy on ``BACKGROUNDS[background]``, at a random place and scale."""
    canvas = size * SUPERSAMPLE
    top, bottom = BACKGROUNDS[background]
    image = _gradient(canvas, top, bottom)
    draw = ImageDraw.Draw(image)
    unit = canvas * rng.uniform(0.055, 0.08)  # the toy is ~10 units tall: 55-80 % of the frame
    # keep the whole toy inside the frame: it spans x in [-2.6, 2.6] units and y in [-6.4, 3.2] units around (cx, cy)
    cx = rng.uniform(2.8 * unit, canvas - 2.8 * unit)
    cy = rng.uniform(6.5 * unit, canvas - 3.4 * unit)
    draw.ellipse((cx - 3 * unit, cy + 2.9 * unit, cx + 3 * unit, cy + 3.5 * unit), fill=tuple(c - 40 for c in bottom))
    draw_toy(draw, cx, cy, unit)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image.resize((size, size), Image.LANCZOS)


def make_demo_subject(directory: str | os.PathLike, n_images: int = 4, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``n_images`` PNGs of the demo toy (``toy_00.png``, ...) into ``directory``; returns their paths.

    Same arguments, same bytes: everything is drawn from ``random.Random(seed)``.
    """
    if n_images < 1:
        raise ValueError(f"n_images={n_images}; ask for at least 1 image")
    if size < 16:
        raise ValueError(f"size={size} is too small to draw the toy; use size >= 16 (e.g. 64)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    backgrounds = rng.sample(range(len(BACKGROUNDS)), len(BACKGROUNDS))  # no repeat before all were used
    paths = []
    for index in range(n_images):
        path = directory / f"toy_{index:02d}.png"
        image = render_demo_image(size, rng, backgrounds[index % len(backgrounds)])
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG", optimize=True))
        paths.append(path)
    return paths
