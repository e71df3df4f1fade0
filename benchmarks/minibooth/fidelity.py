"""Does the base model follow its prompts? Zero-shot attribute accuracy of its pictures under the MiniBooth CLIP.

For each held-out world scene, the base model draws the scene's full caption; for each attribute, CLIP then picks
among the captions that differ from the true one in that attribute only. The same test on the world's own pictures
of those scenes is the ceiling (what CLIP can tell), and 1 / (number of values) is chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from .world import Scene, World, caption

TESTED = ("shape", "color", "pattern", "size", "position", "background_pattern", "background_color")


def attribute_values(world: World, attribute: str) -> list[str]:
    return {
        "shape": list(world.shapes),
        "color": sorted(world.colors),
        "pattern": list(world.object_patterns),
        "size": sorted(world.sizes),
        "position": sorted(world.positions),
        "background_pattern": list(world.background_patterns),
        "background_color": sorted(world.colors),
    }[attribute]


def attribute_accuracy(scorer, images: Sequence, scenes: Sequence[Scene], world: World) -> dict[str, float]:
    """``{attribute: fraction of pictures whose true value CLIP ranks first}`` over ``images`` of ``scenes``, embedded
    as the evaluator embeds them (``scorer``: a :class:`dreambooth_gs.metrics.ClipScorer`)."""
    image_features = scorer.image_embeddings(images)  # (N, D), unit norm
    accuracy = {}
    for attribute in TESTED:
        values = attribute_values(world, attribute)
        correct = 0
        for feature, scene in zip(image_features, scenes):
            candidates = [caption(replace(scene, **{attribute: value})) for value in values]
            text_features = scorer.text_embeddings(candidates)  # (V, D), unit norm
            correct += int(values[int((text_features @ feature).argmax())] == getattr(scene, attribute))
        accuracy[attribute] = correct / len(scenes)
    return accuracy


def prompt_fidelity(pipeline_dir, clip_dir, scenes: Sequence[Scene], real: np.ndarray, world: World, steps, guidance):
    """``{"generated": accuracy, "real": accuracy, "chance": ...}`` for the base model at ``pipeline_dir``."""
    from dreambooth_gs.metrics import ClipScorer
    from dreambooth_gs.sampling import generate_images, load_pipeline

    from .clip_training import load_clip

    scorer = ClipScorer(*load_clip(clip_dir))
    pipeline = load_pipeline(str(pipeline_dir))
    prompts = [caption(scene) for scene in scenes]
    generated = generate_images(pipeline, prompts, list(range(len(prompts))), steps, guidance, batch_size=8)
    real_images = [Image.fromarray(picture) for picture in real]
    return {
        "pictures": len(scenes),
        "generated": attribute_accuracy(scorer, generated, scenes, world),
        "real": attribute_accuracy(scorer, real_images, scenes, world),
        "chance": {a: 1 / len(attribute_values(world, a)) for a in TESTED},
    }


def instance_ceiling(scorer, images: Sequence[Image.Image]) -> float:
    """CLIP-I of the subject's own instance pictures against each other (distinct pairs), embedded as the evaluator
    embeds them (``scorer``: a :class:`dreambooth_gs.metrics.ClipScorer`): what a model whose pictures were as close
    to the subject as the real ones are to each other would score."""
    if len(images) < 2:
        raise ValueError(f"the ceiling needs at least 2 instance pictures, got {len(images)}")
    features = scorer.image_embeddings(images)  # (M, D), unit norm
    similarity = features @ features.T  # (M, M)
    count = len(images)
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * count - count))


def subject_ceilings(clip_dir, subjects_dir, names: Sequence[str]) -> dict[str, float]:
    """``{subject: instance_ceiling}`` under the MiniBooth CLIP for the instance pictures in ``subjects_dir/<name>``."""
    from dreambooth_gs.metrics import ClipScorer

    from .clip_training import load_clip

    scorer = ClipScorer(*load_clip(clip_dir))
    ceilings = {}
    for name in names:
        paths = sorted(Path(subjects_dir, name).glob("*.png"))
        ceilings[name] = instance_ceiling(scorer, [Image.open(p) for p in paths])
    return ceilings
