"""An int8 frozen base against the full-precision one on the MiniBooth world model that ships with the package
(issue 33): the same demo run (``python -m dreambooth_gs.demo``: 400 steps, batch 4, seed 0) with
``--base_model_precision no_change`` and ``int8-torchao``, for GSOFT and LoRA, each in its own process, one after
another.

    python benchmarks/bench_int8_base.py             # ~6 min on 2 CPU cores; writes docs/benchmarks.md's int8_base

Reported per method and base: the training time (the trainer's load included), the process's peak resident memory,
the attribute oracle's subject fidelity (32 subject-prompt pictures drawn in float32 with the adapter merged), and how
far the int8-trained adapter lands from the full-precision one: its tensors' relative difference, and the denoiser's
output change on fixed inputs relative to the adapter's own effect (``|out_int8 - out_full| / |out_full - out_base|``).
The MiniBooth UNet is small (4.3M parameters, 64- and 128-wide projections): int8's memory saving here is a few MB and
its speed says little about large models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.report import machine_line, markdown_table, replace_section  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
PRECISIONS = ("no_change", "int8-torchao")
METHODS = ("gsoft", "lora")
CHILD = """
import resource, runpy, sys, json
sys.argv = ["dreambooth_gs.demo", *json.loads(sys.argv[1])]
try:
    runpy.run_module("dreambooth_gs.demo", run_name="__main__")
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run(method: str, precision: str, work: Path) -> dict:
    output = work / f"{method}-{precision}"
    args = ["--adapter", method, "--base_model_precision", precision, "--output_dir", str(output)]
    args += ["--seeds", "1", "--score_images", "32", "--overwrite", "--num_threads", "2"]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if done.returncode:
        raise SystemExit(f"{method} {precision} failed:\n{done.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    scores = json.loads((output / "scores.json").read_text())["scores"]
    return {"dir": output / method, "seconds": scores[method]["train_seconds"], "peak_mb": peak / 1024} | {
        "fidelity": scores[method]["subject_fidelity"],
        "base_fidelity": scores["base"]["subject_fidelity"],
    }


@torch.no_grad()
def effect_ratio(full_dir: Path, int8_dir: Path) -> float:
    """``|out_int8 - out_full| / |out_full - out_base|`` of the UNet on fixed inputs, adapters merged."""
    from dreambooth_gs import load_adapter
    from dreambooth_gs.adapters.sampling import load_pipeline
    from dreambooth_gs.demo.program import MODEL_DIR

    def unet_out(adapter: Path | None) -> torch.Tensor:
        pipe = load_pipeline(str(MODEL_DIR))
        if adapter is not None:
            load_adapter(pipe, adapter)
        config = pipe.unet.config
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(4, config.in_channels, config.sample_size, config.sample_size, generator=g)
        text = torch.randn(4, 8, config.cross_attention_dim, generator=g)
        return pipe.unet(sample, torch.tensor([100, 300, 500, 700]), text).sample

    base, full, int8 = unet_out(None), unet_out(full_dir), unet_out(int8_dir)
    return float((int8 - full).norm() / (full - base).norm())


def tensor_difference(full_dir: Path, int8_dir: Path) -> float:
    from safetensors.torch import load_file

    full = load_file(full_dir / "adapter_model.safetensors")
    int8 = load_file(int8_dir / "adapter_model.safetensors")
    num = sum(float((full[k] - int8[k]).norm() ** 2) for k in full)
    den = sum(float(full[k].norm() ** 2) for k in full)
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    results = {(m, p): run(m, p, work) for m in METHODS for p in PRECISIONS}
    rows = []
    for method in METHODS:
        full, int8 = results[method, "no_change"], results[method, "int8-torchao"]
        effect = effect_ratio(full["dir"], int8["dir"])
        difference = tensor_difference(full["dir"], int8["dir"])
        for precision, result in (("full precision (fp32)", full), ("int8-torchao", int8)):
            compare = "-" if result is full else f"{difference:.3f} / {effect:.3f}"
            rows.append([
                method, precision, f"{result['seconds']:.1f}", f"{result['peak_mb']:.0f}",
                f"{result['base_fidelity']:.2f} -> {result['fidelity']:.2f}", compare,
            ])  # fmt: skip
    header = ["method", "frozen base", "training s", "peak RSS MB", "subject fidelity (base -> adapter)"]
    header.append("vs the full-precision adapter: tensors / effect")
    body = "\n\n".join(
        [
            "### An int8 base on the MiniBooth world model (`benchmarks/bench_int8_base.py`)",
            "The demo's run (`python -m dreambooth_gs.demo`: 400 steps, batch 4, seed 0, fp32 training) with the "
            "frozen UNet as saved and quantized to int8 (`--base_model_precision int8-torchao`), each in its own "
            "process, one after another; subject fidelity from the attribute oracle on 32 pictures drawn in float32 "
            f"with the adapter merged into the full-precision pipeline. Measured: {machine_line()}.",
            markdown_table(header, rows, "ll" + "r" * (len(header) - 2)),
            "'tensors': the relative difference of the int8-trained adapter's tensors from the full-precision one's; "
            "'effect': the denoiser's output difference between the two adapters relative to the full-precision "
            "adapter's own effect on it. The UNet is 4.3M parameters wide 64-128: int8's memory saving is a few MB "
            "here and its step time says nothing about a large model on a GPU.",
        ]
    )
    print(body)
    if not args.no_write:
        replace_section(DOCS, "int8_base", body)


if __name__ == "__main__":
    main()
