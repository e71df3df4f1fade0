"""export_adapter: every format round-trips on the tiny pipeline, through diffusers' own loaders, for every method."""

import copy
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dreambooth_gs import FullConfig, GSOFTConfig, enable_full_finetuning, inject_adapter, save_adapter
from dreambooth_gs.export import formats as export_module
from dreambooth_gs.export.formats import (
    LORA_FILES,
    REPORT_JSON,
    REPORT_MD,
    export_adapter,
    export_diffusers,
    export_lora,
    load_merged,
)
from dreambooth_gs.export.ldm_layout import SDXL_OPEN_CLIP_PREFIX, unet_to_ldm, vae_to_ldm
from dreambooth_gs.fileio import default_file_mode
from dreambooth_gs.methods.baselines import inject_peft_adapter, make_peft_config
from dreambooth_gs.resources import TINY_SDXL_CONFIG_DIR
from dreambooth_gs.tiny.pipelines import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import export_adapter as script  # noqa: E402
from dreambooth_gs.cli import run_cli  # noqa: E402

# A bias change carried as lora_B.bias gives every LoRA module a bias: PEFT warns for projections without one.
pytestmark = pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed:UserWarning")
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# (id, how to put the adapter into the tiny UNet); every trainable tensor is then moved off its identity init.
METHODS = [
    ("gsoft", lambda unet: inject_adapter(unet, GSOFTConfig(nblocks=4))),
    ("double_gsoft", lambda unet: inject_adapter(unet, GSOFTConfig(method="double_gsoft", nblocks=4))),
    ("boft", lambda unet: inject_adapter(unet, GSOFTConfig(method="boft", nblocks=4, n_butterfly_factor=2))),
    ("lora", lambda unet: inject_peft_adapter(unet, "lora", make_peft_config("lora", TARGETS, rank=4))),
    ("oft", lambda unet: inject_peft_adapter(unet, "oft", make_peft_config("oft", TARGETS, block_size=8))),
    ("full", lambda unet: enable_full_finetuning(unet, FullConfig())),
]


@pytest.fixture(scope="module")
def tiny_dir(tiny_dir):  # the session fixture of conftest.py, as a string
    return str(tiny_dir)


def _pipeline(path: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_pipe(tiny_dir):
    """The tiny base pipeline, loaded once: tests copy it or load LoRAs into it and unload them again."""
    return _pipeline(tiny_dir)


def _save_random_adapter(unet, method: str, folder: Path, base_model: str) -> None:
    """Put ``method``'s adapter into ``unet``, move every trainable tensor off its identity init, save it."""
    dict(METHODS)[method](unet)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in unet.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
    save_adapter(unet, folder, base_model=base_model)


@pytest.fixture(scope="module")
def adapters(base_pipe, tiny_dir, tmp_path_factory):
    """method -> (adapter folder, MergedPipeline), built on first use."""
    cache = {}

    def get(method: str):
        if method not in cache:
            pipe = copy.deepcopy(base_pipe)
            folder = tmp_path_factory.mktemp(f"adapter-{method}")
            _save_random_adapter(pipe.unet, method, folder, tiny_dir)
            cache[method] = (folder, load_merged(folder))
        return cache[method]

    return get


def _out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    sample, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), hidden).sample


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(float(expected.abs().max()), 1.0))


def _lora_out(pipe, folder: Path) -> torch.Tensor:
    """The UNet output with the LoRA of ``folder`` loaded by diffusers' own ``load_lora_weights`` (then unloaded)."""
    pipe.load_lora_weights(str(folder))
    try:
        return _out(pipe.unet)
    finally:
        pipe.unload_lora_weights()


# (method, LoRA layout): full rank reproduces the adapter through diffusers' load_lora_weights
FULL_RANK_CASES = [(m, "diffusers") for m, _ in METHODS] + [("gsoft", "kohya"), ("double_gsoft", "kohya")]


