"""The memory planner's tables (issue 33): what ``--estimate_memory`` prints for SD-2-base (512 px), SDXL base 1.0,
SD3.5 Medium / Large and FLUX.1-dev (1024 px), built from the configs in ``configs/`` on the meta device, and the
measurements behind its activation estimate.

    python benchmarks/bench_memory_plan.py               # the plans: docs/benchmarks.md's memory_plan section and
                                                         # docs/families.md's GPU table (seconds, meta device)
    python benchmarks/bench_memory_plan.py --calibrate   # KEPT_BYTES: what one block of each kind keeps (CPU, ~2 min)
    python benchmarks/bench_memory_plan.py --check       # the estimate against measured whole models (CPU, minutes)

Every component comes from a config in ``configs/``: the denoisers' files, and the text encoders' and VAEs' (CLIP
ViT-L, OpenCLIP ViT-H and ViT-bigG, T5 v1.1 XXL, the 4- and 16-channel VAEs), written from memory of the public
configs and checked by their parameter counts (``tests/test_memory_plan.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import SavedTensors  # noqa: E402
from benchmarks.memory import peak_rss_mib, reset_peak_rss, resident_mib  # noqa: E402
from benchmarks.report import DOCS, ROOT, machine_line, markdown_table, replace_section  # noqa: E402
from dreambooth_gs import families  # noqa: E402
from dreambooth_gs.train import memory_plan, models  # noqa: E402
from dreambooth_gs.train.activation_estimate import CAYLEY_BYTES, KEPT_BYTES, estimate_activations  # noqa: E402
from dreambooth_gs.train.options import TrainingOptions  # noqa: E402

FAMILIES_DOC = ROOT / "docs" / "families.md"
CONFIGS = ROOT / "configs"
WITH_PROJECTION = "CLIPTextModelWithProjection"
# (name, family, resolution, {pipeline name: config file or (config file, class name)})
MODELS = [
    ("SD-2-base", "sd", 512, {
        "unet": "sd2_base_unet.json", "vae": "sd_vae.json", "text_encoder": "openclip_vit_h_text_encoder.json"}),
    ("SDXL base 1.0", "sdxl", 1024, {
        "unet": "sdxl_base_unet.json", "vae": "sd_vae.json", "text_encoder": "clip_vit_l_text_encoder.json",
        "text_encoder_2": "openclip_vit_bigg_text_encoder.json"}),
    ("SD3.5 Medium", "sd3", 1024, {
        "transformer": "sd35_medium_transformer.json", "vae": "sd3_vae.json",
        "text_encoder": ("clip_vit_l_text_encoder.json", WITH_PROJECTION),
        "text_encoder_2": "openclip_vit_bigg_text_encoder.json", "text_encoder_3": "t5_v1_1_xxl_encoder.json"}),
    ("SD3.5 Large", "sd3", 1024, {
        "transformer": "sd35_large_transformer.json", "vae": "sd3_vae.json",
        "text_encoder": ("clip_vit_l_text_encoder.json", WITH_PROJECTION),
        "text_encoder_2": "openclip_vit_bigg_text_encoder.json", "text_encoder_3": "t5_v1_1_xxl_encoder.json"}),
    ("FLUX.1-dev", "flux", 1024, {
        "transformer": "flux1_dev_transformer.json", "vae": "sd3_vae.json",
        "text_encoder": "clip_vit_l_text_encoder.json", "text_encoder_2": "t5_v1_1_xxl_encoder.json"}),
]  # fmt: skip
ADAPTERS = [("GSOFT r=32", {"adapter": "gsoft", "gsoft_nblocks": 32}), ("LoRA r=16", {"adapter": "lora", "rank": 16})]
PRECISION_ADAPTERS = [
    *ADAPTERS[:1],
    ("Double GSOFT r=32", {"adapter": "double_gsoft", "gsoft_nblocks": 32}),
    *ADAPTERS[1:],
    ("OFT b=32", {"adapter": "oft", "oft_block_size": 32}),
]
PLANNED = ("no_change", "int8-torchao", "nf4-bnb")
FSDP_PROCESSES = (1, 2, 4, 8)
# FLUX.1-dev LoRA training memory the peers publish, as issue 33 quotes them (not re-checked here).
PEERS = [
    ["SimpleTuner, LoRA r=16", "> 30 GB", "18 GB (int8)", "13 GB (int4), 9 GB (NF4)"],
    ["kohya sd-scripts", "-", "24 GB at batch 2 (--fp8_base); 8-16 GB with block swapping", "-"],
    ["ai-toolkit", "-", "24 GB GPU (qfloat8)", "-"],
    ["diffusers Flux QLoRA", "-", "-", "about 9 GB (NF4, a 24 GB 4090)"],
]
MEMORY_FLAGS = {"gradient_checkpointing": True, "cache_latents": True, "pre_compute_text_embeddings": True}
BASE = {"mixed_precision": "bf16", "train_batch_size": 1, "estimate_memory": True}  # plans for GPUs it does not have
# Flag sets of the second table (GSOFT r=32, bf16, batch 1): what each memory flag buys.
FLAG_SETS = [
    ("bf16 only", {}),
    ("+ --gradient_checkpointing", {"gradient_checkpointing": True}),
    ("+ caching (the first table)", MEMORY_FLAGS),
    ("checkpointing + --offload", {"gradient_checkpointing": True, "offload": True}),
    ("first table + --use_8bit_adam", {**MEMORY_FLAGS, "use_8bit_adam": True}),
    ("first table, batch 4", {**MEMORY_FLAGS, "train_batch_size": 4}),
]


def read_config(entry) -> dict:
    name, class_name = entry if isinstance(entry, tuple) else (entry, None)
    config = json.loads((CONFIGS / name).read_text())
    return {**config, "_class_name": class_name} if class_name else config


def plan(model: tuple, fsdp_processes: int = 1, **flags) -> memory_plan.MemoryPlan:
    name, family, resolution, files = model
    options = TrainingOptions(resolution=resolution, **{**BASE, **flags})
    configs = {component: read_config(entry) for component, entry in files.items()}
    return memory_plan.plan_from_configs(family, configs, options, name, fsdp_processes=fsdp_processes)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def smallest(plan_: memory_plan.MemoryPlan) -> str:
    fits = plan_.fits()
    return f"{fits[0]} GB" if fits else "none (> 80 GB)"


def plans_section() -> tuple[str, str]:
    """(docs/benchmarks.md's memory_plan section, docs/families.md's table)."""
    rows, short, flux_text = [], [], ""
    for model in MODELS:
        cells = [model[0], f"{model[2]} px"]
        for label, flags in ADAPTERS:
            result = plan(model, **flags, **MEMORY_FLAGS)
            denoiser = result.components[0]
            trainable = sum(m.adapter_parameters for m in result.components)
            rows.append([
                model[0], label, f"{denoiser.parameters / 1e9:.2f}B", gib(denoiser.weight_bytes),
                f"{trainable / 1e6:.1f}M", gib(sum(result.adapter_bytes.values())), gib(result.activation_bytes),
                gib(result.phases["training step"][0]), gib(result.phases["before the first step"][0]),
                gib(result.peak), smallest(result),
            ])  # fmt: skip
            step = gib(result.phases["training step"][0])
            cells.append(f"{step} / {gib(result.peak)} GiB ({smallest(result)})")
            if model[0] == "FLUX.1-dev" and label.startswith("GSOFT"):
                flux_text = memory_plan.format_plan(result)
        short.append(cells)
    header = ["model", "adapter", "denoiser", "its weights", "trainable", "adapter + grads + AdamW", "activations"]
    header += ["training step", "before the first step", "peak", "smallest GPU"]
    flag_rows = []
    for model in MODELS:
        cells = [model[0]]
        for _, flags in FLAG_SETS:
            result = plan(model, **ADAPTERS[0][1], **flags)
            cells.append(f"{gib(result.peak)} ({smallest(result)})")
        flag_rows.append(cells)
    precision_rows, flux_int8, flux_peaks = [], "", {}
    for model in MODELS:
        for label, flags in PRECISION_ADAPTERS:
            cells = [model[0], label]
            for precision in PLANNED:
                result = plan(model, **flags, **MEMORY_FLAGS, base_model_precision=precision)
                cells.append(f"{gib(result.peak)} ({smallest(result)})")
                if model[0] == "FLUX.1-dev":
                    flux_peaks[label, precision] = f"{gib(result.peak)} GiB (est.)"
                if model[0] == "FLUX.1-dev" and label.startswith("GSOFT") and precision != "no_change":
                    flux_int8 = memory_plan.format_plan(result)
            precision_rows.append(cells)
    fsdp_rows = []
    for model in MODELS:
        for label, flags in ADAPTERS:
            cells = [model[0], label]
            for processes in FSDP_PROCESSES:
                result = plan(model, **flags, **MEMORY_FLAGS, fsdp_processes=processes)
                cells.append(f"{gib(result.peak)} ({smallest(result)})")
            fsdp_rows.append(cells)
    settings = (
        "bf16 (`--mixed_precision bf16`), batch 1, `--gradient_checkpointing --cache_latents "
        "--cache_text_embeddings`, no validation, the family's default targets"
    )
    body = "\n\n".join(
        [
            "### What `--estimate_memory` plans for the real models (estimates, not measurements)",
            "Written by `benchmarks/bench_memory_plan.py`: each pipeline built from `configs/` on the meta device "
            "(denoisers as in the sections above; text encoders and VAEs from the configs added for this, checked by "
            "their published parameter counts), the adapter injected by the trainer's own code, and the planner of "
            "`dreambooth_gs/train/memory_plan.py` run on it, as `train_dreambooth_gsoft.py --estimate_memory` runs it "
            f"on a model folder. Settings: {settings}. GiB; a GPU of G GB fits when the peak + 1 GiB (the CUDA "
            "context) <= G GiB. The weights, adapter, gradient and optimizer columns are exact counts; activations "
            "are the planner's estimate (formula in [families.md](families.md#rough-gpu-needs)); 'before the first "
            "step' is every component on the GPU after loading, before caching frees the text encoders and VAE.",
            markdown_table(header, rows, "ll" + "r" * (len(header) - 2)),
            "**What each memory flag buys** (GSOFT r=32, bf16, batch 1; peak GiB and the smallest GPU it fits):",
            markdown_table(["model", *[label for label, _ in FLAG_SETS]], flag_rows),
            "The planner's output for FLUX.1-dev with GSOFT r=32 (the first table's settings):",
            "```\n" + flux_text.replace(str(ROOT) + "/", "") + "\n```",
            "**A quantized frozen base** (`--base_model_precision`; the first table's settings; peak GiB and the "
            "smallest GPU). int8-torchao stores the denoiser's Linear weights in one byte per element plus a scale "
            "per row (the rest in bf16); the GS methods read each adapted weight dequantized and keep it until the "
            "backward, which the estimate counts (with checkpointing: the largest block's adapted weights in bf16). "
            "nf4-bnb (bitsandbytes, CUDA only) packs two values per byte plus an fp32 absmax per 64; its bytes follow "
            "bitsandbytes' documented layout and were not measured (no GPU was lent):",
            markdown_table(["model", "adapter", "bf16 base", "int8-torchao base", "nf4-bnb base"], precision_rows),
            "**FSDP2 over several GPUs** (`accelerate launch --config_file configs/accelerate/fsdp2.yaml "
            "--num_processes N`; the first table's settings, bf16 base; peak GiB per GPU and the smallest GPU). "
            "Each process holds 1/N of the denoiser's frozen weights, plus the root unit and the two largest units "
            "gathered during the step (a UNet: each resnet, attention and sampler is a unit; a transformer: each "
            "block); the adapter, its gradients and AdamW state stay whole on every process "
            "([training.md](training.md#several-gpus-or-nodes)). The sharding itself is tested with 2 gloo "
            "processes on the CPU (each holds exactly half of the frozen bytes); these GPU figures are estimates. The "
            "SD3.5 and FLUX.1 floors (10.55 / 9.26 GiB) are the prompt-encoding phase: the text encoders (T5-XXL: "
            "8.9 GiB in bf16) are not sharded and encode the prompts whole on each GPU before the denoiser comes over:",
            markdown_table(
                ["model", "adapter", *[f"{n} GPU{'s' if n > 1 else ''}" for n in FSDP_PROCESSES]],
                fsdp_rows,
                "ll" + "r" * len(FSDP_PROCESSES),
            ),
            "**Beside the peers' published figures** for FLUX.1-dev (as quoted in issue 33 from each project's "
            "documentation; not re-checked here, and their settings differ: LoRA, their own batch sizes and "
            "offloading). This planner's rows are estimates for GSOFT r=32 / LoRA r=16, batch 1, 1024 px, "
            "checkpointing and caching (the first table's settings):",
            markdown_table(
                ["FLUX.1-dev", "bf16 base", "8-bit base", "4-bit base"],
                PEERS
                + [
                    ["this planner, GSOFT r=32", *(flux_peaks[("GSOFT r=32", p)] for p in PLANNED)],
                    ["this planner, LoRA r=16", *(flux_peaks[("LoRA r=16", p)] for p in PLANNED)],
                ],
                "l" + "r" * 3,
            ),
            "The planner's output for FLUX.1-dev with GSOFT r=32 on an int8 base (the README's 24 GB command):",
            "```\n" + flux_int8.replace(str(ROOT) + "/", "") + "\n```",
        ]
    )
    families_table = markdown_table(
        ["model", "resolution", *[f"{label}: training step / peak (smallest GPU)" for label, _ in ADAPTERS]], short
    )
    return body, families_table


# -- --calibrate: what one block keeps -------------------------------------------------------------------------------

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FLOW_TARGETS = families.get("sd3").default_targets
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def calibration_blocks() -> dict[str, tuple]:
    """kind -> (make the block, its targets, its inputs for a dtype as (args, kwargs), its tokens x channels)."""
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.embeddings import FluxPosEmbed
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    def x(*shape, dtype, grad=True):  # hidden states need gradients (adapters upstream), embeddings do not
        return torch.randn(*shape, dtype=dtype, requires_grad=grad)

    c, side, d, image, text, flux_text = 640, 32, 1536, 1024, 154, 512  # UNet level, SD3, Flux shapes
    clip = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, hidden_act="gelu")
    clip._attn_implementation = "sdpa"
    rope = FluxPosEmbed(10000, [16, 56, 56])(torch.zeros(image + flux_text, 3))

    def resnet_inputs(channels: int):
        return lambda dt: ((x(1, channels, side, side, dtype=dt), x(1, 1280, dtype=dt, grad=False)), {})

    def unet_inputs(*shape: int):
        return lambda dt: ((x(1, *shape, dtype=dt),), {"encoder_hidden_states": x(1, 77, 1024, dtype=dt, grad=False)})

    def joint_inputs(dt):
        return (x(1, image, d, dtype=dt), x(1, text, d, dtype=dt), x(1, d, dtype=dt, grad=False)), {}

    def flux_inputs(dt):
        states = (x(1, image, 3072, dtype=dt), x(1, flux_text, 3072, dtype=dt), x(1, 3072, dtype=dt, grad=False))
        return states, {"image_rotary_emb": rope}

    def clip_inputs(dt):
        return (x(1, 77, 1280, dtype=dt), None), {}

    unet, joint, flux = side * side * c, (image + text) * d, (image + flux_text) * 3072
    return {
        "resnet": (
            lambda: ResnetBlock2D(in_channels=c, out_channels=c, temb_channels=1280),
            (),
            resnet_inputs(c),
            unet,
        ),
        "resnet_up": (
            lambda: ResnetBlock2D(in_channels=2 * c, out_channels=c, temb_channels=1280),
            (),
            resnet_inputs(2 * c),
            unet,
        ),
        "unet_layer": (
            lambda: BasicTransformerBlock(c, c // 64, 64, cross_attention_dim=1024, activation_fn="geglu"),
            UNET_TARGETS,
            unet_inputs(side * side, c),
            unet,
        ),
        "unet_attention+layer": (
            lambda: Transformer2DModel(
                c // 64, 64, in_channels=c, cross_attention_dim=1024, use_linear_projection=True
            ),
            UNET_TARGETS,
            unet_inputs(c, side, side),
            unet,
        ),
        "joint": (lambda: JointTransformerBlock(d, d // 64, 64, qk_norm="rms_norm"), FLOW_TARGETS, joint_inputs, joint),
        "joint+attn2": (
            lambda: JointTransformerBlock(d, d // 64, 64, qk_norm="rms_norm", use_dual_attention=True),
            FLOW_TARGETS,
            joint_inputs,
            joint,
        ),
        "flux_double": (lambda: FluxTransformerBlock(3072, 24, 128), FLOW_TARGETS, flux_inputs, flux),
        "flux_single": (lambda: FluxSingleTransformerBlock(3072, 24, 128), FLOW_TARGETS, flux_inputs, flux),
        "text_layer": (lambda: CLIPEncoderLayer(clip), CLIP_TARGETS, clip_inputs, 77 * 1280),
    }


# A calibration block measured as a whole, and the KEPT_BYTES kinds the planner sums for it.
KEPT_KINDS = {"unet_attention+layer": ("unet_attention", "unet_layer"), "joint+attn2": ("joint", "joint_attn2")}


def kept_per_token_channel(block_parts: tuple, adapter: str | None, half: bool) -> float:
    """Bytes autograd keeps per token x channel in one forward of the block (a GS adapter's Cayley blocks left out)."""
    make, targets, inputs, unit = block_parts
    torch.manual_seed(0)
    block = make().requires_grad_(False)
    if adapter and targets:
        flags = {"gsoft_nblocks": 32, "rank": 16, "target_modules": list(targets)}
        models.add_adapter(block, TrainingOptions(adapter=adapter, **flags))
    dtype = torch.bfloat16 if half else torch.float32
    if half:  # frozen weights in bf16, adapters float32, under autocast: as the trainer runs bf16
        torch.nn.Module.to(block, dtype=dtype)
        for param in block.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    args, kwargs = inputs(dtype)
    with SavedTensors(block) as saved, torch.autocast("cpu", torch.bfloat16, enabled=half):
        block(*args, **kwargs)
    trainable = sum(p.numel() for p in block.parameters() if p.requires_grad)
    cayley = CAYLEY_BYTES["half" if half else "fp32"] * trainable if adapter == "gsoft" else 0
    return (saved.total - cayley) / unit


def calibrate_section() -> str:
    rows = []
    for kind, parts in calibration_blocks().items():
        start = time.perf_counter()
        cells = [kind]
        for half in (False, True):
            for adapter in ("lora", "gsoft"):
                cells.append(f"{kept_per_token_channel(parts, adapter, half):.1f}")
        parts_used = KEPT_KINDS.get(kind, (kind,))
        used = [
            sum(KEPT_BYTES[name][precision][gs] for name in parts_used)
            for precision in ("fp32", "half")
            for gs in (0, 1)
        ]
        cells.append(" / ".join(map(str, used)))
        rows.append(cells)
        print(f"{kind}: {cells[1:]} ({time.perf_counter() - start:.0f} s)", flush=True)
    header = [
        "block",
        "fp32, LoRA r=16",
        "fp32, GSOFT r=32",
        "bf16 autocast, LoRA",
        "bf16 autocast, GSOFT",
        "KEPT_BYTES (same order)",
    ]
    return "\n\n".join(
        [
            f"### What one block keeps for backward, per token x channel ({machine_line()})",
            "Written by `benchmarks/bench_memory_plan.py --calibrate`: one forward of one block of each kind with "
            "random weights, the distinct storages autograd keeps summed (`benchmarks.measure.SavedTensors`, "
            "parameters and buffers excluded), divided by the block's tokens x channels: bytes per token and "
            "channel, the planner's constant k. Shapes: UNet blocks at 640 channels on 32 x 32 positions with 77 "
            "text tokens of width 1024; SD3 joint blocks 1536 wide on 1024 image + 154 text tokens; Flux blocks "
            "3072 wide on 1024 + 512; a CLIP layer 1280 wide on 77 tokens. GSOFT's Cayley blocks (as many values as "
            "its parameters, 4 bytes each in fp32, 6 under autocast) are left out here and added once per forward by "
            "the planner. 'bf16 autocast': frozen weights in bf16, adapters fp32, `torch.autocast('cpu', bf16)`; "
            "CUDA's autocast keeps the same ops in fp32. The last column is what the planner uses (rounded; its "
            "unet_attention is the '+layer' row's excess over unet_layer, its joint_attn2 the 'joint+attn2' row's "
            "excess over joint).",
            markdown_table(header, rows),
        ]
    )


# -- --check: the estimate against measured whole models -------------------------------------------------------------


def check_models() -> list[tuple[str, str, dict, int]]:
    """(label, family, denoiser config, resolution): reduced real-width models a CPU can run."""
    from benchmarks.common import MID_UNET_OVERRIDES, unet_config

    sd3 = {k: v for k, v in read_config("sd35_medium_transformer.json").items() if not k.startswith("_")}
    flux = {k: v for k, v in read_config("flux1_dev_transformer.json").items() if not k.startswith("_")}
    return [
        ("SD-2-base widths, 2 levels (benchmarks' mid UNet)", "sd", {"_class_name": "UNet2DConditionModel",
         **unet_config("sd2"), **MID_UNET_OVERRIDES}, 512),
        ("SD3.5 Medium, 6 of its 24 blocks (3 with attn2)", "sd3", {"_class_name": "SD3Transformer2DModel", **sd3,
         "num_layers": 6, "dual_attention_layers": [0, 1, 2]}, 512),
        ("FLUX.1-dev, 2 double + 2 single blocks", "flux", {"_class_name": "FluxTransformer2DModel", **flux,
         "num_layers": 2, "num_single_layers": 2}, 512),
    ]  # fmt: skip


def real_denoiser(config: dict) -> torch.nn.Module:
    model = memory_plan.build_on_meta(memory_plan.Component(config["_class_name"], config))
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.ndim == 1:
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)
            elif tensor.is_floating_point():
                bound = tensor[0].numel() ** -0.5
                tensor.uniform_(-bound, bound, generator=generator)
    if hasattr(model, "pos_embed") and hasattr(model.pos_embed, "pos_embed"):  # SD3's sin-cos table: rebuild
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        table = model.pos_embed.pos_embed
        grid = int(table.shape[1] ** 0.5)
        table.copy_(get_2d_sincos_pos_embed(table.shape[-1], grid, output_type="pt").float()[None])
    return model


