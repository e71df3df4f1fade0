"""MiniBooth's Table-2-like report: per method its size, speed and memory, CLIP-I and CLIP-T and the attribute
oracle's subject and context fidelity (mean and spread over subjects x seeds) against the base model, a per-subject
table, and which differences are within noise."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .driver import RECORD_FILE, RunPlan
from .fidelity import ORACLE_METRICS

METRIC_NAMES = {
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "subject_fidelity": "subject fidelity",
    "subject_color": "subject colour",
    "subject_pattern": "subject pattern",
    "subject_fidelity_in_context": "subject fidelity in context",
    "context_fidelity": "context fidelity",
}


@dataclass(frozen=True)
class MethodSummary:
    method: str
    learning_rate: float
    parameters: int
    step_seconds: float | None
    peak_rss_mib: float | None
    clip_i: list[float]
    clip_t: list[float]
    timing: frozenset[tuple] = frozenset()  # (threads per run, runs sharing the CPU) of its runs' step times
    oracle: dict[str, list[float]] = field(default_factory=dict)  # ORACLE_METRICS the runs have, per run


def oracle_lists(score_dicts: Sequence[dict[str, float]]) -> dict[str, list[float]]:
    """``{oracle metric: values}`` over the runs, for the metrics every run has."""
    return {m: [s[m] for s in score_dicts] for m in ORACLE_METRICS if score_dicts and all(m in s for s in score_dicts)}


ORACLE_LEGEND = (
    "Oracle columns (attribute classifiers trained on world renders, benchmarks/minibooth/oracle.py): subject "
    "fidelity, the fraction of base-prompt pictures with the subject's colour and pattern (subject colour, subject "
    "pattern: each alone); subject fidelity in "
    "context, the same over the contextual prompts that change neither; context fidelity, the fraction of the "
    "attributes a contextual prompt names (background, size, position, colour or pattern change) that its pictures "
    "show."
)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(plans: Sequence[RunPlan], scores: dict[Path, dict[str, float]]) -> list[MethodSummary]:
    """One summary per method, from its main runs' scores, records and adapter configs."""
    by_method: dict[str, list[RunPlan]] = {}
    for plan in plans:
        by_method.setdefault(plan.method, []).append(plan)
    summaries = []
    for method, runs in by_method.items():
        records = [json.loads((p.output_dir / RECORD_FILE).read_text()) for p in runs]
        config = json.loads((runs[0].output_dir / "adapter_config.json").read_text())
        summaries.append(
            MethodSummary(
                method=method,
                learning_rate=runs[0].learning_rate,
                parameters=int(config.get("num_parameters") or 0),
                step_seconds=_median([r.get("median_step_seconds") for r in records]),
                peak_rss_mib=_median([r.get("peak_rss_mib") for r in records]),
                clip_i=[scores[p.output_dir]["clip_i"] for p in runs],
                clip_t=[scores[p.output_dir]["clip_t"] for p in runs],
                timing=frozenset((r.get("num_threads"), r.get("concurrent_runs", 1)) for r in records),
                oracle=oracle_lists([scores[p.output_dir] for p in runs]),
            )
        )
    return summaries


def timing_conditions(summaries: Sequence[MethodSummary]) -> str:
    """How the runs' step times were taken: threads per run and runs sharing the CPU, from their records."""
    seen = set().union(*(s.timing for s in summaries))
    return "; ".join(f"{threads} thread(s) per run, {runs} run(s) at a time" for threads, runs in sorted(seen, key=str))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}"


# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond the table: the normal 1.96).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_difference(a: dict[str, float], b: dict[str, float]) -> tuple[float, float | None, int]:
    """Mean of the per-subject differences a - b, the half-width of its 95% confidence interval (None with one
    subject) and the number of subjects both have."""
    diffs = [a[key] - b[key] for key in a if key in b]
    if not diffs:
        return math.nan, None, 0
    if len(diffs) < 2:
        return diffs[0], None, 1
    half_width = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return statistics.fmean(diffs), half_width, len(diffs)


def noise_verdict(mean: float, half_width: float | None, n: int) -> str:
    """``+0.012 ± 0.020 (within noise, 8 subjects)``: within noise when the 95% interval contains zero."""
    if half_width is None:
        return f"{mean:+.3f} (one subject: no noise estimate)" if n else "no subject to compare"
    word = "within noise" if abs(mean) <= half_width else ("higher" if mean > 0 else "lower")
    return f"{mean:+.3f} ± {half_width:.3f} ({word}, {n} subjects)"


