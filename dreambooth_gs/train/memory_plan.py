"""The memory planner behind ``--estimate_memory``: what a training run will hold on the GPU, component by
component, for the given flags, from the model's configs alone. No weight is read and nothing is written.

Every model is built from its ``config.json`` on the meta device (shapes, no storage) in the training precision, and
the run's adapter is injected into it by the trainer's own code (:func:`.models.add_adapter`), so the counts of
frozen and trainable parameters are those of the real run, exactly. The budget, in bytes on the GPU:

- frozen weights: parameters x ``BYTES_PER_PARAMETER[precision]`` (fp32 4, ``--mixed_precision bf16|fp16`` 2),
  buffers at their dtype; SDXL's own VAE stays fp32, as the trainer keeps it.
- adapter: trainable parameters x 4 (fp32), their gradients x 4, AdamW's two fp32 states x 8 (``--use_8bit_adam``:
  1 byte each plus one fp32 scale per 256 values; tensors under 4096 values keep fp32 states, as bitsandbytes does).
- text encoders and VAE: resident (counted), offloaded (``--offload``: 0, they visit the GPU while they run) or freed
  (``--cache_text_embeddings`` frees the text encoders after encoding; ``--cache_latents`` frees the VAE when there
  is no ``--validation_prompt``); ``--train_text_encoder`` adds their adapters and activations.
- activations, an ESTIMATE (:mod:`.activation_estimate`): ``B`` = ``--train_batch_size`` (x2 with prior
  preservation); each block of the denoiser sees ``T`` tokens of ``C`` channels (UNet level ``l``:
  ``T = (resolution / 8 / 2^l)^2`` at ``block_out_channels[l]``; SD3 / Flux: ``(resolution / 8 / 2)^2`` image tokens
  plus the text tokens, 77 CLIP + T5's for SD3 and T5's for Flux, at ``heads x head_dim``) and keeps ``k x T x C``
  bytes for backward, ``k`` per block kind, precision and adapter kind (``KEPT_BYTES``, measured with saved-tensor
  hooks). Then

      activations = B x (sum over blocks of kept + 0.75 x the largest block's kept, backward's working set)
                    + the GS methods' Cayley blocks (their parameter count x 4 bytes, 6 under autocast)
      --gradient_checkpointing: B x (sum over blocks of e x T x C + 1.75 x the largest block's kept)
      (e = 4 fp32, 2 bf16: a block's input, one value per token and channel)

  (checkpointing keeps only each block's input and recomputes one block at a time).
- the peak: the training step (weights, adapter, resident components, activations), or before the first step when
  larger (every component is loaded onto the GPU first; caching frees them after), or, with ``--offload``, while an
  offloaded component visits. With ``--cache_text_embeddings`` (and no class images to draw) the prompts are encoded
  before the denoiser comes to the GPU, so the text encoders and the denoiser are never there together. A GPU of
  G GiB fits when peak + :data:`CUDA_CONTEXT_GIB` <= G.

Not modelled: class-image generation and validation sampling (inference, below a training step), the VAE's
encoding of each batch without ``--cache_latents`` (before the denoiser's forward, freed), allocator fragmentation.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import families
from ..families import Family
from ..families.base import read_component_config, read_model_index, vae_scale_factor
from ..fileio import first_line
from ..methods import registry as methods
from . import models
from .activation_estimate import estimate_activations
from .options import TrainingOptions, with_demo_defaults
from .quantization import quantized_text_encoders

GIB = 2**30
NEEDS = "pass a local diffusers folder: model_index.json and each component's config.json are enough, no weights"
# Bytes per frozen parameter by precision.
BYTES_PER_PARAMETER = {"fp32": 4, "bf16": 2, "fp16": 2}
# --base_model_precision: bytes per element of a quantized nn.Linear weight of the denoiser, and per output row (None:
# one value in the training dtype). torchao's weight-only int8 / fp8: one byte per element plus one scale per row in
# the training dtype (checked against a quantized tiny UNet and Flux transformer). bitsandbytes (its documented
# layout, not checked here: diffusers loads it on CUDA only): NF4 packs two 4-bit values per byte with one fp32
# absmax per block of 64 (no double quantization, diffusers' default); int8 keeps one fp32 absmax per row. Biases and
# every other tensor stay in the training dtype.
QUANTIZED_WEIGHT_BYTES = {"int8-torchao": 1, "fp8-torchao": 1, "nf4-bnb": 0.5 + 4 / 64, "int8-bnb": 1}
QUANTIZED_ROW_BYTES = {"int8-torchao": None, "fp8-torchao": None, "nf4-bnb": 0, "int8-bnb": 4}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINABLE_BYTES = 4  # adapter parameters and their gradients stay float32
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq, float32
ADAMW_8BIT = {"state_bytes": 2, "block": 256, "scale_bytes": 8, "min_size": 4096}  # bitsandbytes' AdamW8bit
GPU_SIZES_GIB = (12, 16, 24, 48, 80)
CUDA_CONTEXT_GIB = 1.0  # the CUDA context and kernels, outside PyTorch's allocator


@dataclass(frozen=True)
class Component:
    """One model of a pipeline as its config describes it: a diffusers or transformers ``class_name``."""

    class_name: str
    config: dict


@dataclass
class ComponentMemory:
    """One model of the run: its frozen weights, its adapter's tensors, and where it spends the training steps."""

    name: str
    class_name: str
    precision: str
    parameters: int  # frozen
    weight_bytes: int  # frozen parameters and buffers
    adapter_parameters: int = 0
    adapter_tensors: list[int] = field(default_factory=list)  # numel of each trainable tensor
    placement: str = "resident"  # resident, offloaded, freed or left out
    why: str = ""

    @property
    def on_gpu(self) -> int:
        return self.weight_bytes if self.placement == "resident" else 0


