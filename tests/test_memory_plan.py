"""The memory planner (``--estimate_memory``): its counts against the really loaded tiny pipelines of every family
(frozen weights at their precision, adapter parameters, gradients and AdamW states, byte for byte), the flag (prints
the table, exits 0, writes nothing), one-line refusals of folders it cannot read, the real models' counts from
configs/, and the shape of the activation estimate (an estimate: only its monotonicity is checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from dreambooth_gs import families
from dreambooth_gs.resources import TINY_FLUX_CONFIG_DIR, TINY_SD3_CONFIG_DIR, TINY_SD_CONFIG_DIR, TINY_SDXL_CONFIG_DIR
from dreambooth_gs.tiny.pipelines import build_tiny_pipeline
from dreambooth_gs.train import memory_plan, models
from dreambooth_gs.train.options import TrainingOptions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_dreambooth_gsoft  # noqa: E402

CONFIG_DIRS = {
    "sd": TINY_SD_CONFIG_DIR,
    "sdxl": TINY_SDXL_CONFIG_DIR,
    "sd3": TINY_SD3_CONFIG_DIR,
    "flux": TINY_FLUX_CONFIG_DIR,
}
TINY = {"gsoft_nblocks": 4, "rank": 4}  # block counts that divide the tiny models' 32 / 64-wide projections
# (family, adapter, --mixed_precision, --train_text_encoder, --use_8bit_adam): both adapters on every family, bf16 and
# fp32, the text encoders' adapters, and the 8-bit states (counted by formula: bitsandbytes needs CUDA)
CASES = [
    (family, adapter, precision, text, eight_bit)
    for family in CONFIG_DIRS
    for adapter, precision, text, eight_bit in (("gsoft", "bf16", True, False), ("lora", "no", False, True))
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory-plan-models")
    return {name: build_tiny_pipeline(root / name, config_dir=config_dir) for name, config_dir in CONFIG_DIRS.items()}


def options_for(
    model: Path, adapter: str, precision: str, text: bool, eight_bit: bool = False, base: str = "no_change"
) -> TrainingOptions:
    return TrainingOptions(
        pretrained_model_name_or_path=str(model),
        adapter=adapter,
        mixed_precision=precision,
        train_text_encoder=text,
        use_8bit_adam=eight_bit,
        base_model_precision=base,
        **TINY,
    )


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds: a torchao quantized weight is its int8 data plus its scales."""
    parts = [getattr(tensor, name) for name in getattr(tensor, "tensor_data_names", ())] or [tensor]
    return sum(part.numel() * part.element_size() for part in parts)


def real_counts(options: TrainingOptions) -> tuple[dict[str, tuple[int, int, int]], list[torch.nn.Parameter]]:
    """Load the pipeline as the trainer does (its precision, its adapters): per component (frozen parameters, bytes
    of frozen parameters and buffers, trainable parameters), and every trainable tensor."""
    weight_dtype = {"bf16": torch.bfloat16}.get(options.mixed_precision, torch.float32)
    subject = models.SubjectData(Path("."), None, "a sks toy", "a toy")
    parts = models.load_components(options, Accelerator(cpu=True), weight_dtype, subject)
    options = models.family_options(options, parts.family)
    models.add_adapter(parts.denoiser, options)
    if options.train_text_encoder:
        models.add_text_encoder_adapters(parts, options)
    named = {parts.family.denoiser_name: parts.denoiser, "vae": parts.vae}
    named.update(zip(parts.family.text_encoder_names, parts.text_encoders))
    counts, trainable = {}, []
    for name, model in named.items():
        frozen = [p for p in model.parameters() if not p.requires_grad]
        weight_bytes = sum(storage_bytes(t) for t in [*frozen, *model.buffers()])
        mine = [p for p in model.parameters() if p.requires_grad]
        counts[name] = (sum(p.numel() for p in frozen), weight_bytes, sum(p.numel() for p in mine))
        trainable += mine
    return counts, trainable


