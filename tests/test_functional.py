"""dreambooth_gs.gs.functional against dense matrices built in the test from the paper's formulas."""

import math

import pytest
import torch

from dreambooth_gs.gs import functional as gsf

# (k, n) pairs for P(k, n), including k = 1, k = n and k not a power of two.
SHUFFLE_CASES = [(1, 4), (2, 4), (2, 6), (3, 6), (4, 8), (3, 12), (6, 24), (5, 15), (8, 8), (32, 320)]

# sigma of P(k, n) written out by hand: pins the convention, not just agreement with a re-implementation.
LITERAL_SIGMAS = [
    (2, 4, [0, 2, 1, 3]),
    (2, 6, [0, 3, 1, 4, 2, 5]),
    (3, 6, [0, 2, 4, 1, 3, 5]),
    (4, 8, [0, 2, 4, 6, 1, 3, 5, 7]),
    (1, 3, [0, 1, 2]),
]

# (r, b) for GSOFT: b divides r, r divides b, neither, r = 1, b = 1, the SD sizes.
GS_CASES = [(1, 4), (2, 8), (4, 4), (8, 4), (3, 5), (6, 4), (4, 6), (5, 1), (32, 10), (10, 32)]

# (n, nblocks, m) for BOFT.
BOFT_CASES = [(8, 4, 1), (16, 4, 2), (16, 8, 3), (48, 8, 4), (64, 8, 3), (24, 4, 3)]


