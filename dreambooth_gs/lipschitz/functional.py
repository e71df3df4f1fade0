"""Pure tensor math of orthogonal convolutions: skew kernels, the convolution exponential, spectral bounds,
channel shuffles, space-to-depth, the MaxMin activation and certificates. No state; the layers, the tests and
the benchmark all call these functions.

Conventions:
* Activations are ``(batch, channels, height, width)``.
* A grouped kernel is ``(groups, c, c, r, s)``: group ``j`` maps input channels ``j*c .. j*c+c-1`` to the same
  output channels (a block-diagonal channel structure, one block per group).
* Convolutions are stride 1 with zero "same" padding and odd kernels. Then the adjoint of ``conv(., K)`` is
  ``conv(., K^T)`` with ``K^T[j, i, k, l] = K[i, j, r-k-1, s-l-1]`` (:func:`conv_transpose_kernel`), so
  ``L = M - M^T`` is a skew-symmetric operator and ``exp(L)`` is orthogonal (Singla & Feizi, ICML 2021).
* Channel permutations follow :mod:`dreambooth_gs.gs.functional`: ``P[sigma(i), i] = 1``, i.e. ``(P x)[sigma(i)] =
  x[i]``, applied to the channel axis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..gs import functional as gs_functional

# ---------------------------------------------------------------------------------------------------------------
# Skew kernels and the convolution exponential
# ---------------------------------------------------------------------------------------------------------------


def conv_transpose_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """Kernel of the adjoint convolution, ``K^T[..., j, i, k, l] = K[..., i, j, r-k-1, s-l-1]``.

    Works on plain ``(out, in, r, s)`` and grouped ``(groups, c, c, r, s)`` kernels.
    """
    return kernel.transpose(-4, -3).flip(-2, -1)


def skew_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``L = M - ConvTranspose(M)``: the kernel of a skew-symmetric convolution (per group)."""
    return weight - conv_transpose_kernel(weight)


def grouped_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Stride-1, zero-"same"-padded convolution of ``x`` (B, g*c, H, W) with a grouped kernel (g, c, c, r, s)."""
    groups, c_out, c_in, r, s = kernel.shape
    weight = kernel.reshape(groups * c_out, c_in, r, s)  # (g*c, c, r, s): conv2d's grouped layout
    return F.conv2d(x, weight, padding=(r // 2, s // 2), groups=groups)


def conv_exponential(x: torch.Tensor, kernel: torch.Tensor, terms: int) -> torch.Tensor:
    """``exp(L) x`` by its Taylor series ``x + L x / 1! + L (L x) / 2! + ...`` up to ``L^terms x / terms!``."""
    out = x
    term = x
    for i in range(1, terms + 1):
        term = grouped_conv(term, kernel) / i
        out = out + term
    return out


# ---------------------------------------------------------------------------------------------------------------
# Spectral rescaling: the four bounds of "Fantastic Four" (Singla & Feizi, ICLR 2021), by power iteration
# ---------------------------------------------------------------------------------------------------------------

# Each bound views the kernel (g, c_out, c_in, r, s) as a matrix per group: rows = the dims kept by ``v``,
# columns = the dims kept by ``u``; ``sqrt(r * s) * min_m ||R_m||_2`` bounds the convolution's spectral norm.
BOUND_DIMS = (
    ((2, 4), (1, 3)),  # R1: (c_out * r) x (c_in * s)
    ((2, 3), (1, 4)),  # R2: (c_out * s) x (c_in * r)
    ((2, 3, 4), (1,)),  # R3: c_out x (c_in * r * s)
    ((2,), (1, 3, 4)),  # R4: (c_out * r * s) x c_in
)


def _normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each group's vector (g, ...) to unit norm."""
    return v / v.flatten(1).norm(dim=1).clamp_min(eps).view(-1, *([1] * (v.dim() - 1)))


