"""Evaluate DreamBooth runs: generate the protocol's images, score CLIP-I / CLIP-T / DINO, write tables and plots.

    python evaluate_clip.py --runs out/dog-gsoft out/dog-lora --output_dir out/eval/dog   # 25 x 10 + 30 images a run
    accelerate launch evaluate_clip.py --runs out/*-gsoft out/*-lora                        # generation on every GPU
    python evaluate_clip.py --runs out/demo --clip_model tiny-random --dino_model tiny-random \\
        --images_per_prompt 1 --base_images 2 --max_prompts 2 --num_inference_steps 2     # offline smoke run

Writes into --output_dir: images/ (resumable: existing PNGs are kept), results.csv (one row per run x prompt),
summary.md (a table per method, mean and std over subjects; failures), plots/ (CLIP-I vs CLIP-T per method; with
--adapter_scale 0 0.5 1 ..., clip_strength.png: each method's curve along the strength) and grids/ (one image grid
per subject, a row per method). See docs/evaluation.md.
"""

from __future__ import annotations

import sys

from dreambooth_gs.cli import parse_options, run_cli
from dreambooth_gs.evaluate.evaluation import EvaluationOptions, evaluate


def parse_args(input_args: list[str] | None = None) -> EvaluationOptions:
    return parse_options(EvaluationOptions, input_args, "evaluate_clip.py", __doc__)


def main(args: EvaluationOptions):
    return evaluate(args)


def run(argv: list[str] | None = None) -> None:
    """The ``dreambooth-gs-eval`` command (and ``python evaluate_clip.py``): one-line errors, exit status 2."""
    run_cli(main, parse_args(sys.argv[1:] if argv is None else argv), "evaluate_clip.py")


if __name__ == "__main__":
    run()
