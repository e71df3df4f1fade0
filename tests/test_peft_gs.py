"""GSOFT, Double GSOFT and BOFT as a PEFT method: get_peft_model / save_pretrained / PeftModel.from_pretrained,
the same outputs as the trainer's layer, orthogonal strength, several adapters as a product of rotations, a GS and a
LoRA adapter on one model, and diffusers' adapter API on the tiny UNet and Flux transformer."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model

from dreambooth_gs import GSOFTConfig, inject_adapter
from dreambooth_gs.methods.injection import adapter_layers
from dreambooth_gs.methods.peft_gs import GSOFTLayer

METHODS = {
    "gsoft": {"method": "gsoft", "nblocks": 4},
    "double_gsoft": {"method": "double_gsoft", "nblocks": 4},
    "boft": {"method": "boft", "nblocks": 4, "n_butterfly_factor": 2},
}
MLP_TARGETS = ["fc1", "fc2"]


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2, adapter: str | None = None) -> None:
    """Move every GS tensor (of ``adapter``, or all) away from identity: generators ~ N(0, std), scales ~ 1 + N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gsoft_" not in name or (adapter is not None and not name.endswith(f".{adapter}")):
                continue
            noise = torch.randn(param.shape, generator=g) * std
            param.copy_(1 + noise if ".gsoft_s" in name else noise)


def gs_layers(model) -> list[GSOFTLayer]:
    return [m for m in model.modules() if isinstance(m, GSOFTLayer)]


