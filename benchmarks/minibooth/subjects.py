"""MiniBooth's held-out subjects, and their instance pictures. Two kinds of subjects file:

* sprites (``subjects.json``, MiniBooth v1): a world shape (its class noun) drawn in colours outside the world's
  palette with a pattern the world does not have (zigzag, concentric, split, eyes) and extras (outline, crown, ring);
* world objects (``subjects_v2.json``, ``"kind": "world"``, MiniBooth v2): a shape, colour and pattern of the world
  whose (shape, colour) pair the v2 world (``world_v2.json``) never draws: every part seen in pretraining, the whole
  never, and every attribute one the base model renders and the oracle (oracle.py) reads.

Instance pictures put the subject on world backgrounds at varied places and sizes, deterministically from (seed,
subject name).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .world import RGB, SUPERSAMPLE, Scene, World, draw_background, render_scene, shape_mask

SUBJECTS_FILE = Path(__file__).resolve().parent / "subjects.json"
SUBJECTS_V2_FILE = SUBJECTS_FILE.with_name("subjects_v2.json")
SUBJECT_PATTERNS = ("zigzag", "concentric", "split", "eyes")
SUBJECT_EXTRAS = ("outline", "crown", "ring")
INSTANCE_SIZES = (0.5, 0.6, 0.7)  # sprite side as a fraction of the frame: medium to large, as in subject photos


@dataclass(frozen=True)
class Subject:
    name: str
    class_name: str
    body: str
    color: RGB
    accent: RGB
    pattern: str
    extras: tuple[str, ...]
    sweep: bool


@dataclass(frozen=True)
class WorldSubject:
    """A world object whose (shape, colour) pair the world it is held out of never draws (v2)."""

    name: str
    class_name: str
    shape: str
    color: str  # a world colour name
    pattern: str  # a world object pattern
    sweep: bool

    def attributes(self) -> dict[str, str]:
        """What makes the subject itself, by the oracle's attribute names."""
        return {"shape": self.shape, "color": self.color, "pattern": self.pattern}


def load_subjects(
    path: str | os.PathLike = SUBJECTS_FILE, world: World | None = None
) -> tuple[list[Subject] | list[WorldSubject], int]:
    """``(subjects, instance images per subject)`` from ``path``; bad names, or (with ``world``) colours, patterns
    or bodies the world does not allow for held-out subjects, raise ValueError."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") == "world":
        subjects = [
            WorldSubject(e["name"], e["class_name"], e["shape"], e["color"], e["pattern"], bool(e.get("sweep", False)))
            for e in data["subjects"]
        ]
        if world is not None:
            check_held_out_objects(subjects, world, path)
        if sum(s.sweep for s in subjects) != 1:
            raise ValueError(f'{path}: mark exactly one subject with "sweep": true (the learning-rate sweep subject)')
        return subjects, int(data["instance_images"])
    colors = {k: tuple(v) for k, v in data["colors"].items()}
    subjects = []
    for entry in data["subjects"]:
        for key, value in (("color", entry["color"]), ("accent", entry["accent"])):
            if value not in colors:
                raise ValueError(f"{path}: subject {entry['name']!r} {key} {value!r} is not in its colors table")
        if entry["pattern"] not in SUBJECT_PATTERNS:
            raise ValueError(f"{path}: subject {entry['name']!r} pattern must be one of {', '.join(SUBJECT_PATTERNS)}")
        unknown = sorted(set(entry.get("extras", ())) - set(SUBJECT_EXTRAS))
        if unknown:
            raise ValueError(f"{path}: subject {entry['name']!r} extras {unknown}; known: {', '.join(SUBJECT_EXTRAS)}")
        subjects.append(
            Subject(
                name=entry["name"],
                class_name=entry["class_name"],
                body=entry["body"],
                color=colors[entry["color"]],
                accent=colors[entry["accent"]],
                pattern=entry["pattern"],
                extras=tuple(entry.get("extras", ())),
                sweep=bool(entry.get("sweep", False)),
            )
        )
    if world is not None:
        check_held_out(subjects, world)
    if sum(s.sweep for s in subjects) != 1:
        raise ValueError(f'{path}: mark exactly one subject with "sweep": true (the learning-rate sweep subject)')
    return subjects, int(data["instance_images"])


def check_held_out(subjects: list[Subject], world: World) -> None:
    """ValueError unless every subject's colours are outside the world's palette and its body is a world shape."""
    palette = set(world.colors.values())
    for subject in subjects:
        if subject.body not in world.shapes or subject.class_name != subject.body:
            raise ValueError(f"subject {subject.name!r}: body and class_name must be the same world shape")
        if {subject.color, subject.accent} & palette:
            raise ValueError(f"subject {subject.name!r} uses a colour of the world's palette; held-out means unseen")
        if subject.pattern in world.object_patterns or subject.pattern in world.background_patterns:
            raise ValueError(f"subject {subject.name!r} pattern {subject.pattern!r} exists in the world")


def check_held_out_objects(subjects: list[WorldSubject], world: World, path: str | os.PathLike) -> None:
    """ValueError unless every subject is made of world attributes and its (shape, colour) pair is held out."""
    for subject in subjects:
        where = f"{path}: subject {subject.name!r}"
        if subject.shape not in world.shapes or subject.class_name != subject.shape:
            raise ValueError(f"{where}: shape and class_name must be the same world shape")
        if subject.color not in world.colors or subject.pattern not in world.object_patterns:
            raise ValueError(f"{where}: colour {subject.color!r} / pattern {subject.pattern!r} are not the world's")
        if (subject.shape, subject.color) not in world.held_out:
            raise ValueError(
                f"{where}: the world draws {subject.color} {subject.shape}s, so the subject is not held out; load "
                "the world that leaves it out (world_v2.json)"
            )


# -- drawing --------------------------------------------------------------------------------------------------------


def _zigzag_band(draw: ImageDraw.ImageDraw, cx: float, cy: float, half: float, color: RGB) -> None:
    teeth, amplitude, thickness = 5, 0.16 * half, 0.3 * half
    xs = [cx - half + 2 * half * k / (2 * teeth) for k in range(2 * teeth + 1)]
    top = [(x, cy - thickness / 2 + (amplitude if k % 2 else -amplitude)) for k, x in enumerate(xs)]
    bottom = [(x, y + thickness) for x, y in reversed(top)]
    draw.polygon(top + bottom, fill=color)


def _pattern(subject: Subject, cx: float, cy: float, half: float, canvas: int) -> Image.Image:
    """The sprite's fill (canvas-sized RGB), to be pasted through the body mask."""
    layer = Image.new("RGB", (canvas, canvas), subject.color)
    draw = ImageDraw.Draw(layer)
    if subject.pattern == "zigzag":
        _zigzag_band(draw, cx, cy + 0.15 * half, half, subject.accent)
    elif subject.pattern == "concentric":
        for k, scale in enumerate((0.75, 0.5, 0.25)):
            fill = subject.accent if k % 2 == 0 else subject.color
            layer.paste(fill, mask=shape_mask(subject.body, cx, cy, half, canvas, scale))
    elif subject.pattern == "split":
        draw.rectangle((cx, 0, canvas, canvas), fill=subject.accent)
    return layer


