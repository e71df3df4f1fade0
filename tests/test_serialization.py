"""save_adapter / load_adapter: round trips, what the files hold, and every way a folder can be bad."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dreambooth_gs import (
    FullConfig,
    GSOFTConfig,
    adapter_layers,
    enable_full_finetuning,
    inject_adapter,
    load_adapter,
    read_adapter_config,
    save_adapter,
    trainable_parameters,
)
from dreambooth_gs.adapters import serialization
from dreambooth_gs.adapters.serialization import CONFIG_NAME, WEIGHTS_NAME

MLP_TARGETS = ("fc1", "fc2")
METHOD_CONFIGS = [
    ("gsoft", {"method": "gsoft", "nblocks": 4}),
    ("double", {"method": "double_gsoft", "block_size": 8, "scale": False}),
    ("boft", {"method": "boft", "nblocks": 4, "n_butterfly_factor": 2, "parametrization": "exp"}),
]
methods = pytest.mark.parametrize("kwargs", [c[1] for c in METHOD_CONFIGS], ids=[c[0] for c in METHOD_CONFIGS])


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def saved_mlp(make_mlp, randomize_adapter, directory, kwargs=None, dims=(16, 32, 24)):
    """An MLP with a randomised adapter, saved to ``directory`` (base_model "tiny/mlp"); returns the model."""
    model = make_mlp(dims=dims)
    inject_adapter(model, GSOFTConfig(target_modules=MLP_TARGETS, **(kwargs or {"nblocks": 4})))
    randomize_adapter(model, seed=1)
    save_adapter(model, directory, base_model="tiny/mlp")
    return model


@methods
@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_unet_round_trip(tmp_path, make_unet, unet_inputs, unet_out, randomize_adapter, kwargs, merge):
    unet = make_unet()
    names = inject_adapter(unet, GSOFTConfig(**kwargs))
    randomize_adapter(unet, seed=1)
    expected = unet_out(unet, unet_inputs)
    save_adapter(unet, tmp_path, base_model="tiny/unet")

    fresh = make_unet()
    assert not torch.allclose(unet_out(fresh, unet_inputs), expected, atol=1e-3)
    loaded = load_adapter(fresh, tmp_path, merge=merge)
    assert sorted(loaded) == sorted(names)
    if merge:
        assert not adapter_layers(fresh) and all(type(fresh.get_submodule(n)) is nn.Linear for n in names)
        torch.testing.assert_close(unet_out(fresh, unet_inputs), expected, rtol=1e-5, atol=1e-5)
    else:
        assert sorted(n for n, _ in adapter_layers(fresh)) == sorted(names)
        assert torch.equal(unet_out(fresh, unet_inputs), expected)
        for (name, a), (_, b) in zip(trainable_parameters(unet), trainable_parameters(fresh)):
            assert torch.equal(a, b), name


@methods
def test_files_hold_only_adapter_tensors_and_metadata(tmp_path, make_mlp, randomize_adapter, kwargs):
    model = saved_mlp(make_mlp, randomize_adapter, tmp_path, kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temp files left
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    params = dict(trainable_parameters(model))
    assert tensors.keys() == params.keys()
    assert all(k.rpartition(".")[2].startswith("gsoft_") for k in tensors)
    assert not any("boft_gather" in k or "base_layer" in k for k in tensors)
    for key, value in tensors.items():
        assert value.dtype == torch.float32 and torch.equal(value, params[key].detach()), key
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        assert f.metadata()["method"] == kwargs["method"]

    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert {"method", "config", "format_version", "base_model", "modules"} <= document.keys()
    assert document["method"] == kwargs["method"] and document["format_version"] == GSOFTConfig.FORMAT_VERSION
    assert document["base_model"] == "tiny/mlp"
    assert GSOFTConfig.from_dict(document["config"]) == GSOFTConfig(target_modules=MLP_TARGETS, **kwargs)
    assert document["modules"].keys() == {"fc1", "fc2"}
    shapes = {
        f"{m}.{p}": tuple(shape) for m, spec in document["modules"].items() for p, shape in spec["parameters"].items()
    }
    assert shapes == {k: tuple(v.shape) for k, v in tensors.items()}
    assert read_adapter_config(tmp_path) == document


def test_bf16_model_saves_fp32_and_loads(tmp_path, make_mlp, randomize_adapter):
    model = make_mlp().to(torch.bfloat16)
    inject_adapter(model, GSOFTConfig(nblocks=4, target_modules=MLP_TARGETS))
    randomize_adapter(model, seed=1)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    expected = model(x)
    save_adapter(model, tmp_path)
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / WEIGHTS_NAME).values())
    fresh = make_mlp().to(torch.bfloat16)
    load_adapter(fresh, tmp_path, merge=False)
    assert torch.equal(fresh(x), expected)


def test_save_without_adapters_raises(tmp_path, make_mlp):
    with pytest.raises(ValueError, match="no adapter to save"):
        save_adapter(make_mlp(), tmp_path)
    assert not any(tmp_path.iterdir())


def _edit_json(path: Path, edit) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _drop_tensor(path: Path) -> None:
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# (id, how to damage a good adapter folder, error type, message pattern)
BAD_FOLDERS = [
    ("missing-folder", lambda d: d.rename(d.with_name("moved")), FileNotFoundError,
     r"adapter folder .* does not exist"),
    ("missing-config", lambda d: (d / CONFIG_NAME).unlink(), FileNotFoundError, r"adapter_config\.json is missing"),
    ("missing-weights", lambda d: (d / WEIGHTS_NAME).unlink(), FileNotFoundError,
     r"adapter_model\.safetensors is missing"),
    ("invalid-json", lambda d: (d / CONFIG_NAME).write_text("{not json"), ValueError, r"is not valid JSON"),
    ("json-list", lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), ValueError, r"expected a JSON object"),
    ("unknown-method", lambda d: _edit_json(d / CONFIG_NAME, lambda j: j.update(method="mystery")), ValueError,
     r"unknown method 'mystery'"),
    ("format-version", lambda d: _edit_json(d / CONFIG_NAME, lambda j: j.update(format_version=99)), ValueError,
     r"format_version=99; this dreambooth_gs reads format 1"),
    ("no-format-version", lambda d: _edit_json(d / CONFIG_NAME, lambda j: j.pop("format_version")), ValueError,
     r"format_version=None"),
    ("no-modules", lambda d: _edit_json(d / CONFIG_NAME, lambda j: j.pop("modules")), ValueError,
     r"lacks its 'config' or 'modules' section"),
    ("unknown-config-field", lambda d: _edit_json(d / CONFIG_NAME, lambda j: j["config"].update(rank=4)), ValueError,
     r"unknown GSOFTConfig fields \['rank'\]"),
    ("bad-config-value", lambda d: _edit_json(d / CONFIG_NAME, lambda j: j["config"].update(method="lora")),
     ValueError, r"unknown method 'lora'"),
    ("truncated-weights", lambda d: _truncate(d / WEIGHTS_NAME), ValueError, r"corrupt or truncated"),
    ("garbage-weights", lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10), ValueError,
     r"corrupt or truncated"),
    ("empty-weights", lambda d: (d / WEIGHTS_NAME).write_bytes(b""), ValueError, r"corrupt or truncated"),
    ("missing-tensor", lambda d: _drop_tensor(d / WEIGHTS_NAME), ValueError,
     r"does not match its adapter_config\.json .*missing tensors \['fc1\.gsoft_L'\]"),
    ("extra-module", lambda d: _edit_json(d / CONFIG_NAME, lambda j: j["modules"].update(fc3={})), ValueError,
     r"do not match the adapter .*saved but not in the model: \['fc3'\]"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "error", "match"), [c[1:] for c in BAD_FOLDERS], ids=[c[0] for c in BAD_FOLDERS])
def test_bad_folder_raises_and_leaves_model_unchanged(tmp_path, make_mlp, randomize_adapter, damage, error, match):
    folder = tmp_path / "adapter"
    saved_mlp(make_mlp, randomize_adapter, folder)
    damage(folder)
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        load_adapter(model, folder)
    assert_unchanged(model, before)


def assert_unchanged(model, before):
    """No adapter layer left, the same parameters with the same values (requires_grad: see the test below)."""
    assert not adapter_layers(model)
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (value, _) in before.items():
        assert torch.equal(after[name][0], value), name


def test_load_into_model_with_different_shapes(tmp_path, make_mlp, randomize_adapter):
    saved_mlp(make_mlp, randomize_adapter, tmp_path, dims=(16, 32, 24))
    model = make_mlp(dims=(16, 32, 40))  # same names, fc2 has 40 outputs instead of 24
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"gsoft_s of fc2 has shape \(24,\) in the file but \(40,\) in the model"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_load_into_model_whose_dims_do_not_divide(tmp_path, make_mlp, randomize_adapter):
    saved_mlp(make_mlp, randomize_adapter, tmp_path, dims=(16, 32, 24))
    model = make_mlp(dims=(16, 30, 24))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"nblocks=4 does not divide in_features=30 of fc2"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_load_into_model_with_different_module_names(tmp_path, make_mlp, randomize_adapter):
    saved_mlp(make_mlp, randomize_adapter, tmp_path)
    model = nn.Sequential()
    model.add_module("inner", make_mlp())  # fc1 is now inner.fc1: still a target, but not the saved name
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"saved but not in the model: \['fc1', 'fc2'\].*not saved: \['inner\.fc1'"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_load_into_model_without_targets(tmp_path, make_mlp, randomize_adapter):
    saved_mlp(make_mlp, randomize_adapter, tmp_path)
    model = nn.Sequential(nn.Linear(16, 16))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no nn\.Linear matches target_modules=\['fc1', 'fc2'\]"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_load_twice_raises(tmp_path, make_mlp, randomize_adapter):
    saved_mlp(make_mlp, randomize_adapter, tmp_path)
    model = make_mlp()
    load_adapter(model, tmp_path, merge=False)
    with pytest.raises(ValueError, match="already has GSOFT adapters"):
        load_adapter(model, tmp_path)


# Failures found only after the adapter was injected (inject_adapter froze every parameter on the way in).
LATE_FAILURES = [
    ("missing-tensor", lambda d: _drop_tensor(d / WEIGHTS_NAME), (16, 32, 24)),
    ("other-shapes", lambda d: None, (16, 32, 40)),
]


@pytest.mark.parametrize(("damage", "dims"), [c[1:] for c in LATE_FAILURES], ids=[c[0] for c in LATE_FAILURES])
def test_failed_load_keeps_requires_grad(tmp_path, make_mlp, randomize_adapter, damage, dims):
    saved_mlp(make_mlp, randomize_adapter, tmp_path)
    damage(tmp_path)
    model = make_mlp(dims=dims)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError):
        load_adapter(model, tmp_path)
    assert not adapter_layers(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == [], f"a failed load_adapter left {frozen} frozen"


# -- full fine-tuning of the projections: the same folder shape, the weights themselves -----------------------------


def _perturb_trainable(model, seed=1, std=0.05):
    """Stands in for training: move every trainable parameter away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=g) * std)


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_full_unet_round_trip(tmp_path, make_unet, unet_inputs, unet_out, merge):
    unet = make_unet()
    names = enable_full_finetuning(unet, FullConfig())
    _perturb_trainable(unet)
    expected = unet_out(unet, unet_inputs)
    save_adapter(unet, tmp_path, base_model="tiny/unet")

    document = read_adapter_config(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    projections = {f"{n}.{p}": v for n in names for p, v in unet.get_submodule(n).named_parameters(recurse=False)}
    assert document["method"] == "full" and document["config"] == FullConfig().to_dict()
    assert tensors.keys() == projections.keys() and any(k.endswith("to_out.0.bias") for k in tensors)
    assert all(torch.equal(tensors[k], v.detach()) for k, v in projections.items())
    shapes = {f"{m}.{p}": tuple(s) for m, spec in document["modules"].items() for p, s in spec["parameters"].items()}
    assert shapes == {k: tuple(v.shape) for k, v in tensors.items()}

    fresh = make_unet()
    assert not torch.allclose(unet_out(fresh, unet_inputs), expected, atol=1e-3)
    assert sorted(load_adapter(fresh, tmp_path, merge=merge)) == sorted(names)
    assert torch.equal(unet_out(fresh, unet_inputs), expected)
    assert all(p.requires_grad for p in fresh.parameters())  # a plain model: loading changes values, not flags
    with pytest.raises(ValueError, match="no adapter to save"):  # loaded = merged: nothing left to save
        save_adapter(fresh, tmp_path / "again")


def saved_full_mlp(make_mlp, directory):
    """An MLP (fc1 16->32, fc2 32->24, with biases) whose trained projections are saved to ``directory``."""
    model = make_mlp()
    enable_full_finetuning(model, FullConfig(target_modules=MLP_TARGETS))
    _perturb_trainable(model)
    save_adapter(model, directory, base_model="tiny/mlp")
    return model


# (id, damage to the folder, the model loaded into, message pattern)
FULL_BAD_LOADS = [
    ("other-shapes", lambda d: None, lambda mlp: mlp(dims=(16, 32, 40)),
     r"weight of fc2 has shape \(24, 32\) in the file but \(40, 32\) in the model"),
    ("missing-tensor", lambda d: _drop_tensor(d / WEIGHTS_NAME), lambda mlp: mlp(),
     r"does not match its adapter_config\.json .*missing tensors \['fc1\.bias'\]"),
    ("no-bias-in-model", lambda d: None, lambda mlp: mlp(bias=False),
     r"unexpected tensors \['fc1\.bias', 'fc2\.bias'\]"),
    ("extra-module", lambda d: _edit_json(d / CONFIG_NAME, lambda j: j["modules"].update(fc3={})), lambda mlp: mlp(),
     r"do not match the adapter .*saved but not in the model: \['fc3'\]"),
    ("no-targets", lambda d: None, lambda mlp: nn.Sequential(nn.Linear(16, 16)),
     r"no nn\.Linear matches target_modules=\['fc1', 'fc2'\]"),
    ("unknown-config-field", lambda d: _edit_json(d / CONFIG_NAME, lambda j: j["config"].update(rank=4)),
     lambda mlp: mlp(), r"unknown FullConfig fields \['rank'\]"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "make_model", "match"), [c[1:] for c in FULL_BAD_LOADS], ids=[c[0] for c in FULL_BAD_LOADS]
)
def test_full_bad_load_raises_and_leaves_model_unchanged(tmp_path, make_mlp, damage, make_model, match):
    saved_full_mlp(make_mlp, tmp_path)
    damage(tmp_path)
    model = make_model(make_mlp)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, tmp_path)
    assert snapshot(model).keys() == before.keys()
    for name, (value, trainable) in snapshot(model).items():
        assert torch.equal(value, before[name][0]) and trainable == before[name][1], name


