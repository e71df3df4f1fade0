"""Run ComfyUI's own LoRA loader on this toolkit's text-encoder LoRA exports, at real CLIP sizes, on the CPU.

    python scripts/check_comfyui_lora.py --comfyui path/to/ComfyUI    # a ComfyUI source folder (pip install einops)

For SD 1.x (ComfyUI's ``SD1ClipModel``: CLIP-L) and SDXL (``SDXLClipModel``: CLIP-L + OpenCLIP bigG), built by
ComfyUI at their real sizes with random weights: every attention and MLP projection of every layer gets a GSOFT
adapter (this toolkit's ``GSOFTLinear`` on that very weight, random generators, blocks of 16), each adapted weight
minus the base is exported by ``dreambooth_gs.export.lora.lora_tensors`` in both layouts (kohya and diffusers), under
the module names transformers 5 gives a ``CLIPTextModel`` / ``CLIPTextModelWithProjection``; then ComfyUI's
``model_lora_keys_clip`` and ``load_lora`` map the file and its ``ModelPatcher`` patches the model. Reported per
case: the file's modules, how many ComfyUI mapped ("lora key not loaded" otherwise), and the largest difference
between ComfyUI's patched weight and the adapter's own merged weight, relative to the change. Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_gs import GSOFTConfig  # noqa: E402
from dreambooth_gs.export.lora import ModuleDelta, diffusers_name, kohya_name, lora_tensors  # noqa: E402
from dreambooth_gs.gs.layers import GSOFTLinear  # noqa: E402

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def import_comfy(folder: Path):
    sys.path.insert(0, str(folder))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_patcher
    import comfy.sd1_clip
    import comfy.sdxl_clip

    return comfy


def transformers_module_names(config_name: str, with_projection: bool) -> list[str]:
    """The projections' module names in transformers' own CLIP text model built from ``configs/<config_name>``."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    data = json.loads((ROOT / "configs" / config_name).read_text())
    config = CLIPTextConfig(**{k: v for k, v in data.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return [name for name, _ in model.named_modules() if name.endswith(PROJECTIONS)]


def adapted_deltas(comfy_model, prefix: str, component: str, names: list[str], generator) -> list[ModuleDelta]:
    """Each projection of ComfyUI's model under ``prefix`` wrapped in a GSOFT layer with random generators: its merged
    weight minus the base, named as transformers names the module."""
    deltas = []
    weights = comfy_model.state_dict()
    for name in names:
        path = name.split("text_model.", 1)[-1]  # CLIPTextModelWithProjection keeps the level; CLIPTextModel not
        weight = weights[f"{prefix}.transformer.text_model.{path}.weight"].float()
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        layer = GSOFTLinear(linear, GSOFTConfig(method="gsoft", block_size=16, scale=False, target_modules=("x",)))
        with torch.no_grad():
            for param in layer.adapter_parameters():
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            merged = layer.merged_weight().double()
        deltas.append(ModuleDelta(component, name, merged - weight.double(), None))
    return deltas


def check(comfy, family: str, layout: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    if family == "sd":
        model = comfy.sd1_clip.SD1ClipModel(device="cpu")
        parts = [("clip_l", "text_encoder", transformers_module_names("clip_vit_l_text_encoder.json", False))]
    else:
        model = comfy.sdxl_clip.SDXLClipModel(device="cpu")
        parts = [
            ("clip_l", "text_encoder", transformers_module_names("clip_vit_l_text_encoder.json", False)),
            ("clip_g", "text_encoder_2", transformers_module_names("openclip_vit_bigg_text_encoder.json", True)),
        ]
    with torch.no_grad():  # ComfyUI builds its models uninitialised (weights are loaded later): random ones here
        for param in model.parameters():
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    key_map = comfy.lora.model_lora_keys_clip(model, {})
    two = len(parts) == 2
    every_name = [(c, n) for _, c, names in parts for n in names]  # every layer: are the names the ones it maps?
    named = [kohya_name(c, n, two) if layout == "kohya" else diffusers_name(c, n) for c, n in every_name]
    names_mapped = sum(name in key_map for name in named)
    layers = {0, 5, 11, 31}  # the weights: the first, a middle and the last layers (bigG's full-rank factors are GBs)
    parts = [(p, c, [n for n in names if int(n.split("layers.")[1].split(".")[0]) in layers]) for p, c, names in parts]
    deltas = [
        d for prefix, component, names in parts for d in adapted_deltas(model, prefix, component, names, generator)
    ]
    tensors, _ = lora_tensors(deltas, layout=layout, rank="full")
    skipped = []
    handler = logging.Handler()
    handler.emit = lambda record: skipped.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.lora.load_lora(tensors, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    keys = {d.name: f"{p}.transformer.text_model.{d.module.split('text_model.', 1)[-1]}.weight" for p, c, _ in parts
            for d in deltas if d.component == c}  # fmt: skip
    before = {k: model.state_dict()[k].clone() for k in keys.values()}
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )
    patcher.add_patches(patches, 1.0)
    patcher.patch_model()
    after = model.state_dict()
    worst = 0.0
    for delta in deltas:
        key = keys[delta.name]
        applied = after[key].double() - before[key].double()
        worst = max(worst, float((applied - delta.weight).abs().max() / delta.weight.abs().max()))
    return {
        "family": family,
        "layout": layout,
        "names": len(named),
        "names_mapped": names_mapped,
        "modules": len(deltas),
        "mapped": len(patches),
        "skipped": len([m for m in skipped if "lora key not loaded" in m]),
        "worst": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, help="a ComfyUI source folder (its comfy/ package is imported)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # family:layout, run in a child process
    args = parser.parse_args()
    folder = Path(args.comfyui)
    if not (folder / "comfy" / "lora.py").is_file():
        raise SystemExit(f"check_comfyui_lora.py: error: {folder} is not a ComfyUI source folder (no comfy/lora.py)")
    if args.case:
        print(json.dumps(check(import_comfy(folder), *args.case.split(":"))))
        return
    print("| family | layout | module names (every layer) in ComfyUI's key map | modules in the file | patched by "
          "ComfyUI | skipped | max error vs merged weight |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for family in ("sd", "sdxl"):
        for layout in ("kohya", "diffusers"):  # one process each: full-rank bigG factors are large
            command = [sys.executable, __file__, "--comfyui", str(folder), "--case", f"{family}:{layout}"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{family} {layout} failed:\n{done.stderr[-2000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {family} | {layout} | {r['names_mapped']} of {r['names']} | {r['modules']} | {r['mapped']} | "
                  f"{r['skipped']} | {r['worst']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