def random_blocks(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def row_apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` for every vector in the last dimension of ``x``, computed as ``x @ matrix^T``."""
    return (x.double() @ matrix.double().T).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Permutations
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n", "sigma"), LITERAL_SIGMAS)
def test_shuffle_permutation_literal(k, n, sigma):
    assert gsf.shuffle_permutation(k, n).tolist() == sigma


@pytest.mark.parametrize(("k", "n"), SHUFFLE_CASES)
def test_shuffle_permutation_matches_formula(ref, k, n):
    assert gsf.shuffle_permutation(k, n).tolist() == ref.shuffle_sigma(k, n)


@pytest.mark.parametrize(("k", "n"), SHUFFLE_CASES)
def test_gather_index_applies_p(ref, k, n):
    x = torch.randn(3, n, dtype=torch.float64)
    gather = gsf.permutation_gather_index(gsf.shuffle_permutation(k, n))
    assert torch.equal(x[..., gather], row_apply(ref.shuffle_matrix(k, n), x))


@pytest.mark.parametrize(("k", "n"), SHUFFLE_CASES)
@pytest.mark.parametrize("transpose", [False, True])
def test_apply_shuffle_matches_dense(ref, k, n, transpose):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    p = ref.shuffle_matrix(k, n)
    expected = row_apply(p.T if transpose else p, x)
    assert torch.equal(gsf.apply_shuffle(x, k, transpose=transpose), expected)


def test_shuffle_block_gathers_strided_entries():
    # Block j of P(k, n) x (blocks of size n / k) is x[j::k], the docstring's reading of the formula.
    k, n = 3, 12
    x = torch.arange(n)
    y = gsf.apply_shuffle(x, k)
    for j in range(k):
        assert y[j * (n // k) : (j + 1) * (n // k)].tolist() == x[j::k].tolist()


@pytest.mark.parametrize(("call", "match"), [
    (lambda: gsf.shuffle_permutation(3, 8), "k=3, n=8"),
    (lambda: gsf.shuffle_permutation(0, 8), "k=0, n=8"),
    (lambda: gsf.apply_shuffle(torch.zeros(8), 3), "k=3, n=8"),
])  # fmt: skip
def test_shuffle_rejects_non_divisors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# BOFT butterfly permutations (gathers) written out by hand: (n, nblocks, block_size, factor, gather).
LITERAL_BUTTERFLIES = [
    (8, 4, 2, 0, list(range(8))),
    (8, 4, 2, 1, [0, 2, 1, 3, 4, 6, 5, 7]),
    (8, 4, 2, 2, [0, 2, 4, 6, 1, 3, 5, 7]),
    (16, 4, 4, 1, [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]),
]


@pytest.mark.parametrize(("n", "nblocks", "block_size", "factor", "gather"), LITERAL_BUTTERFLIES)
def test_butterfly_permutation_literal(n, nblocks, block_size, factor, gather):
    assert gsf.butterfly_permutation(n, nblocks, block_size, factor).tolist() == gather


@pytest.mark.parametrize(("first", "then"), [(None, None), ("p", None), (None, "q"), ("p", "q")])
def test_compose_gathers(first, then):
    perms = {"p": torch.randperm(7, generator=torch.Generator().manual_seed(1)),
             "q": torch.randperm(7, generator=torch.Generator().manual_seed(2)), None: None}  # fmt: skip
    x = torch.randn(7)
    expected = x
    for g in (perms[first], perms[then]):
        expected = expected if g is None else expected[g]
    composed = gsf.compose_gathers(perms[first], perms[then])
    assert torch.equal(x if composed is None else x[composed], expected)


# ---------------------------------------------------------------------------------------------------------------
# Orthogonal blocks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cayley_matches_dense_formula(ref, assert_close, dtype):
    a = random_blocks(5, 6, 6, seed=3, dtype=dtype)
    q = gsf.cayley(a)
    # Computed in float32 whatever the input (float64 stays float64).
    assert q.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(q, ref.cayley(a), work)


@pytest.mark.parametrize("parametrization", ["cayley", "cayley_neumann", "exp"])
def test_zero_params_give_identity(parametrization):
    q = gsf.orthogonal_blocks(torch.zeros(3, 5, 5), parametrization)
    assert torch.equal(q, torch.eye(5).expand(3, 5, 5))


# 2x2 blocks have closed forms: A = [[0, -t], [t, 0]] is already skew (K = A); exp(K) rotates by t and
# Cayley(K) rotates by 2 atan(t).
@pytest.mark.parametrize("t", [-2.0, -0.3, 0.1, 1.0, 5.0])
@pytest.mark.parametrize("parametrization", ["cayley", "exp"])
def test_two_by_two_rotation_angle(assert_close, t, parametrization):
    a = torch.tensor([[[0.0, -t], [t, 0.0]]])
    angle = t if parametrization == "exp" else 2 * math.atan(t)
    c, s = math.cos(angle), math.sin(angle)
    expected = torch.tensor([[[c, -s], [s, c]]])
    assert_close(gsf.orthogonal_blocks(a, parametrization), expected)


def test_only_skew_part_matters(assert_close):
    a = random_blocks(4, 5, 5, seed=4)
    sym = random_blocks(4, 5, 5, seed=5)
    assert_close(gsf.cayley(a + sym + sym.mT), gsf.cayley(a))
    assert_close(gsf.skew(a), -gsf.skew(a).mT)


@pytest.mark.parametrize("b", [5, 16, 17, 40, 33, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_positive_real_is_the_inverse(b, dtype):
    # I - K plus a positive semi-definite part keeps the symmetric part positive definite, as the function assumes.
    a, c = random_blocks(6, b, b, seed=20, dtype=dtype), random_blocks(6, b, b, seed=21, dtype=dtype)
    matrices = torch.eye(b, dtype=dtype) - 2 * gsf.skew(a) + 0.1 * c @ c.mT / b
    got = gsf.inverse_positive_real(matrices)
    want = torch.linalg.inv(matrices.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("b", [6, 20])
def test_cayley_backward_matches_dense_formula(ref, b):
    # cayley has a hand-written backward (_Cayley): it must give autograd's gradient of the dense formula.
    a = random_blocks(3, b, b, seed=22).double().requires_grad_()
    upstream = random_blocks(3, b, b, seed=23).double()
    (fast,) = torch.autograd.grad(gsf.cayley(a), a, upstream)
    (dense,) = torch.autograd.grad(ref.cayley(a), a, upstream)
    torch.testing.assert_close(fast, dense, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(gsf.cayley, (random_blocks(2, 4, 4, seed=24).double().requires_grad_(),))


def test_cayley_gradient_is_float32_for_half_parameters():
    a = random_blocks(2, 20, 20, seed=25, dtype=torch.bfloat16).requires_grad_()
    gsf.cayley(a).sum().backward()
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad.float()).all()


def test_unknown_parametrization():
    with pytest.raises(ValueError, match="unknown parametrization 'qr'"):
        gsf.orthogonal_blocks(torch.zeros(1, 2, 2), "qr")


def truncated_cayley_series(a: torch.Tensor, num_terms: int) -> torch.Tensor:
    """``I + 2K + ... + 2K^(n-2) + K^(n-1)`` term by term with dense matrix powers (``(I + K)`` times the first
    ``n - 1`` terms of ``(I - K)^-1``'s Neumann series), float64."""
    k = (a.double() - a.double().mT) / 2
    eye = torch.eye(k.shape[-1], dtype=torch.float64)
    series = sum(torch.linalg.matrix_power(k, j) for j in range(num_terms - 1))
    return (eye + k) @ series


@pytest.mark.parametrize("num_terms", [2, 3, 4, 5, 6, 8, 9, 17])
def test_cayley_neumann_matches_the_truncated_series(num_terms):
    # num_terms - 1 a power of two (2, 3, 5, 9, 17) takes the product form, the others Horner's rule
    a = 0.3 * random_blocks(4, 7, 7, seed=30, dtype=torch.float64)
    got = gsf.cayley_neumann(a, num_terms)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, truncated_cayley_series(a, num_terms), rtol=1e-12, atol=1e-12)


def test_cayley_neumann_default_is_peft_ofts_series():
    # PEFT's OFT computes R = I + 2K + 2K^2 + 2K^3 + K^4 (5 terms) from the upper triangle of K; compare with it
    from peft.tuners.oft.layer import OFTRotationModule

    b = 6
    a = 0.2 * random_blocks(3, b, b, seed=31, dtype=torch.float64)
    k = gsf.skew(a)
    module = OFTRotationModule(r=3, n_elements=b * (b - 1) // 2, block_size=b, in_features=3 * b)
    peft_blocks = module._cayley_batch(k[:, module.rows, module.cols], b)  # its default: Neumann, 5 terms
    assert gsf.NUM_CAYLEY_NEUMANN_TERMS == 5
    torch.testing.assert_close(gsf.orthogonal_blocks(a, "cayley_neumann"), peft_blocks, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cayley_neumann_computes_in_float32(dtype):
    a = 0.05 * random_blocks(3, 8, 8, seed=32)
    got = gsf.cayley_neumann(a.to(dtype))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, truncated_cayley_series(a.to(dtype), 5).float(), rtol=1e-6, atol=1e-6)


def test_cayley_neumann_gradcheck():
    a = (0.3 * random_blocks(2, 5, 5, seed=33, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(gsf.cayley_neumann, (a,))
    assert torch.autograd.gradcheck(lambda p: gsf.cayley_neumann(p, 4), (a,))  # Horner's rule


# Entries of std 1e-3 .. 5e-2 bracket what trained blocks hold. The series is Cayley(K) (I - K^4), so
# |Q^T Q - I| <= 2 |K|^4 + |K|^8 and |Q - Cayley(K)| <= |K|^4 in the spectral norm (which bounds every entry).
@pytest.mark.parametrize("std", [1e-3, 1e-2, 5e-2])
@pytest.mark.parametrize("b", [16, 64])
def test_cayley_neumann_orthogonality_error_within_its_bound(std, b):
    a = std * random_blocks(8, b, b, seed=34, dtype=torch.float64)
    q = gsf.orthogonal_blocks(a, "cayley_neumann")
    norm = torch.linalg.matrix_norm(gsf.skew(a), ord=2)  # (8,)
    eye = torch.eye(b, dtype=torch.float64)
    orthogonality = torch.linalg.matrix_norm(q.mT @ q - eye, ord=2)
    distance = torch.linalg.matrix_norm(q - gsf.cayley(a), ord=2)
    assert (orthogonality <= 2 * norm**4 + norm**8 + 1e-14).all()
    assert (distance <= norm**4 + 1e-14).all()
    if std == 1e-3:  # near the identity (early training) the series is orthogonal to float32 rounding
        assert (q.mT @ q - eye).abs().max() < 1e-7


def test_cayley_neumann_rejects_too_few_terms():
    with pytest.raises(ValueError, match="num_cayley_neumann_terms must be an integer >= 2, got 1"):
        gsf.cayley_neumann(torch.zeros(1, 2, 2), 1)


def assert_orthogonal(q: torch.Tensor, tol: float = 1e-5) -> None:
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    torch.testing.assert_close(q @ q.T, eye, rtol=0, atol=tol)
    torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=tol)


@pytest.mark.parametrize(("r", "b"), GS_CASES)
@pytest.mark.parametrize("parametrization", ["cayley", "exp"])
def test_gs_matrix_orthogonal(r, b, parametrization):
    left = gsf.orthogonal_blocks(random_blocks(r, b, b, seed=1), parametrization)
    right = gsf.orthogonal_blocks(random_blocks(r, b, b, seed=2), parametrization)
    q = gsf.gs_matrix(left, right)
    assert q.dtype == torch.float32 and q.shape == (r * b, r * b)
    assert_orthogonal(q)
    if b > 1:  # 1 x 1 skew blocks are zero; larger random blocks really rotate
        assert not torch.allclose(q, torch.eye(r * b), atol=1e-2)


@pytest.mark.parametrize(("n", "nblocks", "m"), BOFT_CASES)
@pytest.mark.parametrize("parametrization", ["cayley", "exp"])
def test_boft_matrix_orthogonal(n, nblocks, m, parametrization):
    b = n // nblocks
    blocks = gsf.orthogonal_blocks(random_blocks(m, nblocks, b, b, seed=6), parametrization)
    gathers = gsf.boft_gathers([gsf.butterfly_permutation(n, nblocks, b, i) for i in range(m)])
    q = gsf.boft_apply(torch.eye(n), blocks, gathers).T  # column i is Q e_i
    assert_orthogonal(q)


@pytest.mark.parametrize(("r", "b"), [(3, 5), (8, 4), (4, 6)])
def test_identity_blocks_give_identity(r, b):
    eye = torch.eye(b).expand(r, b, b)
    assert torch.equal(gsf.gs_matrix(eye, eye), torch.eye(r * b))
    x = torch.randn(2, r * b)
    assert torch.equal(gsf.gs_apply(x, eye, eye), x)


# ---------------------------------------------------------------------------------------------------------------
# Fast multiplies == dense matrices built here
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("r", "b"), GS_CASES)
@pytest.mark.parametrize("transpose", [False, True])
def test_gs_apply_matches_dense(ref, assert_close, r, b, transpose):
    # Random (not orthogonal) blocks: every entry of L and R shows up in the product.
    left, right = random_blocks(r, b, b, seed=1), random_blocks(r, b, b, seed=2)
    q = ref.gsoft_matrix(left, right)
    x = torch.randn(2, 3, r * b)
    expected = row_apply(q.T if transpose else q, x)
    assert_close(gsf.gs_apply(x, left, right, transpose=transpose), expected)


@pytest.mark.parametrize(("r", "b"), GS_CASES)
@pytest.mark.parametrize("transpose", [False, True])
def test_gs_apply_backward_matches_dense(ref, r, b, transpose):
    # Q x and Q^T x run through hand-written backwards (_GSRotation, _GSRotationTransposed): their gradients must
    # be those of the dense product, for x and both block tensors, with a non-trivial upstream gradient (float64,
    # so the match is tight).
    left, right = (random_blocks(r, b, b, seed=s).double().requires_grad_() for s in (7, 8))
    x = torch.randn(5, r * b, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, r * b, dtype=torch.float64)
    q = ref.gsoft_matrix(left, right)
    fast = torch.autograd.grad(gsf.gs_apply(x, left, right, transpose=transpose), (x, left, right), upstream)
    dense = torch.autograd.grad(row_apply(q.T if transpose else q, x), (x, left, right), upstream)
    for got, want in zip(fast, dense):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("transpose", [False, True])
def test_gs_apply_gradcheck(transpose):
    left, right = (random_blocks(3, 4, 4, seed=s).double().requires_grad_() for s in (9, 10))
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: gsf.gs_apply(*t, transpose=transpose), (x, left, right))


@pytest.mark.parametrize("transpose", [False, True])
def test_gs_apply_accepts_non_contiguous_input(assert_close, transpose):
    left, right = random_blocks(4, 5, 5, seed=11), random_blocks(4, 5, 5, seed=12)
    x = torch.randn(20, 7).T  # (7, 20), a transposed view
    expected = gsf.gs_apply(x.contiguous(), left, right, transpose=transpose)
    assert_close(gsf.gs_apply(x, left, right, transpose=transpose), expected)


def test_gs_apply_under_autocast_runs_in_the_autocast_dtype():
    left, right = (random_blocks(4, 8, 8, seed=s).requires_grad_() for s in (13, 14))
    x = random_blocks(6, 32, seed=15).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gsf.gs_apply(x, left, right)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == left.grad.dtype == right.grad.dtype == torch.float32
    reference = gsf.gs_apply(x.detach(), left.detach(), right.detach())
    assert (y.float() - reference).norm() <= 0.02 * reference.norm()  # bf16 rounding, not a different product


# 2 x 3 tokens into 7 outputs: the forward rotates the tokens; 4 x 5: at least twice 7, it rotates the weight
GS_LINEAR_LEADS = pytest.mark.parametrize("lead", [(2, 3), (4, 5)], ids=["rotate-tokens", "rotate-weight"])


@pytest.mark.parametrize(("r", "b"), GS_CASES)
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@GS_LINEAR_LEADS
def test_gs_linear_matches_dense(ref, r, b, weight_grad, affine, lead):
    # gs_linear is s * F.linear(Q x, W) + bias in one node with its own backward: values and the gradients of x,
    # both block tensors, (when asked) W, and the scale and bias must be the dense product's (float64, tight).
    assert gsf.rotates_weight_forward(lead[0] * lead[1], 7) == (lead == (4, 5))
    left, right = (random_blocks(r, b, b, seed=s).double().requires_grad_() for s in (30, 31))
    weight = random_blocks(7, r * b, seed=32).double().requires_grad_(weight_grad)
    scale, bias = (random_blocks(7, seed=s).double().requires_grad_() if affine else None for s in (40, 41))
    x = torch.randn(*lead, r * b, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*lead, 7, dtype=torch.float64)
    inputs = [x, left, right] + [t for t in (weight, scale, bias) if t is not None and t.requires_grad]
    y = gsf.gs_linear(x, left, right, weight, scale, bias)
    dense_y = torch.nn.functional.linear(row_apply(ref.gsoft_matrix(left, right), x), weight)
    if affine:
        dense_y = dense_y * scale + bias
    torch.testing.assert_close(y, dense_y, rtol=1e-10, atol=1e-10)
    fast = torch.autograd.grad(y, inputs, upstream)
    dense = torch.autograd.grad(dense_y, inputs, upstream)
    for got, want in zip(fast, dense):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("use_scale", "use_bias"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("tokens", [4, 10], ids=["rotate-tokens", "rotate-weight"])
def test_gs_linear_gradcheck_with_scale_and_bias(use_scale, use_bias, tokens):
    left, right = (random_blocks(3, 4, 4, seed=s).double().requires_grad_() for s in (42, 43))
    weight = random_blocks(5, 12, seed=44).double()
    scale, bias = (random_blocks(5, seed=s).double().requires_grad_() for s in (45, 46))
    x = torch.randn(tokens, 12, dtype=torch.float64, requires_grad=True)

    def fn(x, left, right, scale, bias):
        return gsf.gs_linear(x, left, right, weight, scale if use_scale else None, bias if use_bias else None)

    assert torch.autograd.gradcheck(fn, (x, left, right, scale, bias))


@pytest.mark.parametrize(("r", "b"), GS_CASES)
@pytest.mark.parametrize("use_scale", [False, True])
def test_gs_rotate_weight_matches_dense(ref, r, b, use_scale):
    # diag(s) W Q (the weight a forward multiplies when it rotates the weight) and Q W (Double GSOFT's output side)
    left, right = (random_blocks(r, b, b, seed=s).double() for s in (50, 51))
    q = ref.gsoft_matrix(left, right)
    weight = random_blocks(6, r * b, seed=52).double()
    scale = random_blocks(6, seed=53).double() if use_scale else None
    expected = weight @ q if scale is None else scale[:, None] * (weight @ q)
    torch.testing.assert_close(gsf.gs_rotate_weight(weight, left, right, scale), expected, rtol=1e-12, atol=1e-12)
    tall = random_blocks(r * b, 5, seed=54).double()  # (out, d) with Q on out = r * b
    torch.testing.assert_close(gsf.gs_rotate_weight_columns(tall, left, right), q @ tall, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("tokens", "rotated"), [(13, False), (14, True)])
def test_gs_linear_rotates_the_weight_from_twice_its_rows_of_tokens(monkeypatch, tokens, rotated):
    calls = []
    real = gsf.gs_rotate_weight
    monkeypatch.setattr(gsf, "gs_rotate_weight", lambda *args: calls.append(1) or real(*args))
    left, right = (random_blocks(2, 4, 4, seed=s).requires_grad_() for s in (55, 56))
    weight, scale = random_blocks(7, 8, seed=57), random_blocks(7, seed=58).requires_grad_()
    x = torch.randn(tokens, 8, requires_grad=True)
    gsf.gs_linear(x, left, right, weight, scale).sum().backward()
    assert len(calls) == int(rotated)


def test_gs_linear_with_a_zero_scale_entry_keeps_its_input_and_rotates_the_tokens(monkeypatch, ref):
    # y = (y0 - b) / s cannot be undone where s is 0: the node keeps y0, which only the token-side forward has
    monkeypatch.setattr(gsf, "gs_rotate_weight", lambda *args: pytest.fail("rotated the weight"))
    left, right = (random_blocks(2, 4, 4, seed=s).double().requires_grad_() for s in (59, 60))
    weight, bias = random_blocks(3, 8, seed=61).double(), random_blocks(3, seed=62).double()
    scale = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(20, 3, dtype=torch.float64)
    y = gsf.gs_linear(x, left, right, weight, scale, bias)
    dense = torch.nn.functional.linear(row_apply(ref.gsoft_matrix(left, right), x), weight) * scale + bias
    for got, want in zip(torch.autograd.grad(y, (x, left, right, scale), upstream),
                         torch.autograd.grad(dense, (x, left, right, scale), upstream)):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("r", "b"), GS_CASES)
def test_gs_rotation_backward_from_output_matches_autograd(ref, r, b):
    # Double GSOFT's output side: the gradients of y = Q x from y itself (x never formed) equal autograd's
    left, right = (gsf.cayley(random_blocks(r, b, b, seed=s).double() * 0.3).requires_grad_() for s in (63, 64))
    x = torch.randn(9, r * b, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(9, r * b, dtype=torch.float64)
    y = row_apply(ref.gsoft_matrix(left, right), x)
    want = torch.autograd.grad(y, (x, left, right), upstream)
    got = gsf.gs_rotation_backward_from_output(upstream, y.detach(), left.detach(), right.detach(), (True,) * 3)
    for fast, dense in zip(got, want):
        torch.testing.assert_close(fast, dense, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Token chunks: on the CPU the token-sized batched matmuls run chunk by chunk, the blocks' gradients summed
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of the 16-row minimum (37 tokens run as 13 + 13 + 11); yields the chunk count of every loop run."""
    monkeypatch.setattr(gsf, "CPU_CHUNK_BYTES", 1)
    monkeypatch.setattr(gsf, "CPU_REDUCTION_CHUNK_BYTES", 1)
    counts, real = [], gsf._token_chunks
    monkeypatch.setattr(gsf, "_token_chunks", lambda *args: counts.append(len(chunks := real(*args))) or chunks)
    return counts


def test_token_chunks_cover_the_tokens_in_equal_cache_sized_pieces():
    chunks = gsf._token_chunks(torch.empty(4096, 640))  # 2 MiB: 819 rows of 640 floats, so 6 chunks of 683
    assert [stop - start for start, stop in chunks] == [683] * 5 + [681]
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])) and chunks[0][0] == 0 and chunks[-1][1] == 4096
    assert len(gsf._token_chunks(torch.empty(4096, 640, dtype=torch.bfloat16))) == 3  # half the bytes per row
    assert gsf._token_chunks(torch.empty(4096, 640, device="meta")) == [(0, 4096)]  # off the CPU: one range
    assert gsf._token_chunks(torch.empty(0, 640)) == [(0, 0)]


@pytest.mark.parametrize("out", [7, 40], ids=["rotate-weight", "rotate-tokens"])
def test_gs_linear_in_token_chunks_matches_dense(ref, small_chunks, out):
    left, right = (random_blocks(4, 10, 10, seed=s).double().requires_grad_() for s in (70, 71))
    weight = random_blocks(out, 40, seed=72).double().requires_grad_()
    scale, bias = (random_blocks(out, seed=s).double().requires_grad_() for s in (73, 74))
    x = torch.randn(37, 40, dtype=torch.float64, requires_grad=True)
    assert gsf._token_chunks(x) == [(0, 13), (13, 26), (26, 37)] and gsf.rotates_weight_forward(37, out) == (out == 7)
    small_chunks.clear()
    upstream = torch.randn(37, out, dtype=torch.float64)
    inputs = (x, left, right, weight, scale, bias)
    y = gsf.gs_linear(x, left, right, weight, scale, bias)
    dense_y = torch.nn.functional.linear(row_apply(ref.gsoft_matrix(left, right), x), weight) * scale + bias
    torch.testing.assert_close(y, dense_y, rtol=1e-10, atol=1e-10)
    for got, want in zip(torch.autograd.grad(y, inputs, upstream), torch.autograd.grad(dense_y, inputs, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # forward on the weight's 7 rows (one chunk) or on the tokens, then the scale's reductions, Q x recomputed for
    # the weight's gradient and the rotation's backward
    assert small_chunks == ([1] if out == 7 else [3]) + [3] * 3


def test_gs_linear_in_token_chunks_under_autocast_stays_close_to_float32(small_chunks):
    # bf16 chunks (their partial sums of the block, scale and bias gradients added in float32): the values and the
    # gradients are bf16 rounding away from float32's, and the gradients come back in the parameters' float32
    left, right = (random_blocks(4, 10, 10, seed=s).requires_grad_() for s in (78, 79))
    weight = random_blocks(40, 40, seed=80)
    scale, bias = (random_blocks(40, seed=s).requires_grad_() for s in (81, 82))
    x = random_blocks(37, 40, seed=83).requires_grad_()
    upstream = random_blocks(37, 40, seed=84)
    inputs = (x, left, right, scale, bias)
    want = torch.autograd.grad(gsf.gs_linear(x, left, right, weight, scale, bias), inputs, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gsf.gs_linear(x, left, right, weight, scale, bias)
    assert y.dtype == torch.bfloat16 and small_chunks[0] == 3
    assert (y.float() - gsf.gs_linear(x, left, right, weight, scale, bias)).norm() <= 0.02 * y.float().norm()
    for got, reference in zip(torch.autograd.grad(y, inputs, upstream.bfloat16()), want):
        assert got.dtype == torch.float32
        assert (got - reference).norm() <= 0.02 * reference.norm()


def test_gs_rotations_in_token_chunks_match_dense(ref, small_chunks):
    # Q x with its kept intermediate, Q's backward recomputing it, Double GSOFT's backward from the output, and
    # Q W on a weight's 37 columns: every chunked path against the dense product
    left, right = (gsf.cayley(random_blocks(4, 10, 10, seed=s).double() * 0.3).requires_grad_() for s in (75, 76))
    q = ref.gsoft_matrix(left, right)
    x = torch.randn(37, 40, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(37, 40, dtype=torch.float64)
    y, dense_y = gsf.gs_apply(x, left, right), row_apply(q, x)
    torch.testing.assert_close(y, dense_y, rtol=1e-10, atol=1e-10)
    want = torch.autograd.grad(dense_y, (x, left, right), upstream)
    blocks = (left.detach(), right.detach())
    for got in (
        torch.autograd.grad(y, (x, left, right), upstream),
        gsf.gs_rotation_backward(upstream, x.detach(), *blocks, (True,) * 3),
        gsf.gs_rotation_backward_from_output(upstream, dense_y.detach(), *blocks, (True,) * 3),
    ):
        for fast, dense in zip(got, want):
            torch.testing.assert_close(fast, dense, rtol=1e-10, atol=1e-10)
    tall = random_blocks(40, 37, seed=77).double()
    torch.testing.assert_close(gsf.gs_rotate_weight_columns(tall, *blocks), q @ tall, rtol=1e-12, atol=1e-12)
    assert small_chunks == [3] * 5


def test_gs_linear_gradcheck():
    left, right = (random_blocks(3, 4, 4, seed=s).double().requires_grad_() for s in (33, 34))
    weight = random_blocks(5, 12, seed=35).double().requires_grad_()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gsf.gs_linear, (x, left, right, weight))


def test_gs_linear_under_autocast_and_non_contiguous_input():
    left, right = (random_blocks(4, 8, 8, seed=s).requires_grad_() for s in (36, 37))
    weight = random_blocks(16, 32, seed=38)
    x = random_blocks(32, 6, seed=39).T.requires_grad_()  # (6, 32), a transposed view
    expected = torch.nn.functional.linear(gsf.gs_apply(x.detach(), left.detach(), right.detach()), weight)
    torch.testing.assert_close(gsf.gs_linear(x.detach(), left, right, weight), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gsf.gs_linear(x, left, right, weight)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == left.grad.dtype == right.grad.dtype == torch.float32
    assert (y.float() - expected).norm() <= 0.02 * expected.norm()  # bf16 rounding, not a different product


@pytest.mark.parametrize(("r", "b"), GS_CASES)
def test_gs_matrix_matches_dense(ref, assert_close, r, b):
    left, right = random_blocks(r, b, b, seed=3), random_blocks(r, b, b, seed=4)
    assert_close(gsf.gs_matrix(left, right), ref.gsoft_matrix(left, right).float())


@pytest.mark.parametrize(("k", "b_out", "b_in"), [(1, 3, 3), (4, 3, 2), (3, 2, 5), (6, 1, 1)])
def test_block_diag_apply_matches_dense(ref, assert_close, k, b_out, b_in):
    blocks = random_blocks(k, b_out, b_in, seed=5)
    x = torch.randn(2, 3, k * b_in)
    assert_close(gsf.block_diag_apply(x, blocks), row_apply(ref.block_diag(blocks), x))


def randperm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


# General GS class A = P_{m+1} B_m P_m ... B_1 P_1: the block shapes (k, b_out, b_in) of each factor, and which
# permutations are random ("p") or identity (None). Rectangular chains: 8 -> 12 -> 6 and 6 -> 6 -> 10.
GS_MULTIPLY_CASES = [
    ([(4, 3, 3)], ["p", "p"]),
    ([(4, 3, 2)], [None, "p"]),
    ([(4, 3, 2), (3, 2, 4)], ["p", "p", "p"]),
    ([(2, 3, 3), (3, 5, 2)], [None, "p", None]),
    ([(3, 2, 2), (2, 3, 3), (6, 2, 1), (4, 3, 3)], ["p", "p", None, "p", "p"]),
]


def _general_gs(factors, perm_spec):
    blocks = [random_blocks(*shape, seed=10 + i) for i, shape in enumerate(factors)]
    dims = [factors[0][0] * factors[0][2]] + [k * b_out for k, b_out, _ in factors]
    gathers = [None if spec is None else randperm(dims[i], seed=20 + i) for i, spec in enumerate(perm_spec)]
    return blocks, gathers, dims


def _dense_general_gs(ref, blocks, gathers, dims):
    a = ref.gather_matrix(gathers[0], dims[0])
    for i, factor in enumerate(blocks):
        a = ref.gather_matrix(gathers[i + 1], dims[i + 1]) @ ref.block_diag(factor) @ a
    return a


@pytest.mark.parametrize(("factors", "perm_spec"), GS_MULTIPLY_CASES)
def test_gs_multiply_matches_dense(ref, assert_close, factors, perm_spec):
    blocks, gathers, dims = _general_gs(factors, perm_spec)
    dense = _dense_general_gs(ref, blocks, gathers, dims)
    assert dense.shape == (dims[-1], dims[0])
    x = torch.randn(2, 3, dims[0])
    assert_close(gsf.gs_multiply(x, blocks, gathers), row_apply(dense, x))
    assert_close(gsf.gs_multiply_matrix(blocks, gathers), dense.float())


def test_gs_multiply_needs_one_more_permutation_than_factors():
    with pytest.raises(ValueError, match="2 block factors need 3 permutations, got 2"):
        gsf.gs_multiply(torch.zeros(4), [torch.zeros(2, 2, 2)] * 2, [None, None])


def test_gs_apply_is_the_two_factor_gs_class(assert_close):
    # GSOFT's Q = P^T L P R is GS(P^T, P, I): the same numbers through the general multiply.
    r, b = 6, 4
    left, right = random_blocks(r, b, b, seed=7), random_blocks(r, b, b, seed=8)
    p = gsf.permutation_gather_index(gsf.shuffle_permutation(r, r * b))
    x = torch.randn(5, r * b)
    assert_close(gsf.gs_multiply(x, [right, left], [None, p, torch.argsort(p)]), gsf.gs_apply(x, left, right))


@pytest.mark.parametrize(("n", "nblocks", "m"), BOFT_CASES)
@pytest.mark.parametrize("transpose", [False, True])
def test_boft_apply_matches_dense(ref, assert_close, n, nblocks, m, transpose):
    b = n // nblocks
    blocks = random_blocks(m, nblocks, b, b, seed=9)
    perms = [gsf.butterfly_permutation(n, nblocks, b, i) for i in range(m)]
    q = ref.boft_matrix(blocks, perms)
    gathers = gsf.boft_gathers(perms)
    assert len(gathers) == m + 1
    x = torch.randn(2, 3, n)
    apply = gsf.boft_apply_transposed if transpose else gsf.boft_apply
    assert_close(apply(x, blocks, gathers), row_apply(q.T if transpose else q, x))


# ---------------------------------------------------------------------------------------------------------------
# Density
# ---------------------------------------------------------------------------------------------------------------


def nonzero_fraction(a: torch.Tensor) -> float:
    return (a != 0).sum().item() / a.numel()


@pytest.mark.parametrize(("r", "b"), [(8, 2), (6, 4), (16, 4), (9, 3), (32, 10), (5, 1)])
def test_two_factor_density_is_b_over_r_when_b_lt_r(r, b):
    q = gsf.gs_matrix(random_blocks(r, b, b, seed=1, dtype=torch.float64), random_blocks(r, b, b, seed=2).double())
    assert nonzero_fraction(q) == pytest.approx(b / r, abs=1e-12)


@pytest.mark.parametrize(("r", "b"), [(1, 4), (2, 8), (4, 4), (3, 5), (4, 6), (10, 32)])
def test_two_factor_dense_when_b_ge_r(r, b):
    q = gsf.gs_matrix(random_blocks(r, b, b, seed=1, dtype=torch.float64), random_blocks(r, b, b, seed=2).double())
    assert nonzero_fraction(q) == 1.0


@pytest.mark.parametrize(("block_size", "nblocks", "expected"), [
    (4, 1, 1), (2, 2, 2), (8, 2, 2), (4, 4, 2), (5, 4, 2), (4, 8, 3), (3, 9, 3), (2, 8, 4), (3, 10, 4), (10, 32, 3),
])  # fmt: skip
def test_gs_density_factor_count_values(block_size, nblocks, expected):
    assert gsf.gs_density_factor_count(block_size, nblocks) == expected


def _m_factor_gs(b: int, r: int, m: int) -> torch.Tensor:
    """Dense A = B_m P B_{m-1} P ... P B_1 with P = P(r, r*b) and random b x b blocks (float64)."""
    d = r * b
    p = gsf.permutation_gather_index(gsf.shuffle_permutation(r, d))
    blocks = [random_blocks(r, b, b, seed=30 + i, dtype=torch.float64) for i in range(m)]
    return gsf.gs_multiply_matrix(blocks, [None] + [p] * (m - 1) + [None])


@pytest.mark.parametrize(("block_size", "nblocks"), [(2, 2), (4, 4), (5, 4), (4, 8), (3, 9), (2, 8), (3, 10), (2, 16)])
def test_m_factor_density_threshold(block_size, nblocks):
    m = gs_m = gsf.gs_density_factor_count(block_size, nblocks)
    assert nonzero_fraction(_m_factor_gs(block_size, nblocks, m)) == 1.0
    assert nonzero_fraction(_m_factor_gs(block_size, nblocks, gs_m - 1)) < 1.0


def test_density_factor_count_rejects_unit_blocks():
    with pytest.raises(ValueError, match="blocks of size 1"):
        gsf.gs_density_factor_count(1, 4)