def adamw_state_bytes(params: list[torch.nn.Parameter]) -> int:
    """Bytes of torch AdamW's states after one step (the step counters aside)."""
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer = torch.optim.AdamW(params)
    optimizer.step()
    return sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for key, t in state.items() if key != "step"
    )


@pytest.mark.parametrize(
    "family, adapter, precision, text, eight_bit", CASES, ids=["-".join(map(str, c)) for c in CASES]
)
def test_counts_equal_the_really_loaded_models(tiny, family, adapter, precision, text, eight_bit):
    options = options_for(tiny[family], adapter, precision, text, eight_bit)
    plan = memory_plan.plan_memory(options)
    counts, trainable = real_counts(options)
    planned = {m.name: (m.parameters, m.weight_bytes, m.adapter_parameters) for m in plan.components}
    assert planned == counts
    assert plan.components[0].precision == ("bf16" if precision == "bf16" else "fp32")
    if text:  # the CLIP encoders got adapters too, T5 none
        trained = families.get(family).trainable_text_encoders
        assert all((counts[name][2] > 0) == (name in trained) for name in families.get(family).text_encoder_names)
    assert plan.adapter_bytes["parameters"] == sum(p.numel() * p.element_size() for p in trainable)
    assert all(p.dtype == torch.float32 for p in trainable)
    sizes = [p.numel() for p in trainable]
    assert plan.adapter_bytes["optimizer states"] == memory_plan.optimizer_state_bytes(sizes, eight_bit)
    if not eight_bit:
        assert plan.adapter_bytes["optimizer states"] == adamw_state_bytes(trainable)
        assert plan.adapter_bytes["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in trainable)


def test_sdxl_keeps_its_own_vae_in_fp32(tiny):
    plan = memory_plan.plan_memory(options_for(tiny["sdxl"], "gsoft", "bf16", False))
    assert {m.name: m.precision for m in plan.components} == {
        "unet": "bf16", "text_encoder": "bf16", "text_encoder_2": "bf16", "vae": "fp32"
    }  # fmt: skip


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ([4095], 8 * 4095),  # under bitsandbytes' min_8bit_size: fp32 states
        ([4096], 2 * 4096 + 8 * 16),  # 2 uint8 states + 2 fp32 scales per block of 256
        ([5000, 10], 2 * 5000 + 8 * 20 + 8 * 10),
    ],
)
def test_8bit_adamw_states(sizes, expected):
    assert memory_plan.optimizer_state_bytes(sizes, eight_bit=True) == expected
    assert memory_plan.optimizer_state_bytes(sizes, eight_bit=False) == 8 * sum(sizes)


def test_placements_follow_the_memory_flags(tiny):
    base = options_for(tiny["flux"], "gsoft", "bf16", False)
    cases = [
        ({}, {"text_encoder": "resident", "text_encoder_2": "resident", "vae": "resident"}),
        ({"offload": True}, {"text_encoder": "offloaded", "text_encoder_2": "offloaded", "vae": "offloaded"}),
        ({"pre_compute_text_embeddings": True, "cache_latents": True},
         {"text_encoder": "freed", "text_encoder_2": "freed", "vae": "freed"}),
        ({"cache_latents": True, "validation_prompt": "a sks toy"},
         {"text_encoder": "resident", "text_encoder_2": "resident", "vae": "resident"}),
    ]  # fmt: skip
    for changes, expected in cases:
        plan = memory_plan.plan_memory(replace(base, **changes))
        assert {m.name: m.placement for m in plan.components[1:]} == expected, changes
        on_gpu = sum(m.weight_bytes for m in plan.components if m.placement == "resident")
        adapter = sum(plan.adapter_bytes.values())
        assert plan.phases["training step"][0] >= on_gpu + adapter + plan.activation_bytes > 0
        assert plan.peak == max(total for total, _ in plan.phases.values())


