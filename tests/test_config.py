"""GSOFTConfig: defaults, validation messages, the JSON round trip and per-dimension block counts."""

import json
from dataclasses import fields

import pytest

from dreambooth_gs import GSOFTConfig
from dreambooth_gs.gs.config import divisors


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, {"method": "gsoft", "nblocks": 32, "block_size": None, "n_butterfly_factor": None, "scale": True}),
    ({"method": "boft"}, {"nblocks": 32, "n_butterfly_factor": 4}),
    ({"method": "boft", "nblocks": 8, "n_butterfly_factor": 1}, {"nblocks": 8, "n_butterfly_factor": 1}),
    ({"block_size": 8}, {"nblocks": None, "block_size": 8}),
    ({"target_modules": "to_q"}, {"target_modules": ("to_q",)}),
    ({"target_modules": ["to_q", "to_k"]}, {"target_modules": ("to_q", "to_k")}),
    ({"method": "double_gsoft", "parametrization": "exp", "forward_mode": "weight"},
     {"parametrization": "exp", "forward_mode": "weight"}),
    ({"parametrization": "cayley_neumann"}, {"parametrization": "cayley_neumann"}),
])  # fmt: skip
def test_defaults_and_normalisation(kwargs, expected):
    config = GSOFTConfig(**kwargs)
    for name, value in expected.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "lora"}, r"unknown method 'lora'; choose one of gsoft, double_gsoft, boft"),
    ({"nblocks": 4, "block_size": 8}, r"not both \(got nblocks=4, block_size=8\)"),
    ({"nblocks": 0}, r"nblocks must be a positive integer, got 0"),
    ({"nblocks": 2.5}, r"nblocks must be a positive integer, got 2.5"),
    ({"nblocks": True}, r"nblocks must be a positive integer, got True"),
    ({"block_size": -4}, r"block_size must be a positive integer, got -4"),
    ({"n_butterfly_factor": 2}, r"n_butterfly_factor only applies to method='boft', not 'gsoft'"),
    ({"method": "double_gsoft", "n_butterfly_factor": 1}, r"only applies to method='boft', not 'double_gsoft'"),
    ({"method": "boft", "n_butterfly_factor": 0}, r"n_butterfly_factor must be a positive integer, got 0"),
    ({"method": "boft", "nblocks": 6, "n_butterfly_factor": 3}, r"divisible by 2\*\*2=4; got nblocks=6"),
    ({"method": "boft", "nblocks": 4, "n_butterfly_factor": 4}, r"divisible by 2\*\*3=8; got nblocks=4"),
    ({"method": "boft", "block_size": 3, "n_butterfly_factor": 2}, r"even block_size, got 3"),
    ({"target_modules": ()}, r"target_modules must be non-empty"),
    ({"target_modules": ("to_q", "")}, r"target_modules must be non-empty"),
    ({"parametrization": "qr"}, r"unknown parametrization 'qr'; choose one of cayley, cayley_neumann, exp"),
    ({"forward_mode": "fast"}, r"unknown forward_mode 'fast'; choose one of auto, activation, weight"),
])  # fmt: skip
def test_invalid_configs_say_what_is_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GSOFTConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {},
    {"method": "double_gsoft", "block_size": 16, "scale": False},
    {"method": "boft", "nblocks": 16, "n_butterfly_factor": 5, "parametrization": "exp"},
    {"method": "double_gsoft", "parametrization": "cayley_neumann"},
    {"target_modules": ("query", "key"), "forward_mode": "activation"},
])  # fmt: skip
def test_dict_round_trip_through_json(kwargs):
    config = GSOFTConfig(**kwargs)
    data = json.loads(json.dumps(config.adapter_dict()))
    assert isinstance(data["target_modules"], list)
    assert GSOFTConfig.from_dict(data) == config
    # an adapter folder's config section holds the GS fields only, as format 1 always did
    assert set(data) == {"method", "nblocks", "block_size", "n_butterfly_factor", "target_modules", "scale",
                         "parametrization", "forward_mode", "weight_side_modules"}  # fmt: skip
    # PEFT's form carries peft_type, and PEFT's own loader reads it back
    peft_form = json.loads(json.dumps(config.to_dict()))
    assert peft_form["peft_type"] == "GSOFT" and GSOFTConfig.from_peft_type(**peft_form) == config


def test_from_dict_rejects_unknown_fields():
    data = GSOFTConfig().adapter_dict() | {"rank": 4}
    with pytest.raises(ValueError, match=r"unknown GSOFTConfig fields \['rank'\]"):
        GSOFTConfig.from_dict(data)


def test_every_field_has_help():
    for f in fields(GSOFTConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(("kwargs", "dim", "expected"), [
    ({"nblocks": 4}, 32, 4),
    ({"nblocks": 4}, 30, None),
    ({"nblocks": 32}, 320, 32),
    ({"block_size": 8}, 32, 4),
    ({"block_size": 8}, 30, None),
    ({"block_size": 10}, 320, 32),
])  # fmt: skip
def test_blocks_for(kwargs, dim, expected):
    assert GSOFTConfig(**kwargs).blocks_for(dim) == expected


@pytest.mark.parametrize(("n", "expected"), [(1, [1]), (12, [1, 2, 3, 4, 6, 12]), (13, [1, 13])])
def test_divisors(n, expected):
    assert divisors(n) == expected
