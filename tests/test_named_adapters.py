"""Adapters used as LoRA users use theirs, on the tiny SD pipeline with folders the trainer wrote
(tests/data/release-0.1): a name, a strength, a GS subject adapter beside a LoRA style adapter, switched off and on,
fused, unloaded; a failed load changes nothing; a pipeline saved with adapters loaded unmerged keeps its base weights
and the adapters apart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_gs import load_adapter
from dreambooth_gs.adapters import named
from dreambooth_gs.adapters.saving import ADAPTERS_FOLDER

RELEASE = Path(__file__).resolve().parent / "data" / "release-0.1"


def sd_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


@pytest.fixture
def pipe(tiny_dir):
    return sd_pipeline(tiny_dir)


def unet_out(pipe) -> torch.Tensor:
    config = pipe.unet.config
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=g)
    text = torch.randn(1, 3, config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([10]), text).sample


def text_out(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.text_encoder(torch.tensor([[1, 5, 9, 2]]))[0]


def snapshot(pipe) -> dict:
    return {
        name: {k: (v.detach().clone(), v.requires_grad) for k, v in getattr(pipe, name).named_parameters()}
        for name in ("unet", "text_encoder")
    }


def test_strength_zero_is_the_base_one_is_the_plain_load(pipe, tiny_dir):
    from diffusers import StableDiffusionPipeline

    base = unet_out(pipe)
    plain = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    load_adapter(plain, RELEASE / "gsoft", merge=False)  # the trainer's own layers
    load_adapter(pipe, RELEASE / "gsoft", adapter_name="dog", merge=False)
    assert torch.allclose(unet_out(pipe), unet_out(plain), atol=1e-5)
    assert torch.allclose(text_out(pipe), text_out(plain), atol=1e-5)  # its text-encoder adapter came too
    named.set_adapters(pipe, "dog", 0.0)
    assert torch.allclose(unet_out(pipe), base, atol=1e-6)
    named.set_adapters(pipe, "dog", 0.5)
    half = unet_out(pipe)
    assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, unet_out(plain), atol=1e-4)


def test_a_gs_subject_and_a_lora_style_switched_fused_and_unloaded(pipe):
    base = unet_out(pipe)
    load_adapter(pipe, RELEASE / "gsoft", adapter_name="dog", merge=False)
    dog = unet_out(pipe)
    load_adapter(pipe, RELEASE / "lora", adapter_name="style", merge=False)
    assert named.adapter_names(pipe.unet) == ["dog", "style"]
    both = unet_out(pipe)
    assert not torch.allclose(both, dog, atol=1e-4)
    named.set_adapters(pipe, ["dog", "style"], [1.0, 0.6])
    mixed = unet_out(pipe)
    assert not torch.allclose(mixed, both, atol=1e-5)
    named.disable_adapters(pipe)
    assert torch.allclose(unet_out(pipe), base, atol=1e-6)
    named.enable_adapters(pipe)
    assert torch.allclose(unet_out(pipe), mixed, atol=1e-6)
    named.set_adapters(pipe, ["dog"], [1.0])
    assert torch.allclose(unet_out(pipe), dog, atol=1e-6)
    named.unload_adapter(pipe, "style")
    assert named.adapter_names(pipe.unet) == ["dog"]
    assert torch.allclose(unet_out(pipe), dog, atol=1e-6)
    with pytest.raises(ValueError, match="no adapter named 'style'"):
        named.set_adapters(pipe, ["style"])


def test_fused_at_a_strength_equals_the_switchable_adapter_there(pipe, tiny_dir):
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    load_adapter(pipe, RELEASE / "gsoft", adapter_name="dog", merge=False, scale=0.7)
    switchable = unet_out(pipe)

    def fresh():
        return StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)

    plain = fresh()
    load_adapter(plain, RELEASE / "gsoft", scale=0.7)  # no name, merge=True: folded in at 0.7, plain layers
    assert torch.allclose(unet_out(plain), switchable, atol=1e-5)
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.unet.modules()) and not named.adapter_names(plain.unet)
    fused = fresh()
    load_adapter(fused, RELEASE / "gsoft", adapter_name="dog", scale=0.7)  # named, merge=True: fused, still named
    assert torch.allclose(unet_out(fused), switchable, atol=1e-5)
    named.unfuse_adapters(fused)
    assert torch.allclose(unet_out(fused), switchable, atol=1e-5)
    named.set_adapters(fused, "dog", 0.0)
    assert torch.allclose(unet_out(fused), unet_out(fresh()), atol=1e-5)


def test_full_at_a_strength_interpolates_the_weights(pipe, tiny_dir):
    from diffusers import StableDiffusionPipeline

    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    trained = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    load_adapter(trained, RELEASE / "full")
    load_adapter(pipe, RELEASE / "full", scale=0.25)
    changed = 0
    for key, value in pipe.unet.state_dict().items():
        expected = base[key] + 0.25 * (trained.unet.state_dict()[key] - base[key])
        assert torch.allclose(value, expected, atol=1e-6), key
        changed += not torch.equal(value, base[key])
    assert changed > 0


@pytest.mark.parametrize(
    "folder, kwargs, message",
    [
        ("boft", {"adapter_name": "x", "scale": float("nan")}, "finite"),
        ("full", {"adapter_name": "x"}, "has no name or switch"),
        ("gsoft", {"adapter_name": "a.b"}, "without dots"),
    ],
)
def test_refusals_are_one_line_and_change_nothing(pipe, folder, kwargs, message):
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=message):
        load_adapter(pipe, RELEASE / folder, **kwargs)
    after = snapshot(pipe)
    for component in before:
        assert before[component].keys() == after[component].keys()
        assert all(
            torch.equal(a[0], b[0]) and a[1] == b[1]
            for a, b in zip(before[component].values(), after[component].values())
        )


def test_the_same_name_twice_is_refused(pipe):
    load_adapter(pipe, RELEASE / "gsoft", adapter_name="dog", merge=False)
    with pytest.raises(ValueError, match="already loaded"):
        load_adapter(pipe, RELEASE / "lora", adapter_name="dog", merge=False)


@pytest.mark.parametrize("adapter_name", [None, "dog"])
def test_a_load_that_fails_on_the_text_encoder_leaves_every_component_as_it_was(pipe, tmp_path, adapter_name):
    """Issue 32: a truncated text_encoder adapter used to leave the UNet's trainability changed (84 -> 0)."""
    broken = tmp_path / "broken"
    shutil.copytree(RELEASE / "gsoft", broken, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = broken / "text_encoder" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot(pipe)
    base = unet_out(pipe)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter(pipe, broken, adapter_name=adapter_name, merge=False)
    after = snapshot(pipe)
    for component in before:
        assert before[component].keys() == after[component].keys(), component  # no adapter left in
        for key, (value, trainable) in before[component].items():
            assert torch.equal(after[component][key][0], value) and after[component][key][1] == trainable, key
    assert torch.equal(unet_out(pipe), base)
    assert not named.adapter_names(pipe.unet) and not named.adapter_names(pipe.text_encoder)


def test_diffusers_own_pipeline_calls_drive_them_too(pipe):
    """pipe.set_adapters / disable_lora / enable_lora / delete_adapters (diffusers' LoRA loader mixin) work on a GS
    and a LoRA adapter loaded by name, with the same results as dreambooth_gs's own calls."""
    base = unet_out(pipe)
    load_adapter(pipe, RELEASE / "gsoft", adapter_name="dog", merge=False)
    load_adapter(pipe, RELEASE / "lora", adapter_name="style", merge=False)
    named.set_adapters(pipe, ["dog", "style"], [0.5, 0.7])
    ours = unet_out(pipe)
    named.set_adapters(pipe, ["dog", "style"], [1.0, 1.0])
    pipe.set_adapters(["dog", "style"], adapter_weights=[0.5, 0.7])
    assert torch.allclose(unet_out(pipe), ours, atol=1e-6)
    pipe.disable_lora()
    assert torch.allclose(unet_out(pipe), base, atol=1e-6)
    pipe.enable_lora()
    assert torch.allclose(unet_out(pipe), ours, atol=1e-6)
    pipe.delete_adapters("style")
    assert list(pipe.unet.peft_config) == ["dog"]


def test_oft_takes_its_strength_when_it_loads(pipe, tiny_dir):
    """PEFT's OFT layers have no strength to set: it is fixed at load (the stored generators scaled: Cayley(s K)),
    and set_adapters refuses another weight for it in one line."""
    base = unet_out(pipe)
    load_adapter(pipe, RELEASE / "oft", adapter_name="rot", merge=False, scale=0.0)
    assert torch.allclose(unet_out(pipe), base, atol=1e-5)  # s = 0: the identity rotation
    with pytest.raises(ValueError, match="fixed when it loads"):
        named.set_adapters(pipe, "rot", 0.5)


def test_a_load_that_fails_inside_peft_leaves_no_wrapped_layer(make_mlp, tmp_path):
    """PEFT wraps layers one by one: when a later layer refuses (here fc2's 30 inputs do not divide into 4 blocks),
    the layers it wrapped before go back too, though PEFT left no peft_config to say so."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from dreambooth_gs import GSOFTConfig, inject_adapter, save_adapter

    trained = make_mlp()
    inject_adapter(trained, GSOFTConfig(target_modules=["fc1", "fc2"], nblocks=4))
    save_adapter(trained, tmp_path / "mlp-gsoft")
    other = make_mlp(dims=(16, 30, 24))
    before = {k: (v.clone(), v.requires_grad) for k, v in other.named_parameters()}
    with pytest.raises(ValueError, match="does not divide in_features=30 of fc2"):
        load_adapter(other, tmp_path / "mlp-gsoft", adapter_name="dog")
    assert not any(isinstance(m, BaseTunerLayer) for m in other.modules()) and not named.adapter_names(other)
    after = dict(other.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) and after[k].requires_grad == g for k, (v, g) in before.items())


def test_an_adapter_folder_whose_name_is_not_utf8_loads(pipe, tmp_path):
    """Issue 30: the evaluator reads run folders by name; safetensors' file reader refused a non-UTF-8 path."""
    import os

    folder = Path(os.fsdecode(bytes(tmp_path) + b"/run\xff"))
    shutil.copytree(RELEASE / "lora", folder)
    base = unet_out(pipe)
    load_adapter(pipe, folder)
    assert not torch.allclose(unet_out(pipe), base, atol=1e-5)


# -- saving a pipeline that holds adapters -----------------------------------------------------------------------


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


@pytest.mark.parametrize("how", ["unnamed", "named", "named_fused", "subject_and_style"])
def test_saved_pipeline_is_the_base_and_its_adapters_load_back(tiny_dir, tmp_path, how):
    base = sd_pipeline(tiny_dir)
    base_unet, base_text = unet_out(base), text_out(base)
    pipe = sd_pipeline(tiny_dir)
    if how == "unnamed":
        load_adapter(pipe, RELEASE / "gsoft", merge=False)
    elif how == "named":
        load_adapter(pipe, RELEASE / "gsoft", adapter_name="dog", merge=False)
    elif how == "named_fused":
        load_adapter(pipe, RELEASE / "gsoft", adapter_name="dog", merge=True)
    else:
        load_adapter(pipe, RELEASE / "gsoft", adapter_name="dog", merge=False)
        load_adapter(pipe, RELEASE / "lora", adapter_name="style", merge=False)
    adapted_unet, adapted_text = unet_out(pipe), text_out(pipe)
    assert not torch.allclose(adapted_unet, base_unet, atol=1e-4)

    pipe.save_pretrained(tmp_path / "saved")

    # put back (a fused adapter is unfused and fused again: equal to float rounding)
    assert torch.allclose(unet_out(pipe), adapted_unet, atol=1e-6)
    assert torch.allclose(text_out(pipe), adapted_text, atol=1e-5)
    for component in ("unet", "text_encoder"):
        saved, original = weights(tmp_path / "saved" / component), weights(Path(tiny_dir) / component)
        assert set(saved) == set(original)  # no base_layer / adapter keys
        # the base weights: exactly, or to float rounding where a fused adapter was taken out of them
        tolerance = 1e-6 if how == "named_fused" else 0.0
        assert all(torch.allclose(saved[k], original[k], rtol=0, atol=tolerance) for k in saved)
    reloaded = sd_pipeline(tmp_path / "saved")
    assert torch.allclose(unet_out(reloaded), base_unet, rtol=0, atol=10 * tolerance)
    assert torch.allclose(text_out(reloaded), base_text, rtol=0, atol=10 * tolerance)

    names = sorted(p.name for p in (tmp_path / "saved" / "unet" / ADAPTERS_FOLDER).iterdir())
    assert names == {"unnamed": ["default"], "subject_and_style": ["dog", "style"]}.get(how, ["dog"])
    for name in names:
        for component in ("unet", "text_encoder"):
            folder = tmp_path / "saved" / component / ADAPTERS_FOLDER / name
            if folder.is_dir():
                load_adapter(getattr(reloaded, component), folder, adapter_name=name, merge=False)
    assert torch.allclose(unet_out(reloaded), adapted_unet, atol=1e-5)
    assert torch.allclose(text_out(reloaded), adapted_text, atol=1e-5)


def test_a_model_whose_adapters_are_all_unloaded_saves_as_usual(tiny_dir, tmp_path):
    pipe = sd_pipeline(tiny_dir)
    load_adapter(pipe, RELEASE / "gsoft", adapter_name="dog", merge=False)
    named.unload_adapter(pipe, "dog")
    pipe.unet.save_pretrained(tmp_path / "unet")
    assert not (tmp_path / "unet" / ADAPTERS_FOLDER).exists()
    assert set(weights(tmp_path / "unet")) == set(weights(Path(tiny_dir) / "unet"))
