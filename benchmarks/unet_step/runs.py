"""Where the UNet steps run: every method in this process on one shared UNet (:func:`shared_rounds`), or a fresh
child process per method (:func:`isolated_rounds`, :func:`peak_rss_all`, :func:`saved_all`).

A child is ``bench_unet_step.py`` itself with a hidden flag (``--rss-child`` / ``--step-child`` / ``--saved-child``
and a method label); it builds its one UNet, measures, and prints one JSON line, the last of its output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import BY_LABEL, Method, apply_method, shared_copy
from benchmarks.measure import Samples, interleaved, timed
from benchmarks.memory import reset_peak_rss, status_kib
from benchmarks.unet_step.step import (
    QUICK_RSS_METHODS,
    StepRunner,
    adapter_state_bytes,
    frozen_base,
    make_batch,
    parameter_bytes,
    runner_for,
    saved_tensor_bytes,
)

SCRIPT = Path(__file__).resolve().parents[1] / "bench_unet_step.py"


@dataclass
class Measured:
    """What the step table shows, by method label."""

    samples: dict[str, Samples] = field(default_factory=dict)
    saved: dict[str, int] = field(default_factory=dict)  # autograd-saved bytes of one step
    state: dict[str, int] = field(default_factory=dict)  # adapter state bytes
    rss: dict[str, dict[str, int]] = field(default_factory=dict)  # {"peak_kib": ...}; CUDA's peak on CUDA
    loads: list[tuple[float, float, float]] = field(default_factory=list)
    weight_bytes: int = 0  # the frozen weights, in every row


# ---------------------------------------------------------------------------------------------------------------
# In this process
# ---------------------------------------------------------------------------------------------------------------


def shared_rounds(methods: list[Method], args: argparse.Namespace) -> Measured:
    """Every method in this process on one shared UNet, interleaved rounds; peak RSS from child processes."""
    torch.manual_seed(0)
    print(f"building the {args.size} UNet ({args.device}) ...", flush=True)
    base = frozen_base(args)
    measured = Measured(weight_bytes=parameter_bytes(base))
    batch = make_batch(args.batch, args.latent, args.device)
    runners: dict[str, StepRunner] = {}
    for method in methods:
        model = shared_copy(base)
        params = apply_method(model, method)
        runners[method.label] = StepRunner(model, params, batch, args.bf16)
        measured.state[method.label] = adapter_state_bytes(params)
    print(f"{len(methods)} methods; a warm-up step each (saved tensors counted), then {args.rounds} rounds")
    measured.saved = {label: saved_tensor_bytes(runner) for label, runner in runners.items()}
    measured.samples, measured.loads = interleaved(runners, rounds=args.rounds, warmup=0)
    if args.device == "cuda":
        for label, runner in runners.items():  # the CUDA allocator's peak stands in for RSS
            torch.cuda.reset_peak_memory_stats()
            runner()
            measured.rss[label] = {"peak_kib": torch.cuda.max_memory_allocated() // 1024}
    elif not args.no_rss:
        measured.rss = peak_rss_all(QUICK_RSS_METHODS if args.quick else methods, args)
    return measured


# ---------------------------------------------------------------------------------------------------------------
# The children's side (each prints one JSON line)
# ---------------------------------------------------------------------------------------------------------------


def rss_child(args: argparse.Namespace) -> None:
    """--rss-child LABEL: build the UNet, reset the RSS high-water mark, run two steps of one method; print JSON."""
    runner, _ = runner_for(args, BY_LABEL[args.rss_child], device="cpu", fill="constant")
    before = status_kib("VmRSS")
    reset_peak_rss()
    for _ in range(2):  # the second step runs with AdamW's moments allocated
        runner()
    print(json.dumps({"rss_before_kib": before, "peak_kib": status_kib("VmHWM")}))


def step_child(args: argparse.Namespace) -> None:
    """--step-child LABEL: build the UNet, reset the RSS high-water mark, a warm-up step (saved tensors counted),
    one timed step; print JSON."""
    torch.manual_seed(0)
    # random values: constant ones could drift into denormals and time differently
    runner, params = runner_for(args, BY_LABEL[args.step_child])
    reset_peak_rss()
    saved = saved_tensor_bytes(runner)
    wall, cpu = timed(runner)
    weight_bytes = parameter_bytes(runner.model)
    result = {"wall": wall, "cpu": cpu, "saved": saved, "state": adapter_state_bytes(params)}
    print(json.dumps(result | {"peak_kib": status_kib("VmHWM"), "weight_bytes": weight_bytes}))


def saved_child(args: argparse.Namespace) -> None:
    """--saved-child LABEL: build the UNet, one forward of that method under the hooks; print JSON."""
    runner, params = runner_for(args, BY_LABEL[args.saved_child], fill="constant")
    saved = saved_tensor_bytes(runner, backward=False)
    print(json.dumps({"saved": saved, "state": adapter_state_bytes(params), "peak_kib": status_kib("VmHWM")}))


# ---------------------------------------------------------------------------------------------------------------
# The parent's side
# ---------------------------------------------------------------------------------------------------------------


def child_command(flag: str, method: Method, args: argparse.Namespace) -> list[str]:
    """bench_unet_step.py as a child process measuring ``method`` alone (``--rss-child`` / ``--saved-child`` /
    ``--step-child``), with the parent's UNet size, latents, batch, threads and precision."""
    command = [sys.executable, str(SCRIPT), flag, method.label, "--size", args.size]
    command += ["--latent", str(args.latent), "--batch", str(args.batch), "--threads", str(args.threads)]
    return command + (["--bf16"] if args.bf16 else [])