@dataclass
class MemoryPlan:
    """What ``--estimate_memory`` prints: every component, the adapter's bytes, the activations and the phases whose
    largest is the peak."""

    title: str
    settings: str
    components: list[ComponentMemory]
    adapter_bytes: dict[str, int]  # parameters, gradients, optimizer states
    activation_bytes: int
    activation_note: str
    phases: dict[str, tuple[int, str]]  # name -> (bytes, what)

    @property
    def peak(self) -> int:
        return max(total for total, _ in self.phases.values())

    def fits(self) -> list[int]:
        return [size for size in GPU_SIZES_GIB if self.peak / GIB + CUDA_CONTEXT_GIB <= size]


# -- configs -> meta models ---------------------------------------------------------------------------------------


def model_class(class_name: str):
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        if hasattr(library, class_name):
            return getattr(library, class_name)
    raise ValueError(f"unknown model class {class_name!r} (neither diffusers nor transformers has it)")


def build_on_meta(component: Component, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``component`` on the meta device (shapes only), frozen, in ``dtype`` (None: as built)."""
    cls = model_class(component.class_name)
    config = {k: v for k, v in component.config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if hasattr(cls, "from_config"):  # diffusers
            model = cls.from_config(config)
        else:  # transformers
            model = cls(cls.config_class.from_dict(config))
    model.requires_grad_(False)
    # torch's own .to, as the trainer's cast: diffusers' override would warn about float32 modules for nothing here
    return model if dtype is None else torch.nn.Module.to(model, dtype=dtype)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--estimate_memory cannot read {path}: {first_line(err)}") from err


def read_components(model_id: str | None, revision: str | None = None, override: str | None = None):
    """``(family, {name: Component or None})`` of the denoiser, VAE and text encoders of a local diffusers folder
    (or a hub id's, through the network; ``None``: the offline demo's tiny configs). None marks a component the
    folder leaves out (SD3 without T5)."""
    if model_id is None:
        from ..resources import TINY_SD_CONFIG_DIR as demo

        family = families.BY_PIPELINE_CLASS[_read_json(demo / "pipeline.json")["_class_name"]]
        names = (family.denoiser_name, "vae", *family.text_encoder_names)
        configs = {name: _read_json(demo / f"{name}.json") for name in names}
        return family, {name: Component(config["_class_name"], config) for name, config in configs.items()}
    path = Path(model_id)
    if path.is_file():
        raise ValueError(
            f"--estimate_memory reads a diffusers folder's configs; {model_id} is a single file: give the folder "
            "of the same model (model_index.json and each component's config.json)"
        )
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise ValueError(f"--estimate_memory: {model_id} has no model_index.json; {NEEDS}")
    if not path.is_dir():
        if model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id:
            raise ValueError(f"--estimate_memory: no folder {model_id}; {NEEDS}")
        try:
            with warnings.catch_warnings():  # huggingface_hub's deprecation notes, not the user's business
                warnings.simplefilter("ignore")
                read_model_index(model_id, revision)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"--estimate_memory cannot read the configs of the hub id {model_id!r} (offline, or not found: "
                f"{first_line(err, 160)}); {NEEDS}"
            ) from err
    family = families.detect(model_id, revision, override)
    index = read_model_index(model_id, revision)
    components = {}
    for name in (family.denoiser_name, "vae", *family.text_encoder_names):
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            components[name] = None
            continue
        if path.is_dir():
            config = _read_json(path / name / "config.json")
        elif (config := read_component_config(model_id, name, revision)) is None:
            raise ValueError(f"--estimate_memory cannot read {model_id}'s {name}/config.json")
        components[name] = Component(entry[1], config)
    if components.get(family.denoiser_name) is None or components.get("vae") is None:
        raise ValueError(f"{model_id}'s model_index.json names no {family.denoiser_name} or no vae")
    return family, components


# -- counting -----------------------------------------------------------------------------------------------------


def _count(model: torch.nn.Module, precision: str, quantized: str = "no_change") -> tuple[int, int, list[int]]:
    """(frozen parameters, bytes of frozen parameters and buffers, numel of each trainable tensor); ``quantized``:
    the ``--base_model_precision`` of the frozen Linear weights (see :data:`QUANTIZED_WEIGHT_BYTES`)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    floating = sum(p.numel() for p in frozen if p.is_floating_point())
    weight_bytes = floating * BYTES_PER_PARAMETER[precision]
    if quantized in QUANTIZED_WEIGHT_BYTES:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
                rows, elements = module.weight.shape[0], module.weight.numel()
                weight_bytes -= elements * BYTES_PER_PARAMETER[precision]  # counted above at the training dtype
                row_bytes = QUANTIZED_ROW_BYTES[quantized]
                row_bytes = BYTES_PER_PARAMETER[precision] if row_bytes is None else row_bytes
                weight_bytes += round(elements * QUANTIZED_WEIGHT_BYTES[quantized]) + rows * row_bytes
    weight_bytes += sum(p.numel() * p.element_size() for p in frozen if not p.is_floating_point())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in frozen), weight_bytes, trainable


