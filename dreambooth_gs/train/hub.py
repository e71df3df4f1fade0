"""``--push_to_hub``: the network and the token are checked before anything loads, the repository is created once
every other check has passed (before training), and the finished adapter folder is uploaded with a generated
model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text, first_line

MODEL_CARD_NAME = "README.md"
# Never uploaded: resumable state, killed saves, set-aside earlier runs, tracker logs.
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".*", ".*/**", "logs/**"]


def _hub_error(what: str, err: BaseException) -> ValueError:
    return ValueError(
        f"--push_to_hub: {what} ({first_line(err, 160)}); check the network and the token (hf auth login, or "
        "--hub_token), or train without --push_to_hub and upload later. Nothing was written"
    )


def check_hub_access(token: str | None) -> str:
    """The user name the token belongs to; one clear ValueError when the Hub or the token does not answer."""
    from huggingface_hub import whoami

    try:
        return whoami(token=token)["name"]
    except Exception as err:  # offline mode, no network, no or a bad token: huggingface_hub raises many kinds
        raise _hub_error("cannot reach the Hub with this token", err) from err


def create_hub_repo(repo_id: str, token: str | None) -> str:
    """Create (or find) the model repository; one clear ValueError when the Hub cannot be reached."""
    from huggingface_hub import create_repo

    try:
        return create_repo(repo_id, exist_ok=True, token=token).repo_id
    except Exception as err:
        raise _hub_error(f"cannot create the Hub repository {repo_id}", err) from err


def model_card_text(document: dict[str, Any], info: dict[str, Any], repo_id: str, grid: str | None) -> str:
    """A model card for an adapter folder: what was trained on which model, and how to load it."""
    from huggingface_hub import ModelCardData

    method, base = document["method"], document.get("base_model") or "the base model"
    data = ModelCardData(
        base_model=document.get("base_model"),
        library_name="diffusers",
        tags=["text-to-image", "diffusers", "dreambooth", "dreambooth-gs", method],
        instance_prompt=info.get("instance_prompt"),
    )
    lines = [
        f"---\n{data.to_yaml()}\n---",
        f"# {repo_id}",
        "",
        f"A DreamBooth **{method}** adapter for `{base}`, trained with dreambooth-gs (orthogonal fine-tuning "
        "with Group-and-Shuffle matrices, Gorbunov et al., NeurIPS 2024).",
        "",
        f"- instance prompt: `{info.get('instance_prompt')}`",
        f"- steps: {info.get('steps')}, learning rate: {info.get('learning_rate')}",
        f"- trainable parameters: {document.get('num_parameters'):,}",
        f"- adapter config: `{json.dumps(document.get('config'), sort_keys=True)}`",
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "from huggingface_hub import snapshot_download",
        "from dreambooth_gs import load_adapter",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{document.get("base_model")}")',
        f'load_adapter(pipe, snapshot_download("{repo_id}"))  # merged into the weights',
        f'image = pipe("{info.get("instance_prompt")}").images[0]',
        "```",
    ]
    if grid:
        lines += ["", "## Validation images", "", f"![validation]({grid})"]
    return "\n".join(lines) + "\n"


def push_adapter_folder(output_dir: Path, repo_id: str, token: str | None, grid: Path | None) -> None:
    """Write the model card into ``output_dir`` and upload the folder (adapter, record, validation grids)."""
    from huggingface_hub import upload_folder

    document = json.loads((output_dir / "adapter_config.json").read_text())
    info = json.loads((output_dir / "training_args.json").read_text())
    relative_grid = grid.relative_to(output_dir).as_posix() if grid else None
    atomic_write_text(output_dir / MODEL_CARD_NAME, model_card_text(document, info, repo_id, relative_grid))
    try:
        upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message="End of training",
            ignore_patterns=UPLOAD_IGNORE,
            token=token,
        )
    except Exception as err:
        raise ValueError(
            f"uploading {output_dir} to {repo_id} failed ({first_line(err, 160)}); the adapter is saved there, "
            f"upload it later with: hf upload {repo_id} {output_dir}"
        ) from err
