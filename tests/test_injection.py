"""inject_adapter / merge_adapter / remove_adapter / disable_adapters on diffusers, transformers and plain models."""

import warnings

import pytest
import torch
from torch import nn

from dreambooth_gs import (
    GSOFTConfig,
    GSOFTLinear,
    adapter_layers,
    disable_adapters,
    find_targets,
    inject_adapter,
    merge_adapter,
    remove_adapter,
    trainable_parameters,
)
from dreambooth_gs.methods.injection import is_target

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# Configurations that fit every attention Linear of the tiny UNet (dims 32 and 64) with dense Q (b >= r).
UNET_CONFIGS = [
    ("gsoft", {"method": "gsoft", "nblocks": 4}),
    ("gsoft-b8", {"method": "gsoft", "block_size": 8}),
    ("double", {"method": "double_gsoft", "nblocks": 4}),
    ("boft", {"method": "boft", "nblocks": 4, "n_butterfly_factor": 2}),
]
unet_configs = pytest.mark.parametrize("kwargs", [c[1] for c in UNET_CONFIGS], ids=[c[0] for c in UNET_CONFIGS])


def linear_names(model):
    return sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def assert_unchanged(model, before):
    assert not adapter_layers(model)
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (value, requires_grad) in before.items():
        assert torch.equal(after[name][0], value), name
        assert after[name][1] == requires_grad, name


@pytest.mark.parametrize(("name", "targets", "expected"), [
    ("to_q", ("to_q",), True),
    ("attn1.to_q", ("to_q",), True),
    ("attn1.to_out.0", ("to_out.0",), True),
    ("attn1.to_out.1", ("to_out.0",), False),
    ("attn1.to_qx", ("to_q",), False),
    ("attn1.xto_q", ("to_q",), False),
    ("attn1.to_q.base_layer", ("to_q",), False),
    ("layer.0.attention.self.query", ("key", "query"), True),
])  # fmt: skip
def test_is_target(name, targets, expected):
    assert is_target(name, targets) is expected


@unet_configs
def test_unet_identity_at_init_and_targets(make_unet, unet_inputs, unet_out, kwargs):
    unet = make_unet()
    expected_names = [n for n in linear_names(unet) if is_target(n, ATTENTION)]
    base = unet_out(unet, unet_inputs)
    names = inject_adapter(unet, GSOFTConfig(**kwargs))
    assert sorted(names) == expected_names and len(names) == 4 * 2 * 4  # 4 transformer blocks, 2 attentions each
    assert sorted(n for n, _ in adapter_layers(unet)) == expected_names
    assert find_targets(unet, ATTENTION) == []  # wrapped Linears are not targets again
    torch.testing.assert_close(unet_out(unet, unet_inputs), base, rtol=1e-5, atol=1e-5)


@unet_configs
def test_unet_merge_remove_disable(make_unet, unet_inputs, unet_out, randomize_adapter, kwargs):
    unet = make_unet()
    base = unet_out(unet, unet_inputs)
    originals = {n: m.weight.detach().clone() for n, m in unet.named_modules() if type(m) is nn.Linear}
    inject_adapter(unet, GSOFTConfig(**kwargs))
    randomize_adapter(unet, seed=1)
    adapted = unet_out(unet, unet_inputs)
    assert not torch.allclose(adapted, base, atol=1e-3)

    with disable_adapters(unet):
        torch.testing.assert_close(unet_out(unet, unet_inputs), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unet_out(unet, unet_inputs), adapted, rtol=0, atol=0)

    # Merged layers inside disable_adapters: unmerged for the block, merged again afterwards.
    for _, layer in adapter_layers(unet):
        layer.merge()
    with disable_adapters(unet):
        assert not any(layer.merged for _, layer in adapter_layers(unet))
        torch.testing.assert_close(unet_out(unet, unet_inputs), base, rtol=1e-5, atol=1e-5)
    assert all(layer.merged for _, layer in adapter_layers(unet))
    torch.testing.assert_close(unet_out(unet, unet_inputs), adapted, rtol=1e-5, atol=1e-5)
    for _, layer in adapter_layers(unet):
        layer.unmerge()

    copy = make_unet()
    inject_adapter(copy, GSOFTConfig(**kwargs))
    randomize_adapter(copy, seed=1)
    merged_names = merge_adapter(copy)
    assert len(merged_names) == 32
    assert not adapter_layers(copy) and not trainable_parameters(copy)
    assert all(type(copy.get_submodule(n)) is nn.Linear for n in merged_names)
    torch.testing.assert_close(unet_out(copy, unet_inputs), adapted, rtol=1e-5, atol=1e-5)

    removed = remove_adapter(unet)
    assert sorted(removed) == sorted(merged_names)
    assert not adapter_layers(unet)
    for name, weight in originals.items():
        torch.testing.assert_close(unet.get_submodule(name).weight, weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unet_out(unet, unet_inputs), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [c[1] for c in UNET_CONFIGS if c[0] != "gsoft-b8"], ids=["gsoft", "double", "boft"])
