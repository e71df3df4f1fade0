"""Does the base model follow its prompts? Attribute accuracy of its pictures under two judges.

For each held-out world scene, the base model draws the scene's full caption. The MiniBooth CLIP, zero-shot, picks
per attribute among the captions that differ from the true one in that attribute only; the attribute oracle
(oracle.py) reads every attribute directly. The same tests on the world's own pictures of those scenes are the
ceiling (what each judge can tell), and 1 / (number of values) is chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth_gs.demo.oracle import load_oracle, predict

from .oracle import accuracy, attribute_values, scene_truth
from .world import Scene, World, caption


def attribute_accuracy(scorer, images: Sequence, scenes: Sequence[Scene], world: World) -> dict[str, float]:
    """``{attribute: fraction of pictures whose true value CLIP ranks first}`` over ``images`` of ``scenes``, embedded
    as the evaluator embeds them (``scorer``: a :class:`dreambooth_gs.evaluate.metrics.ClipScorer`)."""
    image_features = scorer.image_embeddings(images)  # (N, D), unit norm
    result = {}
    for attribute, values in attribute_values(world).items():
        correct = 0
        for feature, scene in zip(image_features, scenes):
            candidates = [caption(replace(scene, **{attribute: value})) for value in values]
            text_features = scorer.text_embeddings(candidates)  # (V, D), unit norm
            correct += int(values[int((text_features @ feature).argmax())] == getattr(scene, attribute))
        result[attribute] = correct / len(scenes)
    return result


def prompt_fidelity(
    pipeline_dir, clip_dir, oracle_dir, scenes: Sequence[Scene], real: np.ndarray, world: World, steps, guidance
):
    """``{"clip": {"generated", "real"}, "oracle": {"generated", "real"}, "chance"}`` (accuracy per attribute) for
    the base model at ``pipeline_dir``."""
    from dreambooth_gs import families
    from dreambooth_gs.adapters.sampling import generate_images, load_pipeline
    from dreambooth_gs.evaluate.metrics import ClipScorer

    from .clip_training import load_clip

    scorer = ClipScorer(*load_clip(clip_dir))
    pipeline = load_pipeline(str(pipeline_dir))
    sampling = families.detect(str(pipeline_dir)).sampling_kwargs()
    prompts = [caption(scene) for scene in scenes]
    seeds = list(range(len(prompts)))
    generated = generate_images(pipeline, prompts, seeds, steps, guidance, batch_size=8, pipeline_kwargs=sampling)
    real_images = [Image.fromarray(picture) for picture in real]
    oracle = load_oracle(oracle_dir)
    truth = scene_truth(scenes)
    return {
        "pictures": len(scenes),
        "clip": {
            "generated": attribute_accuracy(scorer, generated, scenes, world),
            "real": attribute_accuracy(scorer, real_images, scenes, world),
        },
        "oracle": {
            "generated": accuracy(predict(oracle, generated), truth),
            "real": accuracy(predict(oracle, real), truth),
        },
        "chance": {name: 1 / len(values) for name, values in attribute_values(world).items()},
    }


def instance_ceiling(scorer, images: Sequence[Image.Image]) -> float:
    """CLIP-I of the subject's own instance pictures against each other (distinct pairs), embedded as the evaluator
    embeds them (``scorer``: a :class:`dreambooth_gs.evaluate.metrics.ClipScorer`): what a model whose pictures
    were as close to the subject as the real ones are to each other would score."""
    if len(images) < 2:
        raise ValueError(f"the ceiling needs at least 2 instance pictures, got {len(images)}")
    features = scorer.image_embeddings(images)  # (M, D), unit norm
    similarity = features @ features.T  # (M, M)
    count = len(images)
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * count - count))


def subject_ceilings(clip_dir, subjects_dir, names: Sequence[str]) -> dict[str, float]:
    """``{subject: instance_ceiling}`` under the MiniBooth CLIP for the instance pictures in ``subjects_dir/<name>``."""
    from dreambooth_gs.evaluate.metrics import ClipScorer

    from .clip_training import load_clip

    scorer = ClipScorer(*load_clip(clip_dir))
    ceilings = {}
    for name in names:
        paths = sorted(Path(subjects_dir, name).glob("*.png"))
        ceilings[name] = instance_ceiling(scorer, [Image.open(p) for p in paths])
    return ceilings


# -- fine-tuned runs under the oracle ---------------------------------------------------------------------------------

ORACLE_METRICS = (
    "subject_fidelity",
    "subject_color",
    "subject_pattern",
    "subject_fidelity_in_context",
    "context_fidelity",
)
SUBJECT_LOOK = ("color", "pattern")  # what makes a v2 subject (its shape is the class noun every prompt says)


def oracle_fidelity(
    oracle, run, images_dir, base_prompt: str, max_prompts: int | None, world: World, look: dict[str, str] | None
) -> dict[str, float]:
    """The oracle's scores of one evaluated run (``run``: evaluate_clip.py's RunSpec; its pictures under
    ``images_dir/<run_id>/``):

    * ``subject_fidelity``: the fraction of base-prompt pictures ("a sks circle") carrying the subject's look (its
      colour and pattern, ``look``; None for subjects outside the world's attributes, which leaves both subject
      scores out);
    * ``subject_color`` / ``subject_pattern``: the same for each part of the look alone (partial learning);
    * ``subject_fidelity_in_context``: the same over the contextual prompts that do not change the colour or pattern;
    * ``context_fidelity``: over the contextual prompts, the fraction of (picture, attribute the prompt names other
      than the shape) pairs the picture gets right: backgrounds, sizes, positions and colour / pattern changes.
    """
    from dreambooth_gs.evaluate.metrics import remove_token
    from dreambooth_gs.evaluate.plan import BASE, run_prompts, slug

    from .world import parse_caption

    subject_hits: dict[str, list[int]] = {key: [] for key in ORACLE_METRICS if key != "context_fidelity"}
    context_hits: list[int] = []
    for kind, prompt in run_prompts(run, base_prompt, max_prompts):
        paths = sorted((Path(images_dir) / run.run_id / f"{kind}-{slug(prompt)}").glob("*.png"))
        if not paths:
            raise FileNotFoundError(f"no pictures of {prompt!r} for {run.run_id} under {images_dir}")
        named = parse_caption(remove_token(prompt, run.token), world)
        readings = predict(oracle, [Image.open(path) for path in paths])
        if kind != BASE:
            context_hits += [int(r[a] == v) for r in readings for a, v in named.items() if a != "shape"]
        if look is not None and not set(named) & set(look):
            key = "subject_fidelity" if kind == BASE else "subject_fidelity_in_context"
            subject_hits[key] += [int(all(r[a] == v for a, v in look.items())) for r in readings]
            if kind == BASE:
                for attribute, value in look.items():
                    subject_hits[f"subject_{attribute}"] += [int(r[attribute] == value) for r in readings]
    scores = {"context_fidelity": sum(context_hits) / len(context_hits)} if context_hits else {}
    scores |= {name: sum(hits) / len(hits) for name, hits in subject_hits.items() if hits}
    return scores