@pytest.mark.parametrize(("method", "layout"), FULL_RANK_CASES, ids=[f"{m}-{k}" for m, k in FULL_RANK_CASES])
def test_full_rank_lora_loads_in_diffusers_as_the_adapter(tmp_path, base_pipe, adapters, method, layout):
    _, merged = adapters(method)
    report = export_lora(merged, tmp_path / "lora", layout, "full", None, torch.float32)  # the folder is not reloaded
    merged = merged.pipeline
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == sorted([LORA_FILES[layout], REPORT_JSON, REPORT_MD])
    assert report["total_relative_error"] < 1e-6
    assert all(row["rank"] == row["full_rank"] == min(row["shape"]) for row in report["modules"])
    assert json.loads((tmp_path / "lora" / REPORT_JSON).read_text())["modules"] == report["modules"]
    keys = load_file(tmp_path / "lora" / LORA_FILES[layout]).keys()
    if layout == "kohya":
        assert all(
            k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys
        )
    else:
        assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    _close(_lora_out(base_pipe, tmp_path / "lora"), _out(merged.unet))


def test_bias_changes_travel_as_lora_bias_or_are_reported_lost(tmp_path, base_pipe, adapters):
    _, merged = adapters("full")  # full fine-tuning trains to_out.0's bias
    carried = export_lora(merged, tmp_path / "diffusers", "diffusers", "full", None, torch.float32)
    assert carried["bias_changed"] and carried["total_bias_relative_error"] < 1e-6
    assert any(k.endswith("lora_B.bias") for k in load_file(tmp_path / "diffusers" / LORA_FILES["diffusers"]))
    lost = export_lora(merged, tmp_path / "kohya", "kohya", "full", None, torch.float32)
    assert lost["total_bias_relative_error"] == pytest.approx(1.0) and lost["total_relative_error"] < 1e-6
    assert any("cannot carry bias changes" in line for line in lost["summary"])
    out = _lora_out(base_pipe, tmp_path / "kohya")
    assert (out - _out(merged.pipeline.unet)).abs().max() > 1e-5  # the dropped bias shows: the report's warning is real


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lower_rank_lands_between_base_and_adapter(tmp_path, base_pipe, adapters, layout):
    _, merged = adapters("gsoft")
    report = export_lora(merged, tmp_path / "lora", layout, 16, None, torch.float32)
    merged = merged.pipeline
    assert 0 < report["total_relative_error"] < 1
    for row in report["modules"]:
        assert row["rank"] == 16 and 0 < row["relative_error"] < 1, row
    expected = _out(merged.unet)
    base_gap = (_out(base_pipe.unet) - expected).norm()
    lora_gap = (_lora_out(base_pipe, tmp_path / "lora") - expected).norm()
    assert 0 < lora_gap < base_gap


def test_max_error_picks_the_smallest_rank_per_module(tmp_path, adapters):
    _, merged = adapters("double_gsoft")
    report = export_lora(merged, tmp_path / "lora", "diffusers", None, 0.3, torch.float32)
    assert report["total_relative_error"] <= 0.3 and len({row["rank"] for row in report["modules"]}) > 1
    for row in report["modules"]:
        module = row["module"].removeprefix("unet.")
        delta = merged.pipeline.unet.get_submodule(module).weight.double() - merged.base[("unet", module)][0].double()
        energy = torch.linalg.svdvals(delta).square()
        one_rank_less = float((energy[row["rank"] - 1 :].sum() / energy.sum()).sqrt())
        assert row["relative_error"] <= 0.3 + 1e-9 and one_rank_less > 0.3, row


@pytest.mark.parametrize("method", ["gsoft", "full"])
def test_diffusers_folder_is_the_merged_pipeline(tmp_path, adapters, method):
    from diffusers import DiffusionPipeline

    folder, merged = adapters(method)
    merged = merged.pipeline
    export_adapter(folder, "diffusers", tmp_path / "pipe", command="python export_adapter.py ...")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    for component in ("unet", "vae", "text_encoder"):
        expected = getattr(merged, component).state_dict()
        actual = getattr(loaded, component).state_dict()
        assert actual.keys() == expected.keys()
        assert all(torch.equal(actual[k], expected[k]) for k in expected), component
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert f"({method})" in card and "base_model:" in card and "python export_adapter.py" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no staging folder left behind


