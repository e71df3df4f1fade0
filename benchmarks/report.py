"""How the benchmark scripts report: Markdown tables, figures, the setting lines, docs/benchmarks.md's sections.

Owns where results go (``docs/benchmarks.md`` and ``docs/images``), the table and number formats, the lines that say
on what a result was measured (machine, torch threads, library commit; load average) and the atomic rewrite of one
marked section of a Markdown file. What is measured is :mod:`benchmarks.measure`'s and :mod:`benchmarks.memory`'s.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
IMAGES = ROOT / "docs" / "images"


def replace_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` with ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} markers; add them where the section should go")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{head}{begin}\n{body.rstrip()}\n{end}{tail}")
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one char per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def save_figure(fig, name: str, directory: Path = IMAGES) -> Path:
    """Save a matplotlib figure as <directory>/<name> (docs/images by default; a small PNG) and close it."""
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Where and on what a result was measured
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def library_version() -> str:
    """The last commit touching dreambooth_gs/ (read-only git query), '+ local changes' if the tree differs.

    Cached on first call; this module calls it at import, so a run reports the library it imported.
    """
    try:
        commit = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", "dreambooth_gs"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dreambooth_gs"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "library version unknown"
    return f"dreambooth_gs at {commit}" + (" + local changes" if dirty else "")


def machine_line() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, {library_version()}"
    )


def load_line(loads: list[tuple[float, float, float]] | None = None) -> str:
    """The 1-minute load average now (and its range over ``loads``), for next to a timing table."""
    now = os.getloadavg()
    text = f"load average now {now[0]:.1f} / {now[1]:.1f} / {now[2]:.1f} (1 / 5 / 15 min)"
    if loads:
        ones = [load[0] for load in loads]
        text += f"; 1-minute load during the rounds {min(ones):.1f} to {max(ones):.1f}"
    return text + f" on {os.cpu_count()} cores"


library_version()  # pin the version string to the library this process imports
