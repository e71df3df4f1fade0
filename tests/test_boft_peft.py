"""Our BOFT (on the GS core) against PEFT's own BOFT math: permutations, rotation, output, merge, parameter count.

PEFT's multi-factor BOFT forward needs its CUDA extension; without it PEFT silently drops to one factor. So the
rotation is composed here in plain torch from PEFT's own methods (``block_butterfly_perm``, ``perm2mat``,
``cayley_batch``) exactly as PEFT's forward composes it. ``get_fbd_cuda`` is stubbed to a truthy value so PEFT
builds all ``m`` factors (``boft_R`` and ``boft_P``) without trying to compile anything.
"""

import pytest
import torch
from torch import nn

from dreambooth_gs import GSOFTConfig, GSOFTLinear
from dreambooth_gs.gs import functional as gsf

peft_boft = pytest.importorskip("peft.tuners.boft.layer")
BOFTConfig = pytest.importorskip("peft").BOFTConfig

# (in_features, out_features, nblocks, block_size, n_butterfly_factor, bias)
CASES = [
    (64, 48, 8, None, 3, True),
    (32, 32, 4, None, 2, False),
    (32, 16, None, 4, 3, True),
    (48, 24, 8, None, 4, True),
    (64, 64, 16, None, 1, True),
    (16, 8, 2, None, 2, False),
]
ids = [f"in{c[0]}-out{c[1]}-" + (f"r{c[2]}" if c[2] else f"b{c[3]}") + f"-m{c[4]}" for c in CASES]


def make_peft_layer(monkeypatch, d_in, d_out, nblocks, block_size, m, bias, cuda_stub=True):
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: object() if cuda_stub else None)
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=bias)
    if bias:
        nn.init.normal_(base.bias)
    config = BOFTConfig(
        boft_block_num=nblocks or 0, boft_block_size=block_size or 0, boft_n_butterfly_factor=m,
        init_weights=False, target_modules=["proj"],
    )  # fmt: skip
    layer = peft_boft.Linear(base, "default", config=config)  # init_weights=False: R ~ N(0, 0.1), s ~ N(1, 0.1)
    return layer


