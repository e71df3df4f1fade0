"""How the benchmark scripts measure: timing and autograd-saved tensors.

Owns the timing loops (one call's wall and CPU time; interleaved rounds whose order rotates; per-round ratios; one
layer's forward + backward timed between device synchronisations, and rounds of those medians) and the counting of
what autograd keeps for backward (saved-tensor hooks over a forward; the ``_saved_*`` attributes of a graph). Process
memory (RSS) is :mod:`benchmarks.memory`'s, Markdown and the setting lines :mod:`benchmarks.report`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

THREADS_HELP = (
    "torch CPU threads (default 1: on this shared 2-core machine, 2 OpenMP threads competing with other jobs "
    "run 2-25x slower and erratically, while 1 thread stays steady)"
)

# ---------------------------------------------------------------------------------------------------------------
# Whole calls, interleaved rounds
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Samples:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def wall_min(self) -> float:
        return min(self.wall)

    @property
    def wall_max(self) -> float:
        return max(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, log: Callable[[str], None] | None = print
) -> tuple[dict[str, Samples], list[tuple[float, float, float]]]:
    """Run every function ``warmup`` times, then ``rounds`` rounds of one call each, methods interleaved.

    The order rotates by one each round, so no method always follows the same neighbour. Returns the samples and
    the load averages seen after each round.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples = {name: Samples() for name in names}
    loads = []
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = timed(fns[name])
            samples[name].wall.append(wall)
            samples[name].cpu.append(cpu)
        loads.append(os.getloadavg())
        if log:
            log(f"  round {round_index + 1}/{rounds} done, load average {loads[-1][0]:.1f}")
    return samples, loads


def per_round_ratio(samples: dict[str, Samples], label: str, reference: str, stat: str = "wall") -> float:
    """Median over rounds of (label's time / reference's time in the same round)."""
    ours, ref = getattr(samples[label], stat), getattr(samples[reference], stat)
    return statistics.median(a / b for a, b in zip(ours, ref))


# ---------------------------------------------------------------------------------------------------------------
# One layer's forward + backward
# ---------------------------------------------------------------------------------------------------------------


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda`` and ``--bf16``, as the benchmarks that time on a GPU take them (checked by
    :func:`check_device_arguments` once parsed)."""
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where modules and tensors live; cuda writes its own sections of docs/benchmarks.md",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 autocast around the forward (fp32 parameters); print-only on the CPU"
    )


def check_device_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--device cuda`` without a GPU, and ``--bf16`` writing on the CPU (its sections are fp32)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.bf16 and args.device == "cpu" and not args.no_write:
        parser.error("--bf16 on the CPU is print-only (the CPU sections are fp32): add --no-write")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels: a CUDA call returns before its work is done, a timing must not."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, repeats: int, bf16: bool = False) -> float:
    """Median seconds of forward + backward (output gradient ``grad_out``) over ``repeats`` calls, the forward under
    bf16 autocast if ``bf16``."""
    times = []
    for _ in range(repeats):
        x.grad = None
        module.zero_grad(set_to_none=True)
        synchronize(x.device)
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = module(x)
        if out.requires_grad:  # the frozen floor on a frozen input has no backward at all
            grad = grad_out if out.shape == grad_out.shape else torch.ones_like(out)
            out.backward(grad.to(out.dtype))  # bf16 autocast: the output is bf16, so is the gradient it receives
        synchronize(x.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_medians(
    modules: dict[str, nn.Module],
    x: torch.Tensor,
    grad_out: torch.Tensor,
    rounds: int,
    repeats: int,
    bf16: bool = False,
    loads: list[tuple[float, float, float]] | None = None,
) -> dict[str, float]:
    """Median over ``rounds`` of each module's :func:`step_time` (``repeats`` calls), the modules interleaved in a
    fixed order after two warm-up calls each; appends the load average after each round to ``loads`` when given."""
    for module in modules.values():  # warm-up
        step_time(module, x, grad_out, 2, bf16)
    samples: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(rounds):  # interleaved rounds
        for name, module in modules.items():
            samples[name].append(step_time(module, x, grad_out, repeats, bf16))
        if loads is not None:
            loads.append(os.getloadavg())
    return {name: statistics.median(values) for name, values in samples.items()}


# ---------------------------------------------------------------------------------------------------------------
# What autograd keeps for backward
# ---------------------------------------------------------------------------------------------------------------


class SavedTensors(contextlib.AbstractContextManager):
    """Counts the distinct storages autograd saves for backward while active, ``modules``' parameters and buffers
    excluded (they exist anyway)::

        with SavedTensors(model) as saved:
            loss = model(x).sum()
        saved.total  # bytes
    """

    def __init__(self, *modules: nn.Module) -> None:
        tensors = [t for module in modules for t in [*module.parameters(), *module.buffers()]]
        self.excluded = {t.untyped_storage().data_ptr() for t in tensors}
        self.storages: dict[int, int] = {}  # data pointer -> bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.storages[storage.data_ptr()] = max(self.storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        """Bytes of every distinct storage saved."""
        return sum(self.storages.values())

    def bytes_of(self, tensor: torch.Tensor) -> int:
        """Bytes saved in ``tensor``'s storage (0 if autograd kept none of it)."""
        return self.storages.get(tensor.untyped_storage().data_ptr(), 0)


def saved_in_graph(layer: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...], float]]:
    """What autograd keeps for backward inside one layer's forward: (node.attribute, shape, MiB), parameters excluded.

    Walks the graph from the output back to ``x`` and reads each node's ``_saved_*`` tensors (custom autograd
    Functions keep theirs where these attributes do not show them: :class:`SavedTensors` counts those too).
    """
    excluded = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    out = layer(x)
    seen, found, stack = set(), {}, [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node is x.grad_fn:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr, None)
                if isinstance(value, torch.Tensor) and value.numel() > 0:
                    ptr = value.untyped_storage().data_ptr()
                    if ptr not in excluded and ptr not in found:
                        found[ptr] = (
                            f"{node.name()}.{attr[7:]}",
                            tuple(value.shape),
                            value.untyped_storage().nbytes() / 2**20,
                        )
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(found.values(), key=lambda item: -item[2])
