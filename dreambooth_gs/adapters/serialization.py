"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, saved atomically, loaded strictly.

One folder shape for every method: the GSOFT family (keys ``<module path>.<parameter>``, e.g.
``mid_block.attentions.0.transformer_blocks.0.attn1.to_q.gsoft_L``; only trainable ``gsoft_`` parameters, never
derived buffers), full fine-tuning of the projections (``<module path>.weight`` / ``.bias`` of the trained
Linears) and the PEFT baselines (PEFT's own state-dict keys). ``adapter_config.json`` names the method.
No pickle: user files are read with safetensors and json only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from ..families import FAMILIES
from ..fileio import atomic_write_files, created_directories
from ..gs.config import GSOFTConfig
from ..methods import registry as methods
from ..methods.full import FullConfig, full_parameters
from ..methods.injection import merge_adapter, remove_adapter, require_targets
from .saving import guard_save_pretrained

STRENGTH_LOAD = "dreambooth_gs_strength"  # the passing name of an unnamed load at a strength, fused and dropped
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LIBRARY_NAME = "dreambooth_gs"
# --train_text_encoder's adapters, by pipeline attribute; the pipeline attributes of the denoisers
TEXT_ENCODER_FOLDERS = tuple(dict.fromkeys(n for f in FAMILIES.values() for n in f.trainable_text_encoders))
DENOISER_NAMES = tuple(dict.fromkeys(f.denoiser_name for f in FAMILIES.values()))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The GS-family adapter's trainable tensors by name (float32, detached, contiguous)."""
    return methods.GSKind.state_dict(model)


def describe_adapter(model: nn.Module) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(method, config dict, tensors)`` of the adapter in ``model`` (any method of the registry)."""
    found = methods.find(model)
    if found is None:
        raise ValueError(
            "the model has no adapter to save; call inject_adapter(), enable_full_finetuning() or load_adapter() first"
        )
    method, config = found
    return method.name, config, method.kind.state_dict(model)


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created if needed), atomically; returns the directory.

    Weights and config are replaced together: a failure (a full disk, a read-only folder) leaves the old pair, never
    new weights beside an old config, and no folder this call created.
    """
    method, config, tensors = describe_adapter(model)
    return write_adapter_folder(directory, method, config, tensors, base_model)


def write_adapter_folder(
    directory: str | os.PathLike,
    method: str,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    base_model: str | None = None,
) -> Path:
    """Write an adapter folder from its parts (``method``'s name, its config dict, its tensors by key), atomically
    as :func:`save_adapter` does; returns the directory."""
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, pname = methods.get(method).kind.split_key(key)
        modules.setdefault(module, {"parameters": {}})["parameters"][pname] = list(tensor.shape)
    document = {
        "library": LIBRARY_NAME,
        "format_version": GSOFTConfig.FORMAT_VERSION,
        "method": method,
        "config": config,
        "base_model": base_model,
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "modules": modules,
    }
    metadata = {"format": "pt", "library": LIBRARY_NAME, "method": method}
    with created_directories(directory) as directory:
        atomic_write_files(
            {
                directory / WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata=metadata),
                directory / CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2) + "\n"),
            }
        )
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed and checked ``adapter_config.json`` of an adapter folder (clear errors for bad folders)."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not an adapter folder written by save_adapter")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt") from err
    if not isinstance(document, dict):
        raise ValueError(f"{path} does not hold an adapter config (expected a JSON object)")
    version = document.get("format_version")
    if version != GSOFTConfig.FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={version!r}; this dreambooth_gs reads format {GSOFTConfig.FORMAT_VERSION}"
        )
    method = document.get("method")
    if method not in methods.REGISTRY:
        raise ValueError(f"{path} names unknown method {method!r}; known methods: {', '.join(methods.ALL_METHODS)}")
    if not isinstance(document.get("config"), dict) or not isinstance(document.get("modules"), dict):
        raise ValueError(f"{path} lacks its 'config' or 'modules' section; the file is incomplete")
    return document


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the adapter folder is incomplete")
    try:
        # read by Python, parsed from bytes: safetensors' own file reader refuses a path that is not UTF-8
        return load(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}); save the adapter again") from err


