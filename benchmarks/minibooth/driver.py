"""MiniBooth's comparison, step by step: the protocol (protocol.json), the planned runs (sweep and main), training
them through ``train_one.py`` (resumable: finished run folders are skipped), the base model's reference runs,
evaluation through ``evaluate_clip.py`` and the learning-rate choice. The report is in ``report.py``.

Work-folder layout: ``subjects/<subject>/`` (instance pictures), ``runs/base/<subject>/`` (an identity adapter: the
base model), ``runs/sweep/<method>/lr-<lr>/``, ``runs/main/<method>/<subject>/seed-<k>/``, ``eval/sweep/``,
``eval/main/``, ``sweep.json``, ``report.md``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTOCOL_FILE = HERE / "protocol.json"
PROMPTS_FILE = HERE / "prompts.txt"
RECORD_FILE = "minibooth_run.json"
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_args.json", RECORD_FILE)
BASE_LABEL = "base"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Method:
    name: str
    args: tuple[str, ...]
    learning_rates: tuple[float, ...]


@dataclass(frozen=True)
class Protocol:
    profile: str
    methods: dict[str, Method]
    reference_method: str
    comparisons: tuple[tuple[str, str], ...]  # (method, other) pairs the report compares beside the reference
    instance_prompt: str
    base_prompt: str
    pretrain_args: tuple[str, ...]
    seeds: tuple[int, ...]
    max_subjects: int | None
    sweep_learning_rates: int | None  # how many of each grid's learning rates the sweep tries (None: all)
    sweep_seed: int
    clip_t_tolerance: float
    train_args: tuple[str, ...]
    eval_args: tuple[str, ...]
    world_file: Path  # the world the base models are pretrained on
    subjects_file: Path  # the held-out subjects

    def eval_flag(self, flag: str) -> str | None:
        """The value of ``flag`` in the evaluator's flags, or None when it is not given."""
        args = list(self.eval_args)
        return args[args.index(flag) + 1] if flag in args else None


def load_protocol(profile: str, path: str | os.PathLike = PROTOCOL_FILE, methods: Sequence[str] | None = None):
    """The ``profile`` (e.g. "full", "smoke", "v2") of the protocol file, optionally restricted to ``methods``."""
    data = json.loads(Path(path).read_text())
    if profile not in data["profiles"]:
        raise ValueError(f"unknown profile {profile!r}; {path} has {', '.join(data['profiles'])}")
    settings = data["profiles"][profile]
    compared = settings.get("methods") or list(data["methods"])  # a profile may compare only some methods
    unknown = sorted(set(methods or ()) - set(compared))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; the {profile} profile compares {', '.join(compared)}")
    chosen = {
        name: Method(name, tuple(spec["args"]), tuple(float(x) for x in spec["learning_rates"]))
        for name, spec in data["methods"].items()
        if name in compared and (methods is None or name in methods)
    }
    return Protocol(
        profile=profile,
        methods=chosen,
        reference_method=data["reference_method"],
        comparisons=tuple((a, b) for a, b in data.get("comparisons", []) if a in chosen and b in chosen),
        instance_prompt=data["instance_prompt"],
        base_prompt=data["base_prompt"],
        pretrain_args=tuple(settings["pretrain_args"]),
        seeds=tuple(settings["seeds"]),
        max_subjects=settings["max_subjects"],
        sweep_learning_rates=settings["sweep_learning_rates"],
        sweep_seed=int(settings["sweep_seed"]),
        clip_t_tolerance=float(settings["clip_t_tolerance"]),
        train_args=tuple(settings["train_args"]),
        eval_args=tuple(settings["eval_args"]),
        world_file=Path(path).parent / settings.get("world_file", "world.json"),
        subjects_file=Path(path).parent / settings.get("subjects_file", "subjects.json"),
    )


# -- runs -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """One trainer run: what to train, where its folder goes and its label in the evaluator's tables."""

    kind: str  # "sweep" or "main"
    method: str
    subject: str
    seed: int
    learning_rate: float
    output_dir: Path
    label: str


def sweep_plans(protocol: Protocol, subject: str, work_dir: Path) -> list[RunPlan]:
    """Every method at every learning rate of its grid (or its first few, per the profile) on the sweep subject."""
    plans = []
    for method in protocol.methods.values():
        for lr in method.learning_rates[: protocol.sweep_learning_rates]:
            folder = work_dir / "runs" / "sweep" / method.name / f"lr-{lr:g}"
            plans.append(
                RunPlan("sweep", method.name, subject, protocol.sweep_seed, lr, folder, f"{method.name}@{lr:g}")
            )
    return plans


def base_run_dir(work_dir: Path, subject: str) -> Path:
    """The folder of ``subject``'s base run (:func:`write_base_run`)."""
    return work_dir / "runs" / "base" / subject