def run_child(command: list[str]) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run a child; (the finished process, its JSON line, or None if it failed)."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return done, json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def peak_rss(method: Method, args: argparse.Namespace) -> dict[str, int]:
    done, result = run_child(child_command("--rss-child", method, args))
    if result is None:
        raise RuntimeError(f"RSS child for {method.label} failed:\n{done.stderr[-2000:]}")
    print(f"  peak RSS measured: {method.label}", flush=True)
    return result


def peak_rss_all(methods: list[Method], args: argparse.Namespace, workers: int = 2) -> dict[str, dict[str, int]]:
    """Peak RSS per method, two children at a time (after the timing, so they never disturb it)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda method: peak_rss(method, args), methods)
        return {method.label: result for method, result in zip(methods, results)}


def isolated_rounds(methods: list[Method], args: argparse.Namespace) -> Measured:
    """--isolated: one fresh child process per method and round, the order rotating; a child that dies (killed for
    memory) ends the run with its message."""
    measured = Measured(samples={method.label: Samples() for method in methods})
    for round_index in range(args.rounds):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            done, result = run_child(child_command("--step-child", method, args))
            if result is None:
                raise SystemExit(
                    f"bench_unet_step: the step process of {method.label} failed (exit {done.returncode}; -9 is a "
                    f"kill for memory): {done.stderr.strip()[-300:]}"
                )
            measured.samples[method.label].wall.append(result["wall"])
            measured.samples[method.label].cpu.append(result["cpu"])
            measured.saved[method.label], measured.state[method.label] = result["saved"], result["state"]
            peak = max(result["peak_kib"], measured.rss.get(method.label, {}).get("peak_kib", 0))
            measured.rss[method.label], measured.weight_bytes = {"peak_kib": peak}, result["weight_bytes"]
            peak_gib = result["peak_kib"] / 2**20
            print(f"  {method.label}: {result['wall']:.1f} s, peak RSS {peak_gib:.1f} GiB", flush=True)
        measured.loads.append(os.getloadavg())
        print(f"  round {round_index + 1}/{args.rounds} done, load average {measured.loads[-1][0]:.1f}", flush=True)
    return measured


def saved_all(methods: list[Method], args: argparse.Namespace) -> tuple[Measured, dict[str, int], list[str]]:
    """--saved-only: each method's saved and state bytes from a fresh process (no method inherits another's
    freed-but-held memory); (those, each process's peak RSS in KiB, the labels whose process died)."""
    measured, peaks, failed = Measured(), {}, []
    for method in methods:
        done, result = run_child(child_command("--saved-child", method, args) + ["--device", args.device])
        if result is None:  # e.g. killed for memory
            print(f"  {method.label}: the child process failed (exit {done.returncode}): {done.stderr[-300:]}")
            failed.append(method.label)
            continue
        measured.saved[method.label], measured.state[method.label] = result["saved"], result["state"]
        peaks[method.label] = result["peak_kib"]
        print(f"  {method.label}: {measured.saved[method.label] / 2**20:.0f} MiB saved", flush=True)
    return measured, peaks, failed
