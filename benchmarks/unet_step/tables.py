"""The UNet step's Markdown: the goals and their verdicts, the step table and its section, ``--saved-only``'s section,
and the plot of step time and saved memory relative to LoRA r=4."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import BOFT, DOUBLE, FLOOR, GSOFT, LORA, PEFT_BOFT, REFERENCE, Method
from benchmarks.measure import Samples, per_round_ratio
from benchmarks.report import IMAGES, load_line, markdown_table, save_figure
from benchmarks.unet_step.runs import Measured
from benchmarks.unet_step.step import setting_line

# The goals (issues 5 and 19), as (method, reference, largest allowed ratio).
TIME_GOALS = [(GSOFT[0], LORA[0], 1.05), (GSOFT[0], BOFT[0], 0.60), (DOUBLE[0], LORA[0], 1.15)]
SAVED_GOALS = [(GSOFT[0], LORA[0], 1.10), (DOUBLE[0], LORA[0], 1.20)]
RSS_GOAL = (GSOFT[0], LORA[0], 1.05)
# What the step table's columns mean, whichever way the steps were run.
MEASURES = (
    "Ratios are medians over rounds of (method / reference in the same round). Saved tensors: distinct storages "
    "autograd keeps for backward in one step (frozen weights excluded). Adapter state: parameters + gradients + "
    "AdamW moments."
)


def results_table(
    methods: list[Method],
    samples: dict[str, Samples],
    saved: dict[str, int],
    state: dict[str, int],
    rss: dict[str, dict[str, int]],
    device: str = "cpu",
) -> str:
    ref, floor = REFERENCE.label, FLOOR.label
    rows = []
    for method in methods:
        s, label = samples[method.label], method.label
        row = [
            label,
            f"{s.wall_median:.2f}",
            f"{s.wall_min:.2f}",
            f"{s.cpu_median:.2f}",
            f"{per_round_ratio(samples, label, ref):.2f}",
            f"{per_round_ratio(samples, label, ref, 'cpu'):.2f}",
            f"{per_round_ratio(samples, label, floor):.2f}",
            f"{saved[label] / 2**20:.0f}",
            f"{saved[label] / saved[ref]:.2f}",
            f"{state[label] / 2**20:.0f}",
        ]
        if rss:
            peak = rss.get(label, {}).get("peak_kib")
            floor_peak, ref_peak = rss.get(floor, {}).get("peak_kib"), rss.get(ref, {}).get("peak_kib")
            row += [
                f"{peak / 2**20:.2f}" if peak else "—",
                f"{(peak - floor_peak) / 2**10:+.0f}" if peak and floor_peak else "—",
                f"{peak / ref_peak:.3f}" if peak and ref_peak else "—",
            ]
        rows.append(row)
    header = [
        "method",
        "wall median (s)",
        "wall min (s)",
        "CPU median (s)",
        "time / LoRA r=4 (wall)",
        "time / LoRA r=4 (CPU)",
        "time / floor (wall)",
        "saved tensors (MiB)",
        "saved / LoRA r=4",
        "adapter state (MiB)",
    ]
    if rss:
        header += ["peak RSS (GiB)", "RSS - floor (MiB)", "RSS / LoRA r=4"]
        if device == "cuda":  # the CUDA allocator's peak, all methods' parameters and optimizer states resident
            header[-3:] = ["peak CUDA memory (GiB)", "peak - floor (MiB)", "peak / LoRA r=4"]
    return markdown_table(header, rows)


def goals_text(
    samples: dict[str, Samples], saved: dict[str, int], rss: dict[str, dict[str, int]], device: str = "cpu"
) -> str:
    """The goals' verdicts; on CUDA the wall clock alone (the process's CPU time is host time there)."""
    lines = []
    memory = "peak CUDA memory" if device == "cuda" else "peak RSS"
    for method, reference, limit in TIME_GOALS:
        if method.label in samples and reference.label in samples:
            wall = per_round_ratio(samples, method.label, reference.label)
            cpu = wall if device == "cuda" else per_round_ratio(samples, method.label, reference.label, "cpu")
            verdict = "met" if max(wall, cpu) <= limit else "MISSED"
            if verdict == "MISSED" and min(wall, cpu) <= limit:
                verdict = "met on one clock only"
            floor = per_round_ratio(samples, FLOOR.label, reference.label)
            overhead = (samples[method.label].wall_median - samples[FLOOR.label].wall_median) / (
                samples[reference.label].wall_median - samples[FLOOR.label].wall_median
            )
            lines.append(
                f"- {method.label} / {reference.label}: {wall:.2f} (wall), {cpu:.2f} (CPU); goal <= {limit}: "
                f"{verdict}. The floor alone is {floor:.2f} of {reference.label}; time above the floor: "
                f"{overhead:.2f}x {reference.label}'s"
            )
    if GSOFT[0].label in samples and PEFT_BOFT.label in samples:
        ratio = per_round_ratio(samples, GSOFT[0].label, PEFT_BOFT.label)
        lines.append(f"- for comparison, {GSOFT[0].label} / {PEFT_BOFT.label}: {ratio:.2f}")
    for method, reference, limit in SAVED_GOALS:
        if method.label in saved and reference.label in saved:
            ratio = saved[method.label] / saved[reference.label]
            lines.append(
                f"- memory {method.label} / {reference.label}, autograd-saved tensors: {ratio:.3f}; goal <= "
                f"{limit}: {'met' if ratio <= limit else 'MISSED'}"
            )
    method, reference, limit = RSS_GOAL
    if method.label in rss and reference.label in rss:
        ratio = rss[method.label]["peak_kib"] / rss[reference.label]["peak_kib"]
        lines.append(
            f"- memory {method.label} / {reference.label}, {memory}: {ratio:.3f}; goal <= {limit}: "
            f"{'met' if ratio <= limit else 'MISSED'}"
        )
    return "\n".join(lines)


def plot(methods: list[Method], samples: dict[str, Samples], saved: dict[str, int], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {FLOOR.label: "floor (no adapter)", PEFT_BOFT.label: "PEFT BOFT (32,4) as run (1 factor)"}
    labels = [short.get(m.label, m.label.replace(" (PEFT)", "").split(" (GS core")[0]) for m in methods]
    ratios = [per_round_ratio(samples, m.label, REFERENCE.label) for m in methods]
    memory = [saved[m.label] / saved[REFERENCE.label] for m in methods]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    y = range(len(methods))
    left.barh(y, ratios, color="tab:blue")
    left.axvline(1.0, color="k", lw=0.8)
    left.set_xlabel("step time / LoRA r=4 (median of per-round ratios)")
    right.barh(y, memory, color="tab:orange")
    right.axvline(1.0, color="k", lw=0.8)
    right.set_xlabel("autograd-saved tensors / LoRA r=4")
    left.set_yticks(list(y), labels, fontsize=8)
    left.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path.name, path.parent)


def step_section(methods: list[Method], measured: Measured, args: argparse.Namespace) -> tuple[str, str]:
    """(section name, Markdown) of a timed run, its plot saved (to a temporary folder with --no-write)."""
    m, gib = measured, measured.weight_bytes / 2**30
    if args.isolated:
        how = (
            "Each method runs in a fresh process of its own per round (one UNet in memory at a time), the order "
            f"rotating over {args.rounds} rounds; each process builds the UNet, resets the RSS high-water mark, runs "
            f"a warm-up step (saved tensors counted) and one timed step. {MEASURES} Peak RSS: the process's "
            f"high-water mark over its two steps (the {gib:.1f} GiB of fp32 weights are in every row)."
        )
    else:
        how = (
            "One random-weight UNet shared by every method (structural copies), "
            f"{args.rounds} interleaved rounds after one warm-up step each, the order rotating per round. {MEASURES} "
            + (
                "Peak RSS: a child process per method builds the UNet, resets the high-water mark, runs two steps "
                f"(the {gib:.1f} GiB of fp32 weights are in every row)."
                if m.rss and args.device == "cpu"
                else ""
            )
        )
    timing_load = load_line(m.loads)
    print(timing_load, flush=True)
    parts = [
        f"### Training step: {setting_line(args)}",
        "",
        "Written by `benchmarks/bench_unet_step.py"
        + (" --isolated" if args.isolated else "")
        + "`. One step = forward, fp32 MSE loss, backward, AdamW over the "
        "method's trainable parameters; the input latents require grad in every row, so the floor (no adapter) "
        "has the same backward extent. " + how,
        "",
        f"Timing {timing_load}.",
        "",
        results_table(methods, m.samples, m.saved, m.state, m.rss, args.device),
        "",
        "Goals (issues 5 and 19):",
        "",
        goals_text(m.samples, m.saved, m.rss, args.device),
    ]
    title = f"{args.size} UNet training step ({args.device}, {args.latent}x{args.latent} latents, batch {args.batch})"
    section = "unet_step_gpu" if args.device == "cuda" else "unet_step"
    if args.device != "cuda" and (args.latent, args.batch) != (32, 1):
        section = f"unet_step_latent{args.latent}_batch{args.batch}"
    name = f"{section}.png"
    image = plot(methods, m.samples, m.saved, title, (Path(tempfile.mkdtemp()) if args.no_write else IMAGES) / name)
    print(f"plot: {image}")
    parts += ["", f"![step time and saved memory relative to LoRA r=4](images/{image.name})"]
    return section, "\n".join(parts)


def saved_only_section(
    methods: list[Method], measured: Measured, peaks: dict[str, int], failed: list[str], args: argparse.Namespace
) -> str:
    """--saved-only's Markdown: saved tensors per method (those whose process finished), the saved-memory goals."""
    saved, state = measured.saved, measured.state
    methods = [m for m in methods if m.label in saved]
    reference = saved[LORA[0].label]
    rows = [
        [m.label, f"{saved[m.label] / 2**20:.0f}", f"{saved[m.label] / reference:.3f}", f"{state[m.label] / 2**20:.0f}",
         f"{peaks[m.label] / 2**20:.1f}"]
        for m in methods
    ]  # fmt: skip
    header = ["method", "saved tensors (MiB)", "saved / LoRA r=4", "adapter state (MiB)", "forward's peak RSS (GiB)"]
    killed = "Killed (the child process died, on this machine: out of memory) before its count: "
    return "\n".join(
        [
            f"### Autograd-saved memory of one training step: {setting_line(args)}",
            "",
            "Written by `benchmarks/bench_unet_step.py --saved-only`: one forward per method (fp32 MSE loss "
            "included) under `torch.autograd.graph.saved_tensors_hooks`, the distinct storages autograd keeps for "
            "backward summed (frozen weights excluded). Autograd saves everything in the forward, so this is the "
            "step's count exactly, without the backward. Each method runs in its own process; the last column is "
            "that process's peak RSS (weights, the forward's saved tensors and temporaries; no backward, no "
            "optimizer), not the training step's.",
            "",
            markdown_table(header, rows),
            *(["", killed + ", ".join(failed) + "."] if failed else []),
            "",
            "Goals (issue 19):",
            "",
            goals_text({}, saved, {}),
        ]
    )
