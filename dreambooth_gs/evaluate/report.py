"""Evaluation outputs: results.csv (one row per run x prompt), summary.md (a table per method and model family:
mean and std over subjects), a CLIP-I vs CLIP-T scatter plot per method, a curve along adapter strength per method
when several strengths were evaluated, and an image grid per subject (one row per run). Runs of different families
(sd, sdxl, sd3, flux) are never pooled: a method's scores are per family, and per strength."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from ..adapters.sampling import labeled_grid
from ..fileio import atomic_write
from ..train.data import load_image
from .plan import BASE, PROMPT, ImageJob, RunSpec, printable, slug, strength_text

RESULT_COLUMNS = ("method", "subject", "prompt", "clip_i", "clip_t", "dino", "n", "kind", "run", "family", "scale")
SCORE_COLUMNS = ("clip_i", "clip_t", "dino")  # written with 6 decimals
# Per-subject scores: (column, rows of this kind, metric). The protocol's CLIP-I (and DINO) use the base-prompt
# images, its CLIP-T the contextual prompts; the last two columns add subject fidelity under the contextual prompts.
SUBJECT_SCORES = (
    ("CLIP-I", BASE, "clip_i"),
    ("CLIP-T", PROMPT, "clip_t"),
    ("DINO", BASE, "dino"),
    ("CLIP-I ctx", PROMPT, "clip_i"),
    ("DINO ctx", PROMPT, "dino"),
)


def _atomic_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 through a temporary file; undecodable file-name bytes in it become ``\\xff`` escapes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(printable(text), encoding="utf-8"))


def write_results_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """One line per run x prompt with RESULT_COLUMNS; scores with 6 decimals, an empty cell for a skipped metric,
    the adapter strength as given (``1.0``, ``0.25``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        row = {"scale": 1.0} | row
        writer.writerow(
            {k: (f"{row[k]:.6f}" if k in SCORE_COLUMNS and row[k] is not None else row[k]) for k in RESULT_COLUMNS}
        )
    _atomic_text(Path(path), buffer.getvalue())
    return Path(path)


Group = tuple[str, str, float]  # (method, family, strength): the rows one line of summary.md aggregates


def group_of(row: dict) -> Group:
    """The summary line a row belongs to (rows without a ``scale`` are at strength 1)."""
    return row["method"], row["family"], float(row.get("scale", 1.0))


def swept(groups) -> bool:
    """Whether any group is at another strength than 1: then tables, plots and grids name the strength."""
    return any(strength != 1 for _, _, strength in groups)


def subject_scores(rows: Sequence[dict]) -> dict[Group, dict[str, dict[str, float | None]]]:
    """``{(method, family, strength): {subject: {column: score}}}``: image-weighted means over the subject's prompts
    (and runs); a method's runs on different model families, or at different strengths, stay apart."""
    sums: dict[tuple[Group, str, str], list[float]] = {}
    for row in rows:
        for column, kind, metric in SUBJECT_SCORES:
            if row["kind"] == kind and row[metric] is not None:
                total = sums.setdefault((group_of(row), row["subject"], column), [0.0, 0.0])
                total[0] += row[metric] * row["n"]
                total[1] += row["n"]
    table: dict[Group, dict[str, dict[str, float | None]]] = {}
    for row in rows:
        group = group_of(row)
        scores = table.setdefault(group, {}).setdefault(row["subject"], {})
        for column, _, _ in SUBJECT_SCORES:
            total = sums.get((group, row["subject"], column))
            scores[column] = total[0] / total[1] if total else None
    return table


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over subjects (std None with fewer than two values)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else None)


