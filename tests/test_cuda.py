"""On a CUDA GPU, the same numbers as on the CPU: GSOFT, Double GSOFT and BOFT layers' outputs, gradients and merged
weights on both forward sides, in fp32, under bf16 autocast and with bf16 frozen weights; the auto side uses the CUDA
constant; the tiny trainer trains there and its saved adapter rebuilds the trained UNet on the CPU.

Skipped without CUDA (CI has none); benchmarks/gpu_check.sh runs this file on a GPU machine. TF32 is switched off
here: fp32 on the GPU is then fp32, and the CPU's results are the reference to rounding.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dreambooth_gs import GSOFTConfig, GSOFTLinear
from dreambooth_gs.gs.layers import choose_forward_side

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train_dreambooth_gsoft.py, for the trainer test
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda"

# (id, config kwargs, in_features, out_features): every method; blocks of 32 take the CPU's block-elimination
# inverse (above its 16-wide leaf) where CUDA takes inv_ex, so those cases compare two different kernels
CASES = [
    ("gsoft-r4", {"method": "gsoft", "nblocks": 4}, 32, 24),
    ("gsoft-b32", {"method": "gsoft", "block_size": 32}, 64, 48),
    ("gsoft-exp-noscale", {"method": "gsoft", "nblocks": 4, "parametrization": "exp", "scale": False}, 32, 24),
    ("double-r4", {"method": "double_gsoft", "nblocks": 4}, 32, 48),
    ("double-b32", {"method": "double_gsoft", "block_size": 32}, 64, 96),
    ("boft-r4m2", {"method": "boft", "nblocks": 4, "n_butterfly_factor": 2}, 32, 24),
    ("boft-r8m3", {"method": "boft", "nblocks": 8, "n_butterfly_factor": 3}, 64, 32),
    ("boft-b32m2", {"method": "boft", "block_size": 32, "n_butterfly_factor": 2}, 128, 64),
]
# fp32: fp32 weights and activations; bf16-autocast: fp32 weights, the forward under bf16 autocast; bf16-weights:
# frozen weights and activations in bf16, no autocast; bf16-weights-autocast: both, as the trainer runs
# --mixed_precision bf16 (frozen weights in bf16, accelerate's autocast around the forward)
PRECISIONS = ["fp32", "bf16-autocast", "bf16-weights", "bf16-weights-autocast"]
FP32_TOLERANCE = 1e-4  # rtol, and atol relative to the largest |value|: rounding of one fp32 kernel against another
# |cuda - cpu| / |cpu| (norms): bf16 rounding of the activations. Each device lands up to 1.5% from the fp32
# result (gsoft_s's gradient, measured on the CPU), so two bf16 runs can differ by twice that; the adapter moves
# the output by ~35%
BF16_TOLERANCE = 0.04

cases = pytest.mark.parametrize(("kwargs", "d_in", "d_out"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
sides = pytest.mark.parametrize("side", ["activation", "weight"])


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 matmuls and convolutions in fp32 (cuDNN's convolutions default to TF32; a trainer run may enable it for
    matmuls), restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def make_layer(kwargs: dict, d_in: int, d_out: int, randomize_adapter, dtype: torch.dtype = torch.float32):
    """A GSOFTLinear on the CPU, base weights in ``dtype`` with a nonzero bias, adapter moved off the identity."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    nn.init.normal_(base.bias)
    base = base.to(dtype).requires_grad_(False)
    layer = GSOFTLinear(base, GSOFTConfig(**kwargs), name="block.proj")
    randomize_adapter(layer, seed=2, std=0.3)
    return layer