def adapter_parts(model: nn.Module | Any, directory: Path) -> list[tuple[nn.Module, Path]]:
    """``(component, folder)`` pairs an adapter folder goes into: the model itself, or a pipeline's denoiser and the
    text encoders whose subfolders (``text_encoder/``, ``text_encoder_2/``) the folder holds."""
    if isinstance(model, nn.Module):
        return [(model, directory)]
    denoiser = pipeline_denoiser(model)
    if denoiser is None:
        raise TypeError(
            f"load_adapter needs a torch model or a pipeline with a .unet or .transformer, got {type(model).__name__}"
        )
    parts = [(denoiser, directory)]
    for name in TEXT_ENCODER_FOLDERS:
        if (directory / name / CONFIG_NAME).is_file():
            encoder = getattr(model, name, None)
            if not isinstance(encoder, nn.Module):
                raise ValueError(f"{directory} holds a {name} adapter but the pipeline has no {name}")
            parts.append((encoder, directory / name))
    return parts


def load_adapter(
    model: nn.Module | Any,
    directory: str | os.PathLike,
    merge: bool = True,
    adapter_name: str | None = None,
    scale: float = 1.0,
) -> list[str]:
    """Inject the adapter saved in ``directory`` into ``model`` and load its tensors strictly.

    ``model`` is a torch model or a diffusers pipeline: the adapter goes into its denoiser (``unet``, or
    ``transformer`` for SD3 / Flux), and the adapters of ``--train_text_encoder`` (subfolders ``text_encoder/``,
    ``text_encoder_2/``) into the pipeline's text encoders of those names. Works for every method the trainer writes
    (gsoft, double_gsoft, boft, lora, oft, peft_boft, full). With ``merge=True`` (the default) the adapter is folded
    into the weights (plain layers, no inference overhead); with ``merge=False`` it stays switchable
    (``disable_adapters``, ``merge_adapter`` later). A ``full`` folder holds the projections' weights themselves:
    they are copied in, whatever ``merge`` says.

    ``adapter_name`` loads it as a named adapter at strength ``scale`` (PEFT's layers, several at once, switchable:
    :mod:`dreambooth_gs.adapters.named`; ``merge`` then fuses it at that strength). Without a name, ``scale`` is the
    strength of a merged or unmerged load: GS adapters orthogonal at every strength, LoRA ``s * B A``, ``full``
    ``W + s (W_trained - W)``. On any error the model (every component of a pipeline) is left as it was, its
    trainability included. Returns the adapted module names.
    """
    directory = Path(directory)
    if adapter_name is not None or scale != 1:
        from .named import fuse_and_unload, load_named_adapter

        if adapter_name is None and read_adapter_config(directory)["method"] == "full":
            return _load_full_at(model, directory, scale)
        name = adapter_name or ("default" if not merge else STRENGTH_LOAD)
        components = load_named_adapter(model, directory, name, scale, fuse=merge)
        names = [n for c in components for n, layer in _named_layers(c) if name in layer._get_available_adapters()]
        if adapter_name is None and merge:
            fuse_and_unload(model, name)  # plain layers with the adapter folded in at that strength
        return names
    parts = adapter_parts(model, directory)
    flags = [{n: p.requires_grad for n, p in c.named_parameters()} for c, _ in parts]
    names, done = [], []
    try:
        for component, folder in parts:
            names += _load_into_model(component, folder, merge=False)
            done.append(component)
    except Exception:
        for component in done:
            remove_adapter(component)
        for (component, _), saved in zip(parts, flags):  # injection froze them: give back every flag
            for name, param in component.named_parameters():
                param.requires_grad_(saved.get(name, param.requires_grad))
        raise
    for component, _ in parts:
        if merge:
            merge_adapter(component)
        else:
            guard_save_pretrained(component)  # its save_pretrained keeps the base weights and the adapter apart
    return names