def test_activation_estimate_grows_with_batch_and_resolution_and_checkpointing_saves(tiny):
    base = options_for(tiny["sdxl"], "lora", "bf16", False)

    def activations(**changes) -> int:
        return memory_plan.plan_memory(
            replace(base, **{"train_batch_size": 1, "resolution": 64, **changes})
        ).activation_bytes

    one = activations()
    assert activations(train_batch_size=2) == pytest.approx(2 * one, abs=2) == activations(with_prior_preservation=True)
    assert activations(resolution=128) > 3 * one
    assert activations(gradient_checkpointing=True) < one
    assert activations(adapter="gsoft") > one  # GSOFT's activation side keeps its outputs, and its Cayley blocks
    assert activations(mixed_precision="no") > one


def test_the_flag_prints_the_table_exits_0_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    flags = ["--pretrained_model_name_or_path", str(tiny["flux"]), "--output_dir", str(out), "--estimate_memory"]
    flags += ["--gsoft_nblocks", "4", "--mixed_precision", "bf16", "--gradient_checkpointing"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "train_dreambooth_gsoft.py"), *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("transformer", "text_encoder_2", "adapter parameters", "optimizer states", "activations", "peak"):
        assert f"  {row} " in done.stdout
    assert "an estimate" in done.stdout and "fits 12 / 16 / 24 / 48 / 80 GB GPUs" in done.stdout
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_demo_plan_needs_no_model_and_builds_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DREAMBOOTH_GS_CACHE", str(tmp_path / "cache"))
    train_dreambooth_gsoft.run(["--estimate_memory", "--output_dir", str(tmp_path / "out")])
    assert "the tiny demo model (sd)" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "missing", "no folder"),
        (lambda root: root, "has no model_index.json"),
        (lambda root: "someone/some-model", "cannot read the configs of the hub id 'someone/some-model' (offline"),
    ],
    ids=["missing-folder", "no-index", "hub-id-offline"],
)
def test_unreadable_models_are_one_line(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as stop:
        train_dreambooth_gsoft.run(["--estimate_memory", "--pretrained_model_name_or_path", str(make(tmp_path))])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_component_config_that_cannot_be_read_is_one_line(tiny, tmp_path, capsys):
    import shutil

    broken = shutil.copytree(tiny["sd3"], tmp_path / "sd3", ignore=shutil.ignore_patterns("*.safetensors"))
    (broken / "text_encoder_3" / "config.json").write_text("{not json")
    with pytest.raises(SystemExit):
        train_dreambooth_gsoft.run(["--estimate_memory", "--pretrained_model_name_or_path", str(broken)])
    err = capsys.readouterr().err.strip()
    assert "cannot read" in err and "text_encoder_3/config.json" in err and len(err.splitlines()) == 1


# -- the real models, from configs/ (meta device: shapes only) -----------------------------------------------------


def config(name: str) -> dict:
    import json

    return json.loads((ROOT / "configs" / name).read_text())


def test_real_configs_give_the_published_parameter_counts():
    """The text encoder and VAE configs written from memory: their parameter counts are the published ones."""
    expected = {
        "clip_vit_l_text_encoder.json": 123_060_480,
        "openclip_vit_h_text_encoder.json": 340_387_840,
        "openclip_vit_bigg_text_encoder.json": 694_659_840,
        "t5_v1_1_xxl_encoder.json": 4_762_310_656,
        "sd_vae.json": 83_653_863,
        "sd3_vae.json": 83_819_683,
    }
    for name, count in expected.items():
        data = config(name)
        model = memory_plan.build_on_meta(memory_plan.Component(data["_class_name"], data))
        assert sum(p.numel() for p in model.parameters()) == count, name


@pytest.mark.parametrize(
    "adapter, flags, trainable",
    [("gsoft", {"gsoft_nblocks": 32}, 157_710_336), ("lora", {"rank": 16}, 26_148_864)],  # docs/benchmarks.md
)
def test_flux_dev_from_configs(adapter, flags, trainable):
    configs = {
        "transformer": config("flux1_dev_transformer.json"),
        "vae": config("sd3_vae.json"),
        "text_encoder": config("clip_vit_l_text_encoder.json"),
        "text_encoder_2": config("t5_v1_1_xxl_encoder.json"),
    }
    options = TrainingOptions(adapter=adapter, mixed_precision="bf16", train_batch_size=1, **flags)
    plan = memory_plan.plan_from_configs("flux", configs, options, "FLUX.1-dev")
    assert plan.components[0].adapter_parameters == trainable
    assert plan.components[0].weight_bytes == 2 * plan.components[0].parameters  # bf16, no buffers
    assert round(plan.components[0].parameters / 1e9, 2) == 11.90
    assert plan.adapter_bytes["optimizer states"] == 8 * trainable
    before = plan.phases["before the first step"][0]  # T5-XXL sits on the GPU until the prompts are encoded
    assert before >= sum(m.weight_bytes for m in plan.components) + 4 * trainable


@pytest.mark.parametrize("family", ["sd", "flux"])
@pytest.mark.parametrize("adapter", ["gsoft", "lora"])
def test_an_int8_base_is_planned_as_loaded(tiny, family, adapter):
    """--base_model_precision int8-torchao: the denoiser's Linear weights one byte per element plus a scale per row,
    everything else at the training dtype: equal to the quantized model really loaded."""
    options = options_for(tiny[family], adapter, "no", False, base="int8-torchao")
    plan = memory_plan.plan_memory(options)
    counts, _ = real_counts(options)
    for memory in plan.components:  # the text encoders too: they stay through training, so they are quantized
        assert (memory.parameters, memory.weight_bytes, memory.adapter_parameters) == counts[memory.name], memory.name
    assert all(m.precision.startswith("int8-torchao") for m in plan.components if m.name.startswith("text_encoder"))
    denoiser = plan.components[0]
    full = memory_plan.plan_memory(options_for(tiny[family], adapter, "no", False)).components[0]
    assert denoiser.weight_bytes < full.weight_bytes and denoiser.precision.startswith("int8-torchao")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gs_on_an_int8_base_counts_its_dequantized_weights(tiny, checkpointing):
    """The GS layers keep each adapted weight dequantized (training dtype) from forward to backward: the plan adds
    the largest block's (checkpointing) or all of them; LoRA reads none."""
    gs = replace(options_for(tiny["sd"], "gsoft", "no", False), gradient_checkpointing=checkpointing)
    full, int8 = memory_plan.plan_memory(gs), memory_plan.plan_memory(replace(gs, base_model_precision="int8-torchao"))
    subject = models.SubjectData(Path("."), None, "a", "a")
    parts = models.load_components(gs, Accelerator(cpu=True), torch.float32, subject)
    denoiser, _ = models.add_adapter(parts.denoiser, models.family_options(gs, parts.family))
    blocks: dict[str, int] = {}
    for name, module in denoiser.named_modules():
        if hasattr(module, "gsoft_L"):
            block = name.split(".attentions")[0] if "blocks." in name else name  # e.g. down_blocks.0
            blocks[block] = blocks.get(block, 0) + module.base_layer.weight.numel() * 4
    expected = max(blocks.values()) if checkpointing else sum(blocks.values())
    assert int8.activation_bytes - full.activation_bytes == expected > 0
    lora = replace(gs, adapter="lora")
    assert memory_plan.plan_memory(replace(lora, base_model_precision="int8-torchao")).activation_bytes == (
        memory_plan.plan_memory(lora).activation_bytes
    )


def test_cached_prompts_are_encoded_before_the_denoiser_comes_to_the_gpu(tiny):
    """--cache_text_embeddings: the text encoders and the denoiser are never on the GPU together (the plan's phases);
    with class images to draw first, they are."""
    base = replace(options_for(tiny["flux"], "gsoft", "bf16", False), pre_compute_text_embeddings=True)
    plan = memory_plan.plan_memory(base)
    encoders = sum(m.weight_bytes for m in plan.components[1:-1])
    assert plan.phases["encoding the prompts"][0] == encoders + plan.components[-1].weight_bytes
    assert plan.phases["before the first step"][0] < plan.components[0].weight_bytes + encoders
    assert models.denoiser_waits_for_prompts(base)
    assert not models.denoiser_waits_for_prompts(replace(base, with_prior_preservation=True))
    assert not models.denoiser_waits_for_prompts(replace(base, pre_compute_text_embeddings=False))
