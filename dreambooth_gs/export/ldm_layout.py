"""Diffusers state dicts -> the original (CompVis / LDM / SGM) single-file layout of Stable Diffusion 1.x / 2.x / XL.

Pure key mapping, no IO: the inverse of the ``convert_ldm_*`` functions in diffusers'
``loaders/single_file_utils.py`` (what ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.from_single_file``
read), written from the facts they encode:

* UNet (``model.diffusion_model.``): ``input_blocks.0.0`` is ``conv_in``; down block ``b`` layer ``l`` is
  ``input_blocks.{1 + b (L + 1) + l}`` (``.0`` its resnet, ``.1`` its attention, ``L`` = layers_per_block) and its
  downsampler ``input_blocks.{1 + b (L + 1) + L}.0.op``; the mid block is ``middle_block.{0, 1, 2}`` (resnet,
  attention, resnet); up block ``b`` layer ``l`` is ``output_blocks.{b (L + 1) + l}`` with the upsampler after the
  last layer's attention (``.2.conv``) or resnet (``.1.conv``). Resnets rename ``norm1 -> in_layers.0``,
  ``conv1 -> in_layers.2``, ``norm2 -> out_layers.0``, ``conv2 -> out_layers.3``, ``time_emb_proj ->
  emb_layers.1``, ``conv_shortcut -> skip_connection``; attention blocks keep their names (any number of
  ``transformer_blocks``). SDXL's text_time embedding ``add_embedding.linear_{1,2}`` is ``label_emb.0.{0,2}``.
* VAE (``first_stage_model.``): ``down_blocks.{i}.resnets.{j} -> down.{i}.block.{j}``, decoder up blocks in reverse
  order (``up_blocks.{i} -> up.{n - 1 - i}``), ``mid_block.resnets.{k} -> mid.block_{k + 1}``, the mid attention
  ``-> mid.attn_1`` with ``q / k / v / proj_out`` as 1x1 convolutions, ``conv_shortcut -> nin_shortcut``.
* Text encoder, SD 1.x (OpenAI CLIP): ``cond_stage_model.transformer.text_model.*`` with transformers' own names.
  SD 2.x (OpenCLIP): ``cond_stage_model.model.*`` with ``resblocks``, fused ``attn.in_proj_*`` (q, k, v stacked).
* SDXL: the first encoder (CLIP) as ``conditioner.embedders.0.transformer.text_model.*``, the second
  (``CLIPTextModelWithProjection``) as OpenCLIP under ``conditioner.embedders.1.model.*``, its projection as
  ``text_projection`` = the transpose of transformers' ``text_projection.weight`` (OpenCLIP computes ``x @ P``).
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
TEXT_LAYOUTS = ("clip", "open_clip")

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time conditioning
    "add_embedding.linear_2": "label_emb.0.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
VAE_SAME = {
    "encoder.conv_in",
    "encoder.conv_out",
    "decoder.conv_in",
    "decoder.conv_out",
    "quant_conv",
    "post_quant_conv",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _rename_head(rest: str, table: dict[str, str]) -> str | None:
    """``rest`` with its leading module name replaced from ``table`` (longest match first), or None."""
    for old in sorted(table, key=len, reverse=True):
        if rest.startswith(old + "."):
            return table[old] + rest[len(old) :]
    return None


def _refuse_unmapped(component: str, unmapped: list[str]) -> None:
    if unmapped:
        raise ValueError(
            f"cannot write the {component} in the original single-file layout: no LDM name for "
            f"{unmapped[:3]}{' ...' if len(unmapped) > 3 else ''} (only Stable Diffusion 1.x / 2.x / XL pipelines "
            "are supported; use --format diffusers instead)"
        )


def _layer_key(slot: str, kind: str, rest: str) -> str | None:
    """``<slot>.0.<resnet names>`` for a resnet, ``<slot>.1.<rest>`` for an attention block (names kept)."""
    if kind == "attentions":
        return f"{slot}.1.{rest}"
    renamed = _rename_head(rest, UNET_RESNET)
    return None if renamed is None else f"{slot}.0.{renamed}"


def _unet_key(key: str, per_block: int, up_has_attention: set[int]) -> str | None:
    """The LDM name (without prefix) of one diffusers UNet key, or None when SD 1.x / 2.x / XL has no such tensor."""
    module, _, param = key.rpartition(".")
    if module in UNET_TOP:
        return f"{UNET_TOP[module]}.{param}"
    step = per_block + 1  # LDM slots per down / up block: its layers (+ the downsampler's own slot going down)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return _layer_key(f"input_blocks.{1 + int(m[1]) * step + int(m[3])}", m[2], m[4])
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{1 + int(m[1]) * step + per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        renamed = _rename_head(m[2], UNET_RESNET)
        return None if renamed is None else f"middle_block.{2 * int(m[1])}.{renamed}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        return _layer_key(f"output_blocks.{int(m[1]) * step + int(m[3])}", m[2], m[4])
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        b = int(m[1])
        return f"output_blocks.{b * step + per_block}.{2 if b in up_has_attention else 1}.conv.{m[2]}"
    return None


def unet_to_ldm(state_dict: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in LDM names (``model.diffusion_model.*``)."""
    if not isinstance(layers_per_block, int):
        raise ValueError(f"the single-file layout needs one layers_per_block for every block, got {layers_per_block}")
    up_has_attention = {int(m[1]) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        name = _unet_key(key, layers_per_block, up_has_attention)
        if name is None:
            unmapped.append(key)
        else:
            out[UNET_PREFIX + name] = tensor
    _refuse_unmapped("UNet", unmapped)
    return out


def _vae_key(key: str, num_up_blocks: int) -> tuple[str, bool] | None:
    """``(LDM name, is a 1x1-conv attention weight)`` of one diffusers VAE key, or None."""
    module, _, param = key.rpartition(".")
    if module in VAE_TOP:
        return f"{VAE_TOP[module]}.{param}", False
    if module in VAE_SAME:
        return key, False
    shortcut = {"conv_shortcut": "nin_shortcut"}
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], shortcut) or m[3]}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        ldm_block = num_up_blocks - 1 - int(m[1])  # the LDM decoder counts its up blocks from the bottom
        return f"decoder.up.{ldm_block}.block.{m[2]}.{_rename_head(m[3], shortcut) or m[3]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_head(m[3], shortcut) or m[3]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        rest = _rename_head(m[2], VAE_ATTENTION)
        if rest is None:
            return None
        return f"{m[1]}.mid.attn_1.{rest}", not rest.startswith("norm.") and param == "weight"
    return None


