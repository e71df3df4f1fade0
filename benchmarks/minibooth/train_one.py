"""One DreamBooth run of train_dreambooth_gsoft.py, measured: wall time, time per optimizer step and peak memory.

    python benchmarks/minibooth/train_one.py <train_dreambooth_gsoft.py flags>

Runs the trainer's own ``main(parse_args(flags))`` in this process, timing every optimizer step through torch's
global optimizer hook (no change to the trainer), then writes ``<output_dir>/minibooth_run.json``. That file is
written last: MiniBooth's driver treats a run folder without it as unfinished.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RECORD_FILE = "minibooth_run.json"
WARMUP_STEPS = 3  # the first steps pay for lazy initialisation; their times are not in the median


def current_rss_mib() -> float:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux ``VmHWM``, which starts afresh at exec). ``ru_maxrss`` is the
    fallback elsewhere: on Linux it survives exec, so a child started by a 2 GB parent reported 2 GB whatever it
    used (the first full run's seed-0 records)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, IndexError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def summarize_steps(stamps: list[float]) -> dict:
    """Median / mean seconds per optimizer step from the step-end timestamps, warm-up steps left out."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # gap k: the time of step k + 2
    gaps = gaps[WARMUP_STEPS - 1 :] if len(gaps) > WARMUP_STEPS else gaps  # short runs (smoke): keep them all
    if not gaps:
        return {"median_step_seconds": None, "mean_step_seconds": None}
    return {"median_step_seconds": statistics.median(gaps), "mean_step_seconds": statistics.fmean(gaps)}


def main(argv: list[str]) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from train_dreambooth_gsoft import main as train_main
    from train_dreambooth_gsoft import parse_args

    options = parse_args(argv)
    stamps: list[float] = []
    rss_at_first_step: list[float] = []

    def on_step(optimizer, args, kwargs) -> None:
        stamps.append(time.perf_counter())
        if not rss_at_first_step:
            rss_at_first_step.append(current_rss_mib())

    handle = register_optimizer_step_post_hook(on_step)
    start = time.perf_counter()
    try:
        output_dir = Path(train_main(options))
    finally:
        handle.remove()
    record = {
        "argv": argv,
        "wall_seconds": time.perf_counter() - start,
        "steps": len(stamps),
        **summarize_steps(stamps),
        "peak_rss_mib": peak_rss_mib(),
        "rss_at_first_step_mib": rss_at_first_step[0] if rss_at_first_step else None,
        "num_threads": torch.get_num_threads(),
    }
    (output_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    from dreambooth_gs.cli import run_cli

    run_cli(main, sys.argv[1:], "train_one.py")
