"""Quickstart: GSOFT on a diffusers UNet in a few lines (a tiny random-weight UNet, so it runs anywhere offline).

    python examples/quickstart.py [--method gsoft|double_gsoft|boft] [--steps 30]

It injects an adapter into every attention projection, trains it for a few steps to imitate a randomly perturbed
"teacher" UNet, saves it, loads it into a fresh UNet (switchable and merged) and checks that all three agree.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from dreambooth_gs import GSOFTConfig, inject_adapter, load_adapter, save_adapter, trainable_parameters
from dreambooth_gs.cli import run_cli

TINY_UNET = dict(  # a few-hundred-kB UNet with the SD layout: cross-attention blocks with to_q/to_k/to_v/to_out.0
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    sample_size=8,
)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="gsoft", choices=("gsoft", "double_gsoft", "boft"))
    parser.add_argument("--nblocks", type=int, default=4, help="blocks per factor (dims 32 and 64 here)")
    parser.add_argument(
        "--n_butterfly_factor", type=int, default=None, help="BOFT only: butterfly factors (default 2 for 4 blocks)"
    )
    parser.add_argument("--steps", type=int, default=30, help="optimisation steps")
    parser.add_argument("--lr", type=float, default=1e-2)
    return parser.parse_args(input_args)


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    fresh_state = {k: v.clone() for k, v in unet.state_dict().items()}
    teacher = UNet2DConditionModel(**TINY_UNET)
    teacher.load_state_dict(fresh_state)
    with torch.no_grad():  # the target: the same UNet with rotated attention inputs
        for name, module in teacher.named_modules():
            if name.endswith(("to_q", "to_v")):
                module.weight.copy_(
                    module.weight @ torch.linalg.qr(torch.randn(module.in_features, module.in_features))[0]
                )

    factors = args.n_butterfly_factor or (2 if args.method == "boft" else None)
    config = GSOFTConfig(method=args.method, nblocks=args.nblocks, n_butterfly_factor=factors)
    wrapped = inject_adapter(unet, config)
    params = [p for _, p in trainable_parameters(unet)]
    print(
        f"{config.method}: wrapped {len(wrapped)} projections, {sum(p.numel() for p in params):,} trainable parameters"
    )

    sample = torch.randn(4, 4, 8, 8)
    timestep = torch.tensor([10, 200, 500, 900])
    context = torch.randn(4, 7, 32)
    with torch.no_grad():
        target = teacher(sample, timestep, context).sample
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    progress = tqdm(range(args.steps), desc="training")
    for _ in progress:
        loss = torch.nn.functional.mse_loss(unet(sample, timestep, context).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")

    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        save_adapter(unet, directory, base_model="tiny-random-unet")
        trained = unet(sample, timestep, context).sample
        for merge in (False, True):
            fresh = UNet2DConditionModel(**TINY_UNET)
            fresh.load_state_dict(fresh_state)
            load_adapter(fresh, directory, merge=merge)
            gap = (fresh(sample, timestep, context).sample - trained).abs().max().item()
            print(f"reloaded ({'merged' if merge else 'switchable'}): max |difference| to the trained model {gap:.2e}")


if __name__ == "__main__":
    run_cli(main, parse_args(), "quickstart.py")
