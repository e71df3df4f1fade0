"""FSDP2 (dreambooth_gs.train.distributed): the frozen denoiser sharded over 2 gloo processes on the CPU.

What is tested here: the sharding code itself against one process with the same global batch (tests/fsdp_worker.py
under torchrun, tiny SD UNet and tiny Flux transformer), and the trainer launched as a user launches it on GPUs
(``accelerate launch --use_fsdp --fsdp_version 2``: the same code path, gloo instead of NCCL) against DDP, with
resume, the saved adapter's format, bf16 autocast, validation and class images drawn by the sharded denoiser.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_gs.train.distributed import (
    ShardingRequest,
    check_shardable,
    requested_sharding,
    without_accelerate_fsdp,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TRAIN = ["--checkpointing_steps", "3", "--learning_rate", "1e-2", "--gsoft_nblocks", "4", "--train_batch_size", "1"]
TRAIN += ["--report_to", "none", "--validation_prompt=", "--center_crop", "--max_train_steps", "6"]
FSDP = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp2.yaml")]  # the README's, as users launch it

pytestmark = pytest.mark.usefixtures("tiny_cache")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


# -- the sharding code against one process ------------------------------------------------------------------------


def test_sharded_steps_equal_one_process_with_the_same_global_batch(tmp_path):
    """Tiny SD UNet and tiny Flux transformer, three SGD steps (Adam would blow float noise in near-zero gradients
    up to its learning rate); each of the two processes takes half of the global batch, the reference (here, in
    this process) all of it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp_worker", ROOT / "tests" / "fsdp_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [spec.origin, "--out", str(tmp_path / "two")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    for family in worker.TARGETS:
        with torch.random.fork_rng(devices=[]):  # the worker seeds its models: leave this process's RNG alone
            one, _ = worker.train(family, rank=0, world=1)
        two = load_file(tmp_path / "two" / f"{family}.safetensors")
        assert max_diff(one, two) < 2e-6, family
        assert max(t.abs().max().item() for t in one.values()) > 0.1  # well past the tolerance: the check can fail
        held = json.loads((tmp_path / "two" / f"{family}.json").read_text())
        assert held["sharded_trainable"] == 0  # the adapter stays whole on every process
        assert held["frozen_full"] / 2 <= held["frozen_local"] < held["frozen_full"] / 2 * 1.02  # half (+ padding)


def test_sharding_units_are_the_blocks_of_each_family():
    from dreambooth_gs import families
    from dreambooth_gs.resources import TINY_FLUX_CONFIG_DIR, TINY_SD3_CONFIG_DIR, TINY_SD_CONFIG_DIR
    from dreambooth_gs.tiny.pipelines import make_model

    def units(family: str, path: Path) -> list[str]:
        model = make_model(json.loads(path.read_text()))
        return [type(m).__name__ for m in families.get(family).sharding_units(model)]

    # tiny SD's blocks, each part a unit: CrossAttnDown (attention, resnet, downsampler), Down (resnet),
    # mid (attention, 2 resnets), Up (2 resnets, upsampler), CrossAttnUp (2 attentions, 2 resnets)
    assert units("sd", TINY_SD_CONFIG_DIR / "unet.json") == [
        *("Transformer2DModel", "ResnetBlock2D", "Downsample2D"),
        "ResnetBlock2D",
        *("Transformer2DModel", "ResnetBlock2D", "ResnetBlock2D"),
        *("ResnetBlock2D", "ResnetBlock2D", "Upsample2D"),
        *("Transformer2DModel", "Transformer2DModel", "ResnetBlock2D", "ResnetBlock2D"),
    ]
    sd3 = json.loads((TINY_SD3_CONFIG_DIR / "transformer.json").read_text())
    assert units("sd3", TINY_SD3_CONFIG_DIR / "transformer.json") == ["JointTransformerBlock"] * sd3["num_layers"]
    flux = json.loads((TINY_FLUX_CONFIG_DIR / "transformer.json").read_text())
    assert units("flux", TINY_FLUX_CONFIG_DIR / "transformer.json") == (
        ["FluxTransformerBlock"] * flux["num_layers"] + ["FluxSingleTransformerBlock"] * flux["num_single_layers"]
    )


# -- accelerate's settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "1"}, None),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ShardingRequest()),
        (
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_RESHARD_AFTER_FORWARD": "false",
                "FSDP_ACTIVATION_CHECKPOINTING": "true",
                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            },
            ShardingRequest(reshard_after_forward=False, activation_checkpointing=True),
        ),
    ],
)
def test_accelerates_fsdp_settings_are_read(environ, expected):
    assert requested_sharding(environ) == expected


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"FSDP_VERSION": "1"}, "fsdp_version 1; this trainer shards with FSDP2"),
        ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params is not supported"),
        ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "FULL_SHARD"}, "FSDP2 takes true or false"),
    ],
)
def test_unsupported_fsdp_settings_are_one_line(environ, message):
    with pytest.raises(ValueError, match=message) as err:
        requested_sharding({"ACCELERATE_USE_FSDP": "true", **environ})
    assert "\n" not in str(err.value)


