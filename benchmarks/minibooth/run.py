"""MiniBooth, end to end, in one command: pretrain the base models (cached), render the held-out subjects, sweep each
method's learning rate on the sweep subject, train every method x subject x seed, evaluate everything with
evaluate_clip.py and the MiniBooth CLIP, and write report.md.

    python benchmarks/minibooth/run.py --jobs 2 --num_threads 1   # the full comparison, two runs at a time
    python benchmarks/minibooth/run.py            # the same, one run at a time (see docs/minibooth.md for times)
    python benchmarks/minibooth/run.py --profile v2 --jobs 2 --num_threads 1   # MiniBooth v2 (world-object subjects)
    python benchmarks/minibooth/run.py --profile flow --jobs 2 --num_threads 1  # v2 on an SD3 transformer (flow)
    python benchmarks/minibooth/run.py --smoke    # v2's steps with tiny models and runs: plumbing only
    python benchmarks/minibooth/run.py --until sweep --methods gsoft lora   # part of it

Everything is resumable: pretrained stages, finished run folders and generated pictures are reused. Work folder:
$DREAMBOOTH_GS_CACHE/minibooth/work-<profile> (default ~/.cache/dreambooth_gs/minibooth/work-<profile>).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from benchmarks.minibooth import driver  # noqa: E402
from benchmarks.minibooth import pretrain as pretraining_script  # noqa: E402
from benchmarks.minibooth.cache import cache_root  # noqa: E402
from benchmarks.minibooth.fidelity import SUBJECT_LOOK, subject_ceilings  # noqa: E402
from benchmarks.minibooth.report import per_subject_means, render_report, summarize, timing_conditions  # noqa: E402
from benchmarks.minibooth.subjects import WorldSubject, load_subjects, write_subject_images  # noqa: E402
from benchmarks.minibooth.world import load_world  # noqa: E402
from dreambooth_gs.cli import parse_options, run_cli  # noqa: E402


@dataclass
class RunOptions:
    profile: str = field(
        default="full",
        metadata={
            "help": (
                "The protocol's profile: full (MiniBooth v1, sprite subjects), v2 (world-object subjects held out of "
                "the v2 world, scored by the attribute oracle too), flow (v2's world and subjects on an SD3 "
                "transformer pretrained with flow matching), smoke or flow_smoke (plumbing)."
            )
        },
    )
    smoke: bool = field(default=False, metadata={"help": "Same as --profile smoke: tiny models and runs (plumbing)."})
    work_dir: str | None = field(
        default=None, metadata={"help": "Work folder. Default: <cache>/minibooth/work-<profile>."}
    )
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads of every process. Default: torch's."})
    jobs: int = field(
        default=1,
        metadata={
            "help": (
                "Fine-tuning runs trained at once (each a process with --num_threads threads; the evaluation, which "
                "runs alone, gets jobs x num_threads). On 2 cores, --jobs 2 --num_threads 1 gets through the runs "
                "faster; seconds per step are then measured under that load (the report says so)."
            )
        },
    )
    methods: list[str] | None = field(default=None, metadata={"help": "Only these methods of protocol.json."})
    until: Literal["pretrain", "sweep", "all"] = field(default="all", metadata={"help": "Stop after this step."})
    seeds: list[int] | None = field(
        default=None, metadata={"help": "Seeds of the main runs instead of the profile's (the report says which)."}
    )
    max_subjects: int | None = field(
        default=None, metadata={"help": "Report only the first N held-out subjects instead of the profile's."}
    )
    protocol_file: str = field(default=str(driver.PROTOCOL_FILE), metadata={"help": "The protocol (methods, runs)."})
    subjects_file: str | None = field(default=None, metadata={"help": "The held-out subjects. Default: the profile's."})


def log(message: str) -> None:
    print(f"[minibooth] {message}", flush=True)


def render_subjects(subjects, world, count: int, subjects_dir: Path) -> None:
    """Instance pictures of every subject, written once (unchanged files keep the evaluator's caches valid)."""
    for subject in subjects:
        folder = subjects_dir / subject.name
        if len(list(folder.glob("*.png"))) != count or not (folder / "subject.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            write_subject_images(subject, world, folder, count)


def drop_stale_images(eval_dir: Path, specs, eval_args) -> None:
    """Delete generated pictures made with other evaluation settings, or of runs whose adapter changed since
    (evaluate_clip.py refuses to mix them with new ones); ``specs``: :func:`driver.run_specs`."""
    stamp = eval_dir / "minibooth_eval_args.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != list(eval_args):
        shutil.rmtree(eval_dir / "images", ignore_errors=True)
    eval_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(list(eval_args)) + "\n")
    for spec in specs.values():
        record = eval_dir / "images" / spec.run_id / "generation.json"
        if record.is_file():
            if json.loads(record.read_text()).get("adapter_sha256") != spec.adapter_sha256:
                shutil.rmtree(record.parent)


def evaluate(entries: dict[str, Path], eval_dir: Path, pretrained, protocol, world, looks, options: RunOptions):
    """Evaluate ``{label=folder entry: folder}``; returns the scores per folder: CLIP-I and CLIP-T from
    evaluate_clip.py, then the attribute oracle's subject and context fidelity of the same pictures."""
    specs = driver.run_specs(list(entries.values()), protocol.subjects_file)
    drop_stale_images(eval_dir, specs, protocol.eval_args)
    # The evaluation runs alone: it gets the threads of every training job.
    threads = options.num_threads * options.jobs if options.num_threads else None
    results = driver.evaluate(
        list(entries), eval_dir, pretrained.clip_dir, protocol, protocol.subjects_file, threads, log
    )
    scores = driver.run_scores(results, specs)
    judged = driver.oracle_scores(specs, eval_dir, pretrained.oracle_dir, protocol, world, looks)
    return {folder: scores[folder] | judged[folder] for folder in specs}


def sweep(protocol, sweep_subject: str, base_dir: Path, work_dir: Path, pretrained, world, looks, options):
    """Train and evaluate the learning-rate sweep; write sweep.json; return the chosen rate per method."""
    plans = driver.sweep_plans(protocol, sweep_subject, work_dir)
    driver.train_runs(
        plans, protocol, pretrained.pipeline_dir, work_dir / "subjects", options.num_threads, log, options.jobs
    )
    entries = {f"{driver.BASE_LABEL}={base_dir}": base_dir} | {f"{p.label}={p.output_dir}": p.output_dir for p in plans}
    scores = evaluate(entries, work_dir / "eval" / "sweep", pretrained, protocol, world, looks, options)
    base = scores[base_dir]
    summary = {"subject": sweep_subject, "base": base, "clip_t_tolerance": protocol.clip_t_tolerance, "methods": {}}
    for name in protocol.methods:
        tried = {p.learning_rate: scores[p.output_dir] for p in plans if p.method == name}
        chosen = driver.choose_learning_rate(tried, base["clip_t"], protocol.clip_t_tolerance)
        summary["methods"][name] = {"chosen": chosen, "scores": {f"{lr:g}": s for lr, s in tried.items()}}
        log(
            f"sweep {name}: lr {chosen:g} ("
            + ", ".join(f"{lr:g}: I {s['clip_i']:.3f} T {s['clip_t']:.3f}" for lr, s in tried.items())
            + ")"
        )
    (work_dir / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {name: entry["chosen"] for name, entry in summary["methods"].items()}


def pretrain_for(protocol, num_threads: int | None):
    """The profile's pretrained base models (built or reused): its pretraining flags and world."""
    argv = [*protocol.pretrain_args, "--world_file", str(protocol.world_file)]
    argv += ["--num_threads", str(num_threads)] if num_threads else []
    return pretraining_script.pretrain(pretraining_script.parse_args(argv), log)


def profile_subjects(protocol):
    """``(world, subjects, instance pictures per subject, looks)`` of the profile; ``looks``: what the oracle
    checks of each world-object subject (its colour and pattern), by name."""
    world = load_world(protocol.world_file)
    subjects, count = load_subjects(protocol.subjects_file, world)
    looks = {s.name: {a: s.attributes()[a] for a in SUBJECT_LOOK} for s in subjects if isinstance(s, WorldSubject)}
    return world, subjects, count, looks


def main(args: RunOptions) -> Path:
    protocol = driver.load_protocol("smoke" if args.smoke else args.profile, args.protocol_file, args.methods)
    if args.subjects_file:
        protocol = replace(protocol, subjects_file=Path(args.subjects_file))
    if args.seeds:
        protocol = replace(protocol, seeds=tuple(args.seeds))
    if args.max_subjects:
        protocol = replace(protocol, max_subjects=args.max_subjects)
    work_dir = Path(args.work_dir) if args.work_dir else cache_root() / f"work-{protocol.profile}"
    pretrained = pretrain_for(protocol, args.num_threads)
    if args.until == "pretrain":
        return pretrained.pipeline_dir

    world, subjects, count, looks = profile_subjects(protocol)
    sweep_subject = next(s for s in subjects if s.sweep)
    reported = [s for s in subjects if not s.sweep][: protocol.max_subjects]
    render_subjects([sweep_subject, *reported], world, count, work_dir / "subjects")
    base_dirs = {
        s.name: driver.write_base_run(
            pretrained.pipeline_dir, work_dir / "subjects" / s.name, s.class_name, protocol.instance_prompt,
            driver.base_run_dir(work_dir, s.name),
        )
        for s in [sweep_subject, *reported]
    }  # fmt: skip
    learning_rates = sweep(
        protocol, sweep_subject.name, base_dirs[sweep_subject.name], work_dir, pretrained, world, looks, args
    )
    if args.until == "sweep":
        return work_dir / "sweep.json"

    plans = driver.main_plans(protocol, [s.name for s in reported], learning_rates, work_dir)
    driver.train_runs(plans, protocol, pretrained.pipeline_dir, work_dir / "subjects", args.num_threads, log, args.jobs)
    entries = {f"{driver.BASE_LABEL}={base_dirs[s.name]}": base_dirs[s.name] for s in reported}
    entries |= {f"{p.label}={p.output_dir}": p.output_dir for p in plans}
    scores = evaluate(entries, work_dir / "eval" / "main", pretrained, protocol, world, looks, args)
    summaries = summarize(plans, scores)
    header = (
        f"MiniBooth ({protocol.profile} profile): {len(reported)} subjects x {len(protocol.seeds)} seeds; "
        f"base model {pretrained.pipeline_dir.name}, CLIP {pretrained.clip_dir.name}; "
        f"step times: {timing_conditions(summaries)}"
    )
    text = render_report(
        summaries,
        {s.name: scores[base_dirs[s.name]] for s in reported},
        per_subject_means(plans, scores),
        protocol.reference_method,
        header,
        subject_ceilings(pretrained.clip_dir, work_dir / "subjects", [s.name for s in reported]),
        oracle_check=pretrained.markers.get("oracle"),
        comparisons=protocol.comparisons,
    )
    report = work_dir / "report.md"
    report.write_text(text)
    print(text)
    log(f"report: {report}; plots and grids: {work_dir / 'eval' / 'main'}")
    return report


def parse_args(input_args: list[str] | None = None) -> RunOptions:
    return parse_options(RunOptions, input_args, "run.py", __doc__)


if __name__ == "__main__":
    run_cli(main, parse_args(), "run.py")