def make_inputs(layer: GSOFTLinear, precision: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (requires grad; bf16 with bf16 weights) and a dense output gradient, the same values on every device."""
    dtype = torch.bfloat16 if precision.startswith("bf16-weights") else torch.float32
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, layer.base_layer.in_features, generator=generator).to(device, dtype).requires_grad_()
    return x, torch.randn(3, 7, layer.base_layer.out_features, generator=generator).to(device)


def autocast(precision: str, device: str):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision.endswith("autocast"))


def forward_backward(layer: GSOFTLinear, side: str, precision: str, device: str) -> dict[str, torch.Tensor]:
    """Output and gradients (input and every adapter parameter) of one forward + backward, moved to the CPU."""
    x, upstream = make_inputs(layer, precision, device)
    layer.forward_mode = side
    layer.zero_grad(set_to_none=True)
    with autocast(precision, device):
        y = layer(x)
    y.backward(upstream.to(y.dtype))
    grads = {name: p.grad for name, p in layer.named_parameters() if name.startswith("gsoft_")}
    return {k: v.detach().cpu() for k, v in {"output": y, "input grad": x.grad, **grads}.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@cases
@sides
@pytest.mark.parametrize("precision", PRECISIONS)
def test_outputs_and_gradients_match_the_cpu(randomize_adapter, kwargs, d_in, d_out, side, precision):
    dtype = torch.bfloat16 if precision.startswith("bf16-weights") else torch.float32
    cpu_layer = make_layer(kwargs, d_in, d_out, randomize_adapter, dtype)
    cuda_layer = copy.deepcopy(cpu_layer).to(DEVICE)
    on_cpu = forward_backward(cpu_layer, side, precision, "cpu")
    on_cuda = forward_backward(cuda_layer, side, precision, DEVICE)
    assert on_cuda.keys() == on_cpu.keys()
    for name, expected in on_cpu.items():
        assert on_cuda[name].dtype == expected.dtype, name  # adapter gradients fp32, the rest in the compute dtype
        assert expected.abs().max() > 0, name  # every gradient is there: the comparison means something
    if precision == "fp32":  # each tensor over its largest |value| on the CPU: atol relative to it, failures named
        scales = {name: expected.abs().max() for name, expected in on_cpu.items()}
        torch.testing.assert_close(
            {name: t / scales[name] for name, t in on_cuda.items()},
            {name: t / scales[name] for name, t in on_cpu.items()},
            rtol=FP32_TOLERANCE,
            atol=FP32_TOLERANCE,
        )
    else:
        errors = {name: relative_error(on_cuda[name], expected) for name, expected in on_cpu.items()}
        assert max(errors.values()) <= BF16_TOLERANCE, errors
    with torch.no_grad(), autocast(precision, "cpu"):  # the adapter acts, well beyond the tolerance
        plain = cpu_layer.base_layer(make_inputs(cpu_layer, precision, "cpu")[0])
    assert relative_error(plain, on_cpu["output"]) > 5 * BF16_TOLERANCE


@cases
def test_merged_weight_and_unmerge_match_the_cpu(randomize_adapter, kwargs, d_in, d_out):
    cpu_layer = make_layer(kwargs, d_in, d_out, randomize_adapter)
    cuda_layer = copy.deepcopy(cpu_layer).to(DEVICE)
    expected = cpu_layer.merged_weight()
    scale = expected.abs().max().item()
    tolerance = {"rtol": FP32_TOLERANCE, "atol": FP32_TOLERANCE * scale}
    torch.testing.assert_close(cuda_layer.merged_weight().cpu(), expected, **tolerance)
    original = cuda_layer.base_layer.weight.detach().clone()
    cuda_layer.merge()
    torch.testing.assert_close(cuda_layer.base_layer.weight.cpu(), expected, **tolerance)
    cuda_layer.unmerge()
    torch.testing.assert_close(cuda_layer.base_layer.weight, original, **tolerance)


@cases
def test_a_layer_built_on_cuda_keeps_everything_there(kwargs, d_in, d_out):
    layer = GSOFTLinear(nn.Linear(d_in, d_out, device=DEVICE).requires_grad_(False), GSOFTConfig(**kwargs))
    assert {t.device.type for t in [*layer.parameters(), *layer.buffers()]} == {"cuda"}
    x = torch.randn(5, d_in, device=DEVICE)
    with torch.no_grad():  # identity at initialisation, on the GPU too
        torch.testing.assert_close(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("n_tokens", [77, 1024, 16384, 65536])
@pytest.mark.parametrize(("kwargs", "width"), [({"method": "gsoft", "nblocks": 32}, 320), ({"nblocks": 32}, 1280)])
def test_auto_side_uses_the_cuda_constant(kwargs, width, n_tokens):
    layer = GSOFTLinear(nn.Linear(width, width, device=DEVICE).requires_grad_(False), GSOFTConfig(**kwargs))
    x = torch.empty(n_tokens, width, device=DEVICE)
    assert layer.forward_side(x) == choose_forward_side(n_tokens, width, width, False, True, "cuda")
    with torch.no_grad():  # no adapter gradients: the cheaper side without the weight gradient's matmul
        assert layer.forward_side(x) == choose_forward_side(n_tokens, width, width, False, False, "cuda")


@pytest.mark.usefixtures("tiny_cache", "default_precision")
def test_tiny_trainer_trains_on_cuda_and_its_adapter_rebuilds_the_unet_on_the_cpu(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from dreambooth_gs import load_adapter
    from dreambooth_gs.train import models
    from train_dreambooth_gsoft import main, parse_args

    kept = {}
    add_adapter = models.add_adapter

    def keep_unet(unet, options):  # the trained UNet itself, to compare with the saved adapter on the CPU
        kept["unet"], method = add_adapter(unet, options)
        return kept["unet"], method

    monkeypatch.setattr(models, "add_adapter", keep_unet)
    flags = ["--train_batch_size", "2", "--report_to", "none", "--validation_prompt=", "--center_crop"]
    flags += ["--max_train_steps", "2", "--learning_rate", "1e-2", "--adapter", "gsoft", "--gsoft_nblocks", "4"]
    out = main(parse_args(["--output_dir", str(tmp_path / "out"), *flags]))
    trained = kept["unet"]
    assert {p.device.type for p in trained.parameters()} == {"cuda"}
    tensors = load_file(out / "adapter_model.safetensors")
    moved = [t for k, t in tensors.items() if "gsoft_L" in k]
    assert moved and max(t.abs().max().item() for t in moved) > 0  # two steps moved the blocks off zero
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())

    info = json.loads((out / "training_args.json").read_text())
    base = UNet2DConditionModel.from_pretrained(info["base_model"], subfolder="unet")
    load_adapter(base, out, merge=False)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 5, 32, generator=g))
    with torch.no_grad():
        on_cpu = base.eval()(*inputs).sample
        on_cuda = trained.eval()(*(t.to(DEVICE) for t in inputs)).sample.cpu()
        untrained = UNet2DConditionModel.from_pretrained(info["base_model"], subfolder="unet").eval()(*inputs).sample
    scale = on_cpu.abs().max().item()
    torch.testing.assert_close(on_cuda, on_cpu, rtol=FP32_TOLERANCE, atol=FP32_TOLERANCE * scale)
    assert (on_cpu - untrained).abs().max() > 100 * FP32_TOLERANCE * scale  # the trained adapter shows
