"""The MiniBooth world: one object (shape, colour, pattern, size, position) on a patterned background, with a caption
made from its attributes ("a small red striped star on a dotted blue background, top left").

Everything is deterministic from (seed, index); the attribute values live in ``world.json``. Pictures are drawn with
PIL at 4x and downscaled, so edges are smooth and the same on every machine. ``subjects.py`` reuses the shape,
pattern and background drawers for the held-out subjects.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WORLD_FILE = Path(__file__).resolve().parent / "world.json"
WORLD_V2_FILE = WORLD_FILE.with_name("world_v2.json")
SUPERSAMPLE = 4
ATTRIBUTES = ("size", "color", "pattern", "background_pattern", "background_color", "position")
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class World:
    """The attribute vocabulary of the world (see world.json)."""

    colors: dict[str, RGB]
    shapes: tuple[str, ...]
    object_patterns: tuple[str, ...]
    background_patterns: tuple[str, ...]
    sizes: dict[str, float]
    positions: dict[str, tuple[float, float]]
    jitter: float
    caption_keep: dict[str, float]
    # (shape, colour) pairs the world never draws together: the held-out subjects of a subjects file of kind
    # "world" (``held_out_subjects`` in the world file), so that the base model has seen each part, never the whole.
    held_out: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Scene:
    """The attributes of one picture; ``offset`` is the jitter of the centre (fractions of the frame)."""

    shape: str
    color: str
    pattern: str
    size: str
    position: str
    background_color: str
    background_pattern: str
    offset: tuple[float, float] = (0.0, 0.0)


def load_world(path: str | os.PathLike = WORLD_FILE) -> World:
    """The world described by ``path``; unknown shapes or patterns (no drawer for them) raise ValueError.

    ``"extends": "<world file>"`` (relative to this one) starts from that file's keys; ``"held_out_subjects":
    "<subjects file>"`` leaves out of the world every (shape, colour) pair of that file's subjects (a file of kind
    "world", see subjects.py).
    """
    path = Path(path)
    data = json.loads(path.read_text())
    base = extended_file(path)
    if base is not None:
        data = json.loads(base.read_text()) | data
    held_out = frozenset()
    if data.get("held_out_subjects"):
        subjects = json.loads((path.parent / data["held_out_subjects"]).read_text())
        if subjects.get("kind") != "world":
            raise ValueError(f'{path}: held_out_subjects must name a subjects file of kind "world"')
        held_out = frozenset((entry["shape"], entry["color"]) for entry in subjects["subjects"])
    world = World(
        colors={k: tuple(v) for k, v in data["colors"].items()},
        shapes=tuple(data["shapes"]),
        object_patterns=tuple(data["object_patterns"]),
        background_patterns=tuple(data["background_patterns"]),
        sizes=dict(data["sizes"]),
        positions={k: tuple(v) for k, v in data["positions"].items()},
        jitter=float(data["jitter"]),
        caption_keep={k: float(data["caption_keep"][k]) for k in ATTRIBUTES},
        held_out=held_out,
    )
    unknown_pairs = sorted((s, c) for s, c in held_out if s not in world.shapes or c not in world.colors)
    if unknown_pairs:
        raise ValueError(f"{path}: held-out (shape, colour) pairs {unknown_pairs} are not in the world")
    for kind, names, known in (
        ("shape", world.shapes, SHAPE_POINTS),
        ("object pattern", world.object_patterns, OBJECT_PATTERNS),
        ("background pattern", world.background_patterns, BACKGROUND_PATTERNS),
    ):
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"{path}: {kind}s {unknown} have no drawer; known: {', '.join(sorted(known))}")
    return world


def extended_file(path: str | os.PathLike) -> Path | None:
    """The world file that ``path`` extends (its ``"extends"`` key), or None."""
    path = Path(path)
    name = json.loads(path.read_text()).get("extends")
    return path.parent / name if name else None


# -- sampling and captions ------------------------------------------------------------------------------------------


def scene_rng(seed: int, index: int, stream: str = "scene") -> random.Random:
    """An RNG for item ``index`` of the world with ``seed``: independent of every other item, same on every run."""
    return random.Random(f"minibooth:{stream}:{seed}:{index}")


def sample_scene(rng: random.Random, world: World) -> Scene:
    """A random scene; the object's colour always differs from the background's, and its (shape, colour) is never a
    held-out pair (drawn again until it is not)."""
    while True:  # the draws in the order of a world without held-out pairs, whose scenes are unchanged
        color = rng.choice(sorted(world.colors))
        background = rng.choice([c for c in sorted(world.colors) if c != color])
        shape = rng.choice(world.shapes)
        if (shape, color) not in world.held_out:
            break
    return Scene(
        shape=shape,
        color=color,
        pattern=rng.choice(world.object_patterns),
        size=rng.choice(sorted(world.sizes)),
        position=rng.choice(sorted(world.positions)),
        background_color=background,
        background_pattern=rng.choice(world.background_patterns),
        offset=(rng.uniform(-world.jitter, world.jitter), rng.uniform(-world.jitter, world.jitter)),
    )


def caption(scene: Scene, keep: dict[str, bool] | None = None) -> str:
    """The caption of ``scene`` mentioning the attributes ``keep`` marks (all when None); the shape is always said.

    A plain object pattern is not said ("a red star"); a background is "on a [pattern] [colour] background".
    """
    keep = keep or dict.fromkeys(ATTRIBUTES, True)
    words = ["a"]
    if keep["size"]:
        words.append(scene.size)
    if keep["color"]:
        words.append(scene.color)
    if keep["pattern"] and scene.pattern != "plain":
        words.append(scene.pattern)
    words.append(scene.shape)
    if keep["background_pattern"] or keep["background_color"]:
        words.append("on a")
        if keep["background_pattern"]:
            words.append(scene.background_pattern)
        if keep["background_color"]:
            words.append(scene.background_color)
        words.append("background")
    text = " ".join(words)
    return f"{text}, {scene.position}" if keep["position"] else text


def random_caption(scene: Scene, rng: random.Random, world: World, keep_scale: float = 1.0) -> str:
    """A caption that mentions each attribute with probability ``world.caption_keep`` (raised toward 1 by
    ``keep_scale`` < 1: the probability of dropping is multiplied by it)."""
    keep = {name: rng.random() < 1.0 - (1.0 - world.caption_keep[name]) * keep_scale for name in ATTRIBUTES}
    return caption(scene, keep)


def caption_pattern(world: World) -> re.Pattern:
    """A regex that matches exactly the captions :func:`caption` can write, with one named group per attribute."""

    def one_of(names) -> str:
        return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))

    colors = one_of(world.colors)
    return re.compile(
        rf"^a (?:(?P<size>{one_of(world.sizes)}) )?(?:(?P<color>{colors}) )?"
        rf"(?:(?P<pattern>{one_of(p for p in world.object_patterns if p != 'plain')}) )?"
        rf"(?P<shape>{one_of(world.shapes)})"
        rf"(?: on a (?:(?P<background_pattern>{one_of(world.background_patterns)}) )?"
        rf"(?:(?P<background_color>{colors}) )?background)?(?:, (?P<position>{one_of(world.positions)}))?$"
    )


def parse_caption(text: str, world: World) -> dict[str, str]:
    """The attributes a world caption mentions, ``{name: value}``; ValueError for text that is not a caption."""
    found = caption_pattern(world).match(text)
    if found is None or "on a background" in text:
        raise ValueError(f"{text!r} is not a MiniBooth caption (a [size] [colour] [pattern] shape [on a ...])")
    return {name: value for name, value in found.groupdict().items() if value is not None}


# -- drawing --------------------------------------------------------------------------------------------------------


def _heart(n: int = 48) -> list[tuple[float, float]]:
    points = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17.0, -(y + 2.5) / 15.0))  # y grows downward on screen
    return points


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    radii = [1.0 if k % 2 == 0 else inner for k in range(2 * points)]
    return [(r * math.sin(math.pi * k / points), -r * math.cos(math.pi * k / points)) for k, r in enumerate(radii)]


def _regular(sides: int, start: float) -> list[tuple[float, float]]:
    angles = [start + 2 * math.pi * k / sides for k in range(sides)]
    return [(math.cos(a), math.sin(a)) for a in angles]


_ARM = 0.34  # half width of the cross's arms
SHAPE_POINTS: dict[str, list[tuple[float, float]] | None] = {  # unit outlines in [-1, 1]^2; None: an ellipse
    "circle": None,
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "star": _star(),
    "heart": _heart(),
    "diamond": [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)],
    "cross": [
        (-_ARM, -1),
        (_ARM, -1),
        (_ARM, -_ARM),
        (1, -_ARM),
        (1, _ARM),
        (_ARM, _ARM),
        (_ARM, 1),
        (-_ARM, 1),
        (-_ARM, _ARM),
        (-1, _ARM),
        (-1, -_ARM),
        (-_ARM, -_ARM),
    ],  # fmt: skip
    "hexagon": _regular(6, -math.pi / 2),
}
OBJECT_PATTERNS = ("plain", "striped", "dotted")
BACKGROUND_PATTERNS = ("plain", "striped", "dotted", "checkered")


def luminance(color: RGB) -> float:
    r, g, b = color
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255.0


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def tint(color: RGB) -> RGB:
    """The second colour of a patterned background: lighter, or darker for very light colours."""
    return mix(color, (0, 0, 0), 0.22) if luminance(color) > 0.85 else mix(color, (255, 255, 255), 0.5)


def ink(color: RGB) -> RGB:
    """The colour of stripes and dots on an object: white on dark colours, black on light ones."""
    return (25, 25, 25) if luminance(color) > 0.6 else (250, 250, 250)


def shape_mask(shape: str, cx: float, cy: float, half: float, canvas: int, scale: float = 1.0) -> Image.Image:
    """An 'L' mask of ``shape`` centred at (cx, cy) with half-side ``half * scale`` pixels, on a canvas x canvas."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    r = half * scale
    outline = SHAPE_POINTS[shape]
    if outline is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in outline], fill=255)
    return mask


