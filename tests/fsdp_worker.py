"""A few GSOFT training steps of tiny denoisers (SD's UNet, Flux's transformer) on one fixed global batch: sharded
with the trainer's FSDP2 code when run under ``torchrun`` (gloo; each process takes its share of the batch), whole
when :func:`train` is called with ``world=1``.

tests/test_fsdp.py runs ``torchrun --nproc_per_node 2 tests/fsdp_worker.py --out two/`` (``<family>.safetensors``,
the adapter, and ``<family>.json``, what the process held) and compares with ``train(family, 0, 1)`` in its own
process: the adapters after the steps must agree to float tolerance."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_gs import families  # noqa: E402
from dreambooth_gs.gs.config import GSOFTConfig  # noqa: E402
from dreambooth_gs.methods.injection import inject_adapter  # noqa: E402
from dreambooth_gs.methods.registry import GSKind  # noqa: E402
from dreambooth_gs.resources import TINY_FLUX_CONFIG_DIR, TINY_SD_CONFIG_DIR  # noqa: E402
from dreambooth_gs.tiny.pipelines import make_model  # noqa: E402
from dreambooth_gs.train.distributed import ShardingRequest, average_gradients, shard_denoiser  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 3
TARGETS = {
    "sd": ["to_q", "to_k", "to_v", "to_out.0"],
    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}


def build(family: str) -> torch.nn.Module:
    config = TINY_SD_CONFIG_DIR / "unet.json" if family == "sd" else TINY_FLUX_CONFIG_DIR / "transformer.json"
    torch.manual_seed(0)
    model = make_model(json.loads(config.read_text()))
    model.requires_grad_(False)
    inject_adapter(model, GSOFTConfig(nblocks=4, target_modules=TARGETS[family]))
    with torch.no_grad():  # a non-identity start, so that the steps move every factor
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(param.numel()))
    return model


def batch(family: str) -> tuple[dict, torch.Tensor]:
    """The fixed global batch: the denoiser's inputs and a regression target."""
    g = torch.Generator().manual_seed(1)
    b = GLOBAL_BATCH
    if family == "sd":
        inputs = {
            "sample": torch.randn(b, 4, 8, 8, generator=g),
            "timestep": torch.randint(0, 1000, (b,), generator=g),
            "encoder_hidden_states": torch.randn(b, 7, 32, generator=g),
        }
        return inputs, torch.randn(b, 4, 8, 8, generator=g)
    tokens, text = 16, 5
    inputs = {
        "hidden_states": torch.randn(b, tokens, 16, generator=g),
        "encoder_hidden_states": torch.randn(b, text, 64, generator=g),
        "pooled_projections": torch.randn(b, 32, generator=g),
        "timestep": torch.rand(b, generator=g),
        "img_ids": torch.randn(tokens, 3, generator=g),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.full((b,), 3.5),
    }
    return inputs, torch.randn(b, tokens, 16, generator=g)


def held_bytes(model: torch.nn.Module) -> dict[str, int]:
    """What this process holds of the frozen weights (a DTensor's local shard) against their full size, and how
    many trained tensors were sharded (none should be)."""
    from torch.distributed.tensor import DTensor

    frozen = [p for p in model.parameters() if not p.requires_grad]
    local = [p.to_local() if isinstance(p, DTensor) else p for p in frozen]
    return {
        "frozen_full": sum(p.numel() * p.element_size() for p in frozen),
        "frozen_local": sum(t.numel() * t.element_size() for t in local),
        "sharded_trainable": sum(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad),
    }


def train(family: str, rank: int, world: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The adapter after :data:`STEPS` steps on this process's share of the global batch (sharded if world > 1),
    and what the process held of the frozen weights."""
    model = build(family)
    inputs, target = batch(family)
    if world > 1:
        units = families.get(family).sharding_units(model)
        shard_denoiser(model, units, torch.device("cpu"), world, ShardingRequest())
        share = GLOBAL_BATCH // world
        rows = slice(rank * share, (rank + 1) * share)
        inputs = {k: v[rows] if k not in ("img_ids", "txt_ids") else v for k, v in inputs.items()}
        target = target[rows]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=0.5
    )  # not Adam: its m / sqrt(v) blows float noise in near-zero gradients up to lr
    for _ in range(STEPS):
        output = model(**inputs, return_dict=False)[0]
        torch.nn.functional.mse_loss(output.float(), target).backward()
        average_gradients(params, world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return GSKind.state_dict(model), held_bytes(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="folder for <family>.safetensors and <family>.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for family in TARGETS:
        adapter, held = train(family, rank, world)
        if rank == 0:
            from safetensors.torch import save_file

            Path(args.out).mkdir(parents=True, exist_ok=True)
            save_file(adapter, Path(args.out) / f"{family}.safetensors")
            (Path(args.out) / f"{family}.json").write_text(json.dumps(held))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
