"""GSOFTLinear: identity at init, activation-side == weight-side == merged == dense reference, dtypes, gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dreambooth_gs import GSOFTConfig, GSOFTLinear
from dreambooth_gs.gs import functional as gsf
from dreambooth_gs.gs.layers import choose_forward_side

# (id, config kwargs, in_features, out_features): every method, nblocks / block_size, b dividing r and not, sparse.
LAYER_CASES = [
    ("gsoft-r4", {"method": "gsoft", "nblocks": 4}, 32, 24),
    ("gsoft-b8", {"method": "gsoft", "block_size": 8}, 32, 24),
    ("gsoft-r8-sparse", {"method": "gsoft", "nblocks": 8}, 32, 16),
    ("gsoft-r3b5", {"method": "gsoft", "nblocks": 3}, 15, 10),
    ("gsoft-exp", {"method": "gsoft", "nblocks": 4, "parametrization": "exp"}, 32, 24),
    ("gsoft-noscale", {"method": "gsoft", "nblocks": 4, "scale": False}, 32, 24),
    ("double-r4", {"method": "double_gsoft", "nblocks": 4}, 32, 48),
    ("double-b8", {"method": "double_gsoft", "block_size": 8}, 32, 48),
    ("double-r2-b3b5", {"method": "double_gsoft", "nblocks": 2}, 6, 10),
    ("double-exp-noscale", {"method": "double_gsoft", "nblocks": 4, "parametrization": "exp", "scale": False}, 16, 8),
    ("boft-r4m2", {"method": "boft", "nblocks": 4, "n_butterfly_factor": 2}, 32, 24),
    ("boft-r8m3", {"method": "boft", "nblocks": 8, "n_butterfly_factor": 3}, 32, 16),
    ("boft-b4m2", {"method": "boft", "block_size": 4, "n_butterfly_factor": 2}, 32, 32),
    ("boft-r4m1", {"method": "boft", "nblocks": 4, "n_butterfly_factor": 1}, 24, 12),
    ("boft-exp", {"method": "boft", "nblocks": 4, "n_butterfly_factor": 3, "parametrization": "exp"}, 16, 8),
]
DTYPES = [torch.float32, torch.bfloat16]

cases = pytest.mark.parametrize(
    ("kwargs", "d_in", "d_out"), [c[1:] for c in LAYER_CASES], ids=[c[0] for c in LAYER_CASES]
)
biases = pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])


def make_layer(kwargs, d_in, d_out, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    if bias:  # nonzero bias so that bias handling shows
        nn.init.normal_(base.bias)
    base.requires_grad_(False)
    return GSOFTLinear(base, GSOFTConfig(**kwargs), name="block.proj")


def inputs(d_in, dtype, seed=1, tokens=5):
    return torch.randn(2, tokens, d_in, generator=torch.Generator().manual_seed(seed)).to(dtype)


# 2 x 5 tokens: fewer than twice any case's out_features, so an activation-side forward rotates the tokens; 2 x 64:
# more than twice all of them, so it rotates the weight (gsf.rotates_weight_forward); backward is the same either way
token_counts = pytest.mark.parametrize("tokens", [5, 64], ids=["rotate-tokens", "rotate-weight"])


def reference_weight(ref, layer, weight):
    """diag(s) Q_out W Q_in in float64 from the layer's raw parameters and dense matrices built in the test."""

    def blocks(a):
        if layer.parametrization == "cayley":
            return ref.cayley(a.detach())
        k = (a.detach().double() - a.detach().double().mT) / 2
        return torch.linalg.matrix_exp(k)

    w = weight.double()
    if layer.method == "gsoft":
        w = w @ ref.gsoft_matrix(blocks(layer.gsoft_L), blocks(layer.gsoft_R))
    elif layer.method == "double_gsoft":
        q_in = ref.gsoft_matrix(blocks(layer.gsoft_in_L), blocks(layer.gsoft_in_R))
        q_out = ref.gsoft_matrix(blocks(layer.gsoft_out_L), blocks(layer.gsoft_out_R))
        w = q_out @ w @ q_in
    else:
        m, r, b, _ = layer.gsoft_butterfly.shape
        perms = [gsf.butterfly_permutation(r * b, r, b, i) for i in range(m)]
        w = w @ ref.boft_matrix(blocks(layer.gsoft_butterfly), perms)
    if layer.gsoft_s is not None:
        w = w * layer.gsoft_s.detach().double()[:, None]
    return w