def main_plans(
    protocol: Protocol, subjects: Sequence[str], learning_rates: dict[str, float], work_dir: Path
) -> list[RunPlan]:
    """Every method x reported subject x seed at the method's chosen learning rate."""
    plans = []
    for name in protocol.methods:
        for subject in subjects:
            for seed in protocol.seeds:
                folder = work_dir / "runs" / "main" / name / subject / f"seed-{seed}"
                plans.append(RunPlan("main", name, subject, seed, learning_rates[name], folder, name))
    return plans


def trainer_argv(plan: RunPlan, protocol: Protocol, pipeline_dir: Path, subject_dir: Path) -> list[str]:
    """The train_dreambooth_gsoft.py flags of ``plan``."""
    return [
        "--pretrained_model_name_or_path", str(pipeline_dir),
        "--instance_data_dir", str(subject_dir),
        "--instance_prompt", protocol.instance_prompt,
        "--output_dir", str(plan.output_dir),
        "--seed", str(plan.seed),
        "--learning_rate", f"{plan.learning_rate:g}",
        *protocol.methods[plan.method].args,
        *protocol.train_args,
        "--overwrite_output_dir",
    ]  # fmt: skip


def is_complete(output_dir: Path, argv: Sequence[str]) -> bool:
    """A run folder is complete when every file is there and its record says it ran with exactly ``argv``."""
    if not all((output_dir / name).is_file() for name in RUN_FILES):
        return False
    try:
        return json.loads((output_dir / RECORD_FILE).read_text()).get("argv") == list(argv)
    except json.JSONDecodeError:
        return False


def child_env(num_threads: int | None, concurrent_runs: int = 1) -> dict[str, str]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        MINIBOOTH_CONCURRENT_RUNS=str(concurrent_runs),  # train_one.py records it beside its step times
    )
    if num_threads:
        env["OMP_NUM_THREADS"] = str(num_threads)
    return env


def run_logged(command: list[str], log_file: Path, env: dict[str, str]) -> None:
    """Run ``command`` with its output in ``log_file``; a failure raises with the log's last lines."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if result.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(
            f"{Path(command[1]).name} failed (exit {result.returncode}); see {log_file}:\n" + "\n".join(tail)
        )


def train_runs(
    plans: Sequence[RunPlan],
    protocol: Protocol,
    pipeline_dir: Path,
    subjects_dir: Path,
    num_threads: int | None,
    log: Log,
    jobs: int = 1,
) -> None:
    """Train every planned run whose folder is not complete yet, each in its own process (logged beside it),
    ``jobs`` at a time. A failed run stops new ones from starting; the ones already running finish, then it raises."""
    env = child_env(num_threads, jobs)
    pending = []
    for number, plan in enumerate(plans, 1):
        argv = trainer_argv(plan, protocol, pipeline_dir, subjects_dir / plan.subject)
        what = f"[{number}/{len(plans)}] {plan.kind} {plan.method} {plan.subject} seed {plan.seed}"
        what += f" lr {plan.learning_rate:g}"
        if is_complete(plan.output_dir, argv):
            log(f"{what}: done before, skipped")
        else:
            pending.append((what, plan, argv))

    def train(what: str, plan: RunPlan, argv: list[str]) -> None:
        start = time.perf_counter()
        log_file = plan.output_dir.parent / f"{plan.output_dir.name}.log"
        run_logged([sys.executable, str(HERE / "train_one.py"), *argv], log_file, env)
        log(f"{what}: {time.perf_counter() - start:.0f}s")

    if jobs <= 1:
        for item in pending:
            train(*item)
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(train, *item) for item in pending]
        for future in futures:
            if future.exception() is not None:
                for other in futures:
                    other.cancel()
                raise future.exception()


def write_base_run(pipeline_dir: Path, subject_dir: Path, class_name: str, instance_prompt: str, output_dir: Path):
    """A run folder for the base model itself: an identity GSOFT adapter (zero generators, unit scale) with the
    training_args.json the evaluator reads, so that the base model is evaluated exactly like every other run."""
    if all((output_dir / name).is_file() for name in RUN_FILES[:3]):
        return output_dir
    from dreambooth_gs import GSOFTConfig, families, inject_adapter, save_adapter

    family = families.detect(str(pipeline_dir))
    denoiser = family.load(str(pipeline_dir), None, None, None).denoiser  # the UNet, or SD3's transformer
    config = GSOFTConfig(method="gsoft", nblocks=1, target_modules=family.default_targets)
    inject_adapter(denoiser, config)  # identity at initialisation
    save_adapter(denoiser, output_dir, base_model=str(pipeline_dir))
    info = {
        "method": BASE_LABEL,
        "base_model": str(pipeline_dir),
        "class_name": class_name,
        "instance_prompt": instance_prompt.replace("{class}", class_name),
        "instance_data_dir": str(subject_dir),
        "steps": 0,
    }
    (output_dir / "training_args.json").write_text(json.dumps(info, indent=2) + "\n")
    (output_dir / RECORD_FILE).write_text(json.dumps({"argv": [], "base_model": True}, indent=2) + "\n")
    return output_dir


# -- evaluation -----------------------------------------------------------------------------------------------------


def evaluate(
    entries: Sequence[str],
    output_dir: Path,
    clip_dir: Path,
    protocol: Protocol,
    subjects_file: Path,
    num_threads: int | None,
    log: Log,
) -> Path:
    """Run evaluate_clip.py on ``entries`` (``LABEL=FOLDER``) with the MiniBooth CLIP; returns results.csv."""
    command = [
        sys.executable, str(ROOT / "evaluate_clip.py"),
        "--runs", *entries,
        "--output_dir", str(output_dir),
        "--subjects_file", str(subjects_file),
        "--prompt_set", str(PROMPTS_FILE),
        "--base_prompt", protocol.base_prompt,
        "--clip_model", f"local-dir:{clip_dir}",
        "--clip_pretrained", "",
        *protocol.eval_args,
    ]  # fmt: skip
    start = time.perf_counter()
    run_logged(command, output_dir.parent / f"{output_dir.name}.log", child_env(num_threads))
    log(f"evaluated {len(entries)} runs into {output_dir} ({time.perf_counter() - start:.0f}s)")
    return output_dir / "results.csv"


def run_specs(folders: Sequence[Path], subjects_file: Path) -> dict[Path, object]:
    """evaluate_clip.py's view of each run folder (its ``RunSpec``: run id, subject, token, prompts, adapter hash),
    resolved once per evaluation and shared by everything that reads the evaluator's output."""
    from dreambooth_gs.evaluate.plan import load_subjects, resolve_run

    subjects = load_subjects(subjects_file)
    return {folder: resolve_run(str(folder), subjects, prompt_set=str(PROMPTS_FILE)) for folder in folders}