def test_full_refuses_bad_targets_and_a_second_adapter(make_mlp):
    model = make_mlp()
    with pytest.raises(ValueError, match=r"no nn\.Linear matches target_modules=\['to_q'\]; .* include: fc1, fc2"):
        enable_full_finetuning(model, FullConfig(target_modules=("to_q",)))
    assert all(p.requires_grad for p in model.parameters())  # untouched
    enable_full_finetuning(model, FullConfig(target_modules=("fc1",)))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc1.weight", "fc1.bias"]
    with_gsoft = make_mlp()
    inject_adapter(with_gsoft, GSOFTConfig(nblocks=4, target_modules=MLP_TARGETS))
    for adapted in (model, with_gsoft):
        with pytest.raises(ValueError, match="already has an adapter"):
            enable_full_finetuning(adapted, FullConfig(target_modules=MLP_TARGETS))


def test_adapter_files_get_ordinary_permissions(tmp_path, make_mlp):
    """Adapter files are readable like every other output (0o666 less the umask), not a temp file's 0o600."""
    model = make_mlp()
    inject_adapter(model, GSOFTConfig(nblocks=4, target_modules=("fc1",)))
    previous = os.umask(0o022)
    try:
        save_adapter(model, tmp_path)
    finally:
        os.umask(previous)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert not list(tmp_path.glob(".*.tmp"))