def denoiser_inputs(family: str, config: dict, side: int) -> dict:
    if family == "sd":
        return {"sample": torch.randn(1, 4, side, side), "timestep": torch.tensor([500]),
                "encoder_hidden_states": torch.randn(1, 77, config["cross_attention_dim"])}  # fmt: skip
    if family == "sd3":
        return {"hidden_states": torch.randn(1, 16, side, side), "timestep": torch.tensor([500.0]),
                "encoder_hidden_states": torch.randn(1, 154, 4096),
                "pooled_projections": torch.randn(1, 2048)}  # fmt: skip
    tokens = (side // 2) ** 2
    return {"hidden_states": torch.randn(1, tokens, 64), "timestep": torch.tensor([0.5]),
            "guidance": torch.tensor([3.5]), "encoder_hidden_states": torch.randn(1, 512, 4096),
            "pooled_projections": torch.randn(1, 768),
            "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(512, 3)}  # fmt: skip


def measure_step(family: str, config: dict, resolution: int, adapter: dict, checkpointing: bool) -> dict[str, float]:
    """One fp32 forward + backward: autograd-saved bytes of the forward and the peak RSS above the model's."""
    model = real_denoiser(config)
    options = models.family_options(TrainingOptions(**adapter), families.get(family))
    models.add_adapter(model, options)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    inputs = denoiser_inputs(family, config, resolution // 8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    base = resident_mib()
    reset_peak_rss()
    with SavedTensors(model) as saved:
        out = model(**inputs).sample
    out.float().pow(2).mean().backward()
    peak = peak_rss_mib() - base
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable) / 2**20
    return {"saved": saved.total / 2**20, "peak": peak, "grads": grads, "trainable": sum(p.numel() for p in trainable)}


def check_cases() -> list[tuple[int, int, bool]]:
    """(model, adapter, checkpointing) indices of --check's steps, each run in a child process of its own."""
    return [(m, a, c) for m in range(len(check_models())) for a in range(len(ADAPTERS)) for c in (False, True)]


def check_child(index: int) -> None:
    """One --check step in this fresh process; prints its measurements as one JSON line."""
    model, adapter, checkpointing = check_cases()[index]
    _, family, config, resolution = check_models()[model]
    print(json.dumps(measure_step(family, config, resolution, ADAPTERS[adapter][1], checkpointing)))


def check_section() -> str:
    rows = []
    # Large allocations straight from mmap, returned when freed: the child's resident memory follows its live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    for index, (model, adapter, checkpointing) in enumerate(check_cases()):
        label, family, config, resolution = check_models()[model]
        adapter_label, flags = ADAPTERS[adapter]
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--check-child", str(index)], capture_output=True, text=True, env=env
        )
        if done.returncode:
            raise RuntimeError(f"--check-child {index} failed:\n{done.stderr[-3000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        meta = memory_plan.build_on_meta(memory_plan.Component(config["_class_name"], config))
        options = TrainingOptions(**flags, train_batch_size=1, gradient_checkpointing=checkpointing)
        options = models.family_options(options, families.get(family))
        estimate, _ = estimate_activations(
            families.get(family), meta.config, resolution // 8, options, flags["adapter"], [], measured["trainable"]
        )
        observed = measured["peak"] - measured["grads"]
        rows.append([
            label, adapter_label, "yes" if checkpointing else "no", f"{measured['saved']:.0f}", f"{observed:.0f}",
            f"{estimate / 2**20:.0f}", f"{estimate / 2**20 / observed:.2f}",
        ])  # fmt: skip
        print(rows[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    header = ["model (fp32, batch 1, 512 px)", "adapter", "checkpointing", "saved by the forward (MiB)"]
    header += ["peak RSS above the model, gradients out (MiB)", "planner's activations (MiB)", "estimate / measured"]
    return "\n\n".join(
        [
            f"### The activation estimate against one measured step on the CPU ({machine_line()})",
            "Written by `benchmarks/bench_memory_plan.py --check`: reduced models at their real widths (the "
            "benchmarks' two-level UNet with SD-2-base's widths; six SD3.5 Medium blocks, three with its second "
            "attention; two double and two single FLUX.1 blocks) with random weights, fp32, batch 1, 512 px, one "
            "forward and backward of a squared-output loss, each in a fresh process whose large allocations are "
            "mmapped (`MALLOC_MMAP_THRESHOLD_=65536`, so freed memory leaves the resident set). Measured: what "
            "autograd keeps in the forward, and the process's peak resident memory above the model's during the "
            "forward and backward, less the adapter's gradients. The planner's estimate is its activation term for "
            "the same config and flags. A CPU's allocator is not CUDA's caching allocator; this checks the order of "
            "magnitude and the effect of checkpointing, not a GPU's peak.",
            markdown_table(header, rows, "lll" + "r" * (len(header) - 3)),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="measure what one block of each kind keeps")
    parser.add_argument("--check", action="store_true", help="the activation estimate against measured CPU steps")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch the docs")
    parser.add_argument("--check-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check_child is not None:
        torch.set_num_threads(1)
        check_child(args.check_child)
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="GSOFT on dimension")  # SDXL's 640-wide layers: b < r, as documented
    sections = {}
    if args.calibrate:
        sections["memory_plan_calibration"] = (DOCS, calibrate_section())
    if args.check:
        sections["memory_plan_check"] = (DOCS, check_section())
    if not (args.calibrate or args.check):
        body, families_table = plans_section()
        sections["memory_plan"] = (DOCS, body)
        sections["memory_plan_families"] = (FAMILIES_DOC, families_table)
    for name, (path, body) in sections.items():
        print(body + "\n")
        if not args.no_write:
            replace_section(path, name, body)


if __name__ == "__main__":
    main()
