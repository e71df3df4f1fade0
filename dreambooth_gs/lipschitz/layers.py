"""Orthogonal convolution layers: SOC (skew orthogonal convolution), ChannelShuffle, GSSOC and MaxMinPermuted.

All four preserve the l2 norm of every input (SOC and GSSOC up to the truncated Taylor series: 12 terms in eval
mode). Every forward goes through :mod:`dreambooth_gs.lipschitz.functional`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as lf


class SOC(nn.Module):
    """Skew orthogonal convolution on ``channels`` channels (Singla & Feizi, ICML 2021), optionally grouped.

    ``y = exp(L) x = x + L x / 1! + L (L x) / 2! + ...`` with ``L = c * (M - ConvTranspose(M)) / sigma``: ``M`` is
    the trainable weight ``(groups, channels/groups, channels/groups, k, k)``, each group's kernel is skew, ``sigma``
    the smallest of the four Fantastic-Four norm estimates of the skew kernel (per group, by power iteration whose
    vectors are persistent buffers) and ``c`` = ``correction`` (0.7; 1.0 for 1x1 kernels), so the series converges
    in ``train_terms`` (5) terms during training and ``eval_terms`` (12) in evaluation. No bias: the layer is
    orthogonal; :class:`LipConvnet` adds biases outside it.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        groups: int = 1,
        *,
        train_terms: int = 5,
        eval_terms: int = 12,
        correction: float | None = None,
        init_power_iters: int = 50,
        power_iters: int = 1,
        refresh_every: int = 200,
    ) -> None:
        super().__init__()
        if channels <= 0 or groups <= 0 or channels % groups:
            raise ValueError(f"SOC needs groups dividing channels, got channels={channels}, groups={groups}")
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"SOC needs an odd kernel_size (same padding keeps L skew), got {kernel_size}")
        if min(train_terms, eval_terms) < 1:
            raise ValueError(f"SOC needs at least 1 series term, got train_terms={train_terms}, eval={eval_terms}")
        self.channels, self.kernel_size, self.groups = channels, kernel_size, groups
        self.train_terms, self.eval_terms = train_terms, eval_terms
        self.correction = (0.7 if kernel_size > 1 else 1.0) if correction is None else correction
        self.init_power_iters, self.power_iters, self.refresh_every = init_power_iters, power_iters, refresh_every
        self.steps = 0  # training forwards so far; every refresh_every-th reruns init_power_iters iterations
        width = channels // groups
        self.weight = nn.Parameter(torch.randn(groups, width, width, kernel_size, kernel_size) / math.sqrt(width))
        vectors = lf.init_power_vectors(self.weight.shape, device=self.weight.device, dtype=self.weight.dtype)
        if not self.weight.is_meta:  # meta-device models (parameter counts, checkpoint loading) skip the work
            vectors = lf.power_iteration(lf.skew_kernel(self.weight.detach()), vectors, init_power_iters)
        for i, vector in enumerate(vectors):
            self.register_buffer(f"power_vector_{i}", vector)

    def _power_vectors(self) -> list[torch.Tensor]:
        return [getattr(self, f"power_vector_{i}") for i in range(2 * len(lf.BOUND_DIMS))]

    def kernel(self) -> torch.Tensor:
        """The rescaled skew kernel ``L`` (groups, c, c, k, k) that the series applies; refreshes the power
        iteration first in training mode."""
        skew = lf.skew_kernel(self.weight)
        if self.training:
            self.steps += 1  # construction already ran init_power_iters: the first full refresh is at refresh_every
            iters = self.init_power_iters if self.steps % self.refresh_every == 0 else self.power_iters
            vectors = lf.power_iteration(skew.detach(), self._power_vectors(), iters)
            for i, vector in enumerate(vectors):  # rebind, never copy_: an earlier graph may still hold the old ones
                setattr(self, f"power_vector_{i}", vector)
        sigma = lf.spectral_bound(skew, self._power_vectors()).clamp_min(1e-12)  # (groups,)
        return skew * (self.correction / sigma).view(-1, 1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"SOC({self.channels}) got an input with {x.shape[1]} channels")
        return lf.conv_exponential(x, self.kernel(), self.train_terms if self.training else self.eval_terms)

    def extra_repr(self) -> str:
        terms = f"terms={self.train_terms}/{self.eval_terms}"
        return f"{self.channels}, kernel_size={self.kernel_size}, groups={self.groups}, {terms}"


