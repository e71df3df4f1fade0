"""lowrank: truncated SVD factors, the closed-form (Eckart-Young) errors and the rank an error budget needs."""

import pytest
import torch

from dreambooth_gs.export.lowrank import (
    error_curve,
    low_rank,
    rank_for_error,
    relative_error,
    singular_values,
    tail_errors,
)


def _matrix(out: int, inp: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, inp, generator=g).double()


# (id, matrix, rank asked) -> the factors' shapes, the rank kept and the error the factors reach
CASES = [
    ("tall-low", lambda: _matrix(12, 8, 8), 3),
    ("wide-capped", lambda: _matrix(6, 10, 6), 50),  # asks for more than min(out, in) = 6: capped, exact
    ("rank-deficient-exact", lambda: _matrix(16, 16, 4), 4),  # a rank-4 matrix at rank 4: exact
]


@pytest.mark.parametrize(("make", "rank"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_factors_reach_the_eckart_young_error(make, rank):
    delta = make()
    f = low_rank(delta, rank=rank)
    kept = min(rank, min(delta.shape))
    assert f.rank == kept and f.full_rank == min(delta.shape)
    assert f.up.shape == (delta.shape[0], kept) and f.down.shape == (kept, delta.shape[1])
    s = torch.linalg.svdvals(delta)
    expected = float((s[kept:].square().sum() / s.square().sum()).sqrt())
    assert relative_error(delta, f.up @ f.down) == pytest.approx(expected, abs=1e-10)
    assert f.predicted_error == pytest.approx(expected, abs=1e-10)
    torch.testing.assert_close(f.up.norm(), f.down.norm(), rtol=1e-10, atol=0)  # sqrt(S) on both sides


def test_max_error_gives_the_smallest_sufficient_rank():
    values = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    errors = tail_errors(values)  # e[r] = sqrt(sum_{i >= r} s_i^2 / sum s_i^2)
    assert errors[0] == 1 and errors[-1] == 0 and torch.all(errors[:-1] > errors[1:])
    for r in range(1, len(values) + 1):
        assert rank_for_error(values, float(errors[r])) == r  # the budget is met exactly at rank r ...
    for r in range(1, len(values)):
        assert rank_for_error(values, float(errors[r]) - 1e-6) == r + 1  # ... and a tighter one needs r + 1
    assert rank_for_error(torch.zeros(3), 0.1) == 0
    with pytest.raises(ValueError, match=r"max_error must be in \[0, 1\)"):
        rank_for_error(values, 1.0)


def test_error_curve_weights_modules_by_their_norm():
    big, small = _matrix(10, 10, 10, seed=1) * 10, _matrix(6, 4, 4, seed=2)
    curve = error_curve([singular_values(big), singular_values(small)], [1, 4, 10])
    for r, total in zip([1, 4, 10], curve):
        approx = [low_rank(m, rank=r) for m in (big, small)]
        err2 = sum(float((m - f.up @ f.down).square().sum()) for m, f in zip((big, small), approx))
        assert total == pytest.approx((err2 / float(big.square().sum() + small.square().sum())) ** 0.5, abs=1e-10)
    assert curve[-1] == pytest.approx(0, abs=1e-12)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        low_rank(torch.eye(3), rank=1, max_error=0.1)
    with pytest.raises(ValueError, match="positive integer"):
        low_rank(torch.eye(3), rank=0)
    assert relative_error(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0