def oracle_scores(
    specs: dict[Path, object], eval_dir: Path, oracle_dir: Path, protocol: Protocol, world, looks
) -> dict[Path, dict[str, float]]:
    """Per run folder, the attribute oracle's subject and context fidelity of the pictures the evaluator drew
    (``eval_dir/images``); ``looks``: subject name -> the attributes that make it (None: not a world object)."""
    from dreambooth_gs.demo.oracle import load_oracle

    from .fidelity import oracle_fidelity

    oracle = load_oracle(oracle_dir)
    max_prompts = protocol.eval_flag("--max_prompts")
    max_prompts = int(max_prompts) if max_prompts else None
    return {
        folder: oracle_fidelity(
            oracle, spec, eval_dir / "images", protocol.base_prompt, max_prompts, world, looks.get(spec.subject)
        )
        for folder, spec in specs.items()
    }


def run_scores(results_csv: Path, specs: dict[Path, object]) -> dict[Path, dict[str, float]]:
    """Per run folder (``specs``: :func:`run_specs`): CLIP-I (base-prompt pictures vs the real ones) and CLIP-T
    (contextual prompts), each the picture-weighted mean over its rows, as evaluate_clip.py's summary computes them."""
    folders = list(specs)
    ids = {spec.run_id: folder for folder, spec in specs.items()}
    sums: dict[Path, dict[str, list[float]]] = {}
    with open(results_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            folder = ids.get(row["run"])
            if folder is None:
                continue
            metric = "clip_i" if row["kind"] == "base" else "clip_t"
            total = sums.setdefault(folder, {}).setdefault(metric, [0.0, 0.0])
            total[0] += float(row[metric]) * int(row["n"])
            total[1] += int(row["n"])
    missing = [str(f) for f in folders if f not in sums]
    if missing:
        raise ValueError(f"{results_csv} has no rows for {len(missing)} run(s), e.g. {missing[0]}")
    return {folder: {m: s / n for m, (s, n) in metrics.items()} for folder, metrics in sums.items()}


def choose_learning_rate(scores: dict[float, dict[str, float]], base_clip_t: float, tolerance: float) -> float:
    """The learning rate with the highest CLIP-I among those whose CLIP-T is at least (1 - tolerance) x the base
    model's; when none keeps CLIP-T, the one with the highest CLIP-T."""
    keeping = {lr: s for lr, s in scores.items() if s["clip_t"] >= (1 - tolerance) * base_clip_t}
    if keeping:
        return max(keeping, key=lambda lr: (keeping[lr]["clip_i"], -lr))
    return max(scores, key=lambda lr: (scores[lr]["clip_t"], -lr))
