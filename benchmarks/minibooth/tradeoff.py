"""MiniBooth trade-off probe: is a method behind LoRA, or only at another point of the same CLIP-I / CLIP-T curve?

The comparison's rule gives each method one learning rate, so two methods can differ in CLIP-I only because one
moved further (and paid in CLIP-T). This probe trains each named method one grid step below and one above its
chosen rate (protocol.json's grid), on every reported subject with one seed, reuses that seed's main runs at the
chosen rate, evaluates them all like the main runs and writes, in <work>/tradeoff.md and tradeoff.png, each
method's curve (CLIP-I and CLIP-T, means over subjects) and each method's CLIP-I at the reference method's CLIP-T,
interpolated along its curve. Needs a finished run.py in the same work folder.

    python benchmarks/minibooth/tradeoff.py --jobs 2 --num_threads 1              # every method (84 runs, ~30 min)
    python benchmarks/minibooth/tradeoff.py --methods lora gsoft --jobs 2 --num_threads 1
    python benchmarks/minibooth/tradeoff.py --profile v2 --from_sweep   # the sweep's curves only (no runs)

``--from_sweep`` draws the same table and plot from run.py's sweep.json alone: every rate of each grid, but one
subject and one seed (sweep_tradeoff.md, sweep_tradeoff.png).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import fmean

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from benchmarks.minibooth import driver  # noqa: E402
from benchmarks.minibooth import run as comparison  # noqa: E402
from benchmarks.minibooth.cache import cache_root  # noqa: E402
from benchmarks.minibooth.report import METRIC_NAMES, noise_verdict, paired_difference  # noqa: E402
from dreambooth_gs.cli import parse_options, run_cli  # noqa: E402


@dataclass
class TradeoffOptions:
    methods: list[str] | None = field(
        default=None, metadata={"help": "Methods to probe (default: every method of protocol.json)."}
    )
    seed: int = field(default=0, metadata={"help": "The seed of every probe run (its main runs are reused)."})
    profile: str = field(default="full", metadata={"help": "run.py's profile (full, v2, flow)."})
    work_dir: str | None = field(
        default=None, metadata={"help": "run.py's work folder (default: the profile's, work-<profile>)."}
    )
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads of every process."})
    jobs: int = field(default=1, metadata={"help": "Runs trained at once (as run.py --jobs)."})
    from_sweep: bool = field(
        default=False,
        metadata={
            "help": "Only the sweep's curves (every rate, the sweep subject, one seed) from sweep.json: no runs."
        },
    )


def neighbour_rates(grid: list[float], chosen: float) -> list[float]:
    """The chosen rate and its neighbours in the method's grid (one or two of them at the grid's ends)."""
    index = grid.index(chosen)
    return grid[max(index - 1, 0) : index + 2]


def value_at(curve: list[tuple[float, float]], clip_t: float) -> float | None:
    """CLIP-I at ``clip_t`` by linear interpolation along ``curve`` ((CLIP-T, CLIP-I) points); None outside it."""
    points = sorted(curve)
    for (t0, i0), (t1, i1) in zip(points, points[1:]):
        if t0 <= clip_t <= t1:
            return i0 if t1 == t0 else i0 + (i1 - i0) * (clip_t - t0) / (t1 - t0)
    return None


def probe_plans(protocol, sweep: dict, subjects: list[str], seed: int, work_dir: Path) -> list[driver.RunPlan]:
    """Every method at its chosen rate and the grid neighbours, on every subject; the chosen rate's runs are
    run.py's main runs of ``seed`` (reused when it made them), the others go to ``runs/tradeoff/``."""
    chosen = {name: sweep["methods"][name]["chosen"] for name in protocol.methods}
    plans = driver.main_plans(replace(protocol, seeds=(seed,)), subjects, chosen, work_dir)
    for name, method in protocol.methods.items():
        for rate in neighbour_rates(list(method.learning_rates), chosen[name]):
            if rate == chosen[name]:
                continue
            for subject in subjects:
                folder = work_dir / "runs" / "tradeoff" / name / f"lr-{rate:g}" / subject / f"seed-{seed}"
                plans.append(driver.RunPlan("tradeoff", name, subject, seed, rate, folder, name))
    return plans


