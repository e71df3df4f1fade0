"""DreamBooth fine-tuning of Stable Diffusion 1.x / 2.x, SDXL, SD3 / SD3.5 and Flux.1 with GSOFT / Double GSOFT (and
PEFT's LoRA / OFT, GS-core BOFT, and full fine-tuning of the projections with --adapter full).

    python train_dreambooth_gsoft.py --output_dir out                      # offline demo: tiny random model
    python train_dreambooth_gsoft.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-base \\
        --instance_data_dir photos/ --class_name dog --output_dir out      # a real run (GSOFT r=32, lr 2e-5)
    accelerate launch train_dreambooth_gsoft.py ...                         # several GPUs / nodes (DDP)
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 train_dreambooth_gsoft.py ...
                                                                           # the frozen model sharded (FSDP2)
    python train_dreambooth_gsoft.py --pretrained_model_name_or_path <folder> --estimate_memory  # GPU memory plan

The output folder holds adapter_config.json + adapter_model.safetensors for every --adapter; load it with
dreambooth_gs.load_adapter(pipeline, folder) (into pipe.unet or pipe.transformer, merged).
"""

from __future__ import annotations

import sys

from dreambooth_gs.cli import parse_options, run_cli
from dreambooth_gs.train.loop import train
from dreambooth_gs.train.memory_plan import print_memory_plan
from dreambooth_gs.train.options import TrainingOptions


def parse_args(input_args: list[str] | None = None) -> TrainingOptions:
    return parse_options(TrainingOptions, input_args, "train_dreambooth_gsoft.py", __doc__)


def main(args: TrainingOptions):
    if args.estimate_memory:  # before anything loads or is written
        return print_memory_plan(args)
    return train(args)


def run(argv: list[str] | None = None) -> None:
    """``dreambooth-gs-train`` (and ``python train_dreambooth_gsoft.py``): one-line errors, exit status 2."""
    run_cli(main, parse_args(sys.argv[1:] if argv is None else argv), "train_dreambooth_gsoft.py")


if __name__ == "__main__":
    run()
