"""Weight changes -> LoRA tensors in diffusers' or kohya's key layout, and the export report (errors, ranks).

No file IO here (:mod:`dreambooth_gs.export.formats` writes): each adapted Linear's change
``delta = W_merged - W_base`` is approximated by a truncated SVD (:mod:`dreambooth_gs.export.lowrank`) and laid out as

* ``diffusers`` (what ``pipe.load_lora_weights`` reads, PEFT's names): ``unet.<module>.lora_A.weight`` ``(r, in)``,
  ``unet.<module>.lora_B.weight`` ``(out, r)``, no alpha (diffusers then scales by 1 for every rank); a changed bias
  travels as ``unet.<module>.lora_B.bias`` (PEFT's ``lora_bias``; then every module carries one, zeros where the
  bias did not change).
* ``kohya`` (A1111 / ComfyUI, and diffusers' non-diffusers converter): ``lora_unet_<module, '.' -> '_'>.lora_down
  .weight`` / ``.lora_up.weight`` / ``.alpha``, applied as ``alpha / r * up @ down``. One alpha for every module (the
  largest rank; ``up`` absorbs ``r / alpha``), because diffusers' converter keeps a single alpha when they differ.
  This layout has no bias: a changed bias is dropped and the report says by how much.

Text-encoder modules are named as transformers 4 named CLIP's, with the ``text_model`` level that transformers 5
dropped from ``CLIPTextModel`` (``CLIPTextModelWithProjection`` kept it), because those are the names ComfyUI's
``model_lora_keys_clip`` and A1111 look up (without the level they skip every text-encoder key):
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` (diffusers; its loader strips the level again for an
encoder without it) and ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (kohya; SDXL's ``lora_te1_`` /
``lora_te2_``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .lowrank import low_rank, relative_error, total_relative_error

LORA_LAYOUTS = ("diffusers", "kohya")
FULL_RANK = "full"  # rank=FULL_RANK keeps every module's full rank min(out, in)
# Per component; SDXL's two text encoders are lora_te1_ / lora_te2_ (kohya's sd-scripts), SD's one is lora_te_.
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


@dataclass(frozen=True)
class ModuleDelta:
    """How one adapted Linear changed: ``weight`` ``(out, in)`` and ``bias`` ``(out,)`` (None: no bias), float64."""

    component: str  # the pipeline attribute the module lives in, e.g. "unet"
    module: str  # its dotted path inside that component
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def name(self) -> str:
        return f"{self.component}.{self.module}"

    @property
    def bias_changed(self) -> bool:
        return self.bias is not None and bool(self.bias.abs().max() > 0)

    @property
    def unchanged(self) -> bool:
        return not bool(self.weight.abs().max() > 0) and not self.bias_changed


def clip_module_name(component: str, module: str) -> str:
    """``module`` of ``component`` as transformers 4 named it: a CLIP text encoder's ``encoder.layers.*`` (transformers
    5's flattened ``CLIPTextModel``) gets its ``text_model.`` level back; every other module is returned unchanged."""
    if component.startswith("text_encoder") and module.startswith("encoder.layers."):
        return "text_model." + module
    return module


def diffusers_name(component: str, module: str) -> str:
    """``unet.down_blocks.0...to_q`` / ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``: the module's key
    in diffusers' layout (PEFT's names under the pipeline component)."""
    return f"{component}.{clip_module_name(component, module)}"


def kohya_name(component: str, module: str, two_text_encoders: bool = False) -> str:
    """``lora_unet_down_blocks_0_..._to_q`` / ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``: kohya's module
    name (the diffusers path, text encoders with their ``text_model`` level, with '.' -> '_')."""
    if component not in KOHYA_PREFIXES:
        raise ValueError(f"the kohya layout has no prefix for component {component!r} (known: {list(KOHYA_PREFIXES)})")
    prefix = "lora_te1_" if component == "text_encoder" and two_text_encoders else KOHYA_PREFIXES[component]
    return prefix + clip_module_name(component, module).replace(".", "_")


