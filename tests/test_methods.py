"""The method registry: every entry builds its config from the trainer's options, injects, is found again in the
model, names its tensors by module, and round-trips its config dict; the trainer offers exactly its entries."""

from __future__ import annotations

import warnings

import pytest
import torch

from dreambooth_gs import load_adapter, save_adapter
from dreambooth_gs.methods import baselines
from dreambooth_gs.methods import registry as methods
from dreambooth_gs.methods.injection import adapter_layers
from dreambooth_gs.train.models import add_adapter
from dreambooth_gs.train.options import DEFAULT_LEARNING_RATES, TrainingOptions, with_demo_defaults

TINY_FLAGS = {"gsoft_nblocks": 4, "boft_block_num": 8, "oft_block_size": 8}


def _options(name: str) -> TrainingOptions:
    adapter, backend = ("boft", "peft") if name == "peft_boft" else (name, "gsoft")
    n_factors = 1 if name == "peft_boft" else 4  # PEFT's BOFT builds one factor without its CUDA extension
    flags = {**TINY_FLAGS, "boft_n_butterfly_factor": n_factors}
    return with_demo_defaults(TrainingOptions(adapter=adapter, boft_backend=backend, **flags))


@pytest.mark.parametrize("name", methods.ALL_METHODS)
def test_every_method_injects_is_found_and_names_its_tensors(name, make_unet):
    method, config = methods.for_options(_options(name))
    assert method.name == name and method.default_learning_rate > 0
    model = make_unet()
    names = method.inject(model, config)
    found, config_dict = methods.find(model)
    assert found is method and names
    assert method.config_from_dict(config_dict) is not None  # what adapter_config.json holds loads back
    tensors = method.kind.state_dict(model)
    modules = {method.kind.split_key(key)[0] for key in tensors}
    assert modules == set(names)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors.values())


def test_the_trainer_offers_the_registry():
    assert set(DEFAULT_LEARNING_RATES) == set(methods.TRAINER_ADAPTERS) == set(methods.ALL_METHODS) - {"peft_boft"}
    with pytest.raises(ValueError, match="unknown method 'dora'; known methods: gsoft"):
        methods.get("dora")


def test_a_model_without_adapter_has_no_method(make_unet):
    assert methods.find(make_unet()) is None


@pytest.mark.parametrize("name", ["gsoft", "double_gsoft", "boft"])
@pytest.mark.parametrize("mode", ["activation", "weight"])
def test_the_forward_side_flag_reaches_every_layer(name, mode, make_unet):
    options = with_demo_defaults(TrainingOptions(adapter=name, gsoft_forward_mode=mode, **TINY_FLAGS))
    method, config = methods.for_options(options)
    assert config.forward_mode == mode
    model = make_unet()
    method.inject(model, config)
    assert {layer.forward_mode for _, layer in adapter_layers(model)} == {mode}


@pytest.mark.parametrize("name", ["gsoft", "double_gsoft"])
def test_the_parametrization_flag_reaches_every_layer_and_the_saved_folder(name, make_unet, tmp_path):
    options = with_demo_defaults(TrainingOptions(adapter=name, gsoft_parametrization="cayley_neumann", **TINY_FLAGS))
    method, config = methods.for_options(options)
    model = make_unet()
    method.inject(model, config)
    assert {layer.parametrization for _, layer in adapter_layers(model)} == {"cayley_neumann"}
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05)
    save_adapter(model, tmp_path)
    loaded = make_unet()
    load_adapter(loaded, tmp_path, merge=False)
    assert {layer.parametrization for _, layer in adapter_layers(loaded)} == {"cayley_neumann"}


@pytest.mark.parametrize("block_size, built", [(8, 8), (32, 32), (7, 8), (12, 8), (64, 32)])
def test_an_oft_block_size_peft_would_change_is_refused_by_the_trainer(make_unet, block_size, built):
    """PEFT rounds a block size that does not divide a layer's in_features (32 or 64 here) to a divisor, with a
    warning, while the saved config keeps the one asked for: the trainer refuses it in one line, nothing injected."""
    options = with_demo_defaults(TrainingOptions(adapter="oft", oft_block_size=block_size))
    model = make_unet()
    if built == block_size:
        add_adapter(model, options)
        assert {layer.oft_block_size["default"] for _, layer in baselines.peft_layers(model)} == {block_size}
        return
    message = f"oft_block_size={block_size} does not divide in_features=32 of .*to_q \\(PEFT would silently train "
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's own warning is not shown: the error says it all
        with pytest.raises(ValueError, match=message + f"blocks of {built} there\\); .*: 1, 2, 4, 8, 16, 32$"):
            add_adapter(model, options)
    assert methods.find(model) is None and not any(p.requires_grad for p in model.parameters())


def test_an_oft_folder_saved_with_a_rounded_block_size_still_loads(make_unet, tmp_path):
    """Folders written before the trainer's check (config 7, blocks of 8) load as before: loading does not refuse."""
    method, config = methods.for_options(with_demo_defaults(TrainingOptions(adapter="oft", oft_block_size=7)))
    trained = make_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method.inject(trained, config)
    save_adapter(trained, tmp_path / "old-oft")
    fresh = make_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(fresh, tmp_path / "old-oft", merge=False)
    assert {layer.oft_block_size["default"] for _, layer in baselines.peft_layers(fresh)} == {8}