def init_power_vectors(kernel_shape: torch.Size, device=None, dtype=None) -> list[torch.Tensor]:
    """Random unit start vectors ``[u1, v1, u2, v2, u3, v3, u4, v4]`` for :func:`power_iteration`."""
    groups = kernel_shape[0]
    vectors = []
    for u_dims, v_dims in BOUND_DIMS:
        for kept in (u_dims, v_dims):
            shape = [groups] + [kernel_shape[d] if d in kept else 1 for d in range(1, 5)]
            vectors.append(_normalize(torch.randn(shape, device=device, dtype=dtype)))
    return vectors


def _matrix_view(kernel: torch.Tensor, bound: int) -> torch.Tensor:
    """Bound ``bound``'s matrix view of ``kernel`` per group, (g, rows, cols): rows = ``v``'s dims, cols = ``u``'s."""
    u_dims, v_dims = BOUND_DIMS[bound]
    rows = math.prod(kernel.shape[d] for d in v_dims)
    return kernel.permute(0, *v_dims, *u_dims).reshape(kernel.shape[0], rows, -1)  # (g, rows, cols)


def _normalize_columns(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each group's column vector (g, n, 1) to unit norm."""
    return v / v.norm(dim=(1, 2), keepdim=True).clamp_min(eps)


@torch.no_grad()
def power_iteration(kernel: torch.Tensor, vectors: list[torch.Tensor], iters: int) -> list[torch.Tensor]:
    """``iters`` power-iteration steps for the four matrix views of ``kernel``; returns the new vectors.

    Each view is materialised once, so a step is two batched matrix-vector products.
    """
    if iters == 0:
        return list(vectors)
    groups = kernel.shape[0]
    updated = []
    for bound in range(len(BOUND_DIMS)):
        u, v = vectors[2 * bound], vectors[2 * bound + 1]
        matrix = _matrix_view(kernel, bound)
        u_flat = u.reshape(groups, -1, 1)  # (g, cols, 1): u's kept dims in kernel order, like the columns
        for _ in range(iters):
            v_flat = _normalize_columns(torch.bmm(matrix, u_flat))  # (g, rows, 1)
            u_flat = _normalize_columns(torch.bmm(matrix.mT, v_flat))  # (g, cols, 1)
        updated += [u_flat.reshape(u.shape), v_flat.reshape(v.shape)]
    return updated


def spectral_bound(kernel: torch.Tensor, vectors: list[torch.Tensor]) -> torch.Tensor:
    """Per-group ``min_m v_m^T R_m u_m`` (g,): the smallest of the four estimated norms, differentiable in
    ``kernel`` (the vectors are constants), as SOC rescales by it."""
    groups = kernel.shape[0]
    estimates = []
    for bound in range(len(BOUND_DIMS)):
        u_flat = vectors[2 * bound].reshape(groups, -1, 1)  # (g, cols, 1)
        v_row = vectors[2 * bound + 1].reshape(groups, 1, -1)  # (g, 1, rows)
        estimates.append(torch.bmm(v_row, torch.bmm(_matrix_view(kernel, bound), u_flat)).flatten())  # (g,)
    return torch.stack(estimates).amin(0)


# ---------------------------------------------------------------------------------------------------------------
# Channel permutations, space-to-depth, MaxMin
# ---------------------------------------------------------------------------------------------------------------


def check_channel_shuffle(groups: int, channels: int, paired: bool) -> None:
    """ValueError unless ``groups`` (pairs of channels when ``paired``) divide ``channels``."""
    unit = 2 * groups if paired else groups
    if groups <= 0 or channels % unit != 0:
        what = "2 * groups" if paired else "groups"
        raise ValueError(
            f"channel shuffle with groups={groups}{' (paired)' if paired else ''} needs {what} dividing the "
            f"channel count, got {channels} channels; use a group count that divides {channels // (2 if paired else 1)}"
        )


def channel_shuffle_permutation(
    groups: int, channels: int, paired: bool = False, device: torch.device | None = None
) -> torch.Tensor:
    """``sigma`` of the channel shuffle (``P[sigma[i], i] = 1``), from the GS core's ``P(k, n)``.

    Unpaired: ``sigma(i) = (i mod k) * n/k + floor(i/k)``, the core's ``P(k, n)``. Paired: ``P(k, n/2)`` on channel
    pairs, ``sigma(i) = (floor(i/2) mod k) * n/k + 2 * floor(i/2k) + (i mod 2)``.
    """
    check_channel_shuffle(groups, channels, paired)
    if not paired:
        return gs_functional.shuffle_permutation(groups, channels, device=device)
    pair_sigma = gs_functional.shuffle_permutation(groups, channels // 2, device=device)
    i = torch.arange(channels, device=device)
    return 2 * pair_sigma[torch.div(i, 2, rounding_mode="floor")] + i % 2


def channel_shuffle(x: torch.Tensor, groups: int, paired: bool = False) -> torch.Tensor:
    """``P x`` on the channel axis (dim 1) for :func:`channel_shuffle_permutation`, as one reshape-transpose.

    Output block ``j`` (of ``groups`` blocks of ``n/k`` channels) gathers ``x[:, j::k]`` (pairs ``x[:, 2j:2j+2]``,
    ``2j+2k:..`` when paired), the same reshape as :func:`dreambooth_gs.gs.functional.apply_shuffle`.
    """
    channels = x.shape[1]
    check_channel_shuffle(groups, channels, paired)
    if groups == 1:
        return x
    if paired:
        pairs = x.unflatten(1, (channels // (2 * groups), groups, 2))  # (B, n/2k, k, 2, ...)
        return pairs.transpose(1, 2).flatten(1, 3)  # (B, k, n/2k, 2, ...) -> (B, n, ...)
    return x.unflatten(1, (channels // groups, groups)).transpose(1, 2).flatten(1, 2)  # (B, n/k, k) -> (B, k, n/k)


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Invertible downsampling (B, C, H, W) -> (B, C*f*f, H/f, W/f): channel ``c*f*f + a*f + b`` holds pixel
    ``(f*h + a, f*w + b)`` of channel ``c``. A permutation of the entries, hence norm preserving."""
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"space-to-depth by {factor} needs height and width divisible by it, got {tuple(x.shape)}")
    return F.pixel_unshuffle(x, factor)


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero-pad the channel axis up to ``channels`` (an isometric embedding)."""
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1])) if channels > x.shape[1] else x


def maxmin_pairs(x: torch.Tensor) -> torch.Tensor:
    """MaxMin over neighbouring channel pairs: channels ``2i, 2i+1`` become ``max, min`` of the pair.

    Sorts each pair, so it permutes entries per input: norm preserving and 1-Lipschitz.
    """
    if x.shape[1] % 2:
        raise ValueError(f"MaxMin needs an even channel count, got {x.shape[1]}")
    pairs = x.unflatten(1, (x.shape[1] // 2, 2))  # (B, C/2, 2, ...)
    first, second = pairs.unbind(2)
    return torch.stack((torch.maximum(first, second), torch.minimum(first, second)), 2).flatten(1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Certificates for L-Lipschitz classifiers
# ---------------------------------------------------------------------------------------------------------------


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit per row (batch,)."""
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def certified_radius(logits: torch.Tensor, lipschitz: float = 1.0) -> torch.Tensor:
    """l2 radius within which the predicted class cannot change: ``margin / (sqrt(2) * L)``.

    For an L-Lipschitz network, ``f_i - f_j`` is ``sqrt(2) L``-Lipschitz, so the margin survives any perturbation
    of norm below this radius.
    """
    return logit_margin(logits) / (math.sqrt(2) * lipschitz)


def certified_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, radius: float = 36 / 255, lipschitz: float = 1.0
) -> tuple[float, float]:
    """(accuracy, certified robust accuracy at l2 ``radius``): correct and ``margin > sqrt(2) * L * radius``."""
    correct = logits.argmax(1) == labels
    certified = correct & (certified_radius(logits, lipschitz) > radius)
    return correct.float().mean().item(), certified.float().mean().item()