def optimizer_state_bytes(tensor_sizes: list[int], eight_bit: bool) -> int:
    """AdamW's two states for trainable tensors of these sizes (bitsandbytes' AdamW8bit with ``eight_bit``)."""
    if not eight_bit:
        return ADAMW_STATE_BYTES * sum(tensor_sizes)
    total = 0
    for n in tensor_sizes:
        if n < ADAMW_8BIT["min_size"]:
            total += ADAMW_STATE_BYTES * n
        else:
            total += ADAMW_8BIT["state_bytes"] * n + ADAMW_8BIT["scale_bytes"] * -(-n // ADAMW_8BIT["block"])
    return total


# -- the plan -------------------------------------------------------------------------------------------------------

PRECISIONS = {None: "fp32", "no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _placement(name: str, family: Family, options: TrainingOptions) -> tuple[str, str]:
    """Where a text encoder or the VAE spends the training steps, and why."""
    if name == "vae":
        if options.cache_latents and not options.validation_prompt:
            return "freed", "freed after caching the latents (--cache_latents, no validation)"
        if options.offload:
            return "offloaded", "on the CPU, on the GPU while it " + (
                "validates (--offload)" if options.cache_latents else "encodes each batch (--offload)"
            )
        return "resident", "kept for validation" if options.cache_latents else "encodes each batch"
    if options.train_text_encoder and name in family.trainable_text_encoders:
        return "resident", "trained (--train_text_encoder)"
    if options.pre_compute_text_embeddings:
        return "freed", "freed after encoding the prompts (--cache_text_embeddings)"
    if options.offload:
        return "offloaded", "on the CPU, on the GPU while it encodes each batch (--offload)"
    return "resident", "encodes each batch"


def _memory(
    name: str, component: Component, model: torch.nn.Module, precision: str, quantized: str = "no_change"
) -> ComponentMemory:
    parameters, weight_bytes, trainable = _count(model, precision, quantized)
    label = precision if quantized == "no_change" else f"{quantized} ({precision} rest)"
    return ComponentMemory(name, component.class_name, label, parameters, weight_bytes, sum(trainable), trainable)


def plan_components(
    family: Family,
    components: dict[str, Component | None],
    options: TrainingOptions,
    model_name: str = "",
    demo: bool = False,
    fsdp_processes: int = 1,
) -> MemoryPlan:
    """The memory plan of training ``family``'s pipeline made of ``components`` (by pipeline name: the denoiser,
    ``vae``, the text encoders; a missing or None text encoder is left out) with ``options``; per process, with the
    denoiser sharded over ``fsdp_processes`` processes when there are several (:mod:`.distributed`)."""
    options = models.family_options(with_demo_defaults(options) if demo else options, family)
    precision = PRECISIONS[options.mixed_precision]
    denoiser = build_on_meta(components[family.denoiser_name], TORCH_DTYPES[precision])
    vae_precision = "fp32" if family.vae_in_fp32 and not options.pretrained_vae_model_name_or_path else precision
    vae = build_on_meta(components["vae"], TORCH_DTYPES[vae_precision])
    resolution = options.resolution or family.default_resolution(denoiser, vae)
    family.check_resolution(resolution, denoiser, vae)
    models.add_adapter(denoiser, options)  # the trainer's own injection: exact counts, the same refusals
    quantized = getattr(options, "base_model_precision", "no_change")
    memories = [_memory(family.denoiser_name, components[family.denoiser_name], denoiser, precision, quantized)]
    if fsdp_processes > 1:
        units = family.sharding_units(denoiser)
        shard_denoiser_memory(memories[0], units, denoiser, options, precision, fsdp_processes)
    text_options = replace(options, target_modules=list(family.text_encoder_targets))
    text_layers = []  # (width, layers) of each trained text encoder
    for name in family.text_encoder_names:
        if components.get(name) is None:
            memories.append(ComponentMemory(name, "-", precision, 0, 0, placement="left out", why="not in the folder"))
            continue
        encoder = build_on_meta(components[name], TORCH_DTYPES[precision])
        if options.train_text_encoder and name in family.trainable_text_encoders:
            models.add_adapter(encoder, text_options)
            text_layers.append((encoder.config.hidden_size, encoder.config.num_hidden_layers))
        encoder_precision = quantized if name in quantized_text_encoders(options, family) else "no_change"
        memories.append(_memory(name, components[name], encoder, precision, encoder_precision))
    memories.append(_memory("vae", components["vae"], vae, vae_precision))
    for memory in memories[1:]:
        if memory.placement != "left out":
            memory.placement, memory.why = _placement(memory.name, family, options)
    if options.pretrained_vae_model_name_or_path:  # its config is not read: the model's own VAE stands in
        memories[-1].why = f"{memories[-1].why}; sized as the model's own VAE"

    trainable = [n for memory in memories for n in memory.adapter_tensors]
    adapter = {
        "parameters": TRAINABLE_BYTES * sum(trainable),
        "gradients": TRAINABLE_BYTES * sum(trainable),
        "optimizer states": optimizer_state_bytes(trainable, options.use_8bit_adam),
    }
    method = methods.for_options(options)[0].name
    side = resolution // vae_scale_factor(vae)
    activations, how = estimate_activations(family, denoiser.config, side, options, method, text_layers, sum(trainable))
    dequantized = dequantized_weight_bytes(denoiser, options, TORCH_DTYPES[precision].itemsize)
    if dequantized:
        activations += dequantized
        where = "the largest block's" if options.gradient_checkpointing else "every adapted layer's"
        how += f"; + {dequantized / GIB:.2f} GiB: {where} weights dequantized, kept from forward to backward"
    settings = f"{method}, {precision}, batch {options.train_batch_size} at {resolution} px" + "".join(
        text for flag, text in SETTING_NOTES if getattr(options, flag)
    )
    if fsdp_processes > 1:
        settings += f", FSDP2 over {fsdp_processes} processes (per process)"
    return MemoryPlan(
        title=f"{model_name or family.pipeline_classes[0]} ({family.name})",
        settings=settings,
        components=memories,
        adapter_bytes=adapter,
        activation_bytes=activations,
        activation_note="estimate: " + how,
        phases=_phases(memories, adapter, activations, options),
    )


SETTING_NOTES = (
    ("with_prior_preservation", " (x2: prior preservation)"),
    ("gradient_checkpointing", ", gradient checkpointing"),
    ("use_8bit_adam", ", 8-bit AdamW"),
)


def shard_denoiser_memory(
    memory: ComponentMemory,
    units: list[torch.nn.Module],
    denoiser: torch.nn.Module,
    options: TrainingOptions,
    precision: str,
    processes: int,
) -> None:
    """The denoiser's frozen weights as one process holds them under FSDP2 (:func:`.distributed.shard_denoiser`):
    its share of every unit (``units``, the family's), plus, during the step, the root unit gathered whole (it
    stays gathered from its forward to its backward) and two units (the one running and the one prefetched), taken
    at the largest. The trained parameters stay whole (replicated), so the adapter rows do not change."""
    from .distributed import check_shardable

    quantized = getattr(options, "base_model_precision", "no_change")
    check_shardable(denoiser, methods.for_options(options)[0].name)
    if quantized != "no_change":  # on meta, the quantized weights are not built: refuse as the trainer does
        raise ValueError(
            f"FSDP cannot shard a quantized base (--base_model_precision {quantized}): train on a quantized base on "
            "one GPU, or shard the full-precision base with FSDP"
        )
    total = memory.weight_bytes
    unit_bytes = [_count(unit, precision)[1] for unit in units]
    gathered = (total - sum(unit_bytes)) + 2 * max(unit_bytes, default=0)
    memory.weight_bytes = -(-total // processes) + gathered
    memory.why = (
        f"sharded over {processes} processes: 1/{processes} of {gib(total)} + {gib(gathered)} gathered in the step "
        "(the root unit and the two largest units)"
    )


def dequantized_weight_bytes(denoiser: torch.nn.Module, options: TrainingOptions, element_size: int) -> int:
    """The GS methods on a quantized base read each adapted layer's weight dequantized (in the training dtype) and
    keep it from the forward to the backward: with gradient checkpointing one block's layers at a time (the largest
    block's), without it every adapted layer's at once. 0 on a full-precision base and for PEFT's methods."""
    from ..gs.layers import GSOFTLinear

    if getattr(options, "base_model_precision", "no_change") == "no_change":
        return 0
    per_block: dict[str, int] = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, GSOFTLinear):
            block = re.match(r"(.*?blocks\.\d+)", name)  # e.g. transformer_blocks.3, down_blocks.1
            key = block.group(1) if block else name
            per_block[key] = per_block.get(key, 0) + module.base_layer.weight.numel() * element_size
    if not per_block:
        return 0
    return max(per_block.values()) if options.gradient_checkpointing else sum(per_block.values())


def _phases(
    memories: list[ComponentMemory], adapter: dict[str, int], activations: int, options: TrainingOptions
) -> dict[str, tuple[int, str]]:
    """The moments that may hold the most: the training step; before it, when every component has just been loaded
    (or, with ``--offload``, while caching moves them over); with ``--offload``, an offloaded component's visit."""
    trainable = adapter["parameters"]
    step_temporaries = 0 if options.use_8bit_adam else trainable  # foreach AdamW's sqrt of exp_avg_sq
    resident = sum(memory.on_gpu for memory in memories)
    phases = {
        "training step": (
            resident + sum(adapter.values()) + max(activations, step_temporaries),
            "weights, adapter, resident components, activations",
        )
    }
    loaded = memories[0].weight_bytes + trainable
    encoders, vae = sum(m.weight_bytes for m in memories[1:-1]), memories[-1].weight_bytes
    if models.denoiser_waits_for_prompts(options):  # the prompts are encoded before the denoiser comes over
        on_gpu_vae = 0 if options.offload and not options.cache_latents else vae
        phases["encoding the prompts"] = (
            encoders + (0 if options.offload else vae),
            "the text encoders, before the denoiser is on the GPU",
        )
        phases["before the first step"] = (loaded + on_gpu_vae, "the denoiser, adapter and VAE (caching latents)")
        if not options.offload:
            return phases
    elif not options.offload:
        phases["before the first step"] = (loaded + encoders + vae, "every component loaded, before caching")
        return phases
    else:
        cached = max(encoders if options.pre_compute_text_embeddings else 0, vae if options.cache_latents else 0)
        why = "offloaded components on the GPU while caching" if cached else "the denoiser and adapter loaded"
        phases["before the first step"] = (loaded + cached, why)
    visiting = max(0 if options.pre_compute_text_embeddings else encoders, 0 if options.cache_latents else vae)
    if visiting:
        phases["offloaded components visiting"] = (
            loaded + adapter["optimizer states"] + visiting,
            "each step, before the forward (gradients freed)",
        )
    return phases


def plan_from_configs(
    family_name: str,
    configs: dict[str, dict],
    options: TrainingOptions,
    model_name: str = "",
    fsdp_processes: int = 1,
) -> MemoryPlan:
    """:func:`plan_components` from config dicts by pipeline name, each with its ``_class_name`` as the files in
    ``configs/`` have it (the denoiser's, ``vae`` and the text encoders; those left out are left out): the
    benchmarks' tables."""
    components = {name: Component(config["_class_name"], config) for name, config in configs.items()}
    return plan_components(families.get(family_name), components, options, model_name, fsdp_processes=fsdp_processes)


def plan_memory(options: TrainingOptions, fsdp_processes: int = 1) -> MemoryPlan:
    """The plan of ``options``' run, from ``--pretrained_model_name_or_path``'s configs (the demo's without one)."""
    model_id = options.pretrained_model_name_or_path
    family, components = read_components(model_id, options.revision, options.model_family)
    name = model_id or "the tiny demo model"
    return plan_components(family, components, options, name, demo=model_id is None, fsdp_processes=fsdp_processes)


# -- the table ------------------------------------------------------------------------------------------------------


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as the text ``--estimate_memory`` prints."""
    rows = []
    for memory in plan.components:
        if memory.placement == "left out":
            rows.append((memory.name, "0", f"left out ({memory.why})"))
            continue
        note = f"{memory.class_name}, {count(memory.parameters)} parameters in {memory.precision}"
        shown = gib(memory.weight_bytes)
        if memory.placement != "resident":
            shown, note = f"0 ({memory.placement})", f"{note} ({shown})"
        rows.append((memory.name, shown, note + (f": {memory.why}" if memory.why else "")))
    trainable = sum(memory.adapter_parameters for memory in plan.components)
    states = "8-bit AdamW" if "8-bit" in plan.settings else "AdamW, 2 x fp32"
    rows += [
        ("adapter parameters", gib(plan.adapter_bytes["parameters"]), f"{trainable:,} trainable, fp32"),
        ("adapter gradients", gib(plan.adapter_bytes["gradients"]), "fp32"),
        ("optimizer states", gib(plan.adapter_bytes["optimizer states"]), states),
        ("activations", gib(plan.activation_bytes), plan.activation_note),
    ]
    rows += [(name, gib(total), what) for name, (total, what) in plan.phases.items()]
    fits = plan.fits()
    verdict = (
        f"fits {' / '.join(map(str, fits))} GB GPUs"
        if fits
        else f"fits none of {' / '.join(map(str, GPU_SIZES_GIB))} GB"
    )
    too_small = [size for size in GPU_SIZES_GIB if size not in fits]
    if fits and too_small:
        verdict += f", not {' / '.join(map(str, too_small))} GB"
    rows.append(("peak", gib(plan.peak), f"+ {CUDA_CONTEXT_GIB:g} GiB for the CUDA context: {verdict}"))
    width = max(len(name) for name, _, _ in rows)
    lines = [
        f"Memory plan (an estimate; no weights read) for {plan.title}: {plan.settings}",
        *(f"  {name:<{width}}  {shown:>13}  {note}" for name, shown, note in rows),
    ]
    return "\n".join(lines)


def print_memory_plan(options: TrainingOptions, environ: Mapping[str, str] | None = None) -> MemoryPlan:
    """``--estimate_memory``: print the plan of ``options``' run; nothing is loaded or written. Launched with
    accelerate's FSDP settings over several processes, the plan is per process with the denoiser sharded (the first
    process prints it)."""
    from .distributed import requested_sharding, with_sharding_options

    environ = os.environ if environ is None else environ
    sharding = requested_sharding(environ)
    processes = int(environ.get("WORLD_SIZE", "1")) if sharding else 1
    plan = plan_memory(with_sharding_options(options, sharding), fsdp_processes=processes)
    if environ.get("RANK", "0") == "0":
        print(format_plan(plan))
    return plan