def test_gradients_reach_only_adapter_parameters(make_unet, unet_inputs, randomize_adapter, kwargs):
    unet = make_unet()
    inject_adapter(unet, GSOFTConfig(**kwargs))
    randomize_adapter(unet, seed=2)
    unet.train()
    unet(*unet_inputs).sample.square().mean().backward()
    adapter = dict(trainable_parameters(unet))
    assert adapter and all(n.rpartition(".")[2].startswith("gsoft_") for n in adapter)
    for name, param in unet.named_parameters():
        if name in adapter:
            assert param.requires_grad and param.grad is not None, name
            assert param.grad.abs().max() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def make_roberta():
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return RobertaModel(config).eval()


@pytest.mark.parametrize("method", ["gsoft", "double_gsoft", "boft"])
def test_transformers_roberta(randomize_adapter, method, assert_close):
    model = make_roberta()
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
    extra = {"n_butterfly_factor": 2} if method == "boft" else {}
    names = inject_adapter(
        model, GSOFTConfig(method=method, nblocks=4, target_modules=("query", "key", "value", "dense"), **extra)
    )
    assert len(names) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output per layer + pooler
    assert {n.rpartition(".")[2] for n in names} == {"query", "key", "value", "dense"}
    with torch.no_grad():
        assert_close(model(input_ids=ids).last_hidden_state, base)
    randomize_adapter(model, seed=3)
    out = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(out, base, atol=1e-3)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    pooler = {n for n, _ in trainable_parameters(model) if n.startswith("pooler.")}
    assert set(grads) == {n for n, _ in trainable_parameters(model)} - pooler  # pooler output unused by the loss
    merge_adapter(model)
    with torch.no_grad():
        assert_close(model(input_ids=ids).last_hidden_state, out.detach())