def method_curves(plans: list[driver.RunPlan], scores: dict[Path, dict[str, float]]):
    """``{method: [(rate, CLIP-T, CLIP-I)]}``, means over subjects, rates in increasing order."""
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for plan in plans:
        curves.setdefault(plan.method, [])
    for name, curve in curves.items():
        for rate in sorted({p.learning_rate for p in plans if p.method == name}):
            runs = [scores[p.output_dir] for p in plans if p.method == name and p.learning_rate == rate]
            curve.append((rate, fmean([s["clip_t"] for s in runs]), fmean([s["clip_i"] for s in runs])))
    return curves


TABLE_METRICS = ("subject_fidelity", "context_fidelity")  # the oracle's columns beside CLIP-I / CLIP-T
PAIRED_METRICS = ("clip_i", "subject_fidelity")  # compared at the reference's CLIP-T, paired over subjects


def oracle_columns(plans: list[driver.RunPlan], scores: dict[Path, dict[str, float]]):
    """``{(method, rate): {metric: mean over subjects}}`` of the TABLE_METRICS every run has."""
    metrics = [m for m in TABLE_METRICS if all(m in scores[p.output_dir] for p in plans)]
    groups: dict[tuple[str, float], list[dict[str, float]]] = {}
    for plan in plans:
        groups.setdefault((plan.method, plan.learning_rate), []).append(scores[plan.output_dir])
    return {key: {m: fmean(run[m] for run in runs) for m in metrics} for key, runs in groups.items()}


def paired_at_reference(
    plans: list[driver.RunPlan], scores: dict[Path, dict[str, float]], reference: str, reference_rate: float
) -> dict[str, dict[str, tuple[float, float | None, int]]]:
    """``{method: {metric: (mean, 95% half-width, subjects)}}``: on each subject, the method's metric at the
    reference's CLIP-T there at ``reference_rate`` (interpolated along that subject's curve) minus the reference's,
    paired over the subjects whose curve reaches that CLIP-T. A curve's mean can hide that the subjects disagree;
    this says whether a gap at equal prompt fidelity is more than noise."""
    points: dict[str, dict[str, dict[str, list[tuple[float, float]]]]] = {}  # method -> subject -> metric -> curve
    reference_points: dict[str, dict[str, float]] = {}  # subject -> the reference's scores at reference_rate
    for plan in plans:
        run = scores[plan.output_dir]
        if plan.method == reference and plan.learning_rate == reference_rate:
            reference_points[plan.subject] = run
        by_metric = points.setdefault(plan.method, {}).setdefault(plan.subject, {})
        for metric in PAIRED_METRICS:
            if metric in run:
                by_metric.setdefault(metric, []).append((run["clip_t"], run[metric]))
    differences = {}
    for method, subjects in points.items():
        if method == reference:
            continue
        differences[method] = {}
        for metric in PAIRED_METRICS:
            ours, theirs = {}, {}
            for subject, curves in subjects.items():
                target = reference_points.get(subject)
                if target is None or metric not in curves or metric not in target:
                    continue
                at = value_at(curves[metric], target["clip_t"])
                if at is not None:
                    ours[subject], theirs[subject] = at, target[metric]
            if any(metric in c for c in subjects.values()):  # the method's runs have this metric
                differences[method][metric] = paired_difference(ours, theirs)
    return differences


def sweep_curves(sweep: dict, methods) -> dict[str, list[tuple[float, float, float]]]:
    """``{method: [(rate, CLIP-T, CLIP-I)]}`` of run.py's sweep.json (one subject, one seed), rates increasing."""
    return {
        name: sorted((float(rate), s["clip_t"], s["clip_i"]) for rate, s in sweep["methods"][name]["scores"].items())
        for name in methods
        if name in sweep["methods"]
    }