def forward(layer, x, mode):
    layer.forward_mode = mode
    with torch.no_grad():
        return layer(x)


@cases
@biases
@dtypes
def test_identity_at_init(assert_close, kwargs, d_in, d_out, bias, dtype):
    layer = make_layer(kwargs, d_in, d_out, bias, dtype)
    x = inputs(d_in, dtype)
    with torch.no_grad():
        expected = layer.base_layer(x)
    for mode in ("activation", "weight"):
        assert_close(forward(layer, x, mode), expected, dtype)
    assert torch.equal(layer.merged_weight(), layer.base_layer.weight)


@cases
@biases
@dtypes
@token_counts
def test_forward_paths_agree_with_merge_and_dense_reference(ref, assert_close, randomize_adapter, kwargs, d_in, d_out,
                                                             bias, dtype, tokens):  # fmt: skip
    layer = make_layer(kwargs, d_in, d_out, bias, dtype)
    randomize_adapter(layer, seed=2)
    original = layer.base_layer.weight.detach().clone()
    x = inputs(d_in, dtype, tokens=tokens)
    assert gsf.rotates_weight_forward(2 * tokens, d_out) == (tokens == 64)
    # Reference: F.linear with the dense diag(s) Q_out W Q_in, in float64.
    bias_ref = layer.base_layer.bias.double() if bias else None
    expected = F.linear(x.double(), reference_weight(ref, layer, original), bias_ref)
    activation, weight_side = forward(layer, x, "activation"), forward(layer, x, "weight")
    assert activation.dtype == weight_side.dtype == dtype
    assert not torch.allclose(activation.float(), layer.base_layer(x).float(), atol=1e-2)  # the adapter does act
    assert_close(activation, weight_side, dtype)
    assert_close(activation, expected, dtype)
    assert_close(layer.merged_weight(), reference_weight(ref, layer, original), dtype)

    layer.merge()
    assert layer.merged
    merged = forward(layer, x, "activation")
    assert merged.dtype == dtype
    assert_close(merged, activation, dtype)
    assert_close(layer.base_layer.weight, reference_weight(ref, layer, original), dtype)

    layer.unmerge()
    assert not layer.merged
    assert layer.base_layer.weight.dtype == dtype
    assert_close(layer.base_layer.weight, original, dtype)
    assert_close(forward(layer, x, "activation"), activation, dtype)


@cases
def test_auto_mode_matches_explicit_modes(assert_close, randomize_adapter, kwargs, d_in, d_out):
    layer = make_layer(kwargs, d_in, d_out)
    randomize_adapter(layer, seed=3)
    for n_tokens in (1, 4096):  # small inputs pick one side, large ones the other (see choose_forward_side)
        x = torch.randn(n_tokens, d_in)
        assert_close(forward(layer, x, "auto"), forward(layer, x, "activation"))


@cases
def test_gradients_agree_between_sides(assert_close, randomize_adapter, kwargs, d_in, d_out):
    grads = {}
    for mode in ("activation", "weight"):
        layer = make_layer(kwargs, d_in, d_out)
        randomize_adapter(layer, seed=4)
        layer.forward_mode = mode
        x = inputs(d_in, torch.float32)
        upstream = torch.randn(2, 5, d_out, generator=torch.Generator().manual_seed(5))
        (layer(x) * upstream).sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in layer.named_parameters() if n.startswith("gsoft_")}
        assert layer.base_layer.weight.grad is None
    assert grads["activation"].keys() == grads["weight"].keys()
    for name, grad in grads["activation"].items():
        assert grad.abs().max() > 0, name
        assert_close(grads["weight"][name], grad)