def vae_to_ldm(state_dict: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in LDM names (``first_stage_model.*``)."""
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        found = _vae_key(key, num_up_blocks)
        if found is None:
            unmapped.append(key)
            continue
        name, is_conv = found
        out[VAE_PREFIX + name] = tensor[:, :, None, None] if is_conv and tensor.ndim == 2 else tensor  # (C, C, 1, 1)
    _refuse_unmapped("VAE", unmapped)
    return out


def _text_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text encoder's keys without transformers' ``text_model.`` wrapper (flattened in transformers >= 5.6)."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict in SD 1.x names (``cond_stage_model.transformer.text_model.*``;
    SDXL's first encoder: ``prefix=SDXL_CLIP_PREFIX``)."""
    keys = _text_keys(state_dict)
    _refuse_unmapped(
        "text encoder", [k for k in keys if not k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm."))]
    )
    return {prefix + k: v for k, v in keys.items()}


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict in SD 2.x OpenCLIP names (``cond_stage_model.model.*``), with each
    layer's q / k / v projections fused into ``attn.in_proj_weight`` / ``in_proj_bias`` (stacked q, k, v).

    A ``CLIPTextModelWithProjection`` (SDXL's second encoder, ``prefix=SDXL_OPEN_CLIP_PREFIX``) also has
    ``text_projection.weight`` (projection_dim, hidden): OpenCLIP's ``text_projection`` is its transpose."""
    keys = _text_keys(state_dict)
    out, unmapped, fused = {}, [], {}
    for key, tensor in keys.items():
        if key in OPEN_CLIP_TOP:
            out[prefix + OPEN_CLIP_TOP[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()  # (hidden, projection_dim)
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((int(m[1]), m[3]), {})[m[2]] = tensor
        elif (m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)) and (
            rest := _rename_head(m[2], OPEN_CLIP_LAYER)
        ):
            out[f"{prefix}transformer.resblocks.{m[1]}.{rest}"] = tensor
        else:
            unmapped.append(key)
    for (layer, kind), parts in sorted(fused.items()):
        if set(parts) != {"q", "k", "v"}:
            unmapped.append(f"encoder.layers.{layer}.self_attn (has only {sorted(parts)} projections' {kind})")
            continue
        stacked = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3 hidden, hidden) or (3 hidden,)
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = stacked
    _refuse_unmapped("text encoder", unmapped)
    return out


def default_text_layout(hidden_act: str) -> str:
    """SD 2.x's OpenCLIP text encoder uses GELU, SD 1.x's OpenAI CLIP quick-GELU: the layout the original used."""
    return "open_clip" if hidden_act == "gelu" else "clip"


def pipeline_to_ldm(
    unet: dict[str, torch.Tensor],
    unet_layers_per_block: int,
    vae: dict[str, torch.Tensor],
    vae_num_up_blocks: int,
    text_encoder: dict[str, torch.Tensor],
    text_layout: str,
) -> dict[str, torch.Tensor]:
    """One state dict in the original single-file layout from the three diffusers components' state dicts."""
    if text_layout not in TEXT_LAYOUTS:
        raise ValueError(f"unknown text encoder layout {text_layout!r}; choose one of {', '.join(TEXT_LAYOUTS)}")
    text = clip_to_ldm(text_encoder) if text_layout == "clip" else open_clip_to_ldm(text_encoder)
    return {**unet_to_ldm(unet, unet_layers_per_block), **vae_to_ldm(vae, vae_num_up_blocks), **text}


def sdxl_pipeline_to_ldm(
    unet: dict[str, torch.Tensor],
    unet_layers_per_block: int,
    vae: dict[str, torch.Tensor],
    vae_num_up_blocks: int,
    text_encoder: dict[str, torch.Tensor],
    text_encoder_2: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """One state dict in SDXL's original single-file layout: UNet and VAE as for SD, the first text encoder as CLIP
    (``conditioner.embedders.0.transformer.*``), the second as OpenCLIP (``conditioner.embedders.1.model.*``)."""
    return {
        **unet_to_ldm(unet, unet_layers_per_block),
        **vae_to_ldm(vae, vae_num_up_blocks),
        **clip_to_ldm(text_encoder, SDXL_CLIP_PREFIX),
        **open_clip_to_ldm(text_encoder_2, SDXL_OPEN_CLIP_PREFIX),
    }
