"""Pure tensor math of Group-and-Shuffle (GS) matrices: permutations, orthogonal blocks, GS multiply, dense form.

Everything here is plain torch with no state; the adapter layers, the merge path, the benchmarks and the tests all
call these functions, so the transform is defined exactly once.

Conventions (Gorbunov et al., NeurIPS 2024):
* Vectors are columns; a tensor ``x`` of shape ``(..., n)`` holds a batch of them in its last dimension, and
  ``f(x)`` returns ``A x`` for each.
* ``P(k, n)`` is the shuffle permutation with ``sigma(i) = (i mod k) * (n / k) + floor(i / k)`` and
  ``P[sigma(i), i] = 1``, so ``(P x)[sigma(i)] = x[i]``: block ``j`` of ``P x`` (blocks of size ``n / k``) gathers
  ``x[j::k]``. As a reshape, ``P x = x.view(n / k, k).T.flatten()`` and ``P^T x = x.view(k, n / k).T.flatten()``.
* A block-diagonal matrix is stored as its blocks, shape ``(k, b_out, b_in)``.
* GSOFT's orthogonal matrix on ``d = r * b`` is ``Q = P^T L P R`` with ``P = P(r, d)`` and ``L``, ``R``
  block-diagonal with ``r`` orthogonal ``b x b`` blocks. ``P^T L P`` is "``L`` acting on the strided groups
  ``x[j::r]``", which is how it is applied below: no permutation is ever materialised.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------
# Permutations (index tensors or reshapes, never dense n x n matrices)
# ---------------------------------------------------------------------------------------------------------------


def shuffle_permutation(k: int, n: int, device: torch.device | None = None) -> torch.Tensor:
    """``sigma`` of ``P(k, n)``: ``sigma[i] = (i mod k) * (n / k) + floor(i / k)``, so ``P[sigma[i], i] = 1``."""
    if k <= 0 or n % k != 0:
        raise ValueError(f"P(k, n) needs k > 0 dividing n; got k={k}, n={n}")
    i = torch.arange(n, device=device)
    return (i % k) * (n // k) + torch.div(i, k, rounding_mode="floor")


def permutation_gather_index(sigma: torch.Tensor) -> torch.Tensor:
    """Index ``g`` with ``P x == x[..., g]`` for the permutation matrix ``P[sigma[i], i] = 1`` (``g = sigma^-1``)."""
    return torch.argsort(sigma)


def apply_shuffle(x: torch.Tensor, k: int, transpose: bool = False) -> torch.Tensor:
    """``P(k, n) x`` (or ``P(k, n)^T x``) on the last dimension, as a reshape and a transpose."""
    n = x.shape[-1]
    if n % k != 0:
        raise ValueError(f"P(k, n) needs k dividing n; got k={k}, n={n}")
    if transpose:
        return x.unflatten(-1, (k, n // k)).transpose(-1, -2).flatten(-2)  # (..., k, n/k) -> (..., n/k, k)
    return x.unflatten(-1, (n // k, k)).transpose(-1, -2).flatten(-2)  # (..., n/k, k) -> (..., k, n/k)


def butterfly_permutation(n: int, nblocks: int, block_size: int, factor: int) -> torch.Tensor:
    """Gather index ``g`` (``P_i x == x[..., g]``) of BOFT's block-butterfly permutation for factor ``i``.

    The same permutation PEFT's BOFT builds (``block_butterfly_perm(n, nblocks / 2**i, block_size / 2)``): inside
    each chunk of ``n / (nblocks / 2**i)`` entries, the half-blocks of size ``block_size / 2`` are reordered so that
    even-numbered half-blocks come first, then odd-numbered ones. Factor 0 is the identity.
    """
    if factor == 0:
        return torch.arange(n)
    half = block_size // 2
    chunk = n // (nblocks // 2**factor)  # entries per butterfly chunk
    halves_per_chunk = chunk // half
    order = torch.cat([torch.arange(0, halves_per_chunk, 2), torch.arange(1, halves_per_chunk, 2)])
    within = (order[:, None] * half + torch.arange(half)[None, :]).flatten()  # (chunk,)
    return (torch.arange(0, n, chunk)[:, None] + within[None, :]).flatten()


# ---------------------------------------------------------------------------------------------------------------
# Orthogonal blocks
# ---------------------------------------------------------------------------------------------------------------


def skew(params: torch.Tensor) -> torch.Tensor:
    """``K = (A - A^T) / 2`` for each block of ``params`` (..., b, b)."""
    return (params - params.mT) / 2


def cayley(params: torch.Tensor) -> torch.Tensor:
    """``Cayley(K) = (I + K)(I - K)^-1`` with ``K = skew(A)``, for a batch ``(..., b, b)`` in one batched inverse.

    Uses ``(I + K)(I - K)^-1 = 2 (I - K)^-1 - I``: one inverse forward (:func:`inverse_positive_real`) and two
    matmuls backward (:class:`_Cayley`). Computed in float32 whatever the input dtype (there are no
    half-precision inverses, and orthogonality would suffer); the result is float32 (float64 for float64 input),
    callers cast it where they use it.
    """
    work_dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
    return _Cayley.apply(params.to(work_dtype))


class _Cayley(torch.autograd.Function):
    """``Q = 2 M - I`` with ``M = (I - K)^-1``, ``K = (A - A^T) / 2``; backward ``dA = skew(2 M^T G M^T)``.

    ``dM = M dK M``, so ``<G, dQ> = <2 M^T G M^T, dK>``, and ``dK = skew(dA)`` gives the skew part of that.
    One custom node instead of autograd's chain of small ops (skew, subtract, inverse, scale). It keeps its output
    ``Q`` and recovers ``M = (Q + I) / 2`` in backward: the rotation that uses the blocks keeps ``Q`` anyway, so the
    blocks cost one copy of saved memory instead of two."""

    @staticmethod
    def forward(ctx, params: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(params.shape[-1], dtype=params.dtype, device=params.device)
        blocks = 2 * inverse_positive_real(eye - skew(params)) - eye
        ctx.save_for_backward(blocks)
        return blocks

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor) -> torch.Tensor:
        (blocks,) = ctx.saved_tensors
        eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
        inverse_t = (blocks + eye).mT / 2  # M^T
        grad_k = 2 * (inverse_t @ grad_q @ inverse_t)
        return skew(grad_k)


def inverse_positive_real(matrices: torch.Tensor) -> torch.Tensor:
    """Batched inverse of matrices whose symmetric part is positive definite (such as ``I - K``, ``K`` skew): never
    singular, so LAPACK's ``inv_ex`` without its check. (A 2 x 2 block elimination once beat it on the CPU for
    blocks wider than 16; on torch 2.14.1 ``inv_ex`` takes 0.6-1.0x its time at every block size from 16 to 256:
    benchmarks/bench_orthogonal_blocks.py, docs/benchmarks.md.)"""
    inverse, _ = torch.linalg.inv_ex(matrices)
    return inverse


# PEFT's OFT default (peft 0.21.2, peft/tuners/oft/config.py: use_cayley_neumann=True, num_cayley_neumann_terms=5;
# the series in peft/tuners/oft/layer.py, OFTRotationModule._cayley_batch).
NUM_CAYLEY_NEUMANN_TERMS = 5


def cayley_neumann(params: torch.Tensor, num_terms: int = NUM_CAYLEY_NEUMANN_TERMS) -> torch.Tensor:
    """Cayley with ``(I - K)^-1`` replaced by its first ``n - 1`` Neumann terms (``n = num_terms``, ``K = skew(A)``):
    ``(I + K)(I + K + ... + K^(n-2)) = I + 2K + 2K^2 + ... + 2K^(n-2) + K^(n-1)``, batched matmuls only.

    The series PEFT's OFT computes by default (``_cayley_batch``, 5 terms: ``I + 2K + 2K^2 + 2K^3 + K^4``; PEFT's
    loop gives the same polynomial for every ``num_terms >= 4``, while its 2 and 3 terms give ``I + 2K`` and the
    4-term result). Not exactly orthogonal: it equals ``Cayley(K) (I - K^(n-1))``, so
    ``Q^T Q = (I - (-K)^(n-1)) (I - K^(n-1))``: for the default, ``|Q^T Q - I| <= 2 |K|^4 + |K|^8`` and
    ``|Q - Cayley(K)| <= |K|^4`` (spectral norms), small where trained blocks stay near the identity. Float32
    inside like :func:`cayley`; plain autograd ops (two bmm's forward for the default: when ``n - 1`` is a power of
    two the series is ``(I + K)^2 (I + K^2) (I + K^4) ...``, otherwise Horner's rule)."""
    if not isinstance(num_terms, int) or isinstance(num_terms, bool) or num_terms < 2:
        raise ValueError(f"num_cayley_neumann_terms must be an integer >= 2, got {num_terms!r}")
    work_dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
    k = skew(params.to(work_dtype))
    eye = torch.eye(k.shape[-1], dtype=work_dtype, device=k.device)
    powers = num_terms - 1  # the inverse's series has the terms K^0 .. K^(powers - 1)
    if powers == 1:
        return eye + k
    if powers & (powers - 1) == 0:  # (I + K) * prod_{c < powers, c = 2^i} (I + K^c)
        power = k @ k
        blocks = eye + 2 * k + power  # (I + K)^2
        count = 2
        while count < powers:
            blocks = blocks + blocks @ power  # * (I + K^count)
            count *= 2
            if count < powers:
                power = power @ power
        return blocks
    series = eye + k
    for _ in range(powers - 2):
        series = eye + k @ series  # Horner: I + K (I + K (...))
    return series + k @ series  # (I + K) * series


def orthogonal_blocks(params: torch.Tensor, parametrization: str = "cayley") -> torch.Tensor:
    """Orthogonal blocks from unconstrained parameters: ``"cayley"`` (exact), ``"cayley_neumann"`` (its truncated
    series, :func:`cayley_neumann`, approximately orthogonal) or ``"exp"`` (matrix exponential of ``K``)."""
    if parametrization == "cayley":
        return cayley(params)
    if parametrization == "cayley_neumann":
        return cayley_neumann(params)
    if parametrization == "exp":
        work_dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
        return torch.linalg.matrix_exp(skew(params.to(work_dtype)))
    raise ValueError(f"unknown parametrization {parametrization!r}; use 'cayley', 'cayley_neumann' or 'exp'")


def orthogonal_blocks_at_strength(
    params: torch.Tensor, strength: float, parametrization: str = "cayley"
) -> torch.Tensor:
    """The blocks of an adapter applied at ``strength`` ``s``: ``Cayley(s K)`` (``exp(s K)``) from each block's skew
    generator ``K = skew(A)``. ``s = 0`` gives the identity, ``s = 1`` exactly :func:`orthogonal_blocks` (the same
    call, bit for bit), and every ``s`` an orthogonal block: unlike ``I + s (Q - I)``, the strength never leaves the
    orthogonal group. ``skew`` is linear, so ``skew(s A) = s K``."""
    if strength == 1:
        return orthogonal_blocks(params, parametrization)
    return orthogonal_blocks(params * strength, parametrization)


def scale_at_strength(scale: torch.Tensor, strength: float) -> torch.Tensor:
    """A trained scale vector ``d`` at ``strength`` ``s``: ``1 + s (d - 1)`` (``s = 1``: ``d`` itself, unchanged)."""
    if strength == 1:
        return scale
    return 1 + strength * (scale - 1)


# ---------------------------------------------------------------------------------------------------------------
# Block-diagonal and GS multiplies
# ---------------------------------------------------------------------------------------------------------------


def _row_blocks(rows: torch.Tensor, r: int, b: int) -> torch.Tensor:
    """``(N, r*b)`` token-major -> ``(r, N, b)``: block ``q`` is columns ``q*b .. q*b + b - 1``, a view BLAS reads in
    place (row stride ``r*b``) when the last dimension is contiguous."""
    return rows.unflatten(-1, (r, b)).transpose(0, 1)


def block_diag_apply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``B x`` for block-diagonal ``B`` with blocks ``(k, b_out, b_in)`` (rectangular allowed): ``(..., k*b_in)``."""
    k, b_out, b_in = blocks.shape
    lead = x.shape[:-1]
    xb = _row_blocks(x.reshape(-1, k * b_in), k, b_in)  # (k, N, b_in)
    yb = torch.bmm(xb, blocks.mT)  # (k, N, b_out): row form of B_j x_j
    return yb.transpose(0, 1).reshape(*lead, k * b_out)


def _rotation_forward(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, keep_intermediate: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(R x^T, (Q x)^T)`` for ``x`` ``(N, d)``: the intermediate ``(r, b, N)`` (None unless ``keep_intermediate``)
    and the result ``(d, N)``.

    On ``x^T`` (``(d, N)``) every block of a factor is a ``(b, N)`` slab: the bmm's read ``x`` through its
    transposed strides and ``R x^T`` through a strided view (:func:`_strided_groups`), and the second bmm writes its
    groups straight into their rows of the result (``P^T`` as the output's strides): no copy. The token-major
    layout instead needs element-wise transposes for each shuffle, which cost more than the matmuls on a CPU. Runs
    token chunk by token chunk (:func:`_token_chunks`): ``R x`` of a chunk is read back while still in cache."""
    n_tokens, d = x.shape
    r, b, _ = right.shape
    z_t = x.new_empty(r, b, n_tokens) if keep_intermediate else None  # rows of R x^T in natural order
    u_t = x.new_empty(d, n_tokens)
    for start, stop in _token_chunks(x):
        x_chunk = x[start:stop].mT.view(r, b, stop - start)  # (r, b, n): block q of the chunk's x^T, strided
        if z_t is None:
            z_chunk = torch.bmm(right, x_chunk)
        else:
            z_chunk = z_t[..., start:stop]
            _bmm_into(right, x_chunk, z_chunk)
        _bmm_into(left, _strided_groups(z_chunk, r, b), _strided_groups(u_t[:, start:stop], r, b))  # P^T L P R x^T
    return z_t, u_t


def gs_rotate_weight(
    weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``diag(s) W Q`` for ``W`` ``(out, d)`` and GSOFT's ``Q = P^T L P R`` (``s``: ``(out,)`` or None), without
    autograd: the weight a forward multiplies when it rotates the weight instead of the tokens (row by row,
    ``w Q = (Q^T w)^T``: :func:`_transposed_rotation_forward`; a transpose of the whole weight, the feature-major
    route, crosses a page per element at width 3072 and cost 5-10x more on the CPU)."""
    rotated = _transposed_rotation_forward(weight, left, right)[2]
    return rotated if scale is None else rotated.mul_(scale[:, None])


def gs_rotate_weight_columns(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``Q W`` for ``W`` ``(out, d)`` and ``Q = P^T L P R`` on the output dimension, without autograd: the columns
    of ``W`` are the feature-major vectors :func:`_rotation_forward` rotates in place of ``x^T`` (no copy)."""
    return _rotation_forward(weight.contiguous().mT, left, right, keep_intermediate=False)[1]


def rotates_weight_forward(n_tokens: int, out_features: int) -> bool:
    """Whether a forward whose gradients come from the activations applies the rotation to the weight instead:
    ``x (W Q)^T`` (about five passes over the ``out`` weight rows: two regroupings, two batched matmuls, the scale)
    against ``(Q x) W^T`` (three over the ``N`` token rows: two batched matmuls, the scale), the same product up to
    rounding. Both are memory-bound; measured on the CPU (docs/benchmarks.md) the weight wins at ``out / N`` = 0.16
    and 0.375 and loses at 0.67 and 1.25, so the weight side is taken up to ``out = N / 2``."""
    return 2 * out_features <= n_tokens


def _rotation_backward(
    grad_w_t: torch.Tensor,
    x: torch.Tensor,
    z_t: torch.Tensor | None,
    left: torch.Tensor,
    right: torch.Tensor,
    needs_input_grad: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(x, left, right)`` of :func:`_rotation_forward` from ``grad_w_t`` ``(r, b, N)``, the gradient
    of ``L P R x^T`` group by group (``P`` already applied to the gradient of ``(Q x)^T``; any strides). ``z_t``
    is the forward's ``R x^T`` ``(r, b, N)``, or None to recompute it (one batched matmul of ``b x b`` blocks).

    Token chunk by token chunk (:func:`_token_chunks`): a chunk's ``R x``, its gradient and the gradient of
    ``R x`` stay in cache between the four batched matmuls that use them, and the blocks' gradients add up over
    the chunks."""
    n_tokens, d = x.shape
    r, b, _ = right.shape
    grad_x = x.new_empty(n_tokens, d) if needs_input_grad[0] else None  # token-major like x
    grad_left = grad_right = None
    for start, stop in _token_chunks(x):
        n = stop - start
        x_chunk = x[start:stop].mT.view(r, b, n)  # (r, b, n): block q of the chunk's x^T, strided
        grad_w_chunk = grad_w_t[..., start:stop]
        if needs_input_grad[1]:  # R x^T is needed for L's gradient alone
            z_chunk = torch.bmm(right, x_chunk) if z_t is None else z_t[..., start:stop]
            grad_left = _add_bmm(grad_left, grad_w_chunk, _strided_groups(z_chunk, r, b).mT)
        grad_z = x.new_empty(d, n)
        _bmm_into(left.mT, grad_w_chunk, _strided_groups(grad_z, r, b))  # P^T on the rows: written in place
        grad_z_t = grad_z.view(r, b, n)
        if needs_input_grad[2]:
            grad_right = _add_bmm(grad_right, grad_z_t, x_chunk.mT)
        if grad_x is not None:  # R_q^T per block in row form, written into its b-wide columns
            _bmm_into(grad_z_t.mT, right, _row_blocks(grad_x[start:stop], r, b))  # (r, n, b) views of (n, d)
    return grad_x, _in_dtype(grad_left, x), _in_dtype(grad_right, x)


class _GSRotation(torch.autograd.Function):
    """``Q x = P^T L P R x`` for ``x`` of shape ``(N, d)``, computed on ``x^T`` (see :func:`_rotation_forward`).

    The result is returned as the transposed view of a ``(d, N)`` tensor; the backward needs one copy of the
    incoming gradient (token-major to feature-major) and one row shuffle. Saves ``x`` and ``R x`` (as the
    autograd graph of the plain ops would save ``x`` and ``P R x``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        z_t, y_t = _rotation_forward(x, left, right)
        ctx.save_for_backward(x, z_t, left, right)
        return y_t.mT

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, z_t, left, right = ctx.saved_tensors
        r, b, _ = right.shape
        grad_w_t = _strided_groups(grad_y.mT.contiguous(), r, b)  # (r, b, N): one 2-D transpose, P as a view
        return _rotation_backward(grad_w_t, x, z_t, left, right, ctx.needs_input_grad)


def _transposed_rotation_forward(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Q^T x = R^T P^T L^T P x`` for ``x`` ``(N, d)`` token-major (``W Q`` for a weight ``W``: its rows rotated
    by ``Q^T``): ``(P x`` grouped ``(N, r, b)``, ``L`` applied and shuffled back ``(N, d)``, the result ``(N, d))``.

    The shuffles are transposes within each row (``(b, r)`` to ``(r, b)`` and back: each row stays in cache; a
    gather across rows instead crosses a cache line per element), the factors bmm's in row form that read and
    write through leading dimensions."""
    n_rows, d = x.shape
    r, b, _ = right.shape
    groups = x.new_empty(n_rows, r, b)  # [n, j, m] = x[n, m*r + j]
    shuffled_back = x.new_empty(n_rows, d)
    rotated = x.new_empty(n_rows, d)
    for start, stop in _token_chunks(x):  # chunk by chunk, each step reads the last one's output from cache
        groups[start:stop] = x[start:stop].reshape(-1, b, r).transpose(1, 2)  # P, as a transpose in each row
        rotated_groups = torch.empty_like(groups[start:stop])
        _bmm_into(groups[start:stop].transpose(0, 1), left, rotated_groups.transpose(0, 1))  # L_j^T on group j
        shuffled_back[start:stop].view(-1, b, r).copy_(rotated_groups.transpose(1, 2))  # P^T: [n, m*r+j] = [n, j, m]
        _bmm_into(_row_blocks(shuffled_back[start:stop], r, b), right, _row_blocks(rotated[start:stop], r, b))
    return groups, shuffled_back, rotated


class _GSRotationTransposed(torch.autograd.Function):
    """``Q^T x`` for ``x`` ``(N, d)``, token-major (:func:`_transposed_rotation_forward`); keeps the grouped input and
    the shuffled intermediate for backward, which runs the same steps in reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        groups, shuffled_back, rotated = _transposed_rotation_forward(x, left, right)
        ctx.save_for_backward(groups, shuffled_back, left, right)
        return rotated

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        groups, shuffled_back, left, right = ctx.saved_tensors
        n_rows, d = shuffled_back.shape
        r, b, _ = right.shape
        grad_blocks = _row_blocks(grad_y, r, b)  # (r, N, b)
        grad_right = torch.bmm(_row_blocks(shuffled_back, r, b).mT, grad_blocks) if ctx.needs_input_grad[2] else None
        grad_shuffled = grad_y.new_empty(n_rows, d)
        _bmm_into(grad_blocks, right.mT, _row_blocks(grad_shuffled, r, b))
        grad_groups = grad_shuffled.view(n_rows, b, r).transpose(1, 2).contiguous()  # (N, r, b), as groups
        grad_left = (
            torch.bmm(groups.transpose(0, 1).mT, grad_groups.transpose(0, 1)) if ctx.needs_input_grad[1] else None
        )
        grad_x = None
        if ctx.needs_input_grad[0]:  # L_j on group j, then back to token order
            grad_x_groups = torch.empty_like(grad_groups)
            _bmm_into(grad_groups.transpose(0, 1), left.mT, grad_x_groups.transpose(0, 1))
            grad_x = grad_x_groups.transpose(1, 2).reshape(n_rows, d)
        return grad_x, grad_left, grad_right


class _GSRotatedLinear(torch.autograd.Function):
    """``s * (W Q x) + bias`` for ``x`` ``(N, d)``, ``W`` ``(out, d)``; ``s`` and ``bias`` ``(out,)`` or None.

    The rotation, the matmul and the output scale in one node that keeps for backward only what it cannot cheaply
    recompute: ``x`` (which the frozen layer's own backward needs too) and, for the scale's gradient, the output
    ``y`` (when the following op saves ``y`` anyway, as attention does with q / k / v, it costs nothing).

    Forward applies ``Q`` where it is cheaper (:func:`rotates_weight_forward`): with at least twice as many tokens
    as output features, to the weight (``y = x (diag(s) W Q)^T + bias``, one ``addmm`` on the activations, the
    scale and the bias folded in), otherwise to the tokens (``(Q x) W^T``, then the scale). Backward always works
    on the activations, which the blocks' gradients need: ``R x`` is recomputed (one batched matmul of ``b x b``
    blocks), ``W Q x`` is recovered from the output as ``(y - bias) / s`` (or saved itself where ``s`` has a zero
    entry), the scale rides on the weight (``(diag(s) W)^T grad_y``) or on the gradient, whichever has fewer
    rows, and that matmul writes the gradient of ``(Q x)^T`` feature-major so the rotation's
    backward reads it in place (no token-major to feature-major copy)."""

    @staticmethod
    def forward(ctx, x, left, right, weight, scale, bias):
        keep = _ScaleInput.kind_for(scale, scale is not None and ctx.needs_input_grad[4])
        if keep != "input" and rotates_weight_forward(x.shape[0], weight.shape[0]):
            rotated = gs_rotate_weight(weight, left, right, scale).mT  # (d, out): (diag(s) W Q)^T
            y0, y = None, torch.mm(x, rotated) if bias is None else torch.addmm(bias, x, rotated)
        else:
            _, u_t = _rotation_forward(x, left, right, keep_intermediate=False)
            y0 = torch.mm(u_t.mT, weight.mT)  # (N, out): W Q x
            if scale is None:
                y = y0 if bias is None else y0 + bias
            else:
                y = y0 * scale if bias is None else torch.addcmul(bias, y0, scale)
        ctx.save_for_backward(x, left, right, weight, scale, bias, *_ScaleInput.tensors(keep, y0, y))
        ctx.keep = keep
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, left, right, weight, scale, bias, *kept = ctx.saved_tensors
        needs = ctx.needs_input_grad
        r, b, _ = right.shape
        grad_scale, grad_bias = _ScaleInput.gradients(
            ctx.keep, grad_y, kept, scale, bias, scale is not None and needs[4], needs[5]
        )
        grad_weight = None
        if needs[3]:  # the frozen base weight normally needs none; recompute Q x for it
            scaled_grad = grad_y if scale is None else grad_y * scale
            grad_weight = torch.mm(scaled_grad.mT, _rotation_forward(x, left, right, keep_intermediate=False)[1].mT)
        if not any(needs[:3]):
            return None, None, None, grad_weight, grad_scale, grad_bias
        if scale is not None:  # W^T (s * grad_y^T): the scale on the weight or on the gradient, whichever is smaller
            if weight.shape[1] <= x.shape[0]:
                weight = weight * scale[:, None]  # diag(s) W
            else:
                grad_y = grad_y * scale
        grad_u_t = torch.mm(weight.mT, grad_y.mT)  # (d, N): the gradient of (Q x)^T, feature-major
        grad_w_t = _strided_groups(grad_u_t, r, b)  # P on the rows, a view
        return (*_rotation_backward(grad_w_t, x, None, left, right, needs), grad_weight, grad_scale, grad_bias)


class _ScaleInput:
    """What a rotated linear keeps so that backward has ``y0``, the input of the output scale ``y = s * y0 + b``,
    by kind: ``"none"`` (no scale gradient), ``"output"`` (the output ``y``; then ``y0 = (y - b) / s``) or
    ``"input"`` (``y0`` itself, when ``s`` has a zero entry: division impossible)."""

    @staticmethod
    def kind_for(scale, needed: bool) -> str:
        """Eager: the output unless ``s`` has a zero entry. Compiled: always ``y0``, decided when tracing, not on
        the scale's values (the zero check is a ``Tensor.item()``, a graph break)."""
        if not needed:
            return "none"
        if torch.compiler.is_compiling() or (scale is not None and bool((scale == 0).any())):
            return "input"
        return "output"

    @staticmethod
    def tensors(kind: str, y0: torch.Tensor | None, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What to keep for ``kind``: nothing, ``(y,)`` or ``(y0,)``."""
        return {"none": (), "output": (y,), "input": (y0,)}[kind]

    @staticmethod
    def gradients(kind: str, grad_y: torch.Tensor, kept, scale, bias, scale_needed: bool, bias_needed: bool):
        """``(grad of s, grad of b)`` (None where not needed): ``sum_n grad_y * y0`` and ``sum_n grad_y``. With the
        output kept, ``y0 = (y - b) / s`` gives ``(sum_n grad_y * y - b * sum_n grad_y) / s``; the column sums
        are taken once for both, token chunk by token chunk (:func:`_token_chunks`; the product's temporary stays
        in cache)."""
        sums_needed = bias_needed or (scale_needed and kind == "output" and bias is not None)
        column_sums = products = None
        for start, stop in _token_chunks(grad_y, CPU_REDUCTION_CHUNK_BYTES):
            grad_chunk = grad_y[start:stop]
            if sums_needed:
                column_sums = _add(column_sums, grad_chunk.sum(0))
            if scale_needed:
                products = _add(products, (grad_chunk * kept[0][start:stop]).sum(0))
        grad_scale = products  # float32 at least until the end: y * grad_y and b * grad_y may nearly cancel
        if scale_needed and kind == "output":
            if bias is not None:
                grad_scale = grad_scale - bias * column_sums
            grad_scale = grad_scale / scale
        return _in_dtype(grad_scale, grad_y), _in_dtype(column_sums, grad_y) if bias_needed else None

    @staticmethod
    def recover(kind: str, kept: list[torch.Tensor], scale, bias) -> torch.Tensor:
        """``y0`` from what was kept: itself, or ``(y - b) / s`` as one pass (``y * (1 / s) - b / s``)."""
        if kind == "input":
            return kept[0]
        if scale is None:
            return kept[0] if bias is None else kept[0] - bias
        inverse = 1 / scale
        return kept[0] * inverse if bias is None else torch.addcmul(-bias * inverse, kept[0], inverse)


@dataclass(frozen=True)
class RotationPlan:
    """The rotations of a rotated linear ``y = s * Q_out W Q_in x + b``, as functions of block tensors:
    ``rotate_in(x, *in_blocks)`` (``Q_in x``, recomputed under autograd in backward), and, for two-sided adapters,
    ``rotate_out(y, *out_blocks)`` with its backward from its own output,
    ``backward_out(grad, Q_out y, *out_blocks, needs) -> (grad of y, *grads of the blocks)`` (the node keeps
    ``Q_out y`` through its output, never ``y``); ``n_in`` of the blocks belong to ``Q_in``.
    ``backward_in(grad, x, *in_blocks, needs) -> (grad of x, *grads of the blocks)``, when given, is ``Q_in``'s
    backward (then backward calls no ``torch.autograd.grad``, which ``torch.compile`` cannot trace); without it
    ``Q_in``'s gradients come from autograd through ``rotate_in``. ``fold_weight(weight, *blocks)``, when given,
    is ``Q_out W Q_in`` ``(out, d)``: forward then rotates the weight instead of the tokens where that is cheaper
    (:func:`rotates_weight_forward`)."""

    rotate_in: Callable[..., torch.Tensor]
    n_in: int
    rotate_out: Callable[..., torch.Tensor] | None = None
    backward_out: Callable[..., tuple] | None = None
    backward_in: Callable[..., tuple] | None = None
    fold_weight: Callable[..., torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.rotate_out is not None and self.backward_out is None:
            raise ValueError("a RotationPlan with rotate_out needs backward_out too")


class _RecomputedRotatedLinear(torch.autograd.Function):
    """``s * Q_out(W Q_in x) + b`` for ``x`` ``(N, d)`` with any rotations (Double GSOFT, BOFT), keeping only
    ``x`` and the output ``y`` for backward: ``Q_out W Q_in x`` is recovered from ``y`` through the scale,
    ``Q_out``'s backward works from that (its intermediates from its output through the orthogonal factors'
    transposes), and ``Q_in``'s intermediates are recomputed (batched matmuls of small blocks, cheap next to the
    layer's matmul)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, plan: RotationPlan, *blocks):
        in_blocks, out_blocks = blocks[: plan.n_in], blocks[plan.n_in :]
        needs_y2 = plan.rotate_out is not None and any(ctx.needs_input_grad[5 + plan.n_in :])
        keep = _ScaleInput.kind_for(scale, (scale is not None and ctx.needs_input_grad[2]) or needs_y2)
        if plan.fold_weight is not None and keep != "input" and rotates_weight_forward(x.shape[0], weight.shape[0]):
            folded = plan.fold_weight(weight, *blocks)  # (out, d): Q_out W Q_in, weight-sized work
            folded = folded if scale is None else folded * scale[:, None]
            y2, y = None, torch.mm(x, folded.mT) if bias is None else torch.addmm(bias, x, folded.mT)
        else:
            y1 = torch.mm(plan.rotate_in(x, *in_blocks), weight.mT)  # (N, out): W Q_in x
            y2 = y1 if plan.rotate_out is None else plan.rotate_out(y1, *out_blocks).contiguous()
            if scale is None:
                y = y2 if bias is None else y2 + bias
            else:
                y = y2 * scale if bias is None else torch.addcmul(bias, y2, scale)
        kept = _ScaleInput.tensors(keep, y2, y)
        ctx.save_for_backward(x, weight, scale, bias, *kept, *blocks)
        ctx.keep, ctx.plan, ctx.n_kept = keep, plan, len(kept)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, scale, bias, *rest = ctx.saved_tensors
        kept, blocks = rest[: ctx.n_kept], rest[ctx.n_kept :]
        plan, needs = ctx.plan, ctx.needs_input_grad
        in_blocks, out_blocks = blocks[: plan.n_in], blocks[plan.n_in :]
        grad_scale, grad_bias = _ScaleInput.gradients(
            ctx.keep, grad_y, kept, scale, bias, scale is not None and needs[2], needs[3]
        )
        grad_y2 = grad_y if scale is None else grad_y * scale
        grad_out_blocks: tuple = (None,) * len(out_blocks)
        grad_y1 = grad_y2
        if plan.rotate_out is not None:
            y2 = _ScaleInput.recover(ctx.keep, kept, scale, bias)  # Q_out W Q_in x
            grad_y1, *grad_out_blocks = plan.backward_out(grad_y2, y2, *out_blocks, (True, *needs[5 + plan.n_in :]))
        grad_in_blocks: tuple = (None,) * len(in_blocks)
        grad_x = grad_weight = None
        needs_in = (needs[0], *needs[5 : 5 + plan.n_in])
        if plan.backward_in is not None and any(needs_in):
            # (N, d) as the transposed view of W^T grad_y1^T (d, N): feature-major, as a GS backward reads it
            grad_u = torch.mm(weight.mT, grad_y1.mT).mT
            with _no_autocast(x):
                grad_x, *grad_in_blocks = plan.backward_in(grad_u, x, *in_blocks, needs_in)
            if needs[1]:
                grad_weight = torch.mm(grad_y1.mT, plan.rotate_in(x, *in_blocks))
        elif any(needs_in) or needs[1]:
            with torch.enable_grad(), _no_autocast(x):
                x_in = x.detach().requires_grad_(needs[0])
                detached = [b.detach().requires_grad_(need) for b, need in zip(in_blocks, needs[5 : 5 + plan.n_in])]
                u = plan.rotate_in(x_in, *detached)  # Q_in x, recomputed
                wanted = ([x_in] if needs[0] else []) + [b for b in detached if b.requires_grad]
                grad_u = torch.mm(grad_y1, weight)  # (N, d)
                grads = iter(torch.autograd.grad(u, wanted, grad_u)) if wanted else iter(())
            grad_x = next(grads) if needs[0] else None
            grad_in_blocks = tuple(next(grads) if b.requires_grad else None for b in detached)
            if needs[1]:
                grad_weight = torch.mm(grad_y1.mT, u.detach())
        return (grad_x, grad_weight, grad_scale, grad_bias, None, *grad_in_blocks, *grad_out_blocks)


class _RecomputedWeightLinear(torch.autograd.Function):
    """``F.linear(x, W', bias)`` with ``W' = transform()`` a differentiable function of ``params`` (the weight
    side of an adapter: ``W' = diag(s) Q_out W Q_in``), keeping only ``x`` for backward: ``W'`` is recomputed under
    autograd in backward (weight-sized batched matmuls) and ``grad_y^T x`` flows into ``params`` through it."""

    @staticmethod
    def forward(ctx, x, bias, transform: Callable[[], torch.Tensor], *params):
        weight = transform().to(x.dtype)
        ctx.save_for_backward(x, bias)
        ctx.transform, ctx.params = transform, params
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        wanted = [p for p, need in zip(ctx.params, needs[3:]) if need]
        with torch.enable_grad(), _no_autocast(x):
            weight = ctx.transform()  # W', recomputed with its graph to params
        grad_x = torch.mm(grad_y, weight.detach().to(grad_y.dtype)) if needs[0] else None
        grad_bias = grad_y.sum(0) if needs[1] else None
        grads = iter(())
        if wanted:
            grad_weight = torch.mm(grad_y.mT, x).to(weight.dtype)  # (out, d): grad_y^T x
            grads = iter(torch.autograd.grad(weight, wanted, grad_weight))
        return (grad_x, grad_bias, None, *(next(grads) if need else None for need in needs[3:]))


def gs_rotation_backward(
    grad_y: torch.Tensor, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, needs: Sequence[bool]
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(x, left, right)`` of ``Q x`` (:func:`gs_apply`, ``x`` ``(N, d)``) from ``grad_y`` ``(N, d)``,
    recomputing the one intermediate ``R x^T`` (a batched matmul) instead of keeping it."""
    r, b, _ = right.shape
    grad_w_t = _strided_groups(grad_y.mT.contiguous(), r, b)  # (r, b, N): one 2-D transpose, P as a view
    return _rotation_backward(grad_w_t, x.contiguous(), None, left, right, needs)


def gs_rotation_backward_from_output(
    grad_y: torch.Tensor, y: torch.Tensor, left: torch.Tensor, right: torch.Tensor, needs: Sequence[bool]
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(x, left, right)`` of ``y = Q x`` (:func:`gs_apply`, ``(N, d)``) from ``grad_y`` and the output
    ``y``, never forming ``x``: ``R x`` is ``P^T L^T P y`` (one batched matmul), ``R``'s gradient
    ``grad_(R x)_q (R x)_q^T R_q`` (as ``x_q = R_q^T (R x)_q``: a ``b x b`` product instead of recovering ``x``).
    Exact for orthogonal blocks (Cayley, exp; the Cayley-Neumann series is orthogonal to ``2|K|^4``). The
    gradient of ``x`` is returned as the ``(N, d)`` transposed view of a feature-major ``(d, N)`` tensor. Token
    chunk by token chunk (:func:`_token_chunks`): each chunk's transposes and intermediates stay in cache."""
    n_tokens, d = y.shape
    r, b, _ = right.shape
    grad_x_t = y.new_empty(d, n_tokens) if needs[0] else None  # feature-major
    grad_left = right_products = None
    for start, stop in _token_chunks(y):
        n = stop - start
        grad_groups = _strided_groups(grad_y[start:stop].mT.contiguous(), r, b)  # (r, b, n): P grad_y, feature-major
        if needs[1] or needs[2]:  # R x^T is needed for the blocks' gradients alone
            rotated = y.new_empty(d, n)  # rows in natural order
            _bmm_into(left.mT, _strided_groups(y[start:stop].mT.contiguous(), r, b), _strided_groups(rotated, r, b))
        if needs[1]:
            grad_left = _add_bmm(grad_left, grad_groups, _strided_groups(rotated, r, b).mT)
        grad_rotated = y.new_empty(d, n)
        _bmm_into(left.mT, grad_groups, _strided_groups(grad_rotated, r, b))  # P^T L^T P grad_y
        grad_blocks = grad_rotated.view(r, b, n)
        if needs[2]:
            right_products = _add_bmm(right_products, grad_blocks, rotated.view(r, b, n).mT)
        if grad_x_t is not None:
            _bmm_into(right.mT, grad_blocks, grad_x_t[:, start:stop].view(r, b, n))
    grad_right = torch.bmm(_in_dtype(right_products, y), right) if needs[2] else None
    return None if grad_x_t is None else grad_x_t.mT, _in_dtype(grad_left, y), grad_right


def recomputed_weight_linear(
    x: torch.Tensor, bias: torch.Tensor | None, transform: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``F.linear(x, transform(), bias)`` that saves only ``x`` for backward (see :class:`_RecomputedWeightLinear`);
    ``transform`` computes the weight from ``params`` (read through its closure) and is called again in backward.
    Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would."""
    lead, d = x.shape[:-1], x.shape[-1]

    def run(x2d, bias):
        if torch.compiler.is_compiling():  # plain ops: the recomputation in backward calls torch.autograd.grad,
            return F.linear(x2d, transform().to(x2d.dtype), bias)  # and the compiler picks what to keep itself
        return _RecomputedWeightLinear.apply(x2d, bias, transform, *params)

    y = _in_autocast_dtype(run, x.reshape(-1, d), bias)
    return y.view(*lead, y.shape[-1])


def rotated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    plan: RotationPlan,
    blocks: Sequence[torch.Tensor],
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s * Q_out(F.linear(Q_in x, W)) + bias`` with the rotations of ``plan`` on ``blocks``, saving only ``x``
    and the output for backward (:class:`_RecomputedRotatedLinear`). Under autocast everything runs in the
    autocast dtype."""
    lead, d = x.shape[:-1], x.shape[-1]

    def run(x2d, weight, scale, bias, *blocks):
        if plan.backward_in is None and torch.compiler.is_compiling():  # see _rotated_linear_plain
            return _rotated_linear_plain(x2d, weight, scale, bias, plan, *blocks)
        return _RecomputedRotatedLinear.apply(x2d, weight, scale, bias, plan, *blocks)

    y = _in_autocast_dtype(run, x.reshape(-1, d).contiguous(), weight, scale, bias, *blocks)
    return y.view(*lead, weight.shape[0])


def _rotated_linear_plain(x, weight, scale, bias, plan: RotationPlan, *blocks) -> torch.Tensor:
    """:class:`_RecomputedRotatedLinear`'s forward as plain differentiable ops, for ``torch.compile`` where a plan
    has no explicit ``backward_in`` (BOFT): that node's backward would call ``torch.autograd.grad``, which the
    compiler cannot trace; compiled, the compiler's partitioner chooses what backward keeps and recomputes."""
    y = torch.mm(plan.rotate_in(x, *blocks[: plan.n_in]), weight.mT)  # (N, out): W Q_in x
    if plan.rotate_out is not None:
        y = plan.rotate_out(y, *blocks[plan.n_in :])
    if scale is not None:
        y = y * scale
    return y if bias is None else y + bias


def _strided_groups(rows: torch.Tensor, r: int, b: int) -> torch.Tensor:
    """``P`` as a view: ``(r, b, N)`` rows ``q*b + i`` in natural order -> group ``j`` = rows ``m*r + j``.

    The view has strides ``(N, r*N, 1)``: every group is a matrix with leading dimension ``r*N`` that BLAS reads
    in place, so the shuffle between the two factors costs no copy."""
    n_tokens = rows.shape[-1]
    return rows.view(b, r, n_tokens).transpose(0, 1)  # (r, b, N)


def _bmm_into(batch1: torch.Tensor, batch2: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = batch1 @ batch2`` for a strided view ``out`` (a shuffle or transpose as the output's strides): BLAS
    writes each matrix through its leading dimension, no copy. Compiled, a copy instead (``torch.compile`` refuses a
    non-contiguous ``out=``; inductor fuses the copy into what follows)."""
    if torch.compiler.is_compiling():
        out.copy_(torch.bmm(batch1, batch2))
    else:
        torch.bmm(batch1, batch2, out=out)


# Bytes of one token chunk of an activation on the CPU. The batched matmuls of b x b blocks run at a fraction of the
# frozen matmul's speed when their operands come from main memory; chunk by chunk, what one writes the next reads
# from cache (docs/benchmarks.md, "Token chunks": measured, not derived; the scale's reductions prefer smaller).
CPU_CHUNK_BYTES = 2 * 2**20
CPU_REDUCTION_CHUNK_BYTES = 2**18


def _token_chunks(x: torch.Tensor, chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` token ranges covering ``x`` ``(N, d)`` in equal chunks of at most ``chunk_bytes``
    (default :data:`CPU_CHUNK_BYTES`; at least 16 rows) on the CPU; one range on other devices (each chunk would
    cost kernel launches there; not measured) and under ``torch.compile`` (inductor schedules its own loops)."""
    n_tokens, d = x.shape
    if x.device.type != "cpu" or torch.compiler.is_compiling() or n_tokens == 0:
        return [(0, n_tokens)]
    rows = max(16, (chunk_bytes or CPU_CHUNK_BYTES) // (d * x.element_size()))
    count = -(-n_tokens // rows)  # ceil
    size = -(-n_tokens // count)
    return [(start, min(start + size, n_tokens)) for start in range(0, n_tokens, size)]


def _add(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """``total + term`` in place, summed in float32 at least (``total`` None: ``term`` itself): chunks' partial
    sums in half precision would each be rounded."""
    if total is None:
        return term if term.dtype in (torch.float32, torch.float64) else term.float()
    return total.add_(term)


def _add_bmm(total: torch.Tensor | None, batch1: torch.Tensor, batch2: torch.Tensor) -> torch.Tensor:
    """``total + batch1 @ batch2`` (:func:`_add`)."""
    return _add(total, torch.bmm(batch1, batch2))


def _in_dtype(total: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A sum from :func:`_add` back in ``like``'s dtype (None stays None)."""
    return None if total is None else total.to(like.dtype)


def _no_autocast(like: torch.Tensor):
    """Autocast off for ``like``'s device: a backward's recomputation runs in the dtype its forward ran in."""
    if like.device.type in ("cpu", "cuda"):
        return torch.autocast(like.device.type, enabled=False)
    return contextlib.nullcontext()


def _in_autocast_dtype(function: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    """``function(*tensors)``, with the tensors (None passes through) first cast to the dtype autocast would run a
    matmul on them in and autocast off inside (a custom node then sees one dtype); as it is when autocast is off
    for their device."""
    device_type = tensors[0].device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return function(*tensors)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        return function(*(None if t is None else t.to(dtype) for t in tensors))


def gs_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """GSOFT's ``Q x = P^T L P R x`` (or ``Q^T x``) on the last dimension, without forming ``Q``.

    ``left`` / ``right`` are the ``(r, b, b)`` blocks of ``L`` / ``R``. Two batched matmuls over ``r`` and one
    shuffle between them, no Python loop over blocks and no dense ``d x d`` matrix. ``Q x`` (the activation path)
    runs feature-major through :class:`_GSRotation` and may return a non-contiguous view; ``Q^T x`` (weights,
    merging) runs token-major through :class:`_GSRotationTransposed`. Under autocast the product runs in the
    autocast dtype, as a bmm would.
    """
    r, b, _ = right.shape
    d = r * b
    assert x.shape[-1] == d and left.shape == right.shape, (x.shape, left.shape, right.shape)
    lead = x.shape[:-1]
    if not transpose:
        y = _in_autocast_dtype(_GSRotation.apply, x.reshape(-1, d).contiguous(), left, right)
        return y.view(*lead, d)
    y = _in_autocast_dtype(_GSRotationTransposed.apply, x.reshape(-1, d), left, right)
    return y.view(*lead, d)


def gs_linear(
    x: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s * F.linear(Q x, W) + bias`` with GSOFT's ``Q = P^T L P R`` on the last dimension of ``x``, in one node.

    Same result as ``F.linear(gs_apply(x, left, right), weight) * scale + bias`` (``scale`` / ``bias``: ``(out,)``
    or None), with a cheaper backward (:class:`_GSRotatedLinear`). ``weight`` is ``(out, r * b)``; under autocast
    everything runs in the autocast dtype, as ``F.linear`` would.
    """
    r, b, _ = right.shape
    d = r * b
    assert x.shape[-1] == d == weight.shape[-1] and left.shape == right.shape, (x.shape, left.shape, weight.shape)
    lead = x.shape[:-1]
    y = _in_autocast_dtype(_GSRotatedLinear.apply, x.reshape(-1, d).contiguous(), left, right, weight, scale, bias)
    return y.view(*lead, weight.shape[0])


def gs_matrix(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Dense ``Q = P^T L P R`` (for merging and tests): row ``i`` of ``Q^T applied to I`` is row ``i`` of ``Q``."""
    r, b, _ = right.shape
    eye = torch.eye(r * b, dtype=right.dtype, device=right.device)
    return gs_apply(eye, left, right, transpose=True)


def gs_multiply(
    x: torch.Tensor, blocks: Sequence[torch.Tensor], gathers: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """The general GS class ``A = P_{m+1} B_m P_m ... B_1 P_1`` applied to ``x`` (..., n_in), never densely.

    ``blocks[i]`` are the blocks ``(k_i, b_out, b_in)`` of ``B_{i+1}`` (rectangular allowed); ``gathers`` has
    ``m + 1`` entries, each a gather index ``g`` with ``P x == x[..., g]`` or ``None`` for the identity. The
    two-factor ``GS(P_L, P, P_R)`` class is ``m = 2``: ``A = P_L (L P R) P_R``.
    """
    if len(gathers) != len(blocks) + 1:
        raise ValueError(f"{len(blocks)} block factors need {len(blocks) + 1} permutations, got {len(gathers)}")
    for gather, factor in zip(gathers[:-1], blocks):
        if gather is not None:
            x = x[..., gather]
        x = block_diag_apply(x, factor)
    if gathers[-1] is not None:
        x = x[..., gathers[-1]]
    return x


def gs_multiply_matrix(blocks: Sequence[torch.Tensor], gathers: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Dense matrix of :func:`gs_multiply`, shape ``(n_out, n_in)``."""
    k, _, b_in = blocks[0].shape
    eye = torch.eye(k * b_in, dtype=blocks[0].dtype, device=blocks[0].device)
    return gs_multiply(eye, blocks, gathers).T  # row i of the product is A e_i, i.e. column i of A


def compose_gathers(first: torch.Tensor | None, then: torch.Tensor | None) -> torch.Tensor | None:
    """One gather equal to applying ``first`` and then ``then`` (``x[first][then] == x[composed]``)."""
    if first is None:
        return then
    if then is None:
        return first
    return first[then]


def boft_gathers(perms: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Gathers that make BOFT's ``Q = prod_{i=0..m-1} P_i B_i P_i^T`` an instance of :func:`gs_multiply`.

    ``perms[i]`` is the gather of ``P_i``. Applied to ``x``, the last factor acts first; consecutive ``P_i`` and
    ``P_{i-1}^T`` fuse into one gather. Returns the ``m + 1`` gathers for blocks ordered ``B_{m-1}, ..., B_0``.
    """
    inverses = [torch.argsort(p) for p in perms]  # gather of P_i^T
    m = len(perms)
    gathers: list[torch.Tensor | None] = [inverses[m - 1]]
    for i in range(m - 1, 0, -1):
        gathers.append(compose_gathers(perms[i], inverses[i - 1]))
    gathers.append(perms[0])
    return [None if g is not None and torch.equal(g, torch.arange(g.numel(), device=g.device)) else g for g in gathers]


def boft_apply(x: torch.Tensor, blocks: torch.Tensor, gathers: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """BOFT's ``Q x`` with ``blocks`` ``(m, r, b, b)`` (factor ``i`` = ``blocks[i]``) and :func:`boft_gathers`."""
    return gs_multiply(x, list(blocks.flip(0).unbind(0)), gathers)


def boft_apply_transposed(
    x: torch.Tensor, blocks: torch.Tensor, gathers: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """``Q^T x`` for BOFT: the factors in reverse order with transposed blocks and inverse gathers."""
    inverse = [None if g is None else torch.argsort(g) for g in reversed(gathers)]
    return gs_multiply(x, list(blocks.mT.unbind(0)), inverse)


def gs_density_factor_count(block_size: int, nblocks: int) -> int:
    """Factors needed for a dense GS product with ``P(r, d)`` between ``b x b`` blocks: ``1 + ceil(log_b r)``."""
    if nblocks == 1:
        return 1
    if block_size == 1:
        raise ValueError("blocks of size 1 never mix entries: no number of factors gives a dense matrix")
    return 1 + math.ceil(math.log(nblocks) / math.log(block_size) - 1e-12)