def pattern_layer(pattern: str, color: RGB, accent: RGB, box: tuple[float, float, float, float], canvas: int):
    """A canvas-sized RGB layer: ``color`` with ``pattern`` in ``accent`` laid over ``box`` (x0, y0, x1, y1)."""
    layer = Image.new("RGB", (canvas, canvas), color)
    draw = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = box
    period = (x1 - x0) / 4
    if pattern == "striped":  # horizontal bands
        y = y0 + period / 4
        while y < y1:
            draw.rectangle((x0, y, x1, y + period / 2), fill=accent)
            y += period
    elif pattern == "dotted":
        radius = (x1 - x0) / 16
        for i in range(5):
            for j in range(5):
                px, py = x0 + (i + 0.5 - 0.5 * (j % 2)) * period, y0 + (j + 0.25) * period
                draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=accent)
    elif pattern != "plain":
        raise ValueError(f"unknown object pattern {pattern!r}; known: {', '.join(OBJECT_PATTERNS)}")
    return layer


def draw_background(pattern: str, color: RGB, canvas: int) -> Image.Image:
    """A canvas x canvas background: ``color``, with vertical stripes, dots or checks in its tint."""
    image = Image.new("RGB", (canvas, canvas), color)
    draw = ImageDraw.Draw(image)
    second, cell = tint(color), canvas / 8
    if pattern == "striped":  # vertical stripes, so that they differ from the objects' horizontal ones
        for k in range(0, 8, 2):
            draw.rectangle((k * cell, 0, (k + 1) * cell - 1, canvas), fill=second)
    elif pattern == "dotted":
        radius = cell / 5
        for i in range(8):
            for j in range(8):
                px, py = (i + 0.5) * cell, (j + 0.5) * cell
                draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=second)
    elif pattern == "checkered":
        for i in range(8):
            for j in range(i % 2, 8, 2):
                draw.rectangle((i * cell, j * cell, (i + 1) * cell - 1, (j + 1) * cell - 1), fill=second)
    elif pattern != "plain":
        raise ValueError(f"unknown background pattern {pattern!r}; known: {', '.join(BACKGROUND_PATTERNS)}")
    return image