def peft_permutations(layer) -> list[list[int]]:
    m, r, b, _ = layer.boft_R["default"].shape
    return [layer.block_butterfly_perm(layer.in_features, r // 2**i, b // 2, m - 1).tolist() for i in range(m)]


def peft_rotation(layer) -> torch.Tensor:
    """PEFT's ``boft_rotation`` (PEFT computes ``x @ boft_rotation``), composed as its forward does."""
    boft_r = layer.boft_R["default"].detach()
    m, r, b, _ = boft_r.shape
    perms = torch.stack([layer.perm2mat(p) for p in peft_permutations(layer)])  # (m, n, n)
    blocks = layer.cayley_batch(boft_r.reshape(m * r, b, b)).view(m, r, b, b)
    block_diagonal = torch.stack([torch.block_diag(*blocks[i].unbind(0)) for i in range(m)])  # (m, n, n)
    factors = torch.bmm(perms, torch.bmm(block_diagonal, perms.permute(0, 2, 1)))  # P_i D_i P_i^T
    rotation = factors[0]
    for i in range(1, m):
        rotation = factors[i] @ rotation
    return rotation


def peft_output(layer, x: torch.Tensor) -> torch.Tensor:
    """PEFT's forward given the rotation: base(x @ R), bias taken out, scaled by s, bias put back."""
    base = layer.get_base_layer()
    result = base(x @ peft_rotation(layer))
    if base.bias is not None:
        result = result - base.bias
    result = result * layer.boft_s["default"].detach().squeeze(-1)
    if base.bias is not None:
        result = result + base.bias
    return result


def our_layer_like(peft_layer, nblocks, block_size, m) -> GSOFTLinear:
    base = peft_layer.get_base_layer()
    ours_base = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    ours_base.load_state_dict(base.state_dict())
    config = GSOFTConfig(method="boft", nblocks=nblocks, block_size=block_size, n_butterfly_factor=m)
    layer = GSOFTLinear(ours_base, config, name="proj")
    with torch.no_grad():
        layer.gsoft_butterfly.copy_(peft_layer.boft_R["default"])
        layer.gsoft_s.copy_(peft_layer.boft_s["default"].squeeze(-1))
    return layer


@pytest.mark.parametrize(("d_in", "d_out", "nblocks", "block_size", "m", "bias"), CASES, ids=ids)
def test_permutations_match_peft(monkeypatch, d_in, d_out, nblocks, block_size, m, bias):
    peft_layer = make_peft_layer(monkeypatch, d_in, d_out, nblocks, block_size, m, bias)
    _, r, b, _ = peft_layer.boft_R["default"].shape
    perms = peft_permutations(peft_layer)
    # What we compose from PEFT's methods is what PEFT stores in its boft_P buffer.
    assert torch.equal(torch.stack([peft_layer.perm2mat(p) for p in perms]), peft_layer.boft_P)
    for i, perm in enumerate(perms):
        assert gsf.butterfly_permutation(d_in, r, b, i).tolist() == perm, f"factor {i}"


@pytest.mark.parametrize(("d_in", "d_out", "nblocks", "block_size", "m", "bias"), CASES, ids=ids)
@pytest.mark.parametrize("forward_mode", ["activation", "weight"])
def test_output_matches_peft_formula(monkeypatch, assert_close, d_in, d_out, nblocks, block_size, m, bias,
                                     forward_mode):  # fmt: skip
    peft_layer = make_peft_layer(monkeypatch, d_in, d_out, nblocks, block_size, m, bias)
    ours = our_layer_like(peft_layer, nblocks, block_size, m)
    ours.forward_mode = forward_mode
    x = torch.randn(3, 4, d_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_output(peft_layer, x)
        assert not torch.allclose(expected, peft_layer.get_base_layer()(x), atol=1e-2)  # the adapter does act
        assert_close(ours(x), expected)
        # Our Q (column convention, Q x) is the transpose of PEFT's row-convention rotation.
        q = gsf.boft_apply(torch.eye(d_in), ours.orthogonal_factors()["gsoft_butterfly"], ours._boft_gathers()).T
        assert_close(q, peft_rotation(peft_layer).T)


@pytest.mark.parametrize(("d_in", "d_out", "nblocks", "block_size", "m", "bias"), CASES, ids=ids)
def test_merged_weight_matches_peft_merge_formula(monkeypatch, assert_close, d_in, d_out, nblocks, block_size, m,
                                                  bias):  # fmt: skip
    peft_layer = make_peft_layer(monkeypatch, d_in, d_out, nblocks, block_size, m, bias)
    ours = our_layer_like(peft_layer, nblocks, block_size, m)
    weight = peft_layer.get_base_layer().weight.detach()
    # PEFT's merge: W' = (R_rot @ W^T)^T * s
    expected = (peft_rotation(peft_layer) @ weight.T).T * peft_layer.boft_s["default"].detach()
    assert_close(ours.merged_weight(), expected)


@pytest.mark.parametrize(("d_in", "d_out", "nblocks", "block_size", "m", "bias"), CASES, ids=ids)
def test_parameter_count_matches_peft(monkeypatch, d_in, d_out, nblocks, block_size, m, bias):
    peft_layer = make_peft_layer(monkeypatch, d_in, d_out, nblocks, block_size, m, bias)
    ours = GSOFTLinear(
        nn.Linear(d_in, d_out, bias=bias),
        GSOFTConfig(method="boft", nblocks=nblocks, block_size=block_size, n_butterfly_factor=m),
    )
    assert ours.gsoft_butterfly.shape == peft_layer.boft_R["default"].shape
    assert ours.gsoft_s.numel() == peft_layer.boft_s["default"].numel() == d_out
    peft_count = sum(p.numel() for n, p in peft_layer.named_parameters() if "boft_" in n)
    assert sum(p.numel() for p in ours.adapter_parameters()) == peft_count


@pytest.mark.parametrize("bias", [True, False])
def test_single_factor_matches_peft_forward_and_merge(monkeypatch, assert_close, bias):
    # With one factor (OFT) PEFT's CPU path runs, so its real forward and merge are the reference.
    peft_layer = make_peft_layer(monkeypatch, 32, 24, 4, None, 1, bias, cuda_stub=False)
    assert not peft_layer.fbd_cuda_available
    ours = our_layer_like(peft_layer, 4, None, 1)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_layer(x)
        assert_close(expected, peft_output(peft_layer, x))  # our composition of PEFT's math is PEFT's forward
        assert_close(ours(x), expected)
        peft_layer.merge()
        assert_close(ours.merged_weight(), peft_layer.get_base_layer().weight)
