"""Low-rank approximation of weight changes: truncated SVD, the rank an error budget needs, and relative errors.

Pure torch, no IO: the LoRA export (:mod:`dreambooth_gs.export.lora`), its report, the benchmark and the tests call
these functions. Everything is computed in float64; a change ``delta`` of shape ``(out, in)`` is approximated by
``up @ down`` with ``up`` ``(out, rank)`` (LoRA's ``lora_B``) and ``down`` ``(rank, in)`` (``lora_A``). By
Eckart-Young the truncated SVD is the best rank-``r`` approximation in Frobenius norm, and its relative error is
``sqrt(sum_{i > r} s_i^2) / sqrt(sum_i s_i^2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    """``up @ down`` approximating one weight change (float64), with the rank kept and the module's full rank."""

    up: torch.Tensor  # (out, rank)
    down: torch.Tensor  # (rank, in)
    rank: int
    full_rank: int
    predicted_error: float  # relative Frobenius error from the discarded singular values


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """The singular values of ``delta`` (float64, descending)."""
    return torch.linalg.svdvals(delta.double())


def tail_errors(values: torch.Tensor) -> torch.Tensor:
    """``e[r]`` = relative Frobenius error of the best rank-``r`` approximation, for ``r = 0 .. len(values)``.

    ``e[0] = 1`` (nothing kept), ``e[len] = 0``; a zero matrix has error 0 at every rank.
    """
    energy = values.double() ** 2
    total = float(energy.sum())
    tails = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # tails[r] = sum_{i >= r} s_i^2
    if total == 0.0:
        return torch.zeros_like(tails)
    return (tails / total).clamp_min(0).sqrt()


def rank_for_error(values: torch.Tensor, max_error: float) -> int:
    """The smallest rank whose relative Frobenius error is at most ``max_error`` (0 for a zero matrix)."""
    if not 0.0 <= max_error < 1.0:
        raise ValueError(f"max_error must be in [0, 1), got {max_error}; e.g. 0.01 keeps 99% of the change's norm")
    if values.numel() == 0 or float(values.abs().max()) == 0.0:
        return 0
    errors = tail_errors(values)
    return int(torch.nonzero(errors <= max_error)[0])


def low_rank(delta: torch.Tensor, rank: int | None = None, max_error: float | None = None) -> LowRank:
    """Truncated SVD of ``delta``: the top ``rank`` singular triplets (capped at the full rank ``min(out, in)``),
    or the fewest that reach ``max_error``. The singular values are split evenly: ``up = U_r sqrt(S_r)``,
    ``down = sqrt(S_r) V_r^T``, so neither factor dwarfs the other."""
    if (rank is None) == (max_error is None):
        raise ValueError("give rank or max_error, exactly one")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    delta = delta.double()
    full_rank = min(delta.shape)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in) with k = min(out, in)
    kept = min(rank, full_rank) if rank is not None else rank_for_error(s, max_error)
    root = s[:kept].sqrt()
    up = u[:, :kept] * root  # (out, kept)
    down = root[:, None] * vh[:kept]  # (kept, in)
    return LowRank(up, down, kept, full_rank, float(tail_errors(s)[kept]))


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> float:
    """``||delta - approx||_F / ||delta||_F`` in float64 (0 when both are zero, inf when only ``delta`` is)."""
    delta, approx = delta.double(), approx.double()
    norm, diff = float(torch.linalg.vector_norm(delta)), float(torch.linalg.vector_norm(delta - approx))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def total_relative_error(squared_errors: Sequence[float], squared_norms: Sequence[float]) -> float:
    """The relative error of all modules together: ``sqrt(sum ||delta_i - approx_i||^2 / sum ||delta_i||^2)``."""
    total = sum(squared_norms)
    return math.sqrt(sum(squared_errors) / total) if total > 0 else 0.0


def error_curve(values_by_module: Sequence[torch.Tensor], ranks: Sequence[int]) -> list[float]:
    """Total relative error of a rank-``r`` export (each module capped at its full rank) for every ``r`` in ``ranks``.

    ``values_by_module`` are each module's singular values; the error is exact (Eckart-Young), no factor is built.
    """
    norms = [float((v.double() ** 2).sum()) for v in values_by_module]
    curves = [tail_errors(v) for v in values_by_module]
    out = []
    for r in ranks:
        errors = [float(c[min(r, len(c) - 1)]) ** 2 * n for c, n in zip(curves, norms)]
        out.append(total_relative_error(errors, norms))
    return out
