"""Export a dreambooth_gs adapter folder (any method: gsoft, double_gsoft, boft, lora, oft, full) for other tools.

    python export_adapter.py --adapter_dir out/dog-gsoft --format diffusers --output out/dog-pipeline
    python export_adapter.py --adapter_dir out/dog-gsoft --format lora --rank 64 --output out/dog-lora
    python export_adapter.py --adapter_dir out/dog-gsoft --format lora --max_error 0.05 --lora_format kohya \\
        --output out/dog-lora-a1111
    python export_adapter.py --adapter_dir out/dog-gsoft --format single_file --save_dtype float16 \\
        --output out/dog.safetensors
    python export_adapter.py --adapter_dir out/dog-gsoft --format lora --rank full --lora_format kohya --scale 0.6 \\
        --output out/dog-lora-0.6

diffusers:    a full pipeline folder with the adapter merged (DiffusionPipeline.from_pretrained(OUT)) and a README.md.
lora:         OUT/pytorch_lora_weights.safetensors (pipe.load_lora_weights(OUT); ComfyUI for SD3 / Flux) or, with
              --lora_format kohya, OUT/lora_kohya.safetensors (A1111, and ComfyUI for SD / SDXL: it maps no unet.*
              keys of the diffusers layout), plus export_report.json / .md with the relative
              error ||delta - BA||_F / ||delta||_F of every module. An orthogonal adapter's change is not low-rank:
              --rank full reproduces it to float precision, lower ranks approximate it (see docs/export.md).
single_file:  one .safetensors in the original SD 1.x / 2.x / XL layout (A1111, ComfyUI, from_single_file).

--scale S exports the adapter at strength S (default 1, the adapter as trained): an orthogonal adapter (gsoft,
double_gsoft, boft, oft) rotates each block by Cayley(S K) of its generator K and scales by 1 + S (d - 1), so it stays
a rotation (not the linear blend W + S (R W - W) of other tools); lora and full scale their change by S.

The base model is the adapter's adapter_config.json "base_model" unless --pretrained_model_name_or_path is given.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from dreambooth_gs.cli import run_cli
from dreambooth_gs.export.formats import FORMATS, export_adapter
from dreambooth_gs.export.ldm_layout import TEXT_LAYOUTS
from dreambooth_gs.export.lora import FULL_RANK, LORA_LAYOUTS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _rank(text: str) -> int | str:
    if text == FULL_RANK:
        return FULL_RANK
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'full', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'full', got {value}")
    return value


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="export_adapter.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter_dir", required=True, help="Adapter folder written by the trainer / save_adapter.")
    parser.add_argument("--format", required=True, choices=FORMATS, help="What to write (see above).")
    parser.add_argument(
        "--output", required=True, help="Output folder (diffusers, lora) or .safetensors file (single_file)."
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Base model (diffusers folder or hub id) instead of adapter_config.json's base_model.",
    )
    parser.add_argument(
        "--rank", type=_rank, default=None, help="lora: rank per module (capped at min(out, in)) or 'full'."
    )
    parser.add_argument(
        "--max_error",
        type=float,
        default=None,
        help="lora: instead of --rank, the smallest rank per module whose relative Frobenius error is <= this.",
    )
    parser.add_argument(
        "--lora_format",
        choices=LORA_LAYOUTS,
        default="diffusers",
        help="lora: key layout; diffusers (PEFT names, carries bias changes; ComfyUI reads it for SD3 / Flux) or kohya "
        "(A1111, and ComfyUI for SD / SDXL; no bias).",
    )
    parser.add_argument(
        "--text_encoder_layout",
        choices=("auto", *TEXT_LAYOUTS),
        default="auto",
        help="single_file: clip (SD 1.x cond_stage_model.transformer.*) or open_clip (SD 2.x "
        "cond_stage_model.model.*, fused q/k/v); auto: open_clip for a GELU text encoder (SD 2.x), else clip. SDXL: "
        "auto only (its fixed conditioner.embedders.0 CLIP + .1 OpenCLIP layout).",
    )
    parser.add_argument(
        "--save_dtype", choices=DTYPES, default="float32", help="dtype of the written weights (merging is in fp32)."
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="The adapter's strength S in the export: 0 the base model, 1 the adapter as trained; orthogonal methods "
        "rotate by Cayley(S K) of each block's generator K with scale vector 1 + S (d - 1), lora / full scale their "
        "change by S (see above). A LoRA at --scale 0 is refused: it would be empty.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    return parser.parse_args(input_args)


def main(args: argparse.Namespace) -> dict:
    command = "python export_adapter.py " + " ".join(
        shlex.quote(part)
        for name, value in vars(args).items()
        if value not in (None, False)
        for part in ([f"--{name}"] if value is True else [f"--{name}", str(value)])
    )
    result = export_adapter(
        args.adapter_dir,
        args.format,
        args.output,
        base_model=args.pretrained_model_name_or_path,
        rank=args.rank,
        max_error=args.max_error,
        lora_format=args.lora_format,
        text_encoder_layout=args.text_encoder_layout,
        dtype=DTYPES[args.save_dtype],
        overwrite=args.overwrite,
        command=command,
        scale=args.scale,
    )
    for line in result.get("summary", []):
        print(line)
    print(f"wrote {result['output']} ({args.format})")
    return result


def run(argv: list[str] | None = None) -> None:
    """The ``dreambooth-gs-export`` command (and ``python export_adapter.py``): one-line errors, exit status 2."""
    run_cli(main, parse_args(sys.argv[1:] if argv is None else argv), "export_adapter.py")


if __name__ == "__main__":
    run()