def draw_subject(image: Image.Image, subject: Subject, cx: float, cy: float, half: float) -> None:
    """Draw ``subject`` onto ``image`` (in place), centred at (cx, cy) with half-side ``half`` pixels."""
    canvas = image.size[0]
    body_scale = 1.0
    if "outline" in subject.extras:
        image.paste(subject.accent, mask=shape_mask(subject.body, cx, cy, half, canvas))
        body_scale = 0.84
    fill = _pattern(subject, cx, cy, half, canvas)
    image.paste(fill, mask=shape_mask(subject.body, cx, cy, half, canvas, body_scale))
    draw = ImageDraw.Draw(image)
    if subject.pattern == "eyes":
        for ex in (cx - 0.32 * half, cx + 0.32 * half):
            ey, r = cy - 0.12 * half, 0.2 * half
            draw.ellipse((ex - r, ey - r, ex + r, ey + r), fill=(250, 250, 250))
            draw.ellipse((ex - r / 2, ey - r / 2, ex + r / 2, ey + r / 2), fill=subject.accent)
    if "ring" in subject.extras:
        r = 0.3 * half
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(250, 250, 250), width=max(1, round(0.1 * half)))
    if "crown" in subject.extras:
        base, top, w = cy - 0.35 * half, cy - 0.95 * half, 0.45 * half
        points = [(cx - w, base), (cx - w, top), (cx - w / 2, base - 0.25 * half), (cx, top - 0.05 * half)]
        points += [(cx + w / 2, base - 0.25 * half), (cx + w, top), (cx + w, base)]
        draw.polygon(points, fill=subject.accent)


def instance_scene(subject: WorldSubject, world: World, seed: int, index: int) -> Scene:
    """The world scene of instance picture ``index`` of a v2 subject: medium or large (as subject photos are), any
    world position, a background colour other than the subject's, the background patterns in turn."""
    rng = random.Random(f"minibooth:subject:{subject.name}:{seed}:{index}")
    colors = [c for c in sorted(world.colors) if c != subject.color]
    return Scene(
        shape=subject.shape,
        color=subject.color,
        pattern=subject.pattern,
        size=rng.choice(("medium", "large")),
        position=rng.choice(sorted(world.positions)),
        background_color=colors[(rng.randrange(len(colors)) + index * 2) % len(colors)],
        background_pattern=world.background_patterns[index % len(world.background_patterns)],
        offset=(rng.uniform(-world.jitter, world.jitter), rng.uniform(-world.jitter, world.jitter)),
    )


def render_instance(
    subject: Subject | WorldSubject, world: World, seed: int, index: int, resolution: int = 64
) -> Image.Image:
    """Instance picture ``index`` of ``subject``: a world background, a varied size and place, deterministic."""
    if isinstance(subject, WorldSubject):
        return render_scene(instance_scene(subject, world, seed, index), world, resolution)
    rng = random.Random(f"minibooth:subject:{subject.name}:{seed}:{index}")
    canvas = resolution * SUPERSAMPLE
    colors = sorted(world.colors)
    background = colors[(rng.randrange(len(colors)) + index * 2) % len(colors)]
    pattern = world.background_patterns[index % len(world.background_patterns)]
    image = draw_background(pattern, world.colors[background], canvas)
    side = rng.choice(INSTANCE_SIZES)
    low, high = side / 2 + 0.02, 1 - side / 2 - 0.02
    cx, cy = (rng.uniform(low, high) * canvas for _ in range(2))
    draw_subject(image, subject, cx, cy, side * canvas / 2)
    return image.resize((resolution, resolution), Image.LANCZOS)


def write_subject_images(
    subject: Subject | WorldSubject,
    world: World,
    directory: str | os.PathLike,
    count: int,
    seed: int = 0,
    resolution: int = 64,
) -> Path:
    """Write ``count`` instance PNGs and ``subject.json`` (its class noun, for the trainer) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        render_instance(subject, world, seed, index, resolution).save(directory / f"{subject.name}_{index:02d}.png")
    (directory / "subject.json").write_text(json.dumps({"class_name": subject.class_name}) + "\n")
    return directory
