"""One optimizer step of the whole UNet (forward, fp32 MSE loss, backward, AdamW), the methods and setting of a run,
and what the step's memory columns measure (autograd-saved tensors, adapter state, weights)."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    ALL_METHODS,
    BOFT,
    DOUBLE,
    FLOOR,
    GSOFT,
    GSOFT_WEIGHT_SIDE_OUT,
    LORA,
    PEFT_BOFT,
    PEFT_OFT,
    Method,
    apply_method,
    build_unet,
)
from benchmarks.measure import SavedTensors
from benchmarks.report import machine_line

QUICK_METHODS = [FLOOR, LORA[0], GSOFT[0], DOUBLE[0], BOFT[0], PEFT_OFT, PEFT_BOFT]
QUICK_RSS_METHODS = [GSOFT[0]]
CONTEXT_TOKENS, CONTEXT_WIDTH = 77, 1024

# The side-by-side set of the paper's setting (64x64 latents, batch 4): PEFT's LoRA and OFT, the GS-core BOFT.
PAPER_METHODS = [FLOOR, LORA[0], PEFT_OFT, BOFT[0], GSOFT[0], GSOFT_WEIGHT_SIDE_OUT, DOUBLE[0]]


@dataclass
class Batch:
    latents: torch.Tensor  # (batch, 4, s, s), requires grad: the floor's only gradient
    timesteps: torch.Tensor  # (batch,)
    context: torch.Tensor  # (batch, 77, 1024)
    target: torch.Tensor  # (batch, 4, s, s)


def make_batch(batch: int, latent: int, device: str, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, latent, latent, generator=generator)
    context = torch.randn(batch, CONTEXT_TOKENS, CONTEXT_WIDTH, generator=generator)
    target = torch.randn(batch, 4, latent, latent, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    to = {"device": device}
    return Batch(latents.to(**to).requires_grad_(), timesteps.to(**to), context.to(**to), target.to(**to))


class StepRunner:
    """forward, MSE loss in fp32, backward, AdamW over the method's trainable parameters (none for the floor)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], batch: Batch, bf16: bool) -> None:
        self.model, self.params, self.batch, self.bf16 = model, params, batch, bf16
        self.optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None

    def forward_loss(self) -> torch.Tensor:
        b = self.batch
        device_type = b.latents.device.type
        autocast = torch.autocast(device_type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            prediction = self.model(b.latents, b.timesteps, b.context).sample
        return F.mse_loss(prediction.float(), b.target)

    def __call__(self, saved: SavedTensors | None = None, backward: bool = True) -> float:
        """One step; its forward under ``saved`` (counting what autograd keeps) when given."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.batch.latents.grad = None
        with saved if saved is not None else contextlib.nullcontext():
            loss = self.forward_loss()
        if not backward:  # the forward alone (saved-tensor counts): the graph is freed with ``loss``
            return loss.item()
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        if self.batch.latents.device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()


def chosen_methods(args: argparse.Namespace) -> list[Method]:
    return QUICK_METHODS if args.quick else PAPER_METHODS if args.methods == "paper" else ALL_METHODS


def setting_line(args: argparse.Namespace) -> str:
    """The measured setting, for a section title: UNet, latents, batch, context, precision, device, machine."""
    return (
        f"{args.size} UNet, {args.latent}x{args.latent} latents, batch {args.batch}, cross-attention from "
        f"{CONTEXT_TOKENS} tokens of width {CONTEXT_WIDTH}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"{device_name(args.device)} ({machine_line()})"
    )


def device_name(device: str) -> str:
    return f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else device


def frozen_base(args: argparse.Namespace, device: str | None = None, fill: str = "uniform") -> nn.Module:
    """The random-weight base UNet; with --bf16 its frozen weights are bf16, as the trainer keeps them under mixed
    precision (fp32 weights under autocast would add a bf16 copy of every weight to the saved tensors)."""
    unet = build_unet(args.size, device=device or args.device, seed=0, fill=fill)
    return unet.to(torch.bfloat16) if args.bf16 else unet


def runner_for(
    args: argparse.Namespace, method: Method, device: str | None = None, fill: str = "uniform"
) -> tuple[StepRunner, list[nn.Parameter]]:
    """A child process's one model: a fresh base UNet with ``method`` in it, as a step runner, and its trainable
    parameters."""
    unet = frozen_base(args, device=device, fill=fill)
    params = apply_method(unet, method)
    return StepRunner(unet, params, make_batch(args.batch, args.latent, device or args.device), args.bf16), params


def saved_tensor_bytes(runner: StepRunner, backward: bool = True) -> int:
    """Bytes of the distinct storages autograd saves for backward in one step, parameters and buffers excluded.

    The step is a real one (optimizer included), so this doubles as the warm-up step. ``backward=False`` runs the
    forward only: autograd saves everything during the forward, so the count is the same, at a third of the cost.
    """
    saved = SavedTensors(runner.model)
    runner(saved=saved, backward=backward)
    return saved.total


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters as stored (the frozen weights in every row's memory)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def adapter_state_bytes(params: list[nn.Parameter]) -> int:
    """Parameters + gradients + AdamW's two moments, fp32."""
    return 16 * sum(p.numel() for p in params)
