"""README.md of an exported pipeline folder: what was merged into which base, with which config, and how."""

from __future__ import annotations

import importlib.metadata
import json
import os
from typing import Any


def _library_version() -> str:
    try:
        return importlib.metadata.version("dreambooth-gs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def model_card(doc: dict[str, Any], base_model: str, adapter_dir: str | os.PathLike, command: str | None) -> str:
    """README.md of a merged pipeline folder from the adapter's ``adapter_config.json`` (``doc``) and its base."""
    return "\n".join(
        [
            "---",
            "library_name: diffusers",
            f"base_model: {base_model}",
            f"tags: [stable-diffusion, dreambooth, dreambooth-gs, {doc['method']}]",
            "---",
            "",
            f"# DreamBooth ({doc['method']}) merged into {base_model}",
            "",
            f"A full diffusers pipeline: the base model `{base_model}` with the `{doc['method']}` adapter of "
            f"`{adapter_dir}` ({len(doc['modules'])} modules, {doc.get('num_parameters', 0):,} adapter parameters) "
            "folded into its weights by dreambooth_gs, so it runs at the base model's speed with no extra library.",
            "",
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")',
            "```",
            "",
            "## Adapter config",
            "",
            "```json",
            json.dumps(doc["config"], indent=2),
            "```",
            "",
            "## How it was made",
            "",
            f"`{command}`" if command else "`dreambooth_gs.export.formats.export_adapter(..., fmt='diffusers')`",
            "",
            f"(dreambooth_gs {_library_version()}, adapter method `{doc['method']}`, base `{base_model}`)",
            "",
        ]
    )