@cases
@dtypes
def test_parameters_are_fp32_with_gsoft_prefix(kwargs, d_in, d_out, dtype):
    layer = make_layer(kwargs, d_in, d_out, dtype=dtype)
    config = GSOFTConfig(**kwargs)
    r = config.blocks_for(d_in)
    b = d_in // r
    if config.method == "gsoft":
        expected = {"gsoft_L": (r, b, b), "gsoft_R": (r, b, b)}
    elif config.method == "double_gsoft":
        r_out = config.blocks_for(d_out)
        b_out = d_out // r_out
        expected = {"gsoft_in_L": (r, b, b), "gsoft_in_R": (r, b, b),
                    "gsoft_out_L": (r_out, b_out, b_out), "gsoft_out_R": (r_out, b_out, b_out)}  # fmt: skip
    else:
        expected = {"gsoft_butterfly": (config.n_butterfly_factor, r, b, b)}
    if config.scale:
        expected["gsoft_s"] = (d_out,)
    own = {n: p for n, p in layer.named_parameters(recurse=False)}
    assert {n: tuple(p.shape) for n, p in own.items()} == expected
    assert all(p.dtype == torch.float32 for p in own.values())
    assert layer.base_layer.weight.dtype == dtype
    frozen = {n for n, _ in layer.named_parameters() if not n.startswith("gsoft_")}
    assert frozen <= {"base_layer.weight", "base_layer.bias"}
    # Permutations are derived, never state.
    assert all(not k.startswith("boft_gather") for k in layer.state_dict())


@pytest.mark.parametrize(("kwargs", "d_in", "d_out", "match"), [
    ({"nblocks": 4}, 30, 32,
     r"nblocks=4 does not divide in_features=30 of block\.proj; valid block counts: 1, 2, 3, 5, 6, 10, 15, 30$"),
    ({"block_size": 8}, 30, 32,
     r"block_size=8 does not divide in_features=30 of block\.proj; valid block sizes: 1, 2, 3, 5, 6, 10, 15, 30$"),
    ({"method": "double_gsoft", "nblocks": 4}, 32, 30, r"nblocks=4 does not divide out_features=30 of block\.proj"),
    ({"method": "boft", "block_size": 4, "n_butterfly_factor": 3}, 24, 24,
     r"BOFT with 3 butterfly factors .* divisible by 4; block\.proj \(in_features=24\) gets 6 blocks of size 4"),
    ({"method": "boft", "nblocks": 4, "n_butterfly_factor": 2}, 12, 12,
     r"even block size .* block\.proj \(in_features=12\) gets 4 blocks of size 3"),
])  # fmt: skip
def test_dimension_errors_name_the_module(kwargs, d_in, d_out, match):
    with pytest.raises(ValueError, match=match):
        make_layer(kwargs, d_in, d_out)


def test_gsoft_ignores_out_features_divisibility():
    layer = make_layer({"nblocks": 4}, 32, 30)  # only Q_in: out_features need not divide
    assert layer.gsoft_s.shape == (30,)


def test_unmerge_refuses_zero_scale():
    layer = make_layer({"nblocks": 4}, 16, 8)
    with torch.no_grad():
        layer.gsoft_s[3] = 0
    layer.merge()
    with pytest.raises(ValueError, match="gsoft_s has zero entries"):
        layer.unmerge()


def test_merge_is_idempotent_and_disable_gives_base(randomize_adapter):
    layer = make_layer({"method": "double_gsoft", "nblocks": 4}, 16, 8)
    randomize_adapter(layer, seed=6)
    x = inputs(16, torch.float32)
    base_out = layer.base_layer(x)
    layer.adapter_enabled = False
    assert torch.equal(layer(x), base_out)
    layer.adapter_enabled = True
    layer.merge()
    once = layer.base_layer.weight.clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once)
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer(x), forward(layer, x, "weight"))


@pytest.mark.parametrize(("n_tokens", "d_in", "d_out", "double", "needs_grad", "expected"), [
    (1, 32, 32, False, False, "activation"),
    (1, 320, 320, True, True, "activation"),
    (100_000, 32, 32, False, False, "weight"),
    (100_000, 64, 64, True, False, "weight"),
])  # fmt: skip
def test_choose_forward_side_extremes(n_tokens, d_in, d_out, double, needs_grad, expected):
    assert choose_forward_side(n_tokens, d_in, d_out, double, needs_grad, "cpu") == expected


