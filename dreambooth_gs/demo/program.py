"""``make demo``: teach the shipped MiniBooth world model a subject it has never drawn, and show it.

    python -m dreambooth_gs.demo                      # GSOFT: a before / after grid and the oracle's scores
    python -m dreambooth_gs.demo --compare lora       # GSOFT and LoRA side by side (make demo-compare)

The model (``dreambooth_gs/resources/minibooth``, see its README) was pretrained by this project on its procedural
world of coloured, patterned shapes; the subject is a shape in a colour and pattern that never appeared together in
pretraining. The real trainer fine-tunes it (MiniBooth v2's recipe: 400 steps, batch 4, each method at the rate
MiniBooth's sweep chose), then the base model and each adapter draw the same seeds on the subject prompt and three
contextual prompts, and the attribute oracle reads the subject prompt's pictures: subject fidelity is the fraction
carrying the subject's colour and pattern.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..adapters.sampling import generate_images, labeled_grid, load_pipeline
from ..cli import parse_options
from ..fileio import atomic_write, atomic_write_text
from ..resources import resource_path
from .oracle import load_oracle, predict

MODEL_DIR = resource_path("minibooth")
TOKEN = "sks"
CONTEXT_PROMPTS = (  # three of MiniBooth's contextual prompts: two backgrounds unlike the subject's, a place and size
    "a {token} {cls} on a striped yellow background",
    "a {token} {cls} on a dotted green background",
    "a small {token} {cls}, top left",
)
# MiniBooth v2's adapter sizes and the learning rates its sweep chose (docs/benchmarks.md, "MiniBooth (v2)")
RECIPES = {
    "gsoft": (["--gsoft_nblocks", "8"], 6e-4),
    "double_gsoft": (["--gsoft_nblocks", "16"], 6e-4),
    "boft": (["--boft_block_num", "8", "--boft_n_butterfly_factor", "4"], 3e-4),
    "lora": (["--lora_rank", "4"], 3e-3),
    "oft": (["--oft_block_size", "8"], 2e-3),
    "full": ([], 1.5e-4),
}


@dataclass
class DemoOptions:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the runs, grid and scores go."})
    adapter: str = field(
        default="gsoft", metadata={"help": f"The method to train: {', '.join(RECIPES)}.", "choices": list(RECIPES)}
    )
    compare: list[str] = field(
        default_factory=list,
        metadata={"help": "More methods, trained on the same subject and shown below it (e.g. --compare lora)."},
    )
    max_train_steps: int = field(default=400, metadata={"help": "Optimizer steps of each run."})
    base_model_precision: str = field(
        default="no_change",
        metadata={"help": "As the trainer's: int8-torchao trains on an int8 base (pictures are drawn in float32)."},
    )
    seeds: int = field(default=2, metadata={"help": "Grid columns per prompt (the same seeds in every row)."})
    score_images: int = field(default=16, metadata={"help": "Subject-prompt pictures the oracle scores per row."})
    num_inference_steps: int = field(default=25, metadata={"help": "DDIM steps per picture."})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance."})
    overwrite: bool = field(
        default=False, metadata={"help": "Train again even where a finished run of the same settings is there."}
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads. Default: torch's."})

    def __post_init__(self) -> None:
        unknown = [m for m in [self.adapter, *self.compare] if m not in RECIPES]
        if unknown:
            raise ValueError(f"--adapter / --compare take {', '.join(RECIPES)}; got {', '.join(unknown)}")
        for name in ("max_train_steps", "seeds", "score_images", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")


def check_model(model_dir: Path = MODEL_DIR) -> dict:
    """The shipped model's subject description; one clear error when the package data is missing."""
    if not (model_dir / "model_index.json").is_file() or not (model_dir / "subject" / "subject.json").is_file():
        raise FileNotFoundError(
            f"the demo's model is missing from {model_dir}: reinstall dreambooth-gs (pip install -e .) or rebuild it "
            "with python benchmarks/minibooth/demo_model.py"
        )
    return json.loads((model_dir / "subject" / "subject.json").read_text())


def train_arguments(options: DemoOptions, method: str, subject: dict, run_dir: Path, model_dir: Path) -> list[str]:
    flags, learning_rate = RECIPES[method]
    return [
        "--pretrained_model_name_or_path", str(model_dir),
        "--instance_data_dir", str(model_dir / "subject"),
        "--instance_prompt", f"a {TOKEN} {subject['class_name']}",
        "--output_dir", str(run_dir),
        "--adapter", method, *flags,
        "--learning_rate", str(learning_rate),
        "--max_train_steps", str(options.max_train_steps),
        "--train_batch_size", "4",
        "--lr_scheduler", "constant",
        "--resolution", "64",
        "--checkpointing_steps", "1000000",
        "--report_to", "none",
        "--seed", "0",
        "--base_model_precision", options.base_model_precision,
        "--overwrite_output_dir",
    ]  # fmt: skip