class ChannelShuffle(nn.Module):
    """Channel shuffle ``P(k, n)`` with ``k = groups`` on the channel axis: output block ``j`` gathers ``x[:, j::k]``.

    This is the GS core's ``P(k, n)`` (``sigma(i) = (i mod k) * n/k + floor(i/k)``) and the shuffle of the GS
    authors' code. ShuffleNet's ``channel_shuffle(x, g)`` (view ``(g, n/g)``, transpose) is its transpose
    ``P(g, n)^T = P(n/g, n)``: ``ChannelShuffle(k)`` equals ShuffleNet's shuffle with ``n/k`` groups, and the two
    coincide when ``k^2 = n``. Either way, after a grouped convolution with ``k`` groups every group of the next
    ``k``-grouped convolution sees channels of all previous groups (when ``k^2 <= n``).

    ``paired=True`` moves channel pairs ``(2i, 2i+1)`` together (``P(k, n/2)`` on pairs), so the pairs that
    :class:`MaxMinPermuted` sorts stay adjacent: ``sigma(i) = (floor(i/2) mod k) * n/k + 2 * floor(i/2k) + (i mod 2)``.
    """

    def __init__(self, groups: int, paired: bool = False) -> None:
        super().__init__()
        if groups <= 0:
            raise ValueError(f"ChannelShuffle needs groups >= 1, got {groups}")
        self.groups, self.paired = groups, paired

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lf.channel_shuffle(x, self.groups, self.paired)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, paired={self.paired}"


class GSSOC(nn.Module):
    """GS orthogonal convolution: ``Y = GrExpConv2(ChShuffle2(GrExpConv1(ChShuffle1(X))))``.

    ``GrExpConv1`` is a ``g1``-grouped :class:`SOC` with ``kernel_size``, ``GrExpConv2`` a ``g2``-grouped 1x1 SOC,
    ``ChShuffle_i = ChannelShuffle(g_i)``: a GS matrix ``B2 P(g2) B1 P(g1)`` with orthogonal block-diagonal factors
    acting on channels. ``groups=(g1, None)`` is a single GS layer (shuffle + grouped SOC). Orthogonal, so it
    preserves the norm of every input; ``soc_options`` (``train_terms``, ``eval_terms``, ...) go to both SOCs.
    """

    def __init__(
        self,
        channels: int,
        groups: tuple[int, int | None] = (4, 1),
        kernel_size: int = 3,
        paired: bool = False,
        **soc_options,
    ) -> None:
        super().__init__()
        if not isinstance(groups, (tuple, list)) or len(groups) != 2:
            raise ValueError(f"GSSOC groups must be a pair (g1, g2) or (g1, None), got {groups!r}")
        first, second = groups
        for g in (first, second):
            if g is not None:
                lf.check_channel_shuffle(g, channels, paired)
        self.groups = (first, second)
        self.shuffle1 = ChannelShuffle(first, paired)
        self.conv1 = SOC(channels, kernel_size, first, **soc_options)
        self.shuffle2 = ChannelShuffle(second, paired) if second is not None else None
        self.conv2 = SOC(channels, 1, second, **soc_options) if second is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.shuffle1(x))
        if self.conv2 is not None:
            x = self.conv2(self.shuffle2(x))
        return x


class MaxMinPermuted(nn.Module):
    """MaxMin on neighbouring channel pairs ``(0, 1), (2, 3), ...``: outputs ``max, min`` of each pair.

    SOC's MaxMin pairs channel ``i`` with ``i + C/2``; pairing neighbours keeps each pair inside one group of a
    grouped convolution (and inside one unit of the paired shuffle). Norm preserving, 1-Lipschitz.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lf.maxmin_pairs(x)