def write_tradeoff(
    curves, chosen, protocol, base, header: str, title: str, stem: Path, columns=None, paired=None
) -> Path:
    """``<stem>.md`` (the table) and ``<stem>.png`` (the curves)."""
    reference = reference_method(protocol, curves)
    text = render_tradeoff(curves, chosen, reference, base, header, columns, paired)
    stem.with_suffix(".md").write_text(text)
    print(text)
    plot_tradeoff(curves, base, title, stem.with_suffix(".png"))
    comparison.log(f"trade-off: {stem.with_suffix('.md')}, {stem.with_suffix('.png')}")
    return stem.with_suffix(".md")


def reference_method(protocol, curves) -> str:
    return protocol.reference_method if protocol.reference_method in curves else next(iter(curves))


def render_tradeoff(
    curves,
    chosen: dict[str, float],
    reference: str,
    base: tuple[float, float],
    header: str,
    columns: dict[tuple[str, float], dict[str, float]] | None = None,
    paired: dict[float, dict[str, dict[str, tuple[float, float | None, int]]]] | None = None,
) -> str:
    """The markdown table of every curve (with ``columns``: the oracle's means per method and rate) and each
    method's CLIP-I at ``reference``'s CLIP-T (``base``: the base model's CLIP-I, CLIP-T); ``paired``: per rate of
    the reference, the differences of paired_at_reference."""
    reference_t = next(t for rate, t, _ in curves[reference] if rate == chosen[reference])
    columns = columns or {}
    extra = [m for m in TABLE_METRICS if columns and all(m in v for v in columns.values())]
    lines = [
        f"{header}; CLIP-I / CLIP-T (base model {base[0]:.3f} / {base[1]:.3f}); chosen rates in bold.",
        "",
        "| " + " | ".join(["method", "learning rate", "CLIP-I", "CLIP-T", *(METRIC_NAMES[m] for m in extra)]) + " |",
        "|---|" + "---:|" * (3 + len(extra)),
    ]
    for name, curve in curves.items():
        for rate, clip_t, clip_i in curve:
            cell = f"**{rate:g}**" if rate == chosen[name] else f"{rate:g}"
            oracle = "".join(f" {columns[(name, rate)][m]:.3f} |" for m in extra)
            lines.append(f"| {name} | {cell} | {clip_i:.3f} | {clip_t:.3f} |{oracle}")
    lines += ["", f"CLIP-I at {reference}'s CLIP-T ({reference_t:.3f}), interpolated along each curve:", ""]
    for name, curve in curves.items():
        at = value_at([(t, i) for _, t, i in curve], reference_t)
        lines.append(f"- {name}: " + (f"{at:.3f}" if at is not None else "outside its curve"))
    if paired:
        lines += [
            "",
            f"Paired over subjects at equal prompt fidelity: on each subject, a method's score at {reference}'s "
            f"CLIP-T there at one of {reference}'s rates (interpolated along that subject's curve) minus "
            f"{reference}'s, mean ± 95% half-width (a subject whose curve does not reach that CLIP-T is left out; "
            "within noise: the interval contains zero):",
            "",
        ]
        for rate, differences in paired.items():
            for name, metrics in differences.items():
                if all(n == 0 for _, _, n in metrics.values()):
                    continue  # no subject's curve reaches the reference's CLIP-T at this rate
                parts = [f"{METRIC_NAMES[m]} {noise_verdict(*d)}" for m, d in metrics.items()]
                lines.append(f"- {name} vs {reference} {rate:g}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def plot_tradeoff(curves, base: tuple[float, float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4.2))
    for name, curve in curves.items():
        axes.plot([t for _, t, _ in curve], [i for _, _, i in curve], marker="o", label=name)
        for rate, clip_t, clip_i in curve:
            axes.annotate(f"{rate:g}", (clip_t, clip_i), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.scatter([base[1]], [base[0]], marker="*", s=120, color="black", label="base model", zorder=3)
    axes.set_xlabel("CLIP-T (prompt fidelity)")
    axes.set_ylabel("CLIP-I (subject fidelity)")
    axes.set_title(textwrap.fill(title, 70), fontsize=9)  # a long title would run off the figure
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(options: TradeoffOptions) -> Path:
    protocol = driver.load_protocol(options.profile, methods=options.methods)
    work_dir = Path(options.work_dir) if options.work_dir else cache_root() / f"work-{protocol.profile}"
    if not (work_dir / "sweep.json").is_file():
        raise FileNotFoundError(f"{work_dir / 'sweep.json'} not found: run benchmarks/minibooth/run.py first")
    sweep = json.loads((work_dir / "sweep.json").read_text())
    if options.from_sweep:
        curves = sweep_curves(sweep, protocol.methods)
        chosen = {name: sweep["methods"][name]["chosen"] for name in curves}
        base = (sweep["base"]["clip_i"], sweep["base"]["clip_t"])
        subject = sweep["subject"]
        header = f"MiniBooth ({protocol.profile}) learning-rate sweep: subject {subject}, seed {protocol.sweep_seed}"
        title = f"MiniBooth {protocol.profile}: CLIP-I vs CLIP-T along each sweep ({sweep['subject']}, one seed)"
        columns = {
            (name, float(rate)): {m: s[m] for m in TABLE_METRICS if m in s}
            for name in curves
            for rate, s in sweep["methods"][name]["scores"].items()
        }
        stem = work_dir / "sweep_tradeoff"
        return write_tradeoff(curves, chosen, protocol, base, header, title, stem, columns)
    pretrained = comparison.pretrain_for(protocol, options.num_threads)
    world, subjects, _, looks = comparison.profile_subjects(protocol)
    reported = [s.name for s in subjects if not s.sweep]

    plans = probe_plans(protocol, sweep, reported, options.seed, work_dir)
    driver.train_runs(
        plans, protocol, pretrained.pipeline_dir, work_dir / "subjects", options.num_threads, comparison.log,
        options.jobs,
    )  # fmt: skip
    base_dirs = [driver.base_run_dir(work_dir, s) for s in reported]
    entries = {f"{driver.BASE_LABEL}={d}": d for d in base_dirs}
    entries |= {f"{p.label}@{p.learning_rate:g}={p.output_dir}": p.output_dir for p in plans}
    run_options = comparison.RunOptions(num_threads=options.num_threads, jobs=options.jobs)
    eval_dir = work_dir / "eval" / "tradeoff"
    scores = comparison.evaluate(entries, eval_dir, pretrained, protocol, world, looks, run_options)

    curves = method_curves(plans, scores)
    base = (fmean([scores[d]["clip_i"] for d in base_dirs]), fmean([scores[d]["clip_t"] for d in base_dirs]))
    chosen = {name: sweep["methods"][name]["chosen"] for name in curves}
    header = f"MiniBooth ({protocol.profile}) trade-off probe: means over {len(reported)} subjects, seed {options.seed}"
    title = f"MiniBooth {protocol.profile}: CLIP-I vs CLIP-T along each learning-rate grid ({len(reported)} subjects)"
    reference = reference_method(protocol, curves)
    paired = {rate: paired_at_reference(plans, scores, reference, rate) for rate, _, _ in curves[reference]}
    columns = oracle_columns(plans, scores)
    return write_tradeoff(curves, chosen, protocol, base, header, title, work_dir / "tradeoff", columns, paired)


def parse_args(input_args: list[str] | None = None) -> TradeoffOptions:
    return parse_options(TradeoffOptions, input_args, "tradeoff.py", __doc__)


if __name__ == "__main__":
    run_cli(main, parse_args(), "tradeoff.py")