def test_the_fsdp_switch_is_hidden_only_while_the_accelerator_is_made():
    environ = {"ACCELERATE_USE_FSDP": "true", "OTHER": "1"}
    with without_accelerate_fsdp(environ):
        assert environ == {"OTHER": "1"}
    assert environ == {"ACCELERATE_USE_FSDP": "true", "OTHER": "1"}


def test_full_finetuning_and_quantized_bases_are_refused():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="full fine-tuning trains every weight"):
        check_shardable(layer, "full")
    check_shardable(layer, "gsoft")  # plain frozen weights: fine
    pytest.importorskip("torchao")
    from diffusers import TorchAoConfig  # noqa: F401  (the quantizer the trainer uses)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(layer, Int8WeightOnlyConfig())
    layer.requires_grad_(False)
    with pytest.raises(ValueError, match="FSDP cannot shard the quantized base weight 0.weight"):
        check_shardable(layer, "gsoft")


# -- the trainer, launched as on GPUs -----------------------------------------------------------------------------


def launch(output_dir: Path, launcher: list[str], *flags: str, model: Path | None = None) -> str:
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2"]
    command += ["--num_machines", "1", "--dynamo_backend", "no"]
    command += [str(ROOT / "train_dreambooth_gsoft.py"), "--output_dir", str(output_dir), *TRAIN, *flags]
    command += ["--pretrained_model_name_or_path", str(model)] if model is not None else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, Path]:
    """Six steps on two processes, sharded and with DDP, each checkpointed at step 3."""
    root = tmp_path_factory.mktemp("fsdp")
    out = launch(root / "fsdp", FSDP, "--mixed_precision", "no")
    assert "FSDP2: the frozen denoiser sharded over 2 processes in 15 units" in out
    launch(root / "ddp", ["--multi_gpu"], "--mixed_precision", "no")
    return {"fsdp": root / "fsdp", "ddp": root / "ddp"}


def test_fsdp_trains_the_same_adapter_as_ddp_in_the_same_format(straight):
    fsdp, ddp = straight["fsdp"], straight["ddp"]
    assert max_diff(adapter(fsdp), adapter(ddp)) < 2e-5  # same data and noise per process; float order differs
    assert max_diff(adapter(fsdp / "checkpoint-3"), adapter(fsdp)) > 1e-3  # the last steps moved it
    config = json.loads((fsdp / "adapter_config.json").read_text())
    assert config == json.loads((ddp / "adapter_config.json").read_text())
    names = sorted(p.name for p in (fsdp / "checkpoint-3").iterdir())
    assert names == sorted(p.name for p in (ddp / "checkpoint-3").iterdir())  # no model shards, no extra state