@pytest.mark.parametrize("layout", ["clip", "open_clip"])
def test_single_file_round_trips_through_from_single_file(tmp_path, tiny_dir, adapters, layout):
    from diffusers import StableDiffusionPipeline

    folder, merged = adapters("gsoft")
    merged = merged.pipeline
    out = tmp_path / "model.safetensors"
    result = export_adapter(folder, "single_file", out, base_model=tiny_dir, text_encoder_layout=layout)
    keys = load_file(out).keys()
    text_key = {"clip": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "open_clip": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"}[layout]  # fmt: skip
    assert {"model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
            text_key} <= keys and result["text_encoder_layout"] == layout  # fmt: skip
    assert load_file(out)["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # the LDM VAE's 1x1 convs
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=tiny_dir, local_files_only=True)
    for component in ("unet", "vae", "text_encoder"):
        expected = getattr(merged, component).state_dict()
        actual = getattr(loaded, component).state_dict()
        assert actual.keys() == expected.keys()
        assert all(torch.equal(actual[k], expected[k]) for k in expected), component
    loaded.set_progress_bar_config(disable=True)
    images = [
        p(
            "a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
        for p in (loaded, merged)
    ]
    assert (images[0] == images[1]).all()


# (id, config changes over resources/tiny_sdxl/). The shipped tiny SDXL has two 32-wide text encoders: diffusers'
# create_diffusers_clip_model_from_ldm then takes conditioner.embedders.0 (CLIP, same width) for text_encoder_2 as
# well and leaves its text_projection unloaded, so from_single_file cannot read that encoder back; a 48-wide second
# encoder (as in real SDXL, 768 vs 1280) makes the whole pipeline round-trip.
SDXL_CASES = [
    ("shipped", {}),
    ("wide_text_encoder_2", {"text_encoder_2.json": {"hidden_size": 48}, "unet.json": {"cross_attention_dim": 80}}),
]


@pytest.mark.parametrize("changes", [c for _, c in SDXL_CASES], ids=[i for i, _ in SDXL_CASES])
def test_sdxl_single_file_round_trips_through_from_single_file(tmp_path, changes):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    for path in TINY_SDXL_CONFIG_DIR.glob("*.json"):
        (config_dir / path.name).write_text(json.dumps({**json.loads(path.read_text()), **changes.get(path.name, {})}))
    base = str(build_tiny_pipeline(tmp_path / "tiny-sdxl", config_dir=config_dir))
    _save_random_adapter(StableDiffusionXLPipeline.from_pretrained(base).unet, "gsoft", tmp_path / "adapter", base)
    out = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="SDXL's layout is fixed"):
        export_adapter(tmp_path / "adapter", "single_file", out, text_encoder_layout="clip")
    result = export_adapter(tmp_path / "adapter", "single_file", out)
    tensors = load_file(out)
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.transformer.text_model."
            "embeddings.position_embedding.weight", "conditioner.embedders.1.model.positional_embedding",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "first_stage_model.decoder.up.0.block.0.conv1.weight"} <= tensors.keys()  # fmt: skip
    assert result["text_encoder_layout"] == "sdxl"
    merged = load_merged(tmp_path / "adapter").pipeline
    projection = merged.text_encoder_2.text_projection.weight  # (projection_dim, hidden); OpenCLIP stores x @ P
    assert torch.equal(tensors[SDXL_OPEN_CLIP_PREFIX + "text_projection"], projection.T)
    # The second encoder through diffusers' own OpenCLIP converter, whatever from_single_file picks for it.
    expected = merged.text_encoder_2.state_dict()
    back = convert_open_clip_checkpoint(merged.text_encoder_2, tensors, prefix=SDXL_OPEN_CLIP_PREFIX)
    assert back.keys() == expected.keys() - {"text_model.embeddings.position_ids"}
    assert all(torch.equal(back[k], expected[k]) for k in back)

    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=base, local_files_only=True)
    same_width = merged.text_encoder.config.hidden_size == merged.text_encoder_2.config.hidden_size
    for component in ("unet", "vae", "text_encoder") + (() if same_width else ("text_encoder_2",)):
        expected = getattr(merged, component).state_dict()
        actual = getattr(loaded, component).state_dict()
        assert actual.keys() == expected.keys()
        assert all(torch.equal(actual[k], expected[k]) for k in expected), component
    if same_width:
        return  # text_encoder_2 holds the first encoder's weights (see SDXL_CASES): no generation to compare
    latents = [
        p("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
        for p in (loaded, merged)
    ]
    # Equal weights; the loaded second encoder's tensors may sit in another memory layout, so its matmuls round
    # differently (a few 1e-6 on latents of size ~5, seen with diffusers 0.42): equal to float32 rounding.
    torch.testing.assert_close(latents[0].images, latents[1].images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", ["tiny", "sd2"])
def test_ldm_layout_is_the_inverse_of_diffusers_converters(tiny_dir, size):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    if size == "sd2":
        config = {k: v for k, v in json.loads((ROOT / "configs/sd2_base_unet.json").read_text()).items() if k[0] != "_"}
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
    else:
        unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    back = convert_ldm_unet_checkpoint(unet_to_ldm(unet_sd, unet.config.layers_per_block), unet.config)
    assert back.keys() == unet_sd.keys() and all(back[k] is unet_sd[k] for k in unet_sd)
    back = convert_ldm_vae_checkpoint(vae_to_ldm(vae_sd, len(vae.config.up_block_types)), vae.config)
    assert back.keys() == vae_sd.keys() and all(torch.equal(back[k], vae_sd[k]) for k in vae_sd)


# (id, arguments after --adapter_dir, expected one-line error); the folder is an adapter made on the tiny pipeline
BAD_ARGS = [
    ("lora-no-rank", ["--format", "lora", "--output", "{tmp}/o"], r"needs --rank R .* or --max_error E"),
    ("lora-both", ["--format", "lora", "--rank", "4", "--max_error", "0.1", "--output", "{tmp}/o"], "exactly one"),
    ("rank-not-lora", ["--format", "diffusers", "--rank", "4", "--output", "{tmp}/o"], "only apply to --format lora"),
    ("bad-max-error", ["--format", "lora", "--max_error", "1.5", "--output", "{tmp}/o"], r"must be in \[0, 1\)"),
    ("single-not-st", ["--format", "single_file", "--output", "{tmp}/o.ckpt"], "must end with .safetensors"),
    ("exists", ["--format", "diffusers", "--output", "{tmp}/full"], "exists and is not empty; pass --overwrite"),
    ("file-exists", ["--format", "single_file", "--output", "{tmp}/x.safetensors"], "already exists; pass --overwrite"),
    ("into-adapter", ["--format", "lora", "--rank", "2", "--output", "{adapter}", "--overwrite"],
     "would replace the adapter folder"),
    ("bad-base", ["--format", "diffusers", "--output", "{tmp}/o", "--pretrained_model_name_or_path", "{tmp}/nope"],
     "cannot load the base model"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_cli_refuses_bad_arguments_in_one_line(tmp_path, adapters, capsys, args, message):
    folder, _ = adapters("gsoft")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "x.safetensors").write_bytes(b"x")
    argv = ["--adapter_dir", str(folder)]
    argv += [a.replace("{tmp}", str(tmp_path)).replace("{adapter}", str(folder)) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, script.parse_args(argv), "export_adapter.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("export_adapter.py: error: "), err
    assert re.search(message, err), err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x" and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def unknown_class_base(tiny_dir, tmp_path_factory):
    """The tiny pipeline, its model_index.json naming a pipeline class diffusers does not have."""
    base = tmp_path_factory.mktemp("unknown-class") / "base"
    shutil.copytree(tiny_dir, base)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "_class_name": "NoSuchPipeline"}))
    return base


def test_unknown_pipeline_class_is_one_line(tmp_path, adapters, unknown_class_base, capsys):
    folder, _ = adapters("gsoft")
    argv = ["--adapter_dir", str(folder), "--format", "lora", "--rank", "2", "--output", str(tmp_path / "o"),
            "--pretrained_model_name_or_path", str(unknown_class_base)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        script.run(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "pipeline class 'NoSuchPipeline'" in err and "supported family" in err and "newer diffusers" in err, err
    assert not (tmp_path / "o").exists()


def test_exported_files_get_ordinary_permissions(tmp_path, adapters):
    """safetensors' save_file (and so save_pretrained) leaves files 0o600: every exported file gets 0o666 less the
    umask, like the adapter files (a merged pipeline shared with other users must be readable by them)."""
    folder, merged = adapters("gsoft")
    previous = os.umask(0o022)
    try:
        export_lora(merged, tmp_path / "lora", "diffusers", 2, None, torch.float32)
        export_diffusers(merged, tmp_path / "pipe", folder, torch.float32, None)
    finally:
        os.umask(previous)
    for output in ("lora", "pipe"):
        files = [p for p in (tmp_path / output).rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
        assert set(modes.values()) == {oct(default_file_mode())} == {"0o644"}, modes


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (recursively): a file's bytes, None for a folder."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def _raiser(make_error):
    def fail(*args, **kwargs):
        raise make_error()

    return fail


def _enospc_safetensors():
    return SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "/o/.t"')


def _erofs():
    return OSError(errno.EROFS, "Read-only file system")


def _torch_write():
    return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")


def _fail_publish(monkeypatch):
    """os.replace fails for the staging folder's rename into place (moving an old output aside still works)."""
    real = os.replace

    def replace(src, dst):
        if ".tmp-" in Path(src).name:
            raise _erofs()
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


# (id, --format and its flags, what fails: (object, attribute, error) or "publish", reason in the one line)
WRITE_FAILURES = [
    ("lora-weights-enospc", ["lora", "--rank", "2"], (export_module, "save_file", _enospc_safetensors),
     "the disk is full"),
    ("lora-report-erofs", ["lora", "--rank", "2"], (Path, "write_text", _erofs), "the file system is read-only"),
    ("diffusers-weights-torch", ["diffusers"], (safetensors.torch, "save_file", _torch_write), "probably full"),
    ("diffusers-card-erofs", ["diffusers"], (Path, "write_text", _erofs), "the file system is read-only"),
    ("diffusers-publish-erofs", ["diffusers"], "publish", "the file system is read-only"),
    ("single-file-torch", ["single_file"], (export_module, "save_file", _torch_write), "probably full"),
    ("single-file-erofs", ["single_file"], (export_module, "save_file", _erofs), "the file system is read-only"),
]  # fmt: skip


@pytest.mark.parametrize("existing", [True, False], ids=["overwrite", "new"])
@pytest.mark.parametrize(
    ("fmt", "failure", "reason"), [c[1:] for c in WRITE_FAILURES], ids=[c[0] for c in WRITE_FAILURES]
)
def test_failed_write_is_one_line_and_keeps_the_old_output(
    tmp_path, adapters, monkeypatch, capsys, fmt, failure, reason, existing
):
    """A full disk or a read-only folder while writing: exit status 2 and one line naming the reason; an existing
    output (--overwrite) is byte-identical afterwards, and a new one leaves nothing: no staging folder, no temporary
    file, no parent folder the export created."""
    folder, merged = adapters("gsoft")
    monkeypatch.setattr(export_module, "load_merged", lambda adapter_dir, base_model=None, strength=1.0: merged)
    single = fmt[0] == "single_file"
    output = tmp_path / "parent" / ("model.safetensors" if single else "out")
    if existing:
        output.parent.mkdir()
        if single:
            output.write_bytes(b"old single file")
        else:
            output.mkdir()
            (output / "keep.txt").write_text("old export")
    before = _snapshot(tmp_path)
    if failure == "publish":
        _fail_publish(monkeypatch)
    else:
        owner, name, error = failure
        monkeypatch.setattr(owner, name, _raiser(error))
    argv = ["--adapter_dir", str(folder), "--output", str(output), "--format", *fmt] + ["--overwrite"] * existing
    with pytest.raises(SystemExit) as exit_info:
        script.run(argv)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # byte for byte, and no new file or folder anywhere
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("export_adapter.py: error: writing the ") and reason in err, err
    assert ("is unchanged" if existing else "no partial output was left") in err, err


def test_cli_writes_and_prints_the_report(tmp_path, adapters, capsys):
    folder, _ = adapters("gsoft")
    script.main(script.parse_args(["--adapter_dir", str(folder), "--format", "lora", "--rank", "8",
                                   "--output", str(tmp_path / "lora")]))  # fmt: skip
    printed = capsys.readouterr().out
    assert "total relative error" in printed and f"wrote {tmp_path / 'lora'}" in printed
    assert "| module | shape | rank |" in (tmp_path / "lora" / REPORT_MD).read_text()


@pytest.mark.parametrize("method", ["lora", "gsoft"])
def test_error_benchmark_on_a_trained_adapter(tmp_path, base_pipe, adapters, method):
    """benchmarks/export_lora_error.py --adapter_dir: weight and sample errors fall to zero at full rank, and a
    rank-4 LoRA adapter is reproduced exactly from rank 4 on (its change has rank 4)."""
    from benchmarks import export_lora_error as bench

    folder, _ = adapters(method)
    args = bench.parse_args(["--adapter_dir", str(folder), "--prompt", "a sks dog", "--seeds", "2",
                             "--num_inference_steps", "2", "--images_dir", str(tmp_path),
                             "--threads", "1"])  # fmt: skip
    curve = bench.measure_trained(folder, None, args)
    assert curve.ranks[0] == 1 and curve.ranks[-1] == 64  # the tiny UNet's widest projection, 64 x 64
    assert all(a >= b - 1e-12 for a, b in zip(curve.weight_errors, curve.weight_errors[1:]))
    assert curve.weight_errors[0] > 0.1 and curve.weight_errors[-1] < 1e-9
    assert curve.image_errors[-1] < 1e-3 < curve.image_errors[0]
    if method == "lora":
        rank4 = curve.ranks.index(4)  # float32 rounding of the merged weights is all that is left at rank 4
        assert curve.weight_errors[rank4] < 1e-6 < 0.01 < curve.weight_errors[rank4 - 1]
        assert curve.image_errors[rank4] < 1e-3
    torch.testing.assert_close(curve.samples["base model"], bench.draw(base_pipe, "a sks dog", 2, 2, 5.0))
    bench.save_sample_grid(curve, tmp_path)
    assert (tmp_path / f"export_lora_samples_{method}.jpg").is_file()


# -- --scale: the adapter at a strength -------------------------------------------------------------------------


def _unet_weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v for k, v in pipe.unet.state_dict().items() if k.endswith("weight")}


@pytest.mark.parametrize("method", [m for m, _ in METHODS])
def test_scale_zero_is_the_base_and_one_the_plain_merge(tiny_dir, adapters, method):
    """s = 0 changes no weight at all (bit for bit); s = 1 through the strength path is the plain merge (bit for bit
    for the rotations; lora / full interpolate W + s (W' - W), one rounding off, which is why --scale 1 never takes
    that path and the export stays what it was)."""
    from dreambooth_gs.export.formats import module_deltas
    from dreambooth_gs.export.strength import adapter_documents, load_at_strength

    folder, merged = adapters(method)
    at_zero = load_merged(folder, strength=0.0)
    assert at_zero.strength == 0.0
    assert all(not d.weight.any() and (d.bias is None or not d.bias.any()) for d in module_deltas(at_zero))
    pipe = export_module.load_pipeline_for_export(tiny_dir)
    load_at_strength(pipe, folder, 1.0, adapter_documents(merged.document, folder))
    actual, expected = _unet_weights(pipe), _unet_weights(merged.pipeline)
    if method in ("lora", "full"):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    else:
        assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_scale_one_writes_todays_file_and_zero_no_lora(tmp_path, adapters):
    folder, _ = adapters("gsoft")
    for name, scale in (("default", None), ("one", 1.0)):
        kwargs = {} if scale is None else {"scale": scale}
        export_adapter(folder, "lora", tmp_path / name, rank=8, lora_format="kohya", **kwargs)
    # safetensors writes its metadata in hash order, so two files are compared by tensors and metadata, not bytes
    (default, default_meta), (one, one_meta) = (
        (load_file(path), safetensors.safe_open(path, "pt").metadata())
        for path in (tmp_path / n / LORA_FILES["kohya"] for n in ("default", "one"))
    )
    assert default.keys() == one.keys() and all(torch.equal(default[k], one[k]) for k in default)
    assert default_meta == one_meta and "dreambooth_gs_scale" not in one_meta
    with pytest.raises(ValueError, match="--scale 0 is the base model itself"):
        export_adapter(folder, "lora", tmp_path / "zero", rank=8, scale=0.0)
    assert not (tmp_path / "zero").exists()


def _layer(method: str, scale: bool, parametrization: str = "cayley"):
    from dreambooth_gs.gs.layers import GSOFTLinear

    torch.manual_seed(0)
    config = {"gsoft": {}, "double_gsoft": {"method": "double_gsoft"},
              "boft": {"method": "boft", "n_butterfly_factor": 2}}[method]  # fmt: skip
    layer = GSOFTLinear(
        torch.nn.Linear(32, 48), GSOFTConfig(nblocks=4, scale=scale, parametrization=parametrization, **config)
    )
    with torch.no_grad():
        for param in layer.adapter_parameters():
            param.add_(torch.randn(param.shape) * 0.3)
    return layer


@pytest.mark.parametrize("parametrization", ["cayley", "exp"])
@pytest.mark.parametrize("method", ["gsoft", "double_gsoft", "boft"])
def test_gs_strength_is_a_rotation_cayley_of_s_k(method, parametrization, ref):
    """Half strength without the scale vector: W' = W Q(0.5) keeps W's singular values (the rotation stays in the
    orthogonal group, unlike a linear blend), lies strictly between base and adapter, and its blocks are Cayley(K / 2)
    (exp(K / 2)); with the scale vector d, the rows are scaled by 1 + s (d - 1)."""
    from dreambooth_gs.gs import functional as gsf

    layer = _layer(method, scale=False, parametrization=parametrization)
    base = layer.base_layer.weight.detach()
    assert torch.equal(layer.merged_weight(1.0), layer.merged_weight())
    half, full = layer.merged_weight(0.5).detach(), layer.merged_weight().detach()
    torch.testing.assert_close(torch.linalg.svdvals(half), torch.linalg.svdvals(base), rtol=1e-5, atol=1e-6)
    assert 0 < (half - base).norm() < (full - base).norm() and (half - full).norm() > 1e-3
    torch.testing.assert_close(layer.merged_weight(0.0), base, rtol=0, atol=1e-6)
    params = layer.adapter_parameters()[0].detach().reshape(-1, 8, 8)  # the first factor's raw blocks
    blocks = gsf.orthogonal_blocks_at_strength(params, 0.5, parametrization).double()
    k = (params.double() - params.double().mT) / 2
    expected = ref.cayley(params / 2) if parametrization == "cayley" else torch.linalg.matrix_exp(k / 2)
    torch.testing.assert_close(blocks, expected, rtol=1e-5, atol=1e-6)

    scaled = _layer(method, scale=True, parametrization=parametrization)
    d = scaled.gsoft_s.detach()
    assert torch.equal(gsf.scale_at_strength(d, 1.0), d)
    unscaled = scaled.merged_weight(0.5).detach() / (1 + 0.5 * (d - 1))[:, None]
    torch.testing.assert_close(torch.linalg.svdvals(unscaled), torch.linalg.svdvals(base), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gsoft", "oft", "lora"])
def test_half_strength_lora_loads_as_the_adapter_at_half_strength(tmp_path, base_pipe, adapters, method):
    """--scale 0.5 through the exporter: the full-rank LoRA reproduces the half-strength merge in diffusers; an
    orthogonal method's merged weights keep the base's singular values (PEFT's OFT: Cayley of its scaled
    generator), a LoRA's change is half the full one."""
    folder, merged = adapters(method)
    report = export_adapter(folder, "lora", tmp_path / "lora", rank="full", scale=0.5)
    assert report["scale"] == 0.5 and "strength 0.5" in report["summary"][0]
    metadata = safetensors.safe_open(tmp_path / "lora" / LORA_FILES["diffusers"], "pt").metadata()
    assert metadata["dreambooth_gs_scale"] == "0.5"
    half = load_merged(folder, strength=0.5)
    _close(_lora_out(base_pipe, tmp_path / "lora"), _out(half.pipeline.unet))
    for (component, module), (weight, _) in half.base.items():
        new, old = half.linear(component, module).weight.detach(), merged.linear(component, module).weight.detach()
        if method == "lora":
            torch.testing.assert_close(new - weight, (old - weight) / 2, rtol=1e-4, atol=1e-6)
        elif method == "oft":
            torch.testing.assert_close(torch.linalg.svdvals(new), torch.linalg.svdvals(weight), rtol=1e-5, atol=1e-6)
        assert 0 < (new - weight).norm() < (old - weight).norm()


def test_scale_is_refused_where_it_has_no_meaning(tmp_path, adapters, capsys):
    from dreambooth_gs.export.strength import check_strength

    with pytest.raises(ValueError, match="peft_boft, which is exported at --scale 1 only"):
        check_strength(0.5, {"unet": {"method": "peft_boft", "config": {}}})
    with pytest.raises(ValueError, match="constrained OFT"):
        check_strength(0.5, {"unet": {"method": "oft", "config": {"coft": True}}})
    check_strength(1.0, {"unet": {"method": "peft_boft", "config": {}}})  # s = 1 is the plain merge: always fine
    folder, _ = adapters("gsoft")
    argv = ["--adapter_dir", str(folder), "--format", "diffusers", "--output", str(tmp_path / "o"), "--scale", "nan"]
    with pytest.raises(SystemExit):
        run_cli(script.main, script.parse_args(argv), "export_adapter.py")
    assert "--scale must be a finite number" in capsys.readouterr().err
