"""The activation part of the memory plan (:mod:`.memory_plan`), an ESTIMATE from the denoiser's config: its blocks'
tokens x channels at the training resolution, times the bytes autograd keeps per token and channel for each kind of
block (:data:`KEPT_BYTES`, measured once with saved-tensor hooks: ``benchmarks/bench_memory_plan.py --calibrate``).

With ``B`` the batch (x2 with prior preservation), ``kept(u) = sum of k x T x C`` over the parts of a unit ``u``
(what diffusers checkpoints: a UNet resnet or transformer layer, an SD3 / Flux block; and what it does not: a UNet
attention's wrapper, its down / upsamplers and output head, whose kept bytes count with checkpointing too) and
``e`` the bytes of one activation value (4 fp32, 2 bf16 / fp16):

    activations = B x (sum_u kept(u) + 0.75 x max_u kept(u))    (backward's working set)
                  + the GS methods' Cayley blocks: trainable parameters x 4 bytes (6 under bf16 / fp16 autocast)
    --gradient_checkpointing:
    activations = B x (sum_u e x T_u x C_u + 1.75 x max_u kept(u))  (inputs; one block recomputed, its working set)
    (a UNet resnet on the up path reads 2 x C_u: its input counts twice)

The 0.75 was chosen on one measured CPU step of three reduced real-width models (``--check`` of the same script),
leaning high: the estimate came to 0.97-1.12x their measured peak without checkpointing and 0.95-1.21x with it.
"""

from __future__ import annotations

from ..families import Family
from .options import TrainingOptions

GS_METHODS = ("gsoft", "double_gsoft", "boft")  # keep their outputs (activation side) and their Cayley blocks
# Bytes autograd keeps per token x channel of one block, one sample: {kind: {precision class: (plain, gs)}}, "plain"
# measured with LoRA r=16 (also used for OFT, full and no adapter), "gs" with GSOFT r=32 (auto side), its Cayley blocks
# left out (CAYLEY_BYTES). "half" is bf16 autocast (norms and softmax keep float32 copies). Measured on the CPU at
# real widths (benchmarks/bench_memory_plan.py --calibrate, docs/benchmarks.md), rounded.
KEPT_BYTES = {
    "resnet": {"fp32": (24, 24), "half": (12, 12)},  # ResnetBlock2D, C -> C
    "resnet_up": {"fp32": (36, 36), "half": (18, 18)},  # the up path's resnets read 2C (the skip concatenated)
    "unet_attention": {"fp32": (4, 4), "half": (2, 2)},  # Transformer2DModel around its layers: norm, proj_in / out
    "unet_layer": {"fp32": (94, 101), "half": (56, 51)},  # BasicTransformerBlock: self-, cross-attention, GEGLU
    "joint": {"fp32": (56, 64), "half": (41, 40)},  # SD3 JointTransformerBlock, image and text streams
    "joint_attn2": {"fp32": (21, 21), "half": (18, 18)},  # SD3.5-medium's second image self-attention
    "flux_double": {"fp32": (53, 61), "half": (37, 38)},  # FluxTransformerBlock
    "flux_single": {"fp32": (49, 48), "half": (33, 32)},  # FluxSingleTransformerBlock
    "text_layer": {"fp32": (44, 48), "half": (32, 24)},  # CLIPEncoderLayer (--train_text_encoder)
    # Counted from their ops, not measured: a down / upsampler's conv keeps its input; the output head its GroupNorm's,
    # SiLU's and conv's inputs (the norm's in float32 under autocast).
    "unet_resample": {"fp32": (4, 4), "half": (2, 2)},
    "unet_out": {"fp32": (12, 12), "half": (10, 10)},
}
NOT_CHECKPOINTED = ("unet_attention", "unet_resample", "unet_out")  # diffusers checkpoints resnets and layers only


# The GS methods' forward also keeps the Cayley blocks of its rotations, as many values as the adapter has parameters:
# float32 (4 bytes per parameter), and a bf16 copy besides under autocast (6). Not part of KEPT_BYTES.
CAYLEY_BYTES = {"fp32": 4, "half": 6}
WORKING_SET = 0.75  # of the largest block's kept bytes: what backward holds besides them (fitted, see above)
Part = tuple[str, int, int]  # (KEPT_BYTES kind, tokens, channels)


