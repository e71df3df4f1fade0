"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, saved atomically, loaded strictly.

The tensors are keyed ``<module path>.<parameter name>`` (e.g. ``mid_block.attentions.0.transformer_blocks.0.
attn1.to_q.gsoft_L``); only trainable ``gsoft_`` parameters are written, never derived buffers. No pickle: user
files are read with safetensors and json only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import METHODS, GSOFTConfig
from .injection import adapter_layers, inject_adapter, merge_adapter, remove_adapter, trainable_parameters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LIBRARY_NAME = "dreambooth_gs"


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors by name (float32, detached, contiguous)."""
    return {name: param.detach().float().contiguous().cpu() for name, param in trainable_parameters(model)}


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the adapters of ``model`` to ``directory`` (created if needed); returns the directory."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no GSOFT adapters to save; call inject_adapter() or load_adapter() first")
    configs = {json.dumps(layer.config_dict, sort_keys=True) for _, layer in layers}
    if len(configs) != 1:
        raise ValueError("the model's adapter layers were made from different configs; save them separately")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    config = layers[0][1].config_dict
    document = {
        "library": LIBRARY_NAME,
        "format_version": GSOFTConfig.FORMAT_VERSION,
        "method": config["method"],
        "config": config,
        "base_model": base_model,
        "modules": {
            name: {
                "in_features": layer.base_layer.in_features,
                "out_features": layer.base_layer.out_features,
                "parameters": {
                    n: list(p.shape) for n, p in layer.named_parameters(recurse=False) if n.startswith("gsoft_")
                },
            }
            for name, layer in layers
        },
    }
    metadata = {"format": "pt", "library": LIBRARY_NAME, "method": config["method"]}
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2) + "\n"))
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
    if method not in METHODS:
        raise ValueError(f"{path} names unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if not isinstance(document.get("config"), dict) or not isinstance(document.get("modules"), dict):
        raise ValueError(f"{path} lacks its 'config' or 'modules' section; the file is incomplete")
    return document


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the adapter folder is incomplete")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}); save the adapter again") from err


def load_adapter(model: nn.Module, directory: str | os.PathLike, merge: bool = False) -> list[str]:
    """Inject the adapter saved in ``directory`` into ``model`` and load its tensors strictly.

    With ``merge=True`` the adapter is folded into the weights (plain nn.Linear modules, no inference overhead).
    On any error the model is left as it was. Returns the adapted module names.
    """
    directory = Path(directory)
    document = read_adapter_config(directory)
    tensors = _read_tensors(directory / WEIGHTS_NAME)
    config = GSOFTConfig.from_dict(document["config"])
    names = inject_adapter(model, config)
    try:
        _load_into(model, directory, document, tensors, names)
    except Exception:
        remove_adapter(model)
        raise
    if merge:
        merge_adapter(model)
    return names


def _load_into(
    model: nn.Module, directory: Path, document: dict[str, Any], tensors: dict[str, torch.Tensor], names: list[str]
) -> None:
    saved_modules = set(document["modules"])
    missing, extra = sorted(saved_modules - set(names)), sorted(set(names) - saved_modules)
    if missing or extra:
        detail = (f"saved but not in the model: {missing[:5]}" if missing else "") + (
            f"{'; ' if missing else ''}in the model but not saved: {extra[:5]}" if extra else ""
        )
        raise ValueError(f"the model's layers do not match the adapter in {directory}: {detail}")
    params = dict(trainable_parameters(model))
    weights = directory / WEIGHTS_NAME
    if set(tensors) != set(params):
        unexpected, absent = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        raise ValueError(
            f"{weights} does not match its adapter_config.json (interrupted save?): "
            f"unexpected tensors {unexpected[:5]}, missing tensors {absent[:5]}"
        )
    for key, param in params.items():
        if tensors[key].shape != param.shape:
            module, _, pname = key.rpartition(".")
            raise ValueError(
                f"{weights}: {pname} of {module} has shape {tuple(tensors[key].shape)} in the file but "
                f"{tuple(param.shape)} in the model (in_features/out_features differ from the saved base model)"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
