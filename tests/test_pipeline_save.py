"""A pipeline saved with adapters loaded unmerged: its folder loads as the base model (no adapter keys in the
model's files) and each adapter sits in its own folder beside, which loads back to the same outputs."""

from __future__ import annotations

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
