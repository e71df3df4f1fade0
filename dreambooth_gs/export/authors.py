"""The GSOFT authors' checkpoints -> a dreambooth_gs adapter folder.

Their DreamBooth code trains attention processors and saves them with diffusers 0.25's ``unet.save_attn_procs``
(``pytorch_lora_weights.safetensors``), one processor per attention layer:

    <attention path>.processor.to_{q,k,v,out}_gsoft.ort_gs.{L,R}           GSOFT: Q = P^T L P R on the input
    <attention path>.processor.to_{q,k,v,out}_gsoft_{in,out}.ort_gs.{L,R}  Double GSOFT: Q_in, Q_out
    <attention path>.processor.{q,k,v,out}_scale                           the per-output scale vector

Their ``L`` / ``R`` (``(r, b, b)`` blocks, one block count ``r`` for every layer) are our ``gsoft_L`` / ``gsoft_R``
with no transpose, their scale is our ``gsoft_s`` and ``to_out`` is our ``to_out.0``. The parametrization
(Cayley or matrix exponential) is not stored, so the caller says which one trained the file. Their q / k / v scale
also multiplies the projection's bias, ours does not: a base whose targeted q / k / v carry a bias is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..adapters.serialization import save_adapter
from ..fileio import first_line, reporting_write_failures, staged_directory
from ..gs.config import GSOFTConfig
from ..methods.injection import find_targets, inject_adapter, remove_adapter, trainable_parameters

AUTHORS_PARAMETRIZATIONS = ("cayley", "exp")  # what the authors' code offers (no Cayley-Neumann series)
AUTHORS_FILE = "pytorch_lora_weights.safetensors"
PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
DEFAULT_TARGETS = GSOFTConfig().target_modules
_FACTOR = re.compile(r"(.+)\.processor\.to_(q|k|v|out)_gsoft(_in|_out)?\.ort_gs\.(L|R)")
_SCALE = re.compile(r"(.+)\.processor\.(q|k|v|out)_scale")


def read_authors_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an authors' file (or of the ``pytorch_lora_weights.safetensors`` in a folder), float32."""
    path = Path(path)
    if path.is_dir():
        path = path / AUTHORS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the authors' {AUTHORS_FILE} (or its folder)")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; only safetensors are read (no pickle)")
    try:
        return {k: v.float() for k, v in load_file(path).items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or not a safetensors file ({err})") from err


def authors_to_ours(tensors: dict[str, torch.Tensor]) -> tuple[str, int, bool, dict[str, torch.Tensor]]:
    """``(method, nblocks, scale, tensors under our names)`` of an authors' state dict; refuses what does not fit."""
    ours: dict[str, torch.Tensor] = {}
    sides, unknown, scaled = set(), [], set()
    for key, tensor in tensors.items():
        if m := _FACTOR.fullmatch(key):
            attention, proj, side, factor = m[1], m[2], m[3], m[4]
            sides.add(side)
            prefix = "gsoft_" if side is None else f"gsoft_{side[1:]}_"
            ours[f"{attention}.{PROJECTIONS[proj]}.{prefix}{factor}"] = tensor
        elif m := _SCALE.fullmatch(key):
            scaled.add(f"{m[1]}.{PROJECTIONS[m[2]]}")
            ours[f"{m[1]}.{PROJECTIONS[m[2]]}.gsoft_s"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"not a GSOFT authors' checkpoint: unknown keys {unknown[:3]}{' ...' if len(unknown) > 3 else ''} "
            "(expected <attention>.processor.to_{q,k,v,out}_gsoft[_in|_out].ort_gs.{L,R} and .{q,k,v,out}_scale)"
        )
    if not sides:
        raise ValueError("the checkpoint holds no GSOFT factors (no ...ort_gs.L / .R keys)")
    if len(sides) > 1 and None in sides:
        raise ValueError(
            "the checkpoint mixes GSOFT keys (to_*_gsoft.ort_gs) with Double GSOFT keys (to_*_gsoft_in / _out); "
            "one file holds one method"
        )
    method = "gsoft" if None in sides else "double_gsoft"
    modules = {key.rpartition(".")[0] for key in ours if not key.endswith("gsoft_s")}
    if scaled and scaled != modules:
        missing = sorted(modules - scaled)[:3]
        raise ValueError(f"the checkpoint has scale vectors for some projections but not for {missing}")
    blocks = sorted({t.shape[0] for k, t in ours.items() if not k.endswith("gsoft_s")})
    bad = [k for k, t in ours.items() if not k.endswith("gsoft_s") and (t.ndim != 3 or t.shape[1] != t.shape[2])]
    if bad:
        raise ValueError(f"{bad[0]} has shape {tuple(ours[bad[0]].shape)}; GS factors are (nblocks, b, b)")
    if len(blocks) != 1:
        raise ValueError(f"the checkpoint uses several block counts {blocks}; one GSOFTConfig has one nblocks")
    return method, blocks[0], bool(scaled), ours


def _check_biases(unet: nn.Module, modules: set[str]) -> None:
    biased = [m for m in sorted(modules) if not m.endswith("to_out.0") and unet.get_submodule(m).bias is not None]
    if biased:
        raise ValueError(
            f"the base model's {biased[0]} has a bias ({len(biased)} biased q/k/v projections): the authors' scale "
            "multiplies that bias, dreambooth_gs's does not, so this checkpoint cannot be converted exactly"
        )


def load_unet(base_model: str) -> nn.Module:
    """The base pipeline's UNet (``<base>/unet``) in float32."""
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(base_model, subfolder="unet").float().eval()
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the UNet of {base_model!r}: {first_line(err)}") from err


def _copy_tensors(params: dict[str, nn.Parameter], ours: dict[str, torch.Tensor], method: str) -> None:
    """Copy the checkpoint's tensors into the injected adapter, checking every name and shape first."""
    missing = sorted(set(params) - set(ours))
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[:3]} ({len(missing)} tensors) that {method} needs")
    for key, param in params.items():
        if ours[key].shape != param.shape:
            raise ValueError(
                f"{key} has shape {tuple(ours[key].shape)} in the checkpoint but {tuple(param.shape)} in the base "
                "UNet: the checkpoint was trained on another base model"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(ours[key])


def convert_authors_state_dict(
    tensors: dict[str, torch.Tensor], unet: nn.Module, parametrization: str = "cayley"
) -> list[str]:
    """Inject the adapter an authors' state dict describes into ``unet`` and load its tensors; returns the modules."""
    if parametrization not in AUTHORS_PARAMETRIZATIONS:
        raise ValueError(
            f"parametrization {parametrization!r} is not one the authors' code trains with; choose one of "
            f"{', '.join(AUTHORS_PARAMETRIZATIONS)}"
        )
    method, nblocks, scale, ours = authors_to_ours(tensors)
    modules = {key.rpartition(".")[0] for key in ours}
    names = dict(unet.named_modules())
    absent = sorted(m for m in modules if not isinstance(names.get(m), nn.Linear))
    if absent:
        raise ValueError(f"the base UNet has no Linear {absent[0]} ({len(absent)} such modules): wrong base model?")
    _check_biases(unet, modules)
    default = {name for name, _ in find_targets(unet, DEFAULT_TARGETS)}
    targets = DEFAULT_TARGETS if modules == default else tuple(sorted(modules))  # a subset: name each module
    config = GSOFTConfig(
        method=method, nblocks=nblocks, target_modules=targets, scale=scale, parametrization=parametrization
    )
    trainable = {name: p.requires_grad for name, p in unet.named_parameters()}
    adapted = inject_adapter(unet, config)
    try:
        _copy_tensors(dict(trainable_parameters(unet)), ours, method)
    except ValueError:
        remove_adapter(unet)  # leave the base UNet as it was, trainability included
        for name, param in unet.named_parameters():
            param.requires_grad_(trainable[name])
        raise
    return adapted


def convert_authors_checkpoint(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str,
    parametrization: str = "cayley",
    overwrite: bool = False,
) -> Path:
    """Convert an authors' file into an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    The folder is written beside ``output_dir`` and renamed into place: an existing one (``overwrite``) is replaced
    as a whole, and a failure (a full disk, a read-only folder) leaves it as it was and no new folder behind.
    """
    output_dir = Path(output_dir)
    if output_dir.is_file():
        raise ValueError(
            f"--output {output_dir} is a file; the converter writes an adapter folder: give a folder path (new, empty, "
            "or with --overwrite an adapter folder to replace)"
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not an empty folder; pass --overwrite to replace it")
    for flag, path in (("--input", input_path), ("--pretrained_model_name_or_path", base_model)):
        inside = Path(path).resolve()
        if output_dir.resolve() == inside or output_dir.resolve() in inside.parents:
            raise ValueError(f"--output {output_dir} would replace {flag} {path}; choose another folder")
    tensors = read_authors_file(input_path)
    unet = load_unet(base_model)
    convert_authors_state_dict(tensors, unet, parametrization)
    kept = f"the existing {output_dir} is unchanged" if output_dir.exists() else "no folder was left behind"
    with reporting_write_failures(f"the adapter folder {output_dir}", kept), staged_directory(output_dir) as staging:
        save_adapter(unet, staging, base_model=base_model)
    return output_dir