def _named_layers(component: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in component.named_modules() if isinstance(m, BaseTunerLayer)]


def _load_full_at(model: nn.Module | Any, directory: Path, scale: float) -> list[str]:
    """A ``full`` folder at strength ``scale``: each trained projection becomes ``W + s (W_trained - W)``."""
    names = []
    for component, folder in adapter_parts(model, directory):
        config = FullConfig.from_dict(read_adapter_config(folder)["config"])
        params = dict(full_parameters(component, config))
        before = {name: param.detach().clone() for name, param in params.items()}
        names += _load_into_model(component, folder, merge=True)
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(before[name] + scale * (param - before[name]))
    return names


def denoiser_name(pipeline: Any) -> str | None:
    """The attribute of a diffusers pipeline's denoiser: ``unet`` (SD, SDXL) or ``transformer`` (SD3, Flux)."""
    return next((n for n in DENOISER_NAMES if isinstance(getattr(pipeline, n, None), nn.Module)), None)


def pipeline_denoiser(pipeline: Any) -> nn.Module | None:
    """A diffusers pipeline's denoiser (see :func:`denoiser_name`); None if it has neither."""
    name = denoiser_name(pipeline)
    return None if name is None else getattr(pipeline, name)


def _load_into_model(model: nn.Module, directory: Path, merge: bool) -> list[str]:
    directory = Path(directory)
    document = read_adapter_config(directory)
    tensors = _read_tensors(directory / WEIGHTS_NAME)
    method = methods.get(document["method"])
    config = method.config_from_dict(document["config"])
    if method.kind is methods.FullKind:
        return _load_full(model, directory, document, tensors, config)
    trainable_before = {name: p.requires_grad for name, p in model.named_parameters()}
    names = method.inject(model, config)
    try:
        _check_modules(directory, document, names)
        load_adapter_weights(model, directory, tensors=tensors)
    except Exception:
        remove_adapter(model)
        for name, param in model.named_parameters():  # injection froze the model: give back its flags
            param.requires_grad_(trainable_before.get(name, param.requires_grad))
        raise
    if merge:
        merge_adapter(model)
    return names


def load_adapter_weights(
    model: nn.Module, directory: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None
) -> None:
    """Load the tensors of an adapter folder into the adapter already injected in ``model`` (e.g. on resume)."""
    weights = Path(directory) / WEIGHTS_NAME
    tensors = _read_tensors(weights) if tensors is None else tensors
    found = methods.find(model)
    if found is None:
        raise ValueError("the model has no adapter to load weights into; use load_adapter() to inject one")
    found[0].kind.load_state(model, tensors, str(weights))


def _check_modules(directory: Path, document: dict[str, Any], names: list[str]) -> None:
    saved_modules = set(document["modules"])
    missing, extra = sorted(saved_modules - set(names)), sorted(set(names) - saved_modules)
    if missing or extra:
        detail = (f"saved but not in the model: {missing[:5]}" if missing else "") + (
            f"{'; ' if missing else ''}in the model but not saved: {extra[:5]}" if extra else ""
        )
        raise ValueError(f"the model's layers do not match the adapter in {directory}: {detail}")


def _load_full(model: nn.Module, directory: Path, document: dict[str, Any], tensors: dict, config) -> list[str]:
    """Copy the saved projection weights into ``model``'s matching Linears (checked first: all or nothing)."""
    names = [name for name, _ in require_targets(model, config.target_modules)]
    _check_modules(directory, document, names)
    methods.copy_strictly(dict(full_parameters(model, config)), tensors, str(directory / WEIGHTS_NAME))
    return names