def lora_tensors(
    deltas: Sequence[ModuleDelta],
    layout: str = "diffusers",
    rank: int | str | None = None,
    max_error: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, report)``: the LoRA file's tensors and what they reproduce, per module and in total.

    ``rank`` is capped at each module's full rank ``min(out, in)`` (where the export is exact to float precision);
    ``rank="full"`` keeps every module's full rank; ``max_error`` picks the smallest rank per module whose relative
    Frobenius error is at most that. The report's errors are measured on the stored (``dtype``) tensors, as a
    loader will apply them.
    """
    if layout not in LORA_LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LORA_LAYOUTS)}")
    changed = [d for d in deltas if not d.unchanged]
    if not changed:
        raise ValueError("the adapter does not change any weight (identity adapter?): there is nothing to export")
    factors = {d.name: low_rank(d.weight, rank=_module_rank(d, rank), max_error=max_error) for d in changed}
    with_bias = layout == "diffusers" and any(d.bias_changed for d in changed)
    alpha = max(f.rank for f in factors.values())
    two_text_encoders = any(d.component == "text_encoder_2" for d in changed)
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    for delta in changed:
        f = factors[delta.name]
        key = diffusers_name(delta.component, delta.module)
        if layout == "diffusers":
            up, down = f.up.to(dtype), f.down.to(dtype)
            tensors[f"{key}.lora_A.weight"] = down.contiguous()
            tensors[f"{key}.lora_B.weight"] = up.contiguous()
            applied = up.double() @ down.double()
        else:
            name = kohya_name(delta.component, delta.module, two_text_encoders)
            up, down = (f.up * (f.rank / alpha)).to(dtype), f.down.to(dtype)
            tensors[f"{name}.lora_down.weight"] = down.contiguous()
            tensors[f"{name}.lora_up.weight"] = up.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
            applied = (alpha / f.rank) * (up.double() @ down.double())
        carried = None
        if with_bias and delta.bias is not None:
            carried = delta.bias.to(dtype)
            tensors[f"{key}.lora_B.bias"] = carried.contiguous()
        elif with_bias:
            tensors[f"{key}.lora_B.bias"] = torch.zeros(delta.weight.shape[0], dtype=dtype)
        rows.append(_row(delta, f.rank, f.full_rank, applied, carried))
    return tensors, _report(rows, layout, rank, max_error, dtype, sum(t.numel() for t in tensors.values()), alpha)


def _module_rank(delta: ModuleDelta, rank: int | str | None) -> int | None:
    return min(delta.weight.shape) if rank == FULL_RANK else rank


def _row(delta: ModuleDelta, rank: int, full_rank: int, applied: torch.Tensor, carried) -> dict[str, Any]:
    weight_norm2 = float(delta.weight.square().sum())
    weight_err2 = float((delta.weight - applied).square().sum())
    bias_norm2 = float(delta.bias.square().sum()) if delta.bias_changed else 0.0
    if carried is None:
        bias_err2 = bias_norm2  # not carried: the whole change is lost
    else:
        bias_err2 = float((delta.bias - carried.double()).square().sum())
    return {
        "module": delta.name,
        "shape": list(delta.weight.shape),
        "rank": rank,
        "full_rank": full_rank,
        "relative_error": relative_error(delta.weight, applied),
        "bias_changed": delta.bias_changed,
        "bias_carried": carried is not None,
        "bias_relative_error": (bias_err2 / bias_norm2) ** 0.5 if bias_norm2 > 0 else None,
        "_sq": (weight_err2, weight_norm2, bias_err2, bias_norm2),
    }


def _report(rows, layout, rank, max_error, dtype, num_parameters, alpha) -> dict[str, Any]:
    sq = [row.pop("_sq") for row in rows]
    ranks = [row["rank"] for row in rows]
    bias_norms = [s[3] for s in sq]
    return {
        "layout": layout,
        "requested_rank": rank,
        "max_error": max_error,
        "dtype": str(dtype).removeprefix("torch."),
        "kohya_alpha": alpha if layout == "kohya" else None,
        "num_modules": len(rows),
        "num_parameters": num_parameters,
        "rank_min": min(ranks),
        "rank_median": statistics.median(ranks),
        "rank_max": max(ranks),
        "total_relative_error": total_relative_error([s[0] for s in sq], [s[1] for s in sq]),
        "bias_changed": any(n > 0 for n in bias_norms),
        "total_bias_relative_error": total_relative_error([s[2] for s in sq], bias_norms) if any(bias_norms) else None,
        "modules": rows,
    }


def report_markdown(report: dict[str, Any], title: str) -> str:
    """The report as Markdown: a summary table, then one row per module."""
    summary = [
        ("layout", report["layout"]),
        (
            "rank",
            report["requested_rank"] if report["requested_rank"] is not None else f"max_error {report['max_error']}",
        ),
        ("ranks used (min / median / max)", f"{report['rank_min']} / {report['rank_median']:g} / {report['rank_max']}"),
        ("modules", report["num_modules"]),
        ("stored parameters", f"{report['num_parameters']:,}"),
        ("dtype", report["dtype"]),
        ("total relative error ||delta - BA||_F / ||delta||_F", f"{report['total_relative_error']:.3e}"),
    ]
    if report["bias_changed"]:
        summary.append(("total relative error of the bias changes", f"{report['total_bias_relative_error']:.3e}"))
    if report.get("scale", 1) != 1:
        summary.insert(0, ("adapter strength (--scale)", f"{report['scale']:g}"))
    lines = [f"# {title}", "", "| | |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in summary]
    lines += [
        "",
        "| module | shape | rank | full rank | relative error | bias error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["modules"]:
        bias = "-" if row["bias_relative_error"] is None else f"{row['bias_relative_error']:.2e}"
        shape = " x ".join(map(str, row["shape"]))
        lines.append(
            f"| {row['module']} | {shape} | {row['rank']} | {row['full_rank']} | {row['relative_error']:.2e} | {bias} |"
        )
    return "\n".join(lines) + "\n"


def report_summary(report: dict[str, Any], worst: int = 3) -> list[str]:
    """A few lines for the terminal: totals, ranks, the worst modules, and any bias change that was dropped."""
    lines = [
        f"LoRA ({report['layout']} layout): {report['num_modules']} modules, ranks {report['rank_min']}-"
        f"{report['rank_max']} (median {report['rank_median']:g}), {report['num_parameters']:,} parameters",
        f"total relative error ||delta - BA||_F / ||delta||_F = {report['total_relative_error']:.3e}",
    ]
    if report.get("scale", 1) != 1:
        lines[0] += f", the adapter at strength {report['scale']:g}"
    for row in sorted(report["modules"], key=lambda r: -r["relative_error"])[:worst]:
        lines.append(f"  {row['module']}: rank {row['rank']}/{row['full_rank']}, error {row['relative_error']:.3e}")
    dropped = [r for r in report["modules"] if r["bias_changed"] and not r["bias_carried"]]
    if dropped:
        lines.append(
            f"warning: the {report['layout']} layout cannot carry bias changes: {len(dropped)} module(s) lose theirs "
            f"(total bias relative error {report['total_bias_relative_error']:.3e}); use --lora_format diffusers"
        )
    elif report["bias_changed"]:
        lines.append(
            f"bias changes carried as lora_B.bias (error {report['total_bias_relative_error']:.3e}); PEFT then gives "
            "every module a LoRA bias, so pipe.fuse_lora() fails on projections without one (use --format diffusers)"
        )
    return lines