def object_center(scene: Scene, world: World, side: float) -> tuple[float, float]:
    """Centre of the object (fractions of the frame): the position's anchor plus jitter, kept inside the frame."""
    ax, ay = world.positions[scene.position]
    low, high = side / 2 + 0.02, 1 - side / 2 - 0.02
    return (min(max(ax + scene.offset[0], low), high), min(max(ay + scene.offset[1], low), high))


def render_scene(scene: Scene, world: World, resolution: int = 64) -> Image.Image:
    """The picture of ``scene``: ``resolution`` x ``resolution`` RGB."""
    canvas = resolution * SUPERSAMPLE
    image = draw_background(scene.background_pattern, world.colors[scene.background_color], canvas)
    side = world.sizes[scene.size]
    cx, cy = (c * canvas for c in object_center(scene, world, side))
    half = side * canvas / 2
    color = world.colors[scene.color]
    layer = pattern_layer(scene.pattern, color, ink(color), (cx - half, cy - half, cx + half, cy + half), canvas)
    image.paste(layer, mask=shape_mask(scene.shape, cx, cy, half, canvas))
    return image.resize((resolution, resolution), Image.LANCZOS)


def world_item(seed: int, index: int, world: World, resolution: int = 64) -> tuple[Image.Image, Scene]:
    """Item ``index`` of the world with ``seed``: its picture and its scene."""
    scene = sample_scene(scene_rng(seed, index), world)
    return render_scene(scene, world, resolution), scene


def render_world(
    count: int, seed: int, world: World, resolution: int = 64, start: int = 0
) -> tuple[np.ndarray, list[Scene]]:
    """Items ``start .. start + count - 1``: pictures as one uint8 array (count, R, R, 3) and their scenes."""
    pixels = np.empty((count, resolution, resolution, 3), dtype=np.uint8)  # (N, R, R, 3)
    scenes = []
    for k in range(count):
        image, scene = world_item(seed, start + k, world, resolution)
        pixels[k] = np.asarray(image)
        scenes.append(scene)
    return pixels, scenes