def train(options: DemoOptions, method: str, subject: dict, model_dir: Path, log) -> tuple[Path, float | None]:
    """Train ``method`` into ``<output_dir>/<method>`` with the real trainer; a finished run of the same arguments
    is reused (``None`` seconds) unless ``--overwrite``."""
    from ..commands.train import parse_args as parse_training_args
    from ..train.loop import train as train_main

    run_dir = Path(options.output_dir) / method
    arguments = train_arguments(options, method, subject, run_dir, model_dir)
    record = run_dir / "demo_run.json"
    if not options.overwrite and record.is_file() and json.loads(record.read_text()) == arguments:
        if (run_dir / "adapter_model.safetensors").is_file():
            log(f"{method}: reusing the finished run in {run_dir} (--overwrite trains again)")
            return run_dir, None
    log(f"{method}: training {options.max_train_steps} steps (lr {RECIPES[method][1]:g}) ...")
    start = time.perf_counter()
    train_main(parse_training_args(arguments))
    seconds = time.perf_counter() - start
    atomic_write_text(record, json.dumps(arguments) + "\n")
    return run_dir, seconds


def draw(pipeline, prompts: list[str], seeds: list[int], options: DemoOptions) -> list[Image.Image]:
    """One picture per (prompt, seed), prompt-major."""
    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    return generate_images(
        pipeline,
        [p for p, _ in pairs],
        [s for _, s in pairs],
        options.num_inference_steps,
        options.guidance_scale,
        batch_size=16,
    )


def subject_fidelity(oracle, images: list[Image.Image], subject: dict) -> dict[str, float]:
    """The fraction of ``images`` the oracle reads in the subject's colour and pattern (and in each alone)."""
    readings = predict(oracle, images)
    hits = {
        "subject_fidelity": [r["color"] == subject["color"] and r["pattern"] == subject["pattern"] for r in readings],
        "subject_color": [r["color"] == subject["color"] for r in readings],
        "subject_pattern": [r["pattern"] == subject["pattern"] for r in readings],
    }
    return {name: sum(values) / len(values) for name, values in hits.items()}


def run_demo(options: DemoOptions, model_dir: Path = MODEL_DIR, log=print) -> dict:
    """Train, draw, score; returns the scores document (also written to ``scores.json``)."""
    if options.num_threads:
        torch.set_num_threads(options.num_threads)
    subject = check_model(model_dir)
    methods = list(dict.fromkeys([options.adapter, *options.compare]))
    output = Path(options.output_dir)
    runs = {method: train(options, method, subject, model_dir, log) for method in methods}

    subject_prompt = f"a {TOKEN} {subject['class_name']}"
    prompts = [subject_prompt, *(p.format(token=TOKEN, cls=subject["class_name"]) for p in CONTEXT_PROMPTS)]
    grid_seeds = list(range(options.seeds))
    score_seeds = list(range(1000, 1000 + options.score_images))  # other seeds than the grid's
    oracle = load_oracle(model_dir / "oracle").float()
    instance = [Image.open(path).convert("RGB") for path in sorted((model_dir / "subject").glob("*.png"))]
    rows, labels, scores = [], [], {}
    for name, adapter_dir in [("base", None), *((m, runs[m][0]) for m in methods)]:
        log(f"drawing {'the base model' if adapter_dir is None else name} ...")
        pipeline = load_pipeline(str(model_dir), adapter_dir)
        rows.append([_enlarged(image) for image in draw(pipeline, prompts, grid_seeds, options)])
        scores[name] = subject_fidelity(oracle, draw(pipeline, [subject_prompt], score_seeds, options), subject)
        seconds = None if adapter_dir is None else runs[name][1]
        scores[name]["train_seconds"] = seconds
        labels.append(_row_label(name, scores[name]["subject_fidelity"]))
    columns = [prompt for prompt in prompts for _ in grid_seeds]
    grid = _stacked(
        labeled_grid([[_enlarged(image) for image in instance]], ["training pictures"], label_width=150),
        labeled_grid(rows, labels, columns, label_width=150),
    )
    grid_path = output / "demo.png"
    atomic_write(grid_path, lambda tmp: grid.save(tmp, format="PNG"))
    document = {"subject": subject, "prompts": prompts, "score_images": options.score_images, "scores": scores}
    atomic_write_text(output / "scores.json", json.dumps(document, indent=2) + "\n")
    log(f"\nsubject: {subject['name']} (a {subject['pattern']} {subject['color']} {subject['shape']}, never drawn "
        "by the base model)")  # fmt: skip
    for name, score in scores.items():
        trained = score["train_seconds"]
        timing = "" if name == "base" else (" (reused)" if trained is None else f" (trained in {trained:.0f} s)")
        log(f"  {name:>12}: subject fidelity {score['subject_fidelity']:.2f} (colour {score['subject_color']:.2f},"
            f" pattern {score['subject_pattern']:.2f}){timing}")  # fmt: skip
    log(f"grid: {grid_path}\nscores: {output / 'scores.json'}")
    return document


def _stacked(top: Image.Image, bottom: Image.Image, gap: int = 8) -> Image.Image:
    """``top`` above ``bottom`` on white, left-aligned."""
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + gap + bottom.height), "white")
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height + gap))
    return canvas


def _enlarged(image: Image.Image, factor: int = 2) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _row_label(name: str, fidelity: float) -> str:
    title = "base model" if name == "base" else name.replace("_", " ").upper().replace("DOUBLE ", "Double ")
    return f"{title}: subject {fidelity:.0%}"


def parse_args(input_args: list[str] | None = None) -> DemoOptions:
    return parse_options(DemoOptions, input_args, "python -m dreambooth_gs.demo", __doc__)


def main(options: DemoOptions) -> dict:
    return run_demo(options)