@pytest.mark.parametrize(("n_tokens", "dim", "expected"), [
    (8192, 320, "weight"), (4096, 320, "weight"), (1024, 320, "activation"),
    (2048, 640, "activation"), (512, 1280, "activation"), (256, 1280, "activation"),
])  # fmt: skip
def test_choose_forward_side_matches_the_faster_side_measured_at_sd_shapes(n_tokens, dim, expected):
    # GSOFT training at the SD UNet's self-attention shapes: the side that was faster, forward + backward, with 1
    # and with 2 threads on the CPUs here (fifth session; docs/benchmarks.md). Pins the cost model's constants.
    assert choose_forward_side(n_tokens, dim, dim, False, True, "cpu") == expected


def test_extra_repr_describes_the_adapter():
    text = repr(make_layer({"method": "boft", "nblocks": 4, "n_butterfly_factor": 2}, 32, 24))
    for part in ("method=boft", "in_features=32", "out_features=24", "nblocks=4, block_size=8",
                 "n_butterfly_factor=2", "merged=False"):  # fmt: skip
        assert part in text, part


# -- what backward keeps: recomputation instead of rotated copies (issue 19) ------------------------------------


def dense_reference_output(ref, layer, x):
    """``F.linear(x, diag(s) Q_out W Q_in) + bias`` in float64 from the dense formulas, differentiable in the
    layer's parameters (through the test's own Cayley / matrix exponential and dense GS / BOFT matrices)."""

    def blocks(a):
        if layer.parametrization == "cayley":
            return ref.cayley(a.double())
        return torch.linalg.matrix_exp((a.double() - a.double().mT) / 2)

    w = layer.base_layer.weight.double()
    if layer.method == "gsoft":
        w = w @ ref.gsoft_matrix(blocks(layer.gsoft_L), blocks(layer.gsoft_R))
    elif layer.method == "double_gsoft":
        q_in = ref.gsoft_matrix(blocks(layer.gsoft_in_L), blocks(layer.gsoft_in_R))
        w = ref.gsoft_matrix(blocks(layer.gsoft_out_L), blocks(layer.gsoft_out_R)) @ w @ q_in
    else:
        m, r, b, _ = layer.gsoft_butterfly.shape
        perms = [gsf.butterfly_permutation(r * b, r, b, i) for i in range(m)]
        w = w @ ref.boft_matrix(blocks(layer.gsoft_butterfly), perms)
    if layer.gsoft_s is not None:
        w = w * layer.gsoft_s.double()[:, None]
    bias = None if layer.base_layer.bias is None else layer.base_layer.bias.double()
    return F.linear(x.double(), w, bias)