class Plain(nn.Module):
    """A hand-written module: nested Linears, one non-target Linear, parameters outside any Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(16))
        self.blocks = nn.ModuleList(
            [
                nn.ModuleDict({"proj": nn.Linear(16, 16), "gate": nn.Linear(16, 16)}),
                nn.ModuleDict({"proj": nn.Linear(16, 8), "gate": nn.Linear(16, 16)}),  # gate unused: still frozen
            ]
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = x + self.embed
        x = torch.tanh(self.blocks[0]["proj"](x)) * torch.sigmoid(self.blocks[0]["gate"](x))
        return self.head(self.blocks[1]["proj"](x))


@pytest.mark.parametrize("kwargs", [{"method": "gsoft", "nblocks": 2}, {"method": "double_gsoft", "block_size": 4},
                                    {"method": "boft", "nblocks": 4, "n_butterfly_factor": 2}])  # fmt: skip
def test_plain_module(randomize_adapter, kwargs):
    torch.manual_seed(0)
    model = Plain()
    x = torch.randn(3, 16)
    base = model(x).detach()
    names = inject_adapter(model, GSOFTConfig(target_modules=("proj",), **kwargs))
    assert names == ["blocks.0.proj", "blocks.1.proj"]
    assert not model.embed.requires_grad and not model.head.weight.requires_grad
    torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-6)
    randomize_adapter(model, seed=4)
    adapted = model(x).detach()
    assert not torch.allclose(adapted, base, atol=1e-3)
    merge_adapter(model)
    assert type(model.blocks[1]["proj"]) is nn.Linear
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_mlp_identity_at_init(make_mlp):
    model = make_mlp()
    x = torch.randn(4, 16)
    base = model(x).detach()
    inject_adapter(model, GSOFTConfig(nblocks=4, target_modules=("fc1", "fc2")))
    assert isinstance(model.fc1, GSOFTLinear) and isinstance(model.fc2, GSOFTLinear)
    torch.testing.assert_close(model(x), base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("config", "dims", "error", "match"), [
    (GSOFTConfig(target_modules=("to_q",)), (16, 32, 24), ValueError,
     r"no nn\.Linear matches target_modules=\['to_q'\]; the model's Linear modules include: fc1, fc2"),
    (GSOFTConfig(nblocks=4, target_modules=("fc1", "fc2")), (16, 30, 24), ValueError,
     r"nblocks=4 does not divide in_features=30 of fc2; valid block counts: 1, 2, 3, 5, 6, 10, 15, 30"),
    (GSOFTConfig(method="double_gsoft", nblocks=4, target_modules=("fc1", "fc2")), (16, 32, 18), ValueError,
     r"nblocks=4 does not divide out_features=18 of fc2; valid block counts: 1, 2, 3, 6, 9, 18"),
    (GSOFTConfig(block_size=16, target_modules=("fc1", "fc2")), (16, 24, 8), ValueError,
     r"block_size=16 does not divide in_features=24 of fc2; valid block sizes: 1, 2, 3, 4, 6, 8, 12, 24"),
])  # fmt: skip
def test_bad_injection_raises_and_leaves_model_unchanged(make_mlp, config, dims, error, match):
    model = make_mlp(dims=dims)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        inject_adapter(model, config)
    assert_unchanged(model, before)


def test_no_linear_at_all():
    with pytest.raises(ValueError, match="the model has no nn.Linear"):
        inject_adapter(nn.Sequential(nn.ReLU()), GSOFTConfig())


def test_target_list_is_truncated_for_big_models(make_unet):
    with pytest.raises(ValueError, match=r"include: time_embedding\.linear_1, .*, \.\.\.$"):
        inject_adapter(make_unet(), GSOFTConfig(target_modules=("nothing",)))


def test_injecting_twice_raises(make_mlp):
    model = make_mlp()
    config = GSOFTConfig(nblocks=4, target_modules=("fc1",))
    inject_adapter(model, config)
    with pytest.raises(ValueError, match="already has GSOFT adapters"):
        inject_adapter(model, GSOFTConfig(nblocks=4, target_modules=("fc2",)))
    assert [n for n, _ in adapter_layers(model)] == ["fc1"]


@pytest.mark.parametrize(("kwargs", "dims"), [
    ({"nblocks": 8}, (16, 32, 24)),  # fc1: 16 = 8 x 2
    ({"block_size": 2}, (16, 32, 24)),
    ({"method": "double_gsoft", "nblocks": 8}, (64, 64, 24)),  # fc2 out: 24 = 8 x 3
])  # fmt: skip
def test_sparse_configuration_warns(make_mlp, kwargs, dims):
    model = make_mlp(dims=dims)
    with pytest.warns(UserWarning, match="sparse"):
        inject_adapter(model, GSOFTConfig(target_modules=("fc1", "fc2"), **kwargs))


@pytest.mark.parametrize("kwargs", [{"nblocks": 4}, {"method": "boft", "nblocks": 8, "n_butterfly_factor": 3}])
def test_dense_configuration_does_not_warn(make_mlp, kwargs):
    model = make_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_adapter(model, GSOFTConfig(target_modules=("fc1", "fc2"), **kwargs))