def _cell(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _parameters(runs: Sequence[RunSpec], group: Group) -> str:
    counts = sorted({r.num_parameters for r in runs if (r.label, r.family) == group[:2]})
    return " / ".join(f"{c:,}" for c in counts) or "–"


def summary_markdown(
    rows: Sequence[dict], runs: Sequence[RunSpec], failures: dict[str, str], notes: Sequence[str], settings: dict
) -> str:
    """summary.md: every method side by side, then a table per method (subjects, mean, std), notes and failures."""
    table = subject_scores(rows)
    columns = [c for c, _, _ in SUBJECT_SCORES]
    lines = ["# DreamBooth evaluation", ""]
    lines += [
        "Per subject, each score is a mean over its images; tables give the mean ± standard deviation over subjects. "
        "CLIP-I / DINO: base-prompt images vs the subject's real images (*ctx*: contextual-prompt images vs real "
        "images). CLIP-T: contextual-prompt images vs their prompt without the placeholder token.",
        "",
    ]
    sweep = swept(table)
    strength_header, strength_rule = ("strength | ", "---:|") if sweep else ("", "")
    lines += [f"| method | family | {strength_header}trainable params | subjects | " + " | ".join(columns) + " |"]
    lines += [f"|---|---|{strength_rule}---:|---:|" + "---:|" * len(columns)]
    for group, subjects in sorted(table.items()):
        method, family, strength = group
        cells = [_cell(*mean_std([s[c] for s in subjects.values()])) for c in columns]
        strength_cell = f"{strength_text(strength)} | " if sweep else ""
        parameters = _parameters(runs, group)
        lines += [
            f"| {method} | {family} | {strength_cell}{parameters} | {len(subjects)} | " + " | ".join(cells) + " |"
        ]
    for group, subjects in sorted(table.items()):
        method, family, strength = group
        at = f", strength {strength_text(strength)}" if sweep else ""
        lines += ["", f"## {method}, {family}{at} ({_parameters(runs, group)} trainable parameters)", ""]
        lines += ["| subject | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for subject, scores in sorted(subjects.items()):
            lines += [f"| {subject} | " + " | ".join(_cell(scores[c]) for c in columns) + " |"]
        stats = [mean_std([s[c] for s in subjects.values()]) for c in columns]
        lines += ["| **mean** | " + " | ".join(_cell(m) for m, _ in stats) + " |"]
        lines += ["| **std** | " + " | ".join(_cell(s) for _, s in stats) + " |"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    if failures:
        lines += ["", "## Failures", ""] + [f"- `{entry}`: {message}" for entry, message in failures.items()]
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _save_figure(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def _axes(title: str, size: tuple[float, float] = (5, 4)):
    """A figure on the Agg canvas (no display, no global pyplot state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_xlabel("CLIP-T (prompt fidelity)")
    axes.set_ylabel("CLIP-I (subject fidelity)")
    axes.set_title(title)
    return figure, axes


def _series_label(family: str, strength: float, families: bool, strengths: bool, default: str) -> str:
    """A series' legend text: its family and strength where the plot shows several, else ``default``."""
    parts = ([family] if families else []) + ([f"s={strength_text(strength)}"] if strengths else [])
    return " ".join(parts) or default


def plot_scatter(rows: Sequence[dict], method: str, path: str | os.PathLike) -> Path:
    """CLIP-I (y) against CLIP-T (x) for one method: a point per subject and a star at the mean over subjects, one
    series per model family and strength where the method has several (over strengths, subjects go unnamed: their
    scores are in summary.md)."""
    from matplotlib.lines import Line2D

    table = subject_scores([r for r in rows if r["method"] == method])
    series = []
    for (_, family, strength), subjects in sorted(table.items()):
        points = [
            (s, v["CLIP-T"], v["CLIP-I"]) for s, v in sorted(subjects.items()) if None not in (v["CLIP-T"], v["CLIP-I"])
        ]
        series.append((family, strength, points))
    count = len({subject for _, _, points in series for subject, _, _ in points})
    figure, axes = _axes(printable(f"{method}: CLIP-I vs CLIP-T ({count} subjects)"))
    families, strengths = len({f for f, _, _ in series}) > 1, len({s for _, s, _ in series}) > 1
    several = len(series) > 1
    for family, strength, points in series:
        dots = axes.scatter(
            [x for _, x, _ in points],
            [y for _, _, y in points],
            s=25,
            alpha=0.7,
            label=_series_label(family, strength, families, strengths, "subject"),
        )
        for subject, x, y in points if not strengths else []:
            axes.annotate(printable(subject), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if points:
            mean_x, mean_y = statistics.fmean(p[1] for p in points), statistics.fmean(p[2] for p in points)
            color = dots.get_facecolor()[0][:3] if several else "black"
            label = None if strengths else f"{family} mean" if several else "mean"
            axes.scatter([mean_x], [mean_y], marker="*", s=180, color=color, label=label)
    if count:
        handles, _ = axes.get_legend_handles_labels()
        if strengths:  # one entry for the stars of every strength
            handles.append(Line2D([], [], marker="*", ms=12, ls="", color="grey", label="mean over subjects"))
        axes.legend(handles=handles, loc="best", fontsize=7)
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_methods(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Every method (per model family, where there are several) in one plot: mean CLIP-I against mean CLIP-T over
    subjects, with standard-deviation bars; over strengths, a colour per method and each point labelled with its
    strength."""
    figure, axes = _axes("CLIP-I vs CLIP-T, mean over subjects")
    table = subject_scores(rows)
    families, strengths = len({family for _, family, _ in table}) > 1, swept(table)
    colors: dict[tuple[str, str], str] = {}
    for (method, family, strength), subjects in sorted(table.items()):
        mean_x, std_x = mean_std([s["CLIP-T"] for s in subjects.values()])
        mean_y, std_y = mean_std([s["CLIP-I"] for s in subjects.values()])
        if mean_x is None or mean_y is None:
            continue
        first = (method, family) not in colors
        color = colors.setdefault((method, family), f"C{len(colors) % 10}")
        label = printable(f"{method} ({family})" if families else method) if first else None
        bars = {"xerr": [std_x or 0.0], "yerr": [std_y or 0.0], "fmt": "o", "capsize": 3, "color": color}
        axes.errorbar([mean_x], [mean_y], label=label, **bars)
        if strengths:
            text = strength_text(strength)
            axes.annotate(text, (mean_x, mean_y), fontsize=7, xytext=(4, 4), textcoords="offset points", color=color)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best", fontsize=7)
    figure.tight_layout()
    return _save_figure(figure, path)


def strength_curves(rows: Sequence[dict]) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    """``{(method, family): [(strength, mean CLIP-T, mean CLIP-I), ...]}`` in increasing strength: the means over
    subjects at each strength (a strength without both scores is left out)."""
    curves: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for (method, family, strength), subjects in sorted(subject_scores(rows).items()):
        clip_t, _ = mean_std([s["CLIP-T"] for s in subjects.values()])
        clip_i, _ = mean_std([s["CLIP-I"] for s in subjects.values()])
        if clip_t is not None and clip_i is not None:
            curves.setdefault((method, family), []).append((strength, clip_t, clip_i))
    return curves


def plot_strength(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """The adapter's strength as a curve: mean CLIP-I (y) against mean CLIP-T (x) over subjects, a line per method
    (and family, where there are several) through its strengths in increasing order, each point labelled with its
    strength; the trained adapter (strength 1) is a square, the other strengths are dots."""
    from matplotlib.lines import Line2D

    curves = strength_curves(rows)
    families = len({family for _, family in curves}) > 1
    figure, axes = _axes("CLIP-I vs CLIP-T along adapter strength (labels: strength)", size=(6.4, 4.8))
    label_box = {"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.7}
    for (method, family), points in curves.items():
        label = printable(f"{method} ({family})" if families else method)
        (line,) = axes.plot([x for _, x, _ in points], [y for _, _, y in points], "o-", ms=5, lw=1.5, label=label)
        color = line.get_color()
        for strength, x, y in points:
            if strength == 1:
                axes.plot([x], [y], "s", ms=8, color=color)
            axes.annotate(
                strength_text(strength), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8, color=color,
                bbox=label_box,
            )  # fmt: skip
    if curves:
        handles, _ = axes.get_legend_handles_labels()
        trained = Line2D([], [], marker="s", ms=8, ls="", color="grey", label="strength 1 (as trained)")
        axes.legend(handles=[*handles, trained], loc="best", fontsize=8)
        axes.margins(0.1)  # room for the strength labels at the ends of the curves
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save_figure(figure, path)


def subject_grid(runs: Sequence[RunSpec], jobs: dict[str, list[ImageJob]], prompts: int, path) -> Path:
    """One subject: a row per run (labelled with its method, and its family and strength where the runs have several:
    a strength sweep gives a row per strength), columns: a real image, then the first image of the base prompt and
    of the first ``prompts`` prompts."""
    first_jobs = {r.run_id: [j for j in jobs[r.run_id] if j.index == 0] for r in runs}
    order = list(dict.fromkeys((j.kind, j.prompt) for r in runs for j in first_jobs[r.run_id]))
    order = [p for p in order if p[0] == BASE][:1] + [p for p in order if p[0] == PROMPT][:prompts]
    families, strengths = len({r.family for r in runs}) > 1, any(r.scale != 1 for r in runs)
    rows, labels = [], []
    for run in sorted(runs, key=lambda r: (r.label, r.family, r.scale, r.run_id)):
        by_prompt = {(j.kind, j.prompt): j for j in first_jobs[run.run_id]}
        row = [load_image(run.real_images[0])]
        row += [load_image(by_prompt[p].path) if p in by_prompt else None for p in order]
        rows.append(row)
        label = f"{run.label} ({run.family})" if families else run.label
        labels.append(printable(f"{label}, s={strength_text(run.scale)}" if strengths else label))
    size = next(image.size for row in rows for image in row[1:] if image is not None)
    rows = [[row[0].resize(size)] + row[1:] for row in rows]
    grid = labeled_grid(rows, labels, ["real"] + [printable(prompt) for _, prompt in order])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def write_reports(
    output_dir: str | os.PathLike,
    rows: Sequence[dict],
    runs: Sequence[RunSpec],
    jobs: dict[str, list[ImageJob]],
    failures: dict[str, str],
    notes: Sequence[str],
    settings: dict,
    grid_prompts: int = 6,
) -> dict[str, Path | list[Path]]:
    """Write every output into ``output_dir``; returns their paths by kind."""
    output_dir = Path(output_dir)
    paths: dict[str, Path | list[Path]] = {
        "results": write_results_csv(rows, output_dir / "results.csv"),
        "summary": output_dir / "summary.md",
    }
    _atomic_text(paths["summary"], summary_markdown(rows, runs, failures, notes, settings))
    methods = sorted({r["method"] for r in rows})
    paths["plots"] = [plot_scatter(rows, m, output_dir / "plots" / f"clip_scatter_{slug(m)}.png") for m in methods]
    if methods:
        paths["plots"].append(plot_methods(rows, output_dir / "plots" / "clip_scatter_methods.png"))
    if len({group_of(row)[2] for row in rows}) > 1:  # several strengths: the strength as a curve
        paths["plots"].append(plot_strength(rows, output_dir / "plots" / "clip_strength.png"))
    subjects = sorted({r.subject for r in runs})
    paths["grids"] = [
        subject_grid([r for r in runs if r.subject == s], jobs, grid_prompts, output_dir / "grids" / f"{slug(s)}.png")
        for s in subjects
    ]
    return paths
