"""What the trainer does across processes beyond accelerate's DDP: FSDP2 sharding of the frozen denoiser, and the
gradient average of adapters that no DDP wrapper syncs.

**FSDP2, the design.** Launched with accelerate's FSDP settings (``accelerate launch --config_file
configs/accelerate/fsdp2.yaml`` or ``--use_fsdp --fsdp_version 2``), the trainer shards the frozen denoiser itself
with torch's ``fully_shard``, unit by unit as its family says (``Family.sharding_units``: SD / SDXL each resnet,
attention transformer and sampler of the UNet's blocks; SD3 each joint block; Flux each double- and single-stream
block); the rest of the model is the root unit. The adapter's trainable parameters are ``ignored_params``: they
stay whole and replicated on every process, as under DDP, and their gradients are averaged here once per optimizer
step (:func:`average_gradients`).

Why not accelerate's own FSDP path: it shards the trainable parameters too and saves the whole model in every
checkpoint (24 GB for FLUX.1-dev); and on a machine without CUDA it ignores the FSDP settings and runs DDP, so no
test on a CPU could reach it. Here the same code shards on the GPUs and, with gloo, on the CPU (the tests); the
frozen weights (22.2 of the 26.9 GiB the planner gives FLUX.1-dev with GSOFT r=32) are split over the processes,
and the adapter, its optimizer state, its checkpoints and the saved folder are exactly those of a one-process run
(replicated: 2.35 GiB of adapter, gradient and AdamW state there).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

FSDP_ENV = "ACCELERATE_USE_FSDP"


@dataclass(frozen=True)
class ShardingRequest:
    """accelerate's FSDP settings as this trainer reads them."""

    reshard_after_forward: bool = True
    activation_checkpointing: bool = False  # as --gradient_checkpointing


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes")


def requested_sharding(environ: Mapping[str, str]) -> ShardingRequest | None:
    """The FSDP2 request that ``accelerate launch`` put in ``environ`` (``ACCELERATE_USE_FSDP`` and ``FSDP_*``), or
    None; refuses what the trainer cannot do with one line. Read: the version (2), ``reshard_after_forward``,
    ``activation_checkpointing``; refused: ``offload_params``."""
    if not _flag(environ, FSDP_ENV, False):
        return None
    version = environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ValueError(
            f"accelerate's FSDP settings ask for fsdp_version {version}; this trainer shards with FSDP2: set "
            "fsdp_version: 2 in the config (as configs/accelerate/fsdp2.yaml does) or pass --fsdp_version 2 to "
            "accelerate launch"
        )
    if _flag(environ, "FSDP_OFFLOAD_PARAMS", False):
        raise ValueError(
            "fsdp_offload_params is not supported by this trainer: drop it from the accelerate config (to fit a "
            "smaller GPU, use more processes, --base_model_precision on one GPU, or --offload for the VAE and text "
            "encoders)"
        )
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    if reshard not in ("true", "false", "1", "0"):
        raise ValueError(
            f"fsdp_reshard_after_forward {reshard!r}: FSDP2 takes true or false (FSDP1's strategy names do not apply)"
        )
    # The wrap policy, state-dict type and RAM-efficient loading have no use here: the units are the denoiser's
    # blocks, checkpoints hold the (replicated) adapter only, and every process loads the base model.
    return ShardingRequest(
        reshard_after_forward=reshard in ("true", "1"),
        activation_checkpointing=_flag(environ, "FSDP_ACTIVATION_CHECKPOINTING", False),
    )


def with_sharding_options(options, request: ShardingRequest | None):
    """``options`` (a TrainingOptions) as a run with ``request`` trains: accelerate's fsdp_activation_checkpointing is
    ``--gradient_checkpointing`` (the trainer and the planner both read it from there)."""
    if request is None or not request.activation_checkpointing or options.gradient_checkpointing:
        return options
    return replace(options, gradient_checkpointing=True)


@contextlib.contextmanager
def without_accelerate_fsdp(environ: os._Environ | dict) -> Iterator[None]:
    """Hide the FSDP switch while the Accelerator is made, so that accelerate runs its plain multi-process mode
    (DDP for what it prepares) and leaves the sharding to :func:`shard_denoiser`; the environment is restored."""
    value = environ.pop(FSDP_ENV, None)
    try:
        yield
    finally:
        if value is not None:
            environ[FSDP_ENV] = value


def check_shardable(denoiser: nn.Module, method: str) -> None:
    """Refuse, with one line, a denoiser whose frozen weights this sharding cannot split."""
    if method == "full":
        raise ValueError(
            "FSDP here shards the frozen weights and keeps the trained ones whole; full fine-tuning trains every "
            "weight, so nothing would be sharded: use an adapter method, or DDP (accelerate launch --multi_gpu)"
        )
    for name, param in denoiser.named_parameters():
        if not param.requires_grad and type(param.data) is not torch.Tensor:
            raise ValueError(
                f"FSDP cannot shard the quantized base weight {name} ({type(param.data).__name__}): train on a "
                "quantized base on one GPU (--base_model_precision), or shard the full-precision base with FSDP"
            )


def shard_denoiser(
    denoiser: nn.Module,
    units: list[nn.Module],
    device: torch.device,
    num_processes: int,
    request: ShardingRequest,
) -> None:
    """Shard ``denoiser``'s frozen weights over the ``num_processes`` processes of the default process group, unit
    by unit (``units``, its family's, then the root), moving each unit's shard to ``device``; the trainable
    parameters stay whole (moved to ``device``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (num_processes,))
    trainable = {param for param in denoiser.parameters() if param.requires_grad}
    for unit in units:  # bottom-up: only one unit's full weights are ever on the device at once
        fully_shard(unit, mesh=mesh, reshard_after_forward=request.reshard_after_forward, ignored_params=trainable)
    fully_shard(denoiser, mesh=mesh, ignored_params=trainable)  # the root: embeddings, norms, mid block, heads
    for param in trainable:  # fully_shard moves what it manages; the replicated adapter goes over here
        param.data = param.data.to(device)


def autocast_forward(model: nn.Module, accelerator) -> None:
    """Give ``model`` the mixed-precision forward that ``accelerator.prepare`` gives the models it wraps (autocast
    inside, float32 outputs): a sharded denoiser is not prepared (accelerate would wrap it in DDP)."""
    if not accelerator.native_amp:
        return
    from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model.forward = convert_outputs_to_fp32(autocast(model.forward))


def average_gradients(params: list[nn.Parameter], num_processes: int) -> None:
    """Average the gradients of ``params`` over the processes (as DDP does for what it wraps), in one all-reduce
    per dtype: the replicated adapter under FSDP, and text-encoder adapters, which no DDP wrapper holds."""
    if num_processes == 1:
        return
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in params:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = torch.cat([grad.reshape(-1) for grad in grads])  # (sum of numels,)
        dist.all_reduce(flat)
        flat /= num_processes
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