@cases
@pytest.mark.parametrize(  # the token count decides only the activation side's forward (the weight side has one)
    ("mode", "tokens"),
    [("activation", 5), ("activation", 64), ("weight", 5)],
    ids=["activation-rotate-tokens", "activation-rotate-weight", "weight"],
)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_gradients_with_recomputation_match_the_dense_formulas(
    ref, randomize_adapter, kwargs, d_in, d_out, mode, autocast, tokens
):
    layer = make_layer(kwargs, d_in, d_out)
    randomize_adapter(layer, seed=6)
    layer.forward_mode = mode
    x = inputs(d_in, torch.float32, tokens=tokens).requires_grad_()
    upstream = torch.randn(2, tokens, d_out, generator=torch.Generator().manual_seed(7))
    params = [x, *layer.adapter_parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    got = torch.autograd.grad(y, params, upstream.to(y.dtype))
    want = torch.autograd.grad(dense_reference_output(ref, layer, x), params, upstream.double())
    for tensor, fast, dense in zip(params, got, want):
        assert fast.dtype == tensor.dtype
        if autocast:  # bf16 rounding of the activations, not a different gradient
            assert (fast.double() - dense).norm() <= 0.03 * dense.norm()
        else:
            scale = max(1.0, dense.abs().max().item())
            torch.testing.assert_close(fast.double(), dense.double(), rtol=1e-4, atol=1e-4 * scale)


def saved_storages(layer, x) -> dict[int, int]:
    """Bytes of every distinct storage autograd keeps for one forward of ``layer`` (parameters and buffers out)."""
    excluded = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    return storages, y


@cases
@pytest.mark.parametrize("mode", ["activation", "weight"])
def test_backward_keeps_no_rotated_copy_of_the_input_or_the_weight(randomize_adapter, kwargs, d_in, d_out, mode):
    """Activation side: only x and the output (whose storage the next op usually keeps anyway) are activation-sized;
    weight side: only x (no rotated weight). Everything else kept is block-sized."""
    layer = make_layer(kwargs, d_in, d_out)
    randomize_adapter(layer, seed=8)
    layer.forward_mode = mode
    x = torch.randn(512, d_in, requires_grad=True)  # many tokens: activations dwarf the blocks
    storages, y = saved_storages(layer, x)
    allowed = {x.untyped_storage().data_ptr()}
    if mode == "activation" and (layer.gsoft_s is not None or layer.method == "double_gsoft"):
        allowed.add(y.untyped_storage().data_ptr())
    large = {ptr for ptr, size in storages.items() if size >= 512 * min(d_in, d_out) * 4}
    assert large <= allowed, (large - allowed, storages)
    blocks = sum(p.numel() * 4 for p in layer.adapter_parameters())
    # the orthogonal blocks once (the Cayley node keeps its output, which the rotation keeps too), the scale, and
    # at most a few small index / shape tensors: no second block-sized copy
    assert sum(size for ptr, size in storages.items() if ptr not in allowed) <= blocks + 4096


def test_cayley_keeps_only_its_output():
    params = torch.randn(4, 6, 6, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        blocks = gsf.cayley(params)
    assert len(kept) == 1 and kept[0].untyped_storage().data_ptr() == blocks.untyped_storage().data_ptr()
    params = params.detach().double().requires_grad_()
    grad = torch.randn(4, 6, 6, dtype=torch.float64)
    (got,) = torch.autograd.grad(gsf.cayley(params), params, grad)  # M recovered as (Q + I) / 2
    eye = torch.eye(6, dtype=torch.float64)
    k = gsf.skew(params)
    (want,) = torch.autograd.grad((eye + k) @ torch.linalg.inv(eye - k), params, grad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "forward_mode", "side"),
    [("down.attn1.to_out.0", "auto", "weight"), ("down.attn1.to_q", "auto", None),
     ("down.attn1.to_out.0", "activation", "activation")],
)  # fmt: skip
def test_weight_side_modules_train_on_the_weight_side(name, forward_mode, side):
    """GSOFTConfig.weight_side_modules puts matching layers on the weight side under 'auto' (tokens many enough
    for the activation side to be the faster one); an explicit forward_mode wins; results never change."""
    config = GSOFTConfig(nblocks=4, weight_side_modules=("to_out.0",), forward_mode=forward_mode)
    torch.manual_seed(0)
    layer = GSOFTLinear(nn.Linear(16, 16).requires_grad_(False), config, name=name)
    with torch.no_grad():
        layer.gsoft_L.normal_(std=0.1)
    x = torch.randn(4096, 16, requires_grad=True)
    assert layer.forward_side(x) == (side or choose_forward_side(4096, 16, 16, False, True, "cpu"))
    y = layer(x)
    layer.forward_mode = "activation" if layer.forward_side(x) == "weight" else "weight"
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


# -- Cayley-Neumann blocks (an option, not the default) ---------------------------------------------------------


def neumann_weight(layer, weight):
    """diag(s) Q_out W Q_in in float64 with every block the 5-term series I + 2K + 2K^2 + 2K^3 + K^4, built here."""

    def blocks(a):
        k = (a.detach().double() - a.detach().double().mT) / 2
        k2 = k @ k
        eye = torch.eye(k.shape[-1], dtype=torch.float64)
        return eye + 2 * k + 2 * k2 + 2 * k2 @ k + k2 @ k2

    def q(prefix):
        p = [getattr(layer, prefix + side) for side in ("L", "R")]
        r, b, _ = p[0].shape
        left, right = (torch.block_diag(*blocks(t)) for t in p)
        perm = torch.eye(r * b, dtype=torch.float64)[gsf.permutation_gather_index(gsf.shuffle_permutation(r, r * b))]
        return perm.T @ left @ perm @ right  # P^T L P R

    w = weight.double()
    w = w @ q("gsoft_") if layer.method == "gsoft" else q("gsoft_out_") @ w @ q("gsoft_in_")
    return w * layer.gsoft_s.detach().double()[:, None]


@pytest.mark.parametrize("method", ["gsoft", "double_gsoft"])
def test_cayley_neumann_layer_matches_its_dense_series_on_every_path(randomize_adapter, method):
    layer = make_layer({"method": method, "nblocks": 4, "parametrization": "cayley_neumann"}, 32, 24)
    randomize_adapter(layer, seed=8)
    original = layer.base_layer.weight.detach().clone()
    x = inputs(32, torch.float32)
    expected = F.linear(x.double(), neumann_weight(layer, original), layer.base_layer.bias.double())
    for mode in ("activation", "weight"):
        torch.testing.assert_close(forward(layer, x, mode).double(), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(forward(layer, x, "activation").double(), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()  # Q^T of a series that is orthogonal only to |K|^4: unmerge is exact only up to that
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-2)


def test_cayley_neumann_adapter_saves_and_loads(tmp_path, make_mlp, randomize_adapter):
    from dreambooth_gs import inject_adapter, load_adapter, read_adapter_config, save_adapter

    config = GSOFTConfig(method="double_gsoft", nblocks=4, parametrization="cayley_neumann", target_modules=("fc1",))
    model = make_mlp()
    inject_adapter(model, config)
    randomize_adapter(model, seed=9)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, tmp_path)
    assert read_adapter_config(tmp_path)["config"]["parametrization"] == "cayley_neumann"
    fresh = make_mlp()
    load_adapter(fresh, tmp_path, merge=False)
    assert fresh.fc1.parametrization == "cayley_neumann"
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("mode", ["activation", "weight"])
@pytest.mark.parametrize(
    ("kwargs", "d_in", "d_out"),
    [c[1:] for c in LAYER_CASES if c[0] in ("gsoft-r4", "double-r4", "boft-r4m2")],
    ids=["gsoft", "double", "boft"],
)
def test_reused_blocks_are_computed_once_per_optimizer_step_with_the_same_gradients(
    monkeypatch, randomize_adapter, kwargs, d_in, d_out, mode
):
    """Gradient accumulation with set_block_reuse: one Cayley solve for 3 micro-steps (counted), and after the
    flush the parameters hold the gradients that 3 micro-steps computing their own blocks accumulate."""
    from dreambooth_gs.gs.layers import flush_reused_blocks, set_block_reuse

    calls = []
    real = gsf.orthogonal_blocks_at_strength
    monkeypatch.setattr(gsf, "orthogonal_blocks_at_strength", lambda *a: calls.append(1) or real(*a))
    micro_batches = [inputs(d_in, torch.float32, seed=s, tokens=t) for s, t in ((10, 5), (11, 64), (12, 5))]
    grads = {}
    for reuse in (False, True):
        layer = make_layer(kwargs, d_in, d_out)
        randomize_adapter(layer, seed=9)
        layer.forward_mode = mode
        set_block_reuse([layer], reuse)
        solves = len({p.shape[-1] for n, p in layer.named_parameters(recurse=False) if n != "gsoft_s"})  # per size
        calls.clear()
        for x in micro_batches:
            (layer(x) ** 2).sum().backward()
        assert len(calls) == (1 if reuse else 3) * solves
        if reuse:
            assert all(p.grad is None for n, p in layer.named_parameters() if n != "gsoft_s")  # not yet pushed
        flush_reused_blocks([layer])
        grads[reuse] = {n: p.grad.clone() for n, p in layer.named_parameters() if n.startswith("gsoft_")}
        layer(micro_batches[0]).sum().backward()  # after the flush the next step computes its blocks afresh
        assert len(calls) == (2 if reuse else 4) * solves
    for name, grad in grads[False].items():
        assert grad.abs().max() > 0, name
        # float32 sums in another order (the blocks' gradients are added before the Cayley map, not after)
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())
