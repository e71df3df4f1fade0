"""convert_authors_checkpoint: the GSOFT authors' save_attn_procs files become our adapter folders, exactly."""

import errno
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from dreambooth_gs import GSOFTConfig, GSOFTLinear, inject_adapter, load_adapter, read_adapter_config, save_adapter
from dreambooth_gs.adapters.serialization import adapter_state_dict
from dreambooth_gs.cli import run_cli
from dreambooth_gs.export.authors import AUTHORS_FILE, convert_authors_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import convert_authors_checkpoint as script  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tiny_dir):  # the session fixture of conftest.py, as a string
    return str(tiny_dir)


def _unet(tiny_dir: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").eval()


def _to_authors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our adapter tensors under the names diffusers 0.25's save_attn_procs gives the authors' processors."""
    out = {}
    for key, tensor in tensors.items():
        module, _, param = key.rpartition(".")
        attention, _, proj = module.removesuffix(".0").rpartition(".")  # ...attn1, to_q / to_out
        short = proj.removeprefix("to_")
        if param == "gsoft_s":
            out[f"{attention}.processor.{short}_scale"] = tensor
        elif param in ("gsoft_L", "gsoft_R"):
            out[f"{attention}.processor.to_{short}_gsoft.ort_gs.{param[-1]}"] = tensor
        else:  # gsoft_in_L -> to_q_gsoft_in.ort_gs.L
            out[f"{attention}.processor.to_{short}_gsoft_{param.split('_')[1]}.ort_gs.{param[-1]}"] = tensor
    return out


def _adapted(tiny_dir: str, method: str, parametrization: str = "cayley") -> nn.Module:
    unet = _unet(tiny_dir)
    inject_adapter(unet, GSOFTConfig(method=method, nblocks=4, parametrization=parametrization))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in unet.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return unet


CASES = [("gsoft", "cayley"), ("double_gsoft", "cayley"), ("gsoft", "exp")]


@pytest.mark.parametrize(("method", "parametrization"), CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_conversion_restores_the_adapter_exactly(tmp_path, tiny_dir, unet_inputs, unet_out, method, parametrization):
    original = _adapted(tiny_dir, method, parametrization)
    authors = _to_authors(adapter_state_dict(original))
    assert all(".processor." in k for k in authors)
    save_file(authors, tmp_path / AUTHORS_FILE)
    args = ["--input", str(tmp_path / AUTHORS_FILE), "--output", str(tmp_path / "ours"),
            "--pretrained_model_name_or_path", tiny_dir, "--parametrization", parametrization]  # fmt: skip
    script.main(script.parse_args(args))

    document = read_adapter_config(tmp_path / "ours")
    assert GSOFTConfig.from_dict(document["config"]) == GSOFTConfig(
        method=method, nblocks=4, parametrization=parametrization
    )
    assert document["base_model"] == tiny_dir
    fresh = _unet(tiny_dir)
    load_adapter(fresh, tmp_path / "ours", merge=False)
    expected, actual = adapter_state_dict(original), adapter_state_dict(fresh)
    assert actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)
    assert torch.equal(unet_out(fresh, unet_inputs), unet_out(original, unet_inputs))


def _authors_gs(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The authors' GSOrthogonal forward, written from its reshapes: block-diagonal R, then L on strided groups.

    Their BlockdiagButterflyMultiply(x, R, L) multiplies block k of x by R_k, regroups the result as
    (b, r) -> (r, b) (group j takes entries j, j + r, j + 2r, ...), multiplies group j by L_j and writes output
    entry s * r + j from group j's entry s.
    """
    r, b, _ = right.shape
    y = torch.einsum("kqp,nkp->nkq", right, x.reshape(-1, r, b)).reshape(-1, r * b)  # (batch, r * b)
    groups = y.reshape(-1, b, r).transpose(1, 2)  # (batch, r, b): group j = y[:, j::r]
    z = torch.einsum("jsi,nji->njs", left, groups)  # (batch, r, b)
    return z.transpose(1, 2).reshape(-1, r * b)  # out[:, s * r + j] = z[:, j, s]


def _authors_orthogonal(params: torch.Tensor, parametrization: str) -> torch.Tensor:
    skew = 0.5 * (params - params.transpose(1, 2))
    if parametrization == "exp":
        return torch.matrix_exp(skew)
    eye = torch.eye(params.shape[-1], dtype=params.dtype).expand_as(params)
    return torch.linalg.solve(eye - skew, eye + skew, left=False)  # (I + K)(I - K)^-1


@pytest.mark.parametrize("parametrization", ["cayley", "exp"])
@pytest.mark.parametrize("nblocks", [4, 8])
def test_their_L_and_R_are_ours_without_transpose(parametrization, nblocks):
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = GSOFTLinear(base, GSOFTConfig(nblocks=nblocks, parametrization=parametrization))
    with torch.no_grad():
        for param in (layer.gsoft_L, layer.gsoft_R):
            param.normal_(0, 0.3)
        layer.gsoft_s.uniform_(0.5, 1.5)
    x = torch.randn(5, 32)
    left, right = (_authors_orthogonal(p.detach().double(), parametrization) for p in (layer.gsoft_L, layer.gsoft_R))
    rotated = _authors_gs(x.double(), left, right)
    theirs = layer.gsoft_s.double() * (rotated @ base.weight.double().T) + base.bias.double()  # their to_out path
    torch.testing.assert_close(layer(x).double(), theirs, rtol=1e-5, atol=1e-5)


def _edited(tensors: dict, edit) -> dict:
    tensors = dict(tensors)
    edit(tensors)
    return tensors


def _first(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _add_double_factor(tensors: dict) -> None:
    """A Double GSOFT key (to_q_gsoft_in.ort_gs.L) beside the GSOFT ones."""
    tensors[_first(tensors, "to_q_gsoft.ort_gs.L").replace("_gsoft.", "_gsoft_in.")] = torch.zeros(4, 8, 8)


def _add_bias(unet: nn.Module) -> None:
    linear = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_k")
    linear.bias = nn.Parameter(torch.zeros(linear.out_features))


# (id, how to spoil a good authors' GSOFT state dict, how to change the base UNet, expected message)
BAD = [
    ("unknown-key", lambda t: t.update({"down_blocks.0.attentions.0.proj_in.lora.up.weight": torch.zeros(1)}),
     None, r"unknown keys \['down_blocks\.0\.attentions\.0\.proj_in\.lora\.up\.weight'\]"),
    ("mixed", _add_double_factor, None, "mixes GSOFT keys .* with Double GSOFT keys"),
    ("block-counts", lambda t: t.update({_first(t, "to_q_gsoft.ort_gs.L"): torch.zeros(8, 4, 4)}), None,
     r"several block counts \[4, 8\]"),
    ("partial-scale", lambda t: t.pop(_first(t, "q_scale")), None, "scale vectors for some projections but not"),
    ("missing-factor", lambda t: t.pop(_first(t, "to_v_gsoft.ort_gs.R")), None, r"lacks \[.*to_v\.gsoft_R'\]"),
    ("other-base", lambda t: t.update({_first(t, "to_q_gsoft.ort_gs.L"): torch.zeros(4, 16, 16),
                                       _first(t, "to_q_gsoft.ort_gs.R"): torch.zeros(4, 16, 16)}),
     None, r"shape \(4, 16, 16\) in the checkpoint but \(4, 8, 8\) in the base UNet"),
    ("no-factors", lambda t: [t.pop(k) for k in list(t) if "ort_gs" in k], None, "holds no GSOFT factors"),
    ("biased-base", lambda t: None, _add_bias, r"base model's mid_block\..*attn1\.to_k has a bias"),
]  # fmt: skip


@pytest.fixture(scope="module")
def good_gsoft(tiny_dir):
    return _to_authors(adapter_state_dict(_adapted(tiny_dir, "gsoft")))


@pytest.mark.parametrize(("spoil", "change_base", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_checkpoints_are_refused(tiny_dir, good_gsoft, spoil, change_base, message):
    good = good_gsoft
    unet = _unet(tiny_dir)
    if change_base is not None:
        change_base(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        convert_authors_state_dict(_edited(good, spoil), unet)
    assert not any(isinstance(m, GSOFTLinear) for m in unet.modules())
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_cli_errors_are_one_line(tmp_path, tiny_dir, capsys):
    good = _to_authors(adapter_state_dict(_adapted(tiny_dir, "double_gsoft")))
    save_file(_edited(good, lambda t: t.update({"unet.extra": torch.zeros(1)})), tmp_path / AUTHORS_FILE)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    for output, message in [(tmp_path / "new", "unknown keys"), (tmp_path / "full", "pass --overwrite")]:
        args = ["--input", str(tmp_path), "--output", str(output), "--pretrained_model_name_or_path", tiny_dir]
        with pytest.raises(SystemExit) as exit_info:
            run_cli(script.main, script.parse_args(args), "convert_authors_checkpoint.py")
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "new").exists() and (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_output_that_is_a_file_is_refused_even_with_overwrite(tmp_path, tiny_dir, good_gsoft, capsys):
    """--overwrite replaces an adapter folder; a file at --output is named as such, not 'pass --overwrite'."""
    save_file(good_gsoft, tmp_path / AUTHORS_FILE)
    (tmp_path / "adapter").write_bytes(b"a file")
    for extra in ([], ["--overwrite"]):
        args = ["--input", str(tmp_path / AUTHORS_FILE), "--output", str(tmp_path / "adapter"),
                "--pretrained_model_name_or_path", tiny_dir, *extra]  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            script.run(args)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert "is a file; the converter writes an adapter folder: give a folder path" in err, err
        assert "pass --overwrite" not in err, err
    assert (tmp_path / "adapter").read_bytes() == b"a file"


def test_overwrite_never_replaces_the_input_folder(tmp_path, tiny_dir, good_gsoft, capsys):
    save_file(good_gsoft, tmp_path / AUTHORS_FILE)
    before = (tmp_path / AUTHORS_FILE).read_bytes()
    for output in (tmp_path, tmp_path.parent):
        args = ["--input", str(tmp_path), "--output", str(output), "--pretrained_model_name_or_path", tiny_dir,
                "--overwrite"]  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            script.run(args)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "would replace --input" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [AUTHORS_FILE]
    assert (tmp_path / AUTHORS_FILE).read_bytes() == before


def test_overwrite_replaces_the_whole_folder(tmp_path, tiny_dir, good_gsoft):
    """A stale text_encoder/ adapter of the old folder must not be loaded beside the converted UNet adapter."""
    save_file(good_gsoft, tmp_path / AUTHORS_FILE)
    old = tmp_path / "ours"
    (old / "text_encoder").mkdir(parents=True)
    (old / "text_encoder" / "adapter_config.json").write_text("{}")
    args = ["--input", str(tmp_path / AUTHORS_FILE), "--output", str(old), "--pretrained_model_name_or_path",
            tiny_dir, "--overwrite"]  # fmt: skip
    script.run(args)
    assert sorted(p.name for p in old.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([AUTHORS_FILE, "ours"])  # no staging folder left


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def _raise(make_error):
    def fail(*args, **kwargs):
        raise make_error()

    return fail


# (id, (serialization.save_file or Path.write_text, its error), reason in the one line)
WRITE_FAILURES = [
    ("weights-enospc", ("save_file", lambda: SafetensorError("Error while serializing: I/O error: No space left on "
                                                             "device (os error 28)")), "the disk is full"),
    ("config-erofs", ("write_text", lambda: OSError(errno.EROFS, "Read-only file system")),
     "the file system is read-only"),
    ("weights-torch", ("save_file", lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                         "64 vs 0")), "probably full"),
]  # fmt: skip


@pytest.mark.parametrize("existing", [True, False], ids=["overwrite", "new"])
@pytest.mark.parametrize(("failure", "reason"), [c[1:] for c in WRITE_FAILURES], ids=[c[0] for c in WRITE_FAILURES])
def test_failed_write_is_one_line_and_leaves_no_folder(
    tmp_path, tiny_dir, good_gsoft, monkeypatch, capsys, failure, reason, existing
):
    """A full disk or a read-only folder: one line, exit status 2, no new (empty) folder, an old folder intact."""
    from dreambooth_gs.adapters import serialization

    save_file(good_gsoft, tmp_path / AUTHORS_FILE)
    output = tmp_path / "runs" / "ours"
    if existing:
        save_adapter(_adapted(tiny_dir, "double_gsoft"), output, base_model=tiny_dir)
        (output / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    name, make_error = failure
    monkeypatch.setattr(serialization if name == "save_file" else Path, name, _raise(make_error))
    args = ["--input", str(tmp_path / AUTHORS_FILE), "--output", str(output), "--pretrained_model_name_or_path",
            tiny_dir] + ["--overwrite"] * existing  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        script.run(args)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # byte for byte; no new folder, staging folder or temporary file
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"convert_authors_checkpoint.py: error: writing the adapter folder {output} failed: ")
    assert reason in err and ("is unchanged" if existing else "no folder was left behind") in err, err