def _fail(make_error):
    def fail(*args, **kwargs):
        raise make_error()

    return fail


def _enospc():
    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _erofs():
    return OSError(errno.EROFS, "Read-only file system")


def _fail_config_rename(monkeypatch):
    """The weights are renamed into place, then the config's rename fails."""
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == CONFIG_NAME:
            raise _erofs()
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


# (id, how the save fails): the weights' write, the config's write, or the config's rename after the weights'
SAVE_FAILURES = [
    ("weights-enospc", lambda mp: mp.setattr(serialization, "save_file", _fail(_enospc))),
    ("config-erofs", lambda mp: mp.setattr(Path, "write_text", _fail(_erofs))),
    ("config-rename-erofs", _fail_config_rename),
]


@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new"])
@pytest.mark.parametrize("fail", [c[1] for c in SAVE_FAILURES], ids=[c[0] for c in SAVE_FAILURES])
def test_failed_save_leaves_the_old_adapter_or_nothing(
    tmp_path, make_mlp, randomize_adapter, monkeypatch, fail, existing
):
    """save_adapter used alone: a failed write leaves the old weights and config together (never new weights beside
    an old config), no temporary file, and no folder it created; the error is the writer's own."""
    folder = tmp_path / "runs" / "adapter"
    if existing:
        saved_mlp(make_mlp, randomize_adapter, folder, {"method": "boft", "nblocks": 4, "n_butterfly_factor": 2})
    before = {p.relative_to(tmp_path).as_posix(): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    model = make_mlp()
    inject_adapter(model, GSOFTConfig(nblocks=2, target_modules=MLP_TARGETS))
    fail(monkeypatch)
    with pytest.raises((OSError, SafetensorError)):
        save_adapter(model, folder, base_model="other")
    monkeypatch.undo()
    after = {p.relative_to(tmp_path).as_posix(): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    assert after == before
    if existing:
        assert read_adapter_config(folder)["method"] == "boft" and load_adapter(make_mlp(), folder)
