"""One optimizer step (forward, backward, AdamW) of the whole SD-2-base-architecture UNet, every adapter side by side.

One random-weight base UNet is built once; each method gets a structural copy sharing its frozen weights, with the
adapter injected into the copy. Methods are timed interleaved in one process after a warm-up step, the order
rotating each round; the table reports per-round ratios (method time / LoRA r=4 time in the same round, median over
rounds), wall and CPU medians. Memory per method: autograd-saved tensors of one step (in-process, parameters
excluded) and the peak RSS of a child process that builds the UNet and runs two steps of that method alone.

Default shapes fit a 2-core CPU: 32x32 latents (256 px), batch 1, cross-attention from 77 tokens of width 1024.
The paper's setting (GPU, 64x64 latents, batch 4, bf16) is ``--device cuda --latent 64 --batch 4 --bf16``, which
writes its own section.

    python benchmarks/bench_unet_step.py [--rounds 5] [--quick] [--no-write] [--profile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import THREADS_HELP  # noqa: E402
from benchmarks.report import DOCS, replace_section  # noqa: E402
from benchmarks.unet_step.profile import profile_body  # noqa: E402
from benchmarks.unet_step.runs import (  # noqa: E402
    isolated_rounds,
    rss_child,
    saved_all,
    saved_child,
    shared_rounds,
    step_child,
)
from benchmarks.unet_step.step import chosen_methods  # noqa: E402
from benchmarks.unet_step.tables import saved_only_section, step_section  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timed rounds (one step per method each)")
    parser.add_argument("--quick", action="store_true", help="mid-size UNet at 8x8 latents, 7 methods, 1 round")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument(
        "--saved-only",
        action="store_true",
        help="only the autograd-saved tensors, from one forward per method (exact, no timing, no RSS): the "
        "paper's setting, --latent 64 --batch 4, in minutes on a CPU; its own section",
    )
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="every method's steps in a fresh process of its own, one per method and round (the order rotating): "
        "only one UNet in memory at a time, so the paper's setting (--latent 64 --batch 4) fits where the shared "
        "process does not; each child's peak RSS and saved tensors come from the same run",
    )
    parser.add_argument(
        "--profile", action="store_true", help="instead: per-layer timings, op profile, saved tensors per layer"
    )
    parser.add_argument("--size", default="sd2", choices=("sd2", "mid"), help="UNet architecture")
    parser.add_argument("--latent", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--methods",
        default="all",
        choices=("all", "paper"),
        help="all: every Table 2 row and the PEFT baselines; paper: floor, LoRA r=4, OFT, BOFT (32,4), GSOFT r=32 "
        "(also with --gsoft_weight_side_modules to_out.0), Double GSOFT r=64 (the side-by-side set for the "
        "paper's setting, --latent 64 --batch 4)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (adapter parameters stay fp32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: peak memory from the CUDA allocator)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--saved-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--step-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.latent, args.rounds, args.no_write = "mid", 8, 1, True
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    if args.profile:
        write(args, "unet_step_profile", profile_body(args))
        return
    if args.saved_child:
        saved_child(args)
        return
    if args.saved_only:  # one forward per method under the saved-tensor hooks, each in its own process
        methods = chosen_methods(args)
        body = saved_only_section(methods, *saved_all(methods, args), args)
        write(args, f"unet_step_saved_latent{args.latent}_batch{args.batch}", body)
        return
    if args.step_child:
        step_child(args)
        return
    methods = chosen_methods(args)
    measured = isolated_rounds(methods, args) if args.isolated else shared_rounds(methods, args)
    write(args, *step_section(methods, measured, args))


def write(args: argparse.Namespace, section: str, body: str) -> None:
    """Print ``body``; unless --no-write, put it between the ``section`` markers of docs/benchmarks.md."""
    print(body)
    if not args.no_write:
        replace_section(DOCS, section, body)


if __name__ == "__main__":
    main()