@pytest.mark.parametrize("method", METHODS)
def test_peft_round_trip(make_mlp, tmp_path, method):
    x = torch.randn(5, 16)
    base = make_mlp()(x)
    model = get_peft_model(make_mlp(), GSOFTConfig(target_modules=MLP_TARGETS, **METHODS[method]))
    assert torch.allclose(model(x), base, atol=1e-6)  # identity at initialisation
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} <= {
        "gsoft_L", "gsoft_R", "gsoft_in_L", "gsoft_in_R", "gsoft_out_L", "gsoft_out_R", "gsoft_butterfly", "gsoft_s"
    }  # fmt: skip
    randomize(model)
    trained = model(x)
    assert not torch.allclose(trained, base, atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_mlp(), tmp_path / "adapter")
    assert torch.allclose(reloaded(x), trained, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_the_peft_layer_equals_the_trainers_layer(make_mlp, method):
    """Two paths, one kernel: the same tensors in the trainer's GSOFTLinear and in the PEFT layer give the same
    output and the same merged weight."""
    x = torch.randn(5, 16)
    config = GSOFTConfig(target_modules=MLP_TARGETS, **METHODS[method])
    trainer = make_mlp()
    inject_adapter(trainer, config)
    randomize(trainer)
    peft_model = make_mlp()
    inject_adapter_in_model(config, peft_model, "dog")
    with torch.no_grad():
        for name, layer in adapter_layers(trainer):
            peft_layer = peft_model.get_submodule(name)
            for pname, param in layer.named_parameters(recurse=False):
                if pname.startswith("gsoft_"):
                    getattr(peft_layer, pname)["dog"].copy_(param)
    assert torch.allclose(peft_model(x), trainer(x), atol=1e-5)
    for name, layer in adapter_layers(trainer):
        delta = peft_model.get_submodule(name).delta_weight()
        assert torch.allclose(delta + layer.base_layer.weight, layer.merged_weight(), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_strength_zero_is_the_base_one_is_the_adapter_and_every_strength_is_orthogonal(make_mlp, method):
    x = torch.randn(5, 16)
    base_model = make_mlp()
    model = make_mlp()
    inject_adapter_in_model(GSOFTConfig(target_modules=MLP_TARGETS, scale=False, **METHODS[method]), model, "dog")
    randomize(model)
    trained = model(x)
    layers = gs_layers(model)
    for layer in layers:
        layer.set_scale("dog", 0.0)
    assert torch.equal(model(x), base_model(x))  # s = 0: exactly the base model
    for strength in (0.3, 0.5, 1.7):
        for layer in layers:
            layer.set_scale("dog", strength)
            weight = layer.get_base_layer().weight
            merged = layer.delta_weight() + weight
            assert not torch.allclose(merged, weight, atol=1e-4)  # the adapter does act at this strength
            # orthogonal at every strength: the singular values of W are kept (seen from outside the layer)
            assert torch.allclose(torch.linalg.svdvals(merged), torch.linalg.svdvals(weight), atol=1e-5)
    for layer in layers:
        layer.set_scale("dog", 1.0)
    assert torch.equal(model(x), trained)


def test_the_scale_vector_follows_the_strength(make_mlp):
    model = make_mlp()
    inject_adapter_in_model(GSOFTConfig(target_modules=["fc1"], nblocks=4), model, "dog")
    with torch.no_grad():
        model.fc1.gsoft_s["dog"].fill_(3.0)  # no rotation: only the scale vector acts
    model.fc1.set_scale("dog", 0.5)
    weight = model.fc1.get_base_layer().weight
    assert torch.allclose(model.fc1.delta_weight() + weight, 2.0 * weight)  # 1 + 0.5 * (3 - 1)


@pytest.mark.parametrize("method", METHODS)
def test_two_adapters_compose_as_the_documented_product_and_stay_orthogonal(make_mlp, method):
    model = make_mlp()
    for name, seed in (("dog", 1), ("style", 2)):
        config = GSOFTConfig(target_modules=MLP_TARGETS, scale=False, **METHODS[method])
        inject_adapter_in_model(config, model, name)
        randomize(model, seed=seed, adapter=name)
    layer = model.fc1
    layer.set_adapter(["dog", "style"])
    layer.set_scale("dog", 0.8)
    layer.set_scale("style", 0.6)
    weight = layer.get_base_layer().weight
    both = layer.delta_weight() + weight
    # W -> T_dog(W) -> T_style(T_dog(W)), T(W) = Q_out W Q_in: the product of the two rotations on each side
    expected = layer.adapter_transform("style", layer.adapter_transform("dog", weight))
    assert torch.allclose(both, expected, atol=1e-6)
    if method != "double_gsoft":  # input side only: W Q_dog Q_style
        eye = torch.eye(weight.shape[1])
        q_dog, q_style = layer.adapter_transform("dog", eye), layer.adapter_transform("style", eye)
        assert torch.allclose(both, weight @ q_dog @ q_style, atol=1e-5)
    assert torch.allclose(torch.linalg.svdvals(both), torch.linalg.svdvals(weight), atol=1e-5)
    layer.merge(adapter_names=["dog", "style"])
    assert torch.allclose(layer.get_base_layer().weight, both, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.get_base_layer().weight, weight, atol=1e-5)


def test_a_gs_and_a_lora_adapter_on_one_model(make_mlp):
    x = torch.randn(5, 16)
    model = make_mlp()
    base = model(x)
    inject_adapter_in_model(GSOFTConfig(target_modules=MLP_TARGETS, nblocks=4), model, "dog")
    randomize(model, adapter="dog")
    gs_only = model(x)
    inject_adapter_in_model(LoraConfig(target_modules=MLP_TARGETS, r=2, init_lora_weights=False), model, "style")
    for layer in model.modules():
        if hasattr(layer, "set_adapter") and hasattr(layer, "active_adapters"):
            layer.set_adapter(["dog", "style"])
    both = model(x)
    assert not torch.allclose(both, gs_only, atol=1e-4) and not torch.allclose(both, base, atol=1e-4)
    for layer in model.modules():
        if hasattr(layer, "set_adapter") and hasattr(layer, "active_adapters"):
            layer.set_adapter(["dog"])
    assert torch.allclose(model(x), gs_only, atol=1e-6)  # the LoRA switched off: the GS adapter alone


def test_diffusers_adapter_api_on_the_tiny_unet(make_unet, unet_inputs, unet_out):
    unet = make_unet()
    base = unet_out(unet, unet_inputs)
    config = {"target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "nblocks": 4}
    unet.add_adapter(GSOFTConfig(**config), adapter_name="dog")
    unet.add_adapter(GSOFTConfig(method="double_gsoft", **config), adapter_name="style")
    randomize(unet, seed=1, adapter="dog")
    randomize(unet, seed=2, adapter="style")
    unet.set_adapters(["dog"], weights=[1.0])
    dog = unet_out(unet, unet_inputs)
    unet.set_adapters(["dog", "style"], weights=[1.0, 0.6])
    both = unet_out(unet, unet_inputs)
    assert not torch.allclose(dog, base, atol=1e-4) and not torch.allclose(both, dog, atol=1e-4)
    unet.disable_adapters()
    assert torch.allclose(unet_out(unet, unet_inputs), base, atol=1e-6)
    unet.enable_adapters()
    assert torch.allclose(unet_out(unet, unet_inputs), both, atol=1e-6)
    unet.set_adapters(["dog", "style"], weights=[0.0, 0.0])
    assert torch.allclose(unet_out(unet, unet_inputs), base, atol=1e-6)
    unet.delete_adapters("style")
    unet.set_adapters(["dog"], weights=[1.0])
    assert torch.allclose(unet_out(unet, unet_inputs), dog, atol=1e-6)
    assert list(unet.peft_config) == ["dog"]


def test_diffusers_adapter_api_on_the_tiny_flux_transformer():
    import json

    from dreambooth_gs.resources import TINY_FLUX_CONFIG_DIR
    from dreambooth_gs.tiny.pipelines import make_model

    torch.manual_seed(0)
    transformer = make_model(json.loads((TINY_FLUX_CONFIG_DIR / "transformer.json").read_text())).eval()
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])

    def out():
        with torch.no_grad():
            return transformer(**inputs).sample

    base = out()
    targets = ["attn.to_q", "attn.to_k", "attn.to_v"]
    transformer.add_adapter(GSOFTConfig(target_modules=targets, nblocks=4), adapter_name="dog")
    randomize(transformer, adapter="dog")
    adapted = out()
    assert not torch.allclose(adapted, base, atol=1e-4)
    transformer.set_adapters(["dog"], weights=[0.0])
    assert torch.allclose(out(), base, atol=1e-6)
    transformer.set_adapters(["dog"], weights=[1.0])
    transformer.disable_adapters()
    assert torch.allclose(out(), base, atol=1e-6)
    transformer.enable_adapters()
    assert torch.allclose(out(), adapted, atol=1e-6)
    transformer.delete_adapters("dog")
    assert torch.allclose(out(), base, atol=1e-6)
    assert all(not layer.gsoft_config for layer in gs_layers(transformer))  # PEFT keeps the emptied wrappers


def test_a_transformers_model_injects_trains_a_step_saves_and_reloads(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    base = BertModel(config).state_dict()
    ids = torch.randint(0, 64, (2, 7))

    def bert():
        model = BertModel(config)
        model.load_state_dict(base)
        return model

    model = get_peft_model(bert(), GSOFTConfig(target_modules=["query", "value"], nblocks=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
    loss.backward()
    optimizer.step()
    trained = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(trained, bert()(input_ids=ids).last_hidden_state, atol=1e-5)  # the step moved it
    model.save_pretrained(tmp_path / "bert-gsoft")
    reloaded = PeftModel.from_pretrained(bert(), tmp_path / "bert-gsoft")
    assert torch.allclose(reloaded(input_ids=ids).last_hidden_state, trained, atol=1e-5)


def test_stacking_onto_another_method_is_one_clear_line(make_mlp):
    model = make_mlp()
    inject_adapter_in_model(LoraConfig(target_modules=MLP_TARGETS, r=2), model, "style")
    with pytest.raises(ValueError, match="already holds a .* adapter of another method"):
        inject_adapter_in_model(GSOFTConfig(target_modules=MLP_TARGETS, nblocks=4), model, "dog")
