"""Mixed precision: every method's training step under bf16 autocast, with fp32 adapter parameters.

A mid-size UNet with SD-2-base's widths (320 / 640, cross-attention from 1024 tokens' width; see
``benchmarks.common.MID_UNET_OVERRIDES``), so every Table 2 configuration applies. For each method, on a copy sharing
the frozen base weights: one fp32 step for reference (loss and adapter gradients, no update), then three AdamW steps
under ``torch.autocast("cpu", dtype=torch.bfloat16)``. Checked: every loss finite, every adapter gradient finite,
the adapter parameters still float32 after the updates; reported next to it: how far the first bf16 loss and
gradients are from fp32.

    python benchmarks/bench_precision.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ALL_METHODS,
    BOFT,
    DOUBLE,
    GSOFT,
    LORA,
    PEFT_BOFT,
    PEFT_OFT,
    Method,
    apply_method,
    build_unet,
    shared_copy,
)
from benchmarks.measure import THREADS_HELP  # noqa: E402
from benchmarks.report import DOCS, load_line, machine_line, markdown_table, replace_section  # noqa: E402

QUICK_METHODS = [LORA[0], GSOFT[0], DOUBLE[0], BOFT[0], PEFT_OFT, PEFT_BOFT]
BF16_STEPS = 3


def make_inputs(latent: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, latent, latent, generator=generator)
    context = torch.randn(1, 77, 1024, generator=generator)
    target = torch.randn(1, 4, latent, latent, generator=generator)
    return latents, torch.tensor([500]), context, target


def loss_of(model, inputs, bf16: bool) -> torch.Tensor:
    latents, timesteps, context, target = inputs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        prediction = model(latents, timesteps, context).sample
    return F.mse_loss(prediction.float(), target)


def check_method(base, method: Method, inputs, lr: float) -> list[str]:
    model = shared_copy(base)
    torch.manual_seed(0)
    params = apply_method(model, method)
    if not params:  # the floor: gradient to the input only
        latents = inputs[0].clone().requires_grad_()
        inputs = (latents, *inputs[1:])
        params = [latents]
    # fp32 reference: loss and gradients at the starting point, no update
    reference = loss_of(model, inputs, bf16=False)
    reference.backward()
    reference_grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone()
    for p in params:
        p.grad = None
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses, grads_finite, first_grads = [], True, None
    for _ in range(BF16_STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, inputs, bf16=True)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        grads_finite &= all(bool(torch.isfinite(g).all()) for g in grads) and len(grads) > 0
        if first_grads is None:
            first_grads = torch.cat([g.flatten() for g in grads]).clone()
        losses.append(loss.item())
        optimizer.step()
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    losses_finite = all(math.isfinite(v) for v in losses)
    cosine = F.cosine_similarity(first_grads.double(), reference_grads.double(), dim=0).item()
    loss_gap = abs(losses[0] - reference.item()) / abs(reference.item())
    ok = losses_finite and grads_finite and dtypes == ["float32"]
    return [
        method.label,
        f"{reference.item():.4f}",
        ", ".join(f"{v:.4f}" for v in losses),
        f"{loss_gap:.1e}",
        f"{cosine:.4f}",
        "yes" if losses_finite else "**NO**",
        "yes" if grads_finite else "**NO**",
        ", ".join(dtypes),
        "pass" if ok else "**FAIL**",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=16, help="latent height = width")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the bf16 steps")
    parser.add_argument("--quick", action="store_true", help="8x8 latents, 6 methods; no write")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = ALL_METHODS
    if args.quick:
        methods, args.latent, args.no_write = QUICK_METHODS, 8, True
    start = time.perf_counter()
    base = build_unet("mid")
    inputs = make_inputs(args.latent)
    rows = []
    for method in methods:
        try:
            rows.append(check_method(base, method, inputs, args.lr))
        except Exception as error:  # a crash is a result too: report it in the table
            rows.append([method.label, "—", "—", "—", "—", "—", "—", "—", f"**FAIL**: {type(error).__name__}: {error}"])
        print(" | ".join(rows[-1]), flush=True)
    failures = [row[0] for row in rows if not row[-1].startswith("pass")]
    header = ["method", "fp32 loss", f"bf16 losses ({BF16_STEPS} AdamW steps)", "|bf16 - fp32| / fp32 (step 1)"]
    header += ["grad cosine bf16 vs fp32", "losses finite", "adapter grads finite", "adapter dtype", "result"]
    params = sum(p.numel() for p in base.parameters())
    body = "\n".join(
        [
            f"### Precision: bf16 autocast with fp32 adapter parameters ({args.latent}x{args.latent} latents)",
            "",
            "Written by `benchmarks/bench_precision.py`. A mid-size UNet with SD-2-base's widths "
            f"({params / 1e6:.0f}M parameters: blocks 320 / 640, one layer each, cross-attention width 1024), fp32 "
            "weights, one step per method in fp32 for reference, then "
            f"{BF16_STEPS} AdamW steps (lr {args.lr}) under `torch.autocast('cpu', dtype=torch.bfloat16)`. The "
            "floor row has no adapter: its gradient is the input's. LoRA's B starts at zero, so the first "
            "gradients of its A are zero in both precisions (the cosine is over all adapter gradients).",
            "",
            markdown_table(header, rows, "lrrrrrrrl"),
            "",
            (f"All {len(rows)} methods pass." if not failures else f"Failing: {', '.join(failures)}.")
            + f" {time.perf_counter() - start:.0f} s ({machine_line()}; {load_line()}).",
        ]
    )
    print(body)
    if not args.no_write:
        replace_section(DOCS, "precision", body)


if __name__ == "__main__":
    main()