def test_a_sharded_run_resumes_exactly(straight, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(straight["fsdp"] / "checkpoint-3", resumed / "checkpoint-3")
    launch(resumed, FSDP, "--mixed_precision", "no", "--resume_from_checkpoint", "latest")
    assert max_diff(adapter(straight["fsdp"]), adapter(resumed)) < 1e-6


def test_a_sharded_flux_draws_class_and_validation_images_under_bf16(tmp_path, tiny_cache):
    from dreambooth_gs.resources import TINY_FLUX_CONFIG_DIR
    from dreambooth_gs.tiny.pipelines import build_tiny_pipeline

    model = build_tiny_pipeline(tmp_path / "tiny-flux", config_dir=TINY_FLUX_CONFIG_DIR)
    flags = ["--mixed_precision", "bf16", "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class")]
    flags += ["--num_class_images", "2", "--validation_prompt", "a photo of sks {class}", "--validation_steps", "3"]
    flags += ["--num_validation_images", "1", "--validation_inference_steps", "2", "--gradient_checkpointing"]
    out = launch(tmp_path / "run", FSDP, *flags, model=model)
    assert "sharded over 2 processes in 5 units" in out  # 2 double- and 2 single-stream blocks + the root
    assert "generated 2 class images" in out
    assert len(list((tmp_path / "class").glob("*.png"))) == 2  # written once, by the main process
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["method"] == "gsoft"


# -- the planner ---------------------------------------------------------------------------------------------------


def test_the_planner_plans_one_process_of_a_sharded_run(capsys):
    from dreambooth_gs.train.memory_plan import print_memory_plan
    from dreambooth_gs.train.options import TrainingOptions

    options = TrainingOptions(estimate_memory=True, adapter="gsoft", gsoft_nblocks=4)
    whole = print_memory_plan(options, environ={})
    environ = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2", "RANK": "0"}
    sharded = print_memory_plan(options, environ=environ)
    printed = capsys.readouterr().out
    assert "FSDP2 over 2 processes (per process)" in printed and "sharded over 2 processes: 1/2 of" in printed
    full, share = whole.components[0].weight_bytes, sharded.components[0].weight_bytes
    assert share > full / 2  # half, plus the root unit and two blocks gathered during the step
    assert whole.adapter_bytes == sharded.adapter_bytes  # the adapter is replicated, not sharded
    checkpointed = print_memory_plan(options, environ={**environ, "FSDP_ACTIVATION_CHECKPOINTING": "true"})
    assert "gradient checkpointing" in checkpointed.settings and "gradient checkpointing" not in sharded.settings
    capsys.readouterr()
    print_memory_plan(options, environ={**environ, "RANK": "1"})
    assert capsys.readouterr().out == ""  # one plan per launch, from the first process
    with pytest.raises(ValueError, match="FSDP cannot shard a quantized base"):
        print_memory_plan(TrainingOptions(estimate_memory=True, base_model_precision="int8-torchao"), environ=environ)


def test_flux_dev_over_two_processes_plans_about_half_its_weights_and_fits_24_gb():
    from dreambooth_gs.train import memory_plan
    from dreambooth_gs.train.options import TrainingOptions

    configs = {
        name: json.loads((ROOT / "configs" / file).read_text())
        for name, file in [
            ("transformer", "flux1_dev_transformer.json"),
            ("vae", "sd3_vae.json"),
            ("text_encoder", "clip_vit_l_text_encoder.json"),
            ("text_encoder_2", "t5_v1_1_xxl_encoder.json"),
        ]
    }
    flags = {"gradient_checkpointing": True, "cache_latents": True, "pre_compute_text_embeddings": True}
    options = TrainingOptions(adapter="gsoft", gsoft_nblocks=32, mixed_precision="bf16", train_batch_size=1, **flags)
    whole, two = (memory_plan.plan_from_configs("flux", configs, options, fsdp_processes=n) for n in (1, 2))
    ratio = two.components[0].weight_bytes / whole.components[0].weight_bytes
    assert 0.5 < ratio < 0.57  # 19 + 38 blocks: one double block and the root are small beside the whole
    assert 48 in whole.fits() and 24 not in whole.fits() and 24 in two.fits()  # docs/families.md's claim