def _unet_units(config, side: int) -> list[list[Part]]:
    """The UNet's units with their tokens x channels: what diffusers checkpoints (each resnet, each transformer
    layer) and what it does not (the attention wrappers, the down / upsamplers, the output head)."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    per_level = config["layers_per_block"]
    per_level = list(per_level) if isinstance(per_level, (list, tuple)) else [per_level] * levels
    layers = config.get("transformer_layers_per_block") or 1
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * levels

    def tokens(level: int) -> int:
        return (side // 2**level) ** 2

    def attention(level: int, count: int) -> list[list[Part]]:
        t, c = tokens(level), channels[level]
        return [[("unet_attention", t, c)]] + [[("unet_layer", t, c)]] * count

    units = []
    for level, kind in enumerate(config["down_block_types"]):
        for _ in range(per_level[level]):
            units.append([("resnet", tokens(level), channels[level])])
            units += attention(level, layers[level]) if "CrossAttn" in kind else []
        if level < levels - 1:
            units.append([("unet_resample", tokens(level), channels[level])])
    if config.get("mid_block_type") == "UNetMidBlock2DCrossAttn":
        mid = [("resnet", tokens(levels - 1), channels[-1])]
        units += [mid, *attention(levels - 1, layers[-1]), mid]
    up_layers = config.get("reverse_transformer_layers_per_block") or layers[::-1]
    for index, kind in enumerate(config["up_block_types"]):
        level = levels - 1 - index
        count = up_layers[index] if isinstance(up_layers[index], int) else up_layers[index][0]
        for _ in range(per_level[level] + 1):
            units.append([("resnet_up", tokens(level), channels[level])])
            units += attention(level, count) if "CrossAttn" in kind else []
        if level > 0:  # the upsampler's conv runs at the next level's size
            units.append([("unet_resample", tokens(level - 1), channels[level])])
    return [*units, [("unet_out", tokens(0), channels[0])]]


def _transformer_units(family: Family, config, side: int, text_tokens: int) -> list[list[Part]]:
    """SD3's joint blocks (SD3.5-medium's first ones with a second attention) or Flux's double and single blocks."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (side // 2) ** 2 + text_tokens  # 2 x 2 latent patches (SD3's patch_size, Flux's packing) + text
    if family.name == "flux":
        double, single = [("flux_double", tokens, width)], [("flux_single", tokens, width)]
        return [double] * config["num_layers"] + [single] * config["num_single_layers"]
    dual = set(config.get("dual_attention_layers") or ())
    return [
        [("joint", tokens, width)] + ([("joint_attn2", tokens, width)] if i in dual else [])
        for i in range(config["num_layers"])
    ]


def text_tokens(family: Family, options: TrainingOptions) -> int:
    """The text tokens a transformer block sees besides the image's (SD3: 77 CLIP + T5's, Flux: T5's); the UNet
    families' prompt length (their cross-attention reads it; it is within the constants)."""
    if family.objective != "flow":
        return options.tokenizer_max_length or 77
    t5 = options.max_sequence_length or family.default_max_sequence_length
    return 77 + t5 if family.name == "sd3" else t5


def estimate_activations(
    family: Family,
    denoiser_config,
    latent_side: int,
    options: TrainingOptions,
    method: str,
    text_encoder_layers: list[tuple[int, int]] = (),
    trainable_parameters: int = 0,
) -> tuple[int, str]:
    """``(bytes, how)``: the activations of one training step of ``family``'s denoiser (its ``denoiser_config``) on
    ``latent_side`` x ``latent_side`` latents with ``options``' batch, precision and checkpointing, plus the trained
    text encoders' ``(width, layers)``; ``trainable_parameters`` for the GS methods' Cayley blocks."""
    batch = options.train_batch_size * (2 if options.with_prior_preservation else 1)
    precision = "fp32" if options.mixed_precision in (None, "no") else "half"
    gs = method in GS_METHODS
    if family.objective == "flow":
        tokens = text_tokens(family, options)
        units = _transformer_units(family, denoiser_config, latent_side, tokens)
        shape = f"{(latent_side // 2) ** 2} image + {tokens} text tokens"
    else:
        units = _unet_units(denoiser_config, latent_side)
        shape = f"{latent_side}x{latent_side} latents"
    prompt = options.tokenizer_max_length or 77
    text_units = [[("text_layer", prompt, width)] for width, depth in text_encoder_layers for _ in range(depth)]
    checkpointing = options.gradient_checkpointing
    total = _step_bytes(units + text_units, batch, precision, gs, checkpointing)
    if gs and not checkpointing:
        total += CAYLEY_BYTES[precision] * trainable_parameters  # each forward keeps its rotations' Cayley blocks
    blocks = sum(unit[0][0] not in NOT_CHECKPOINTED for unit in units)
    how = f"batch {batch} x {shape}, {blocks} blocks" + (f" + {len(text_units)} text layers" if text_units else "")
    how += ", checkpointed: block inputs + 1.75 blocks" if checkpointing else ", every block kept"
    return total, how


def _step_bytes(units: list[list[Part]], batch: int, precision: str, gs: bool, checkpointing: bool) -> int:
    def kept(unit: list[Part]) -> int:
        return sum(KEPT_BYTES[kind][precision][int(gs)] * tokens * width for kind, tokens, width in unit)

    def held(unit: list[Part]) -> int:  # what a unit holds until backward reaches it
        kind, tokens, width = unit[0]
        if not checkpointing or kind in NOT_CHECKPOINTED:
            return kept(unit)
        return (4 if precision == "fp32" else 2) * tokens * width * (2 if kind == "resnet_up" else 1)

    blocks = [unit for unit in units if unit[0][0] not in NOT_CHECKPOINTED]
    largest = max((kept(unit) for unit in blocks), default=0)
    working_set = WORKING_SET * largest  # backward's gradients and temporaries around the block it is in
    recomputed = largest if checkpointing else 0  # the block being recomputed
    return int(batch * (sum(held(unit) for unit in units) + recomputed + working_set))
