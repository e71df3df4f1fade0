"""Train a 1-Lipschitz LipConvnet with SOC or GS-SOC convolutions and report certified robust accuracy.

    # CIFAR-100 through torchvision (downloads into --cifar100_root where the network allows)
    python train_lipconvnet.py --cifar100_root data/cifar100 --download --conv gs_soc --groups 4,1
    # a CIFAR-style folder in ImageFolder layout (train/<class>/*.png, test/<class>/*.png)
    python train_lipconvnet.py --train_dir data/train --eval_dir data/test --conv soc
    # smoke run on random data
    python train_lipconvnet.py --synthetic --max_steps 2 --depth 5 --init_channels 8 --batch_size 4

Writes ``lipconvnet.safetensors`` (weights, config in the metadata) and ``metrics.json`` to --output_dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dreambooth_gs.lipschitz import LipConvnet
from dreambooth_gs.lipschitz import training as lt


def parse_groups(text: str) -> tuple[int, int | None]:
    """``"4,1"`` -> (4, 1); ``"4,-"`` or ``"4"`` -> (4, None)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        first = int(parts[0])
        second = None if len(parts) == 1 or parts[1] in ("-", "", "none", "None") else int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--groups takes 'g1,g2' or 'g1,-' (e.g. 4,1 or 4,-), got {text!r}") from None
    if len(parts) > 2 or first < 1 or (second is not None and second < 1):
        raise argparse.ArgumentTypeError(f"--groups takes two positive group counts 'g1,g2' or 'g1,-', got {text!r}")
    return first, second


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (exactly one source)")
    data.add_argument("--train_dir", help="training images in ImageFolder layout: DIR/<class name>/<image>")
    data.add_argument("--eval_dir", help="evaluation images, same layout (default: no held-out evaluation)")
    data.add_argument("--cifar100_root", help="torchvision CIFAR-100 folder (train and test splits)")
    data.add_argument("--download", action="store_true", help="let torchvision download CIFAR-100 if missing")
    data.add_argument("--synthetic", action="store_true", help="random images and labels (smoke test, no data)")
    data.add_argument("--synthetic_samples", type=int, default=64, help="samples in each synthetic split")
    model = parser.add_argument_group("model")
    model.add_argument("--conv", choices=("soc", "gs_soc"), default="gs_soc", help="orthogonal convolution type")
    model.add_argument("--groups", type=parse_groups, default=None, help="GS-SOC groups 'g1,g2' or 'g1,-' (4,1)")
    model.add_argument("--paired", action="store_true", help="paired channel shuffle (keeps MaxMin pairs together)")
    model.add_argument("--depth", type=int, default=15, help="LipConvnet depth, a multiple of 5")
    model.add_argument("--init_channels", type=int, default=32, help="channels after the first layer")
    model.add_argument("--num_classes", type=int, default=None, help="classes (default: from the dataset; 100)")
    model.add_argument("--input_size", type=int, default=32, help="image side, a multiple of 32")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=200, help="passes over the training set")
    train.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (overrides epochs)")
    train.add_argument("--batch_size", type=int, default=128)
    train.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (divided by 10 at 50%% and 75%%)")
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument("--weight_decay", type=float, default=5e-4)
    train.add_argument("--gamma", type=float, default=0.0, help="certificate regularisation weight (SOC's CR)")
    train.add_argument("--epsilon", type=float, default=36.0, help="certified l2 radius in 1/255 pixel units")
    train.add_argument("--num_workers", type=int, default=2, help="data loader workers")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output_dir", default="outputs/lipconvnet", help="checkpoint and metrics go here")
    train.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(input_args)
    sources = [bool(args.train_dir), bool(args.cifar100_root), args.synthetic]
    if sum(sources) != 1:
        parser.error("give exactly one data source: --train_dir, --cifar100_root or --synthetic")
    if args.eval_dir and not args.train_dir:
        parser.error("--eval_dir goes with --train_dir")
    if args.groups is not None and args.conv != "gs_soc":
        parser.error("--groups applies to --conv gs_soc only")
    for name in ("epochs", "batch_size", "synthetic_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max_steps must be positive, got {args.max_steps}")
    return args


def build_datasets(args: argparse.Namespace):
    """(train, eval or None) datasets for the chosen source."""
    if args.synthetic:
        classes = args.num_classes or 100
        train = lt.synthetic_dataset(args.synthetic_samples, classes, args.input_size, seed=args.seed)
        held_out = lt.synthetic_dataset(args.synthetic_samples, classes, args.input_size, seed=args.seed + 1)
        return train, held_out
    if args.cifar100_root:
        if args.input_size != 32:
            raise ValueError(f"CIFAR-100 images are 32x32; drop --input_size {args.input_size}")
        train = lt.cifar100_dataset(args.cifar100_root, train=True, download=args.download)
        return train, lt.cifar100_dataset(args.cifar100_root, train=False, download=args.download)
    train = lt.image_folder_dataset(args.train_dir, args.input_size, train=True)
    held_out = lt.image_folder_dataset(args.eval_dir, args.input_size, train=False) if args.eval_dir else None
    return train, held_out


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_set, eval_set = build_datasets(args)
    num_classes = args.num_classes or lt.num_classes_of(train_set)
    loader = DataLoader(
        train_set,
        args.batch_size,
        shuffle=True,
        drop_last=len(train_set) >= args.batch_size,
        num_workers=0 if args.synthetic else args.num_workers,
    )
    steps = args.max_steps or args.epochs * len(loader)
    model = LipConvnet(
        args.depth, num_classes, args.conv, args.groups, args.init_channels, args.input_size, paired=args.paired
    ).to(device)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"LipConvnet-{args.depth} {args.conv} groups={model.config['groups']}: {parameters:,} parameters, {steps} steps"
    )
    optimizer, scheduler = lt.make_optimizer(model, args.lr, args.momentum, args.weight_decay, steps)
    lipschitz = lt.pixel_lipschitz()
    logs = lt.fit(model, loader, optimizer, scheduler, steps, device, args.gamma, lipschitz, not args.no_progress)
    metrics = {"steps": steps, "parameters": parameters, "final_train_loss": logs[-1]["loss"]}
    if eval_set is not None:
        eval_loader = DataLoader(eval_set, args.batch_size, num_workers=0 if args.synthetic else args.num_workers)
        metrics["eval"] = lt.evaluate(model, eval_loader, device, lipschitz, radius=args.epsilon / 255)
        print(
            f"accuracy {metrics['eval']['accuracy']:.4f}, certified robust accuracy at {args.epsilon:g}/255 "
            f"{metrics['eval']['certified_accuracy']:.4f}"
        )
    output_dir = Path(args.output_dir)
    checkpoint = lt.save_checkpoint(model, output_dir / "lipconvnet.safetensors", extra=metrics)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"saved {checkpoint}")
    return metrics


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as error:
        sys.exit(f"error: {error}")
