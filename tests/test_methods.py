"""The method registry: every entry builds its config from the trainer's options, injects, is found again in the
model, names its tensors by module, and round-trips its config dict; the trainer offers exactly its entries."""

from __future__ import annotations

import pytest
import torch

from dreambooth_gs import methods
from dreambooth_gs.injection import adapter_layers
from dreambooth_gs.options import DEFAULT_LEARNING_RATES, TrainingOptions, with_demo_defaults

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