def noise_lines(
    per_subject: dict[str, dict[str, dict[str, float]]],
    base_scores: dict[str, dict[str, float]],
    reference: str,
    comparisons: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """One line per comparison (each method against the base model and against ``reference``, then each (method,
    other) pair of ``comparisons`` that both ran), paired over subjects (seed means; every method is sampled from
    the same noise): a difference whose 95% confidence interval contains zero is within noise."""
    lines = []
    for method, table in per_subject.items():
        others = [("base", base_scores)] + (
            [(reference, per_subject[reference])] if method != reference and reference in per_subject else []
        )
        others += [(b, per_subject[b]) for a, b in comparisons if a == method and b in per_subject]
        metrics = [m for m in METRIC_NAMES if all(m in v for v in table.values())]
        for name, other in others:
            parts = []
            for metric in metrics:
                if not all(metric in v for v in other.values()):
                    continue
                difference = paired_difference(
                    {k: v[metric] for k, v in table.items()}, {k: v[metric] for k, v in other.items()}
                )
                parts.append(f"{METRIC_NAMES[metric]} {noise_verdict(*difference)}")
            lines.append(f"- {method} vs {name}: " + "; ".join(parts))
    return lines


def render_report(
    summaries: Sequence[MethodSummary],
    base_scores: dict[str, dict[str, float]],
    per_subject: dict[str, dict[str, dict[str, float]]],
    reference: str,
    header: str,
    ceilings: dict[str, float] | None = None,
    oracle_check: dict | None = None,
    comparisons: Sequence[tuple[str, str]] = (),
) -> str:
    """The Markdown report: the main table, the per-subject table and the noise lines. ``ceilings`` (subject ->
    CLIP-I of its instance pictures against each other) adds a reference row to both tables; the oracle's columns
    appear when every run has them, with its accuracy on fresh renders (``oracle_check``, the oracle stage's
    marker) under the table; ``comparisons``: (method, other) pairs compared beside each method against
    ``reference``."""
    base = MethodSummary(
        "base",
        0.0,
        0,
        None,
        None,
        [s["clip_i"] for s in base_scores.values()],
        [s["clip_t"] for s in base_scores.values()],
        oracle=oracle_lists(list(base_scores.values())),
    )
    judged = [m for m in ORACLE_METRICS if m in base.oracle and all(m in s.oracle for s in summaries)]
    ref_step = next((s.step_seconds for s in summaries if s.method == reference), None)
    subjects = sorted(base_scores)
    columns = ["method", "lr", "parameters", "s / step", f"vs {reference}", "peak RSS MiB", "CLIP-I", "CLIP-T"]
    columns += [METRIC_NAMES[m] for m in judged] + ["runs"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    base_cells = [_cell(base.clip_i), _cell(base.clip_t), *(_cell(base.oracle[m]) for m in judged)]
    lines.append("| base (no fine-tuning) | – | 0 | – | – | – | " + " | ".join(base_cells) + f" | {len(base.clip_i)} |")
    if ceilings:
        ceiling_cells = " | ".join([_cell([ceilings[x] for x in subjects]), "–", *("–" for _ in judged), "–"])
        lines.append(f"| instance pictures vs each other (CLIP-I ceiling) | – | – | – | – | – | {ceiling_cells} |")
    for s in summaries:
        step = f"{s.step_seconds:.3f}" if s.step_seconds else "–"
        ratio = f"{s.step_seconds / ref_step:.2f}" if s.step_seconds and ref_step else "–"
        rss = f"{s.peak_rss_mib:.0f}" if s.peak_rss_mib else "–"
        cells = [_cell(s.clip_i), _cell(s.clip_t), *(_cell(s.oracle[m]) for m in judged)]
        lines.append(
            f"| {s.method} | {s.learning_rate:g} | {s.parameters:,} | {step} | {ratio} | {rss} | "
            + " | ".join(cells)
            + f" | {len(s.clip_i)} |"
        )
    if judged:
        lines += ["", ORACLE_LEGEND]
        if oracle_check:
            accuracy = oracle_check.get("check_accuracy", {})
            lines.append(
                f"The oracle on {oracle_check.get('check_pictures')} fresh world renders: "
                + ", ".join(f"{a} {v:.3f}" for a, v in accuracy.items())
                + "."
            )
    lines += ["", "Per subject, CLIP-I / CLIP-T (mean over seeds):", ""]
    lines.append("| method | " + " | ".join(subjects) + " |")
    lines.append("|---|" + "---:|" * len(subjects))
    lines.append(
        "| base | "
        + " | ".join(f"{base_scores[x]['clip_i']:.3f} / {base_scores[x]['clip_t']:.3f}" for x in subjects)
        + " |"
    )
    for method, table in per_subject.items():
        cells = [f"{table[x]['clip_i']:.3f} / {table[x]['clip_t']:.3f}" if x in table else "–" for x in subjects]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if ceilings:
        lines.append("| CLIP-I ceiling | " + " | ".join(f"{ceilings[x]:.3f} / –" for x in subjects) + " |")
    if {"subject_fidelity", "subject_color"} <= set(judged):  # which subjects are visibly learned, per method
        lines += ["", "Per subject, the oracle's subject fidelity / subject colour (mean over seeds):", ""]
        lines.append("| method | " + " | ".join(subjects) + " |")
        lines.append("|---|" + "---:|" * len(subjects))
        for method, table in {"base": base_scores, **per_subject}.items():
            cells = [
                f"{table[x]['subject_fidelity']:.2f} / {table[x]['subject_color']:.2f}" if x in table else "–"
                for x in subjects
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Differences, paired over subjects (mean ± 95% confidence half-width; within noise: the interval "
        "contains zero):",
        "",
    ]
    lines += noise_lines(per_subject, base_scores, reference, comparisons)
    return "\n".join(lines) + "\n"


def per_subject_means(plans: Sequence[RunPlan], scores: dict[Path, dict[str, float]]):
    """``{method: {subject: {"clip_i", "clip_t"}}}``: means over seeds."""
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for plan in plans:
        groups.setdefault((plan.method, plan.subject), []).append(scores[plan.output_dir])
    table: dict[str, dict[str, dict[str, float]]] = {}
    for (method, subject), values in groups.items():
        metrics = [m for m in METRIC_NAMES if all(m in v for v in values)]
        table.setdefault(method, {})[subject] = {m: statistics.fmean(v[m] for v in values) for m in metrics}
    return table
