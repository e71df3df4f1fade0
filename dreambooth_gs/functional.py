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

import math
from collections.abc import Callable, Sequence

import torch

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
    One custom node instead of autograd's chain of small ops (skew, subtract, inverse, scale)."""

    @staticmethod
    def forward(ctx, params: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(params.shape[-1], dtype=params.dtype, device=params.device)
        inverse = inverse_positive_real(eye - skew(params))
        ctx.save_for_backward(inverse)
        return 2 * inverse - eye

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor) -> torch.Tensor:
        (inverse,) = ctx.saved_tensors
        grad_k = 2 * (inverse.mT @ grad_q @ inverse.mT)
        return skew(grad_k)


# Below this size the CPU's batched LAPACK inverse is cheap; above it, splitting into halves is faster.
_BLOCK_INVERSE_LEAF = 16


def inverse_positive_real(matrices: torch.Tensor) -> torch.Tensor:
    """Batched inverse of matrices whose symmetric part is positive definite (such as ``I - K``, ``K`` skew).

    On the CPU, LAPACK's batched inverse spends most of its time in per-matrix triangular inversion (4-8x the LU
    factorisation for 16-80 wide blocks), so larger blocks are inverted by 2 x 2 block elimination, recursively:
    ``M = [[A, B], [C, D]]``, ``S = D - C A^-1 B``, every step a batched matmul. Without pivoting this is stable
    here: the leading block and the Schur complement of such a matrix again have a positive definite symmetric
    part (``x^T M x >= |x|^2`` for ``I - K``), so nothing is ever singular. Other devices use ``inv_ex``.
    """
    n = matrices.shape[-1]
    if matrices.device.type != "cpu" or n <= _BLOCK_INVERSE_LEAF:
        inverse, _ = torch.linalg.inv_ex(matrices)  # no singularity check: these never are
        return inverse
    half = n // 2
    a, b = matrices[..., :half, :half], matrices[..., :half, half:]
    c, d = matrices[..., half:, :half], matrices[..., half:, half:]
    a_inv = inverse_positive_real(a)
    a_inv_b = a_inv @ b  # (..., half, n - half)
    c_a_inv = c @ a_inv  # (..., n - half, half)
    s_inv = inverse_positive_real(d - c @ a_inv_b)  # inverse of the Schur complement
    s_inv_c_a_inv = s_inv @ c_a_inv
    top = torch.cat([a_inv + a_inv_b @ s_inv_c_a_inv, -(a_inv_b @ s_inv)], dim=-1)
    bottom = torch.cat([-s_inv_c_a_inv, s_inv], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def orthogonal_blocks(params: torch.Tensor, parametrization: str = "cayley") -> torch.Tensor:
    """Orthogonal blocks from unconstrained parameters: ``"cayley"`` or ``"exp"`` (matrix exponential of ``K``)."""
    if parametrization == "cayley":
        return cayley(params)
    if parametrization == "exp":
        work_dtype = torch.float64 if params.dtype == torch.float64 else torch.float32
        return torch.linalg.matrix_exp(skew(params.to(work_dtype)))
    raise ValueError(f"unknown parametrization {parametrization!r}; use 'cayley' or 'exp'")


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


def _rotation_forward(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R x^T, (Q x)^T)`` for ``x`` ``(N, d)``: the saved intermediate ``(r, b, N)`` and the result ``(d, N)``.

    On ``x^T`` (``(d, N)``) every block of a factor is a ``(b, N)`` slab: the bmm's read ``x`` through its
    transposed strides and ``R x^T`` through a strided view (:func:`_strided_groups`), so the only copy is the
    final ``P^T`` (whole length-``N`` rows). The token-major layout instead needs element-wise transposes for each
    shuffle, which cost more than the matmuls on a CPU."""
    n_tokens, d = x.shape
    r, b, _ = right.shape
    x_t = x.mT.view(r, b, n_tokens)  # (r, b, N): block q of x^T, a strided view (BLAS reads it as is)
    z_t = torch.bmm(right, x_t)  # (r, b, N) = (d, N) rows of R x^T in natural order
    w_t = torch.bmm(left, _strided_groups(z_t, r, b))  # (r, b, N): w_t[j, m] = (L P R x^T)[j*b + m]
    return z_t, w_t.transpose(0, 1).reshape(d, n_tokens)  # P^T: (b, r, N) rows m*r + j -> (d, N)


def _rotation_backward(
    grad_w_t: torch.Tensor,
    x: torch.Tensor,
    z_t: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    needs_input_grad: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(x, left, right)`` of :func:`_rotation_forward` from ``grad_w_t`` ``(r, b, N)``, the gradient
    of ``L P R x^T`` group by group (``P`` already applied to the gradient of ``(Q x)^T``; any strides)."""
    n_tokens, d = x.shape
    r, b, _ = right.shape
    grad_left = torch.bmm(grad_w_t, _strided_groups(z_t, r, b).mT) if needs_input_grad[1] else None
    grad_z_t = torch.bmm(left.mT, grad_w_t).transpose(0, 1).reshape(r, b, n_tokens)  # P^T on the rows
    grad_right = torch.bmm(grad_z_t, x.mT.view(r, b, n_tokens).mT) if needs_input_grad[2] else None
    grad_x = None
    if needs_input_grad[0]:  # token-major like x: R_q^T per block in row form, then whole b-wide runs moved
        grad_x = torch.bmm(grad_z_t.mT, right).transpose(0, 1).reshape(n_tokens, d)  # (r, N, b) -> (N, d)
    return grad_x, grad_left, grad_right


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
        grad_w_t = grad_y.mT.reshape(b, r, x.shape[0]).transpose(0, 1).contiguous()  # (r, b, N)
        return _rotation_backward(grad_w_t, x, z_t, left, right, ctx.needs_input_grad)


class _GSRotationTransposed(torch.autograd.Function):
    """``Q^T x = R^T P^T L^T P x`` for ``x`` ``(N, d)`` (``W Q`` for a weight ``W``: its rows are rotated by ``Q^T``),
    token-major: ``L^T`` on the strided groups ``x[:, j::r]``, then ``R^T`` on contiguous ``b``-wide runs, each as
    one bmm in row form. Three copies (the grouping of ``x``, the shuffle between the factors, the result back in
    token order) and no per-block Python loop; every bmm operand is a view BLAS reads in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        n_rows, d = x.shape
        r, b, _ = right.shape
        x_groups = x.unflatten(-1, (b, r)).permute(2, 0, 1).contiguous()  # (r, N, b): [j, n, m] = x[n, m*r + j]
        w = torch.bmm(x_groups, left)  # (r, N, b): row form of L_j^T on group j
        t = w.permute(1, 2, 0).reshape(n_rows, d)  # P^T: t[n, m*r + j] = w[j, n, m]
        z = torch.bmm(_row_blocks(t, r, b), right)  # (r, N, b): row form of R_q^T on block q
        ctx.save_for_backward(x_groups, t, left, right)
        return z.transpose(0, 1).reshape(n_rows, d)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_groups, t, left, right = ctx.saved_tensors
        n_rows, d = t.shape
        r, b, _ = right.shape
        grad_z = _row_blocks(grad_y, r, b)  # (r, N, b)
        grad_right = torch.bmm(_row_blocks(t, r, b).mT, grad_z) if ctx.needs_input_grad[2] else None
        grad_t = torch.bmm(grad_z, right.mT).transpose(0, 1).reshape(n_rows, d)  # (r, N, b) -> token order
        grad_w = grad_t.unflatten(-1, (b, r)).permute(2, 0, 1).contiguous()  # (r, N, b), as x_groups
        grad_left = torch.bmm(x_groups.mT, grad_w) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:  # L_j on group j, then back to token order
            grad_x = torch.bmm(grad_w, left.mT).permute(1, 2, 0).reshape(n_rows, d)
        return grad_x, grad_left, grad_right


class _GSRotatedLinear(torch.autograd.Function):
    """``s * (W Q x) + bias`` for ``x`` ``(N, d)``, ``W`` ``(out, d)``; ``s`` and ``bias`` ``(out,)`` or None.

    The rotation, the matmul and the output scale in one node: the backward's matmul writes the gradient of
    ``(Q x)^T`` feature-major (``W^T grad_y^T``, the same GEMM as ``grad_y W`` with its operands swapped) so the
    rotation's backward reads it in place (no token-major to feature-major copy), and the scale's two products
    with the output gradient share one buffer (no autograd nodes, one activation-sized allocation fewer)."""

    @staticmethod
    def forward(ctx, x, left, right, weight, scale, bias):
        z_t, u_t = _rotation_forward(x, left, right)
        if scale is None:
            y0 = None
            y = torch.mm(u_t.mT, weight.mT) if bias is None else torch.addmm(bias, u_t.mT, weight.mT)  # (N, out)
        else:
            y0 = torch.mm(u_t.mT, weight.mT)  # (N, out), W Q x before the scale (its gradient needs it)
            y = y0 * scale if bias is None else torch.addcmul(bias, y0, scale)
        ctx.save_for_backward(x, z_t, left, right, weight, u_t if ctx.needs_input_grad[3] else None, scale, y0)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, z_t, left, right, weight, u_t, scale, y0 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        r, b, _ = right.shape
        grad_bias = grad_y.sum(0) if needs[5] else None
        grad_scale = None
        if scale is not None:  # grad_s = sum_n grad_y * y0, then grad_y0 = grad_y * s, in one buffer
            buffer = torch.mul(grad_y, y0)
            grad_scale = buffer.sum(0) if needs[4] else None
            grad_y = torch.mul(grad_y, scale, out=buffer)
        grad_weight = torch.mm(grad_y.mT, u_t.mT) if needs[3] else None
        if not any(needs[:3]):
            return None, None, None, grad_weight, grad_scale, grad_bias
        grad_u_t = torch.mm(weight.mT, grad_y.mT)  # (d, N): the gradient of (Q x)^T, feature-major
        grad_w_t = _strided_groups(grad_u_t, r, b)  # P on the rows, a view
        return (*_rotation_backward(grad_w_t, x, z_t, left, right, needs), grad_weight, grad_scale, grad_bias)


def _strided_groups(rows: torch.Tensor, r: int, b: int) -> torch.Tensor:
    """``P`` as a view: ``(r, b, N)`` rows ``q*b + i`` in natural order -> group ``j`` = rows ``m*r + j``.

    The view has strides ``(N, r*N, 1)``: every group is a matrix with leading dimension ``r*N`` that BLAS reads
    in place, so the shuffle between the two factors costs no copy."""
    n_tokens = rows.shape[-1]
    return rows.view(b, r, n_tokens).transpose(0, 1)  # (r, b, N)


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
