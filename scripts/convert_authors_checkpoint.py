"""Convert a checkpoint of the GSOFT authors' DreamBooth code into a dreambooth_gs adapter folder.

    python scripts/convert_authors_checkpoint.py --input their_run/pytorch_lora_weights.safetensors \\
        --output out/dog-gsoft --pretrained_model_name_or_path stabilityai/stable-diffusion-2-base
    python export_adapter.py --adapter_dir out/dog-gsoft --format diffusers --output out/dog-pipeline  # then export

Their files come from diffusers 0.25's unet.save_attn_procs: keys <attention>.processor.to_{q,k,v,out}_gsoft.ort_gs.
{L,R} (GSOFT) or to_{q,k,v,out}_gsoft_{in,out}.ort_gs.{L,R} (Double GSOFT), and <attention>.processor.{q,k,v,out}_scale.
The block count is read from the tensors. The parametrization is not stored in their files: pass the one the run
used (--parametrization; their default is cayley). The output loads with dreambooth_gs.load_adapter(pipe, OUT).
"""

from __future__ import annotations

import argparse
import sys

from dreambooth_gs.cli import run_cli
from dreambooth_gs.export.authors import AUTHORS_PARAMETRIZATIONS, convert_authors_checkpoint


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_authors_checkpoint.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="The authors' pytorch_lora_weights.safetensors (or its folder).")
    parser.add_argument("--output", required=True, help="Adapter folder to write (must be empty or absent).")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="The base pipeline the checkpoint was trained on (diffusers folder or hub id); recorded as base_model.",
    )
    parser.add_argument(
        "--parametrization",
        choices=AUTHORS_PARAMETRIZATIONS,
        default="cayley",
        help="How the run made its blocks orthogonal: cayley (the authors' default) or exp (matrix exponential).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output.")
    return parser.parse_args(input_args)


def main(args: argparse.Namespace):
    path = convert_authors_checkpoint(
        args.input, args.output, args.pretrained_model_name_or_path, args.parametrization, overwrite=args.overwrite
    )
    print(f"wrote {path}")
    return path


def run(argv: list[str] | None = None) -> None:
    """The command line: user errors and failed writes (full disk, read-only folder) are one line, exit status 2."""
    run_cli(main, parse_args(sys.argv[1:] if argv is None else argv), "convert_authors_checkpoint.py")


if __name__ == "__main__":
    run()
