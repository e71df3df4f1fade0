"""``--base_model_precision int8-torchao`` on tiny SD, SDXL, SD3 and Flux pipelines: the denoiser is loaded quantized
(torchao's int8 weights through diffusers' TorchAoConfig), GSOFT and LoRA train on it and save the usual adapter
folder, which loads into the full-precision pipeline and changes its output; resume is exact; what cannot train on a
quantized base is refused in one line before anything is written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("torchao")

from accelerate import Accelerator  # noqa: E402

from dreambooth_gs import load_adapter  # noqa: E402
from dreambooth_gs.adapters.sampling import generate_images  # noqa: E402
from dreambooth_gs.resources import TINY_FLUX_CONFIG_DIR, TINY_SD3_CONFIG_DIR, TINY_SDXL_CONFIG_DIR  # noqa: E402
from dreambooth_gs.tiny.pipelines import build_tiny_pipeline  # noqa: E402
from dreambooth_gs.train import models  # noqa: E402
from dreambooth_gs.train.quantization import DequantizedLinear, is_quantized  # noqa: E402
from train_dreambooth_gsoft import main, parse_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("tiny_cache")
FAST = ["--train_batch_size", "2", "--report_to", "none", "--validation_prompt=", "--center_crop"]
FAST += ["--class_name", "toy", "--learning_rate", "1e-2", "--gsoft_nblocks", "4", "--boft_block_num", "8"]
FAST += ["--oft_block_size", "8"]
FLOW = ["--max_sequence_length", "16"]
INT8 = ["--base_model_precision", "int8-torchao"]
FAMILIES = ("sd", "flux")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized-models")
    return {
        "sd": build_tiny_pipeline(root / "sd"),
        "sdxl": build_tiny_pipeline(root / "sdxl", config_dir=TINY_SDXL_CONFIG_DIR),
        "sd3": build_tiny_pipeline(root / "sd3", config_dir=TINY_SD3_CONFIG_DIR),
        "flux": build_tiny_pipeline(root / "flux", config_dir=TINY_FLUX_CONFIG_DIR),
    }


def train(tiny: dict[str, Path], family: str, output_dir: Path, *extra: str) -> Path:
    flags = ["--pretrained_model_name_or_path", str(tiny[family]), "--output_dir", str(output_dir), *FAST]
    return main(parse_args([*flags, *(FLOW if family in ("sd3", "flux") else []), *extra]))


def pipeline(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe) -> torch.Tensor:
    kwargs = {"height": 32, "width": 32, "output_type": "latent"}
    return torch.stack(generate_images(pipe, ["a sks toy"], [3], 2, 5.0, **kwargs))


@pytest.mark.parametrize("adapter", ["gsoft", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_denoiser_is_quantized_and_the_adapter_reads_it(tiny, family, adapter):
    options = parse_args(["--pretrained_model_name_or_path", str(tiny[family]), "--adapter", adapter, *FAST, *INT8])
    subject = models.check_subject_data(options, Accelerator(cpu=True))
    parts = models.load_components(options, Accelerator(cpu=True), torch.float32, subject)
    options = models.family_options(options, parts.family)
    denoiser, _ = models.add_adapter(parts.denoiser, options)
    linears = [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert linears and all(is_quantized(m.weight) for m in linears)  # every frozen Linear, the targeted ones included
    wrapped = [m for m in denoiser.modules() if isinstance(m, DequantizedLinear)]
    assert bool(wrapped) == (adapter == "gsoft")  # the GS kernels read a dequantized copy; PEFT calls the layer
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and not is_quantized(p) for p in trainable)


@pytest.mark.parametrize(
    "flags, quantized",
    [
        ([], {"text_encoder", "text_encoder_2"}),  # both stay through training: quantized with the denoiser
        (["--cache_text_embeddings"], set()),  # freed after encoding the prompts: loaded as saved
        (["--train_text_encoder"], {"text_encoder_2"}),  # CLIP is trained (its weights read whole); T5 is not
    ],
)
def test_the_text_encoders_that_stay_are_quantized_with_the_denoiser(tiny, flags, quantized):
    options = parse_args(["--pretrained_model_name_or_path", str(tiny["flux"]), *FAST, *FLOW, *INT8, *flags])
    subject = models.check_subject_data(options, Accelerator(cpu=True))
    parts = models.load_components(options, Accelerator(cpu=True), torch.float32, subject)
    found = set()
    for name, encoder in zip(parts.family.text_encoder_names, parts.text_encoders):
        weights = [m.weight for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
        if all(is_quantized(w) for w in weights):
            found.add(name)
        else:
            assert not any(is_quantized(w) for w in weights), name
    assert found == quantized


# GSOFT and LoRA on SD and Flux; the other methods (GS kernels: Double GSOFT, BOFT; PEFT: OFT) on Flux; GSOFT on
# SDXL and SD3 (every family, the GS kernels' path through the quantized layers).
TRAINED = [(f, a) for f in FAMILIES for a in ("gsoft", "lora")] + [("flux", a) for a in ("double_gsoft", "boft", "oft")]
TRAINED += [("sdxl", "gsoft"), ("sd3", "gsoft")]


@pytest.mark.parametrize(("family", "adapter"), TRAINED)
def test_an_adapter_trained_on_int8_loads_into_the_full_precision_pipeline(tiny, tmp_path, family, adapter):
    out = train(tiny, family, tmp_path / "int8", "--adapter", adapter, "--max_train_steps", "2", *INT8)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_args.json",
    ]
    full = train(tiny, family, tmp_path / "full", "--adapter", adapter, "--max_train_steps", "2")
    tensors, reference = load_file(out / "adapter_model.safetensors"), load_file(full / "adapter_model.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in reference.items()}  # the same layout
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    base = sample(pipeline(tiny[family]))
    adapted = pipeline(tiny[family])
    load_adapter(adapted, out)
    # Both methods start as the identity: a changed output means the trained tensors moved from their init.
    assert (sample(adapted) - base).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_resume_of_a_quantized_run_is_exact(tiny, tmp_path, family):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", *INT8]
    straight = load_file(train(tiny, family, tmp_path / "a", *common) / "adapter_model.safetensors")
    train(tiny, family, tmp_path / "b", "--max_train_steps", "2", "--checkpointing_steps", "2", *INT8)
    resumed = train(tiny, family, tmp_path / "b", *common, "--resume_from_checkpoint", "latest")
    again = load_file(resumed / "adapter_model.safetensors")
    assert straight.keys() == again.keys()
    assert max((straight[k] - again[k]).abs().max().item() for k in straight) == 0.0


FP8_RUNS = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
REFUSALS = [
    (["--gsoft_forward_mode", "weight"], "GS methods on the activation side only"),
    (["--gsoft_weight_side_modules", "to_out.0"], "GS methods on the activation side only"),
    (["--adapter", "full"], "--adapter full trains them"),
    (["--adapter", "boft", "--boft_backend", "peft"], "PEFT's BOFT rotates the frozen weight"),
    (["--base_model_precision", "fp8-torchao"], "compute capability 8.9"),
    (["--base_model_precision", "nf4-bnb"], "needs a CUDA GPU"),
    (["--base_model_precision", "int8-bnb"], "needs a CUDA GPU"),
]


@pytest.mark.parametrize(("flags", "message"), REFUSALS, ids=[" ".join(f) for f, _ in REFUSALS])
def test_what_cannot_train_on_a_quantized_base_is_refused_in_one_line(tiny, tmp_path, capsys, flags, message):
    if "fp8-torchao" in flags and FP8_RUNS:
        pytest.skip("this GPU runs fp8")
    if any(f.endswith("-bnb") for f in flags) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bitsandbytes bases load")
    with pytest.raises(SystemExit) as exit_info:
        train(tiny, "sd", tmp_path / "out", *INT8, *flags, "--max_train_steps", "1")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage line, then the one-line reason
    assert message in error and "--base_model_precision" in error
    assert not (tmp_path / "out").exists()


def test_no_change_is_the_default():
    assert parse_args([]).base_model_precision == "no_change"


@pytest.mark.parametrize("method", ["gsoft", "double_gsoft", "boft"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_gs_methods_train_through_bitsandbytes_layers(kind, method):
    """A GS layer on a bitsandbytes NF4 / int8 Linear (built by hand: diffusers loads those only on CUDA) computes, in
    forward and backward, exactly what it computes on a plain Linear holding the dequantized weight."""
    bnb = pytest.importorskip("bitsandbytes")
    from dreambooth_gs import GSOFTConfig
    from dreambooth_gs.gs.layers import GSOFTLinear
    from dreambooth_gs.train.quantization import dequantize, expose_dequantized_weights

    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 32)
    if kind == "nf4":
        quantized = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    else:
        quantized = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    quantized.load_state_dict(plain.state_dict())
    quantized = quantized.to("cpu")  # bitsandbytes quantizes when the layer moves to its device
    assert is_quantized(quantized.weight) and not is_quantized(plain.weight)
    dense = torch.nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight.copy_(dequantize(quantized.weight))
        dense.bias.copy_(quantized.bias)
    assert 0 < (dense.weight - plain.weight).abs().max() < 0.1  # quantized, and close
    config = GSOFTConfig(method=method, nblocks=8 if method == "boft" else 4, target_modules=("x",))
    layers = [GSOFTLinear(quantized, config), GSOFTLinear(dense, config)]
    model = torch.nn.Sequential(layers[0])
    assert expose_dequantized_weights(model) == 1 and isinstance(layers[0].base_layer, DequantizedLinear)
    with torch.no_grad():
        for mine, other in zip(layers[0].adapter_parameters(), layers[1].adapter_parameters()):
            mine.copy_(0.1 * torch.randn(mine.shape))
            other.copy_(mine)
    x = torch.randn(6, 64)
    outs, grads = [], []
    for layer in layers:
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([xi.grad, *[p.grad for p in layer.adapter_parameters()]])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0], grads[1]))
    assert quantized.weight.dtype in (torch.uint8, torch.int8)  # the stored weight stays quantized


def test_bitsandbytes_bases_load_through_diffusers_config_and_plan_without_a_gpu(tiny):
    from diffusers import BitsAndBytesConfig

    from dreambooth_gs.train import memory_plan
    from dreambooth_gs.train.quantization import denoiser_kwargs

    config = denoiser_kwargs("nf4-bnb", torch.bfloat16)["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert denoiser_kwargs("int8-bnb", torch.bfloat16)["quantization_config"].load_in_8bit
    args = ["--pretrained_model_name_or_path", str(tiny["flux"]), "--estimate_memory", "--mixed_precision", "bf16"]
    sizes = {p: memory_plan.plan_memory(parse_args([*args, "--base_model_precision", p])).components[0].weight_bytes
             for p in ("no_change", "int8-torchao", "nf4-bnb")}  # fmt: skip
    assert sizes["nf4-bnb"] < sizes["int8-torchao"] < sizes["no_change"]


def test_diffusers_bnb_config_file_sets_the_precision(tiny, tmp_path, capsys):
    """--bnb_quantization_config_path (diffusers' flag): its JSON picks nf4-bnb / int8-bnb and its arguments go into
    the BitsAndBytesConfig; a bad file or a contradicting --base_model_precision is one line."""
    from dreambooth_gs.train.quantization import denoiser_kwargs

    config = tmp_path / "bnb.json"
    config.write_text('{"load_in_4bit": true, "bnb_4bit_quant_type": "fp4"}')
    base = ["--pretrained_model_name_or_path", str(tiny["sd"]), "--estimate_memory"]
    options = parse_args([*base, "--bnb_quantization_config_path", str(config)])
    assert options.base_model_precision == "nf4-bnb"
    made = denoiser_kwargs(options.base_model_precision, torch.bfloat16, options.bnb_quantization_config_path)
    assert made["quantization_config"].bnb_4bit_quant_type == "fp4"  # the file's, not the default nf4
    assert made["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    for text, flags, message in [
        ("[1, 2]", [], "one of load_in_4bit / load_in_8bit"),
        ("{nope", [], "not valid JSON"),
        ('{"load_in_8bit": true}', ["--base_model_precision", "int8-torchao"], "asks for int8-bnb"),
    ]:
        config.write_text(text)
        with pytest.raises(SystemExit):
            parse_args([*base, "--bnb_quantization_config_path", str(config), *flags])
        assert message in capsys.readouterr().err
    config.write_text('{"load_in_8bit": true}')
    if not torch.cuda.is_available():  # running (not planning) needs CUDA
        with pytest.raises(SystemExit):
            parse_args(["--bnb_quantization_config_path", str(config)])
        assert "needs a CUDA GPU" in capsys.readouterr().err
