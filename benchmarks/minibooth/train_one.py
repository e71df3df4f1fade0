"""One DreamBooth run of train_dreambooth_gsoft.py, measured: wall time, time per optimizer step and peak memory.

    python benchmarks/minibooth/train_one.py <train_dreambooth_gsoft.py flags>

Runs the trainer's own ``main(parse_args(flags))`` in this process, timing every optimizer step through torch's
global optimizer hook (no change to the trainer), then writes ``<output_dir>/minibooth_run.json``. That file is
written last: MiniBooth's driver treats a run folder without it as unfinished.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.memory import peak_rss_mib, resident_mib  # noqa: E402

RECORD_FILE = "minibooth_run.json"
WARMUP_STEPS = 3  # the first steps pay for lazy initialisation; their times are not in the median


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
            rss_at_first_step.append(resident_mib())

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
        "concurrent_runs": int(os.environ.get("MINIBOOTH_CONCURRENT_RUNS", "1")),  # other runs sharing the CPU
    }
    (output_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    from dreambooth_gs.cli import run_cli

    run_cli(main, sys.argv[1:], "train_one.py")
