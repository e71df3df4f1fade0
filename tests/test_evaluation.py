"""evaluate_clip.py and its bookkeeping: prompt files, subjects, seeds, sharding, an end-to-end evaluation of two
trained runs on the tiny pipeline, resume, bad inputs, and load_adapter in a pipeline for every method."""

from __future__ import annotations

import copy
import csv
import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate_clip  # noqa: E402
from dreambooth_gs import load_adapter, save_adapter  # noqa: E402
from dreambooth_gs.cli import run_cli  # noqa: E402
from dreambooth_gs.evaluate import evaluation  # noqa: E402
from dreambooth_gs.evaluate.metrics import load_clip_scorer, mean_cosine_to  # noqa: E402
from dreambooth_gs.evaluate.plan import (  # noqa: E402
    format_prompt,
    image_seed,
    instance_token,
    load_prompt_set,
    load_subjects,
    plan_jobs,
    resolve_run,
    shard,
    split_label,
)
from dreambooth_gs.resources import SUBJECTS_FILE  # noqa: E402

COMMON = [
    "a {token} {class} in the jungle",
    "a {token} {class} in the snow",
    "a {token} {class} on the beach",
    "a {token} {class} on a cobblestone street",
    "a {token} {class} on top of pink fabric",
    "a {token} {class} on top of a wooden floor",
    "a {token} {class} with a city in the background",
    "a {token} {class} with a mountain in the background",
    "a {token} {class} with a blue house in the background",
    "a {token} {class} on top of a purple rug in a forest",
]
ENDING = [f"a {w} {{token}} {{class}}" for w in ("red", "purple", "shiny", "wet", "cube shaped")]
MIDDLE = {
    "objects": [
        "a {token} {class} with a wheat field in the background",
        "a {token} {class} with a tree and autumn leaves in the background",
        "a {token} {class} with the Eiffel Tower in the background",
        "a {token} {class} floating on top of water",
        "a {token} {class} floating in an ocean of milk",
        "a {token} {class} on top of green grass with sunflowers around it",
        "a {token} {class} on top of a mirror",
        "a {token} {class} on top of the sidewalk in a crowded street",
        "a {token} {class} on top of a dirt road",
        "a {token} {class} on top of a white rug",
    ],
    "live": [
        "a {token} {class} wearing a red hat",
        "a {token} {class} wearing a santa hat",
        "a {token} {class} wearing a rainbow scarf",
        "a {token} {class} wearing a black top hat and a monocle",
        "a {token} {class} in a chef outfit",
        "a {token} {class} in a firefighter outfit",
        "a {token} {class} in a police outfit",
        "a {token} {class} wearing pink glasses",
        "a {token} {class} wearing a yellow shirt",
        "a {token} {class} in a purple wizard outfit",
    ],
}


# -- data files and bookkeeping -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["objects", "live"])
def test_prompt_sets_are_the_papers_25_templates(name):
    templates = load_prompt_set(name)
    assert templates == COMMON + MIDDLE[name] + ENDING
    prompts = [format_prompt(t, "sks", "stuffed animal") for t in templates]
    assert len(set(prompts)) == 25 and all("sks stuffed animal" in p and "{" not in p for p in prompts)
    assert prompts[0] == "a sks stuffed animal in the jungle" and prompts[-1] == "a cube shaped sks stuffed animal"


def test_prompt_set_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown prompt set 'animals'; use one of live, objects"):
        load_prompt_set("animals")
    bad = tmp_path / "bad.txt"
    bad.write_text("a {token} {subject} on the moon\n")
    with pytest.raises(ValueError, match="only {token} and {class}"):
        load_prompt_set(str(bad))
    custom = tmp_path / "custom.txt"
    custom.write_text("# my prompts\n\na {token} {class} on the moon\n")
    assert load_prompt_set(str(custom)) == ["a {token} {class} on the moon"]


@pytest.mark.parametrize(
    "name, class_name, prompt_set",
    [("dog", "dog", "live"), ("cat2", "cat", "live"), ("bear_plushie", "stuffed animal", "objects"),
     ("pink_sunglasses", "glasses", "objects"), ("red_cartoon", "cartoon", "objects")],
)  # fmt: skip
def test_subjects_file(name, class_name, prompt_set):
    subjects = load_subjects(SUBJECTS_FILE)
    assert len(subjects) == 30 and sum(s["prompt_set"] == "live" for s in subjects.values()) == 9
    assert subjects[name] == {"class_name": class_name, "prompt_set": prompt_set}


@pytest.mark.parametrize(
    "prompt, class_name, token",
    [("a photo of sks toy", "toy", "sks"), ("a photo of zwx stuffed animal", "stuffed animal", "zwx"),
     ("a photo of toy", "dog", "sks"), (None, "dog", "sks")],
)  # fmt: skip
def test_instance_token(prompt, class_name, token):
    assert instance_token(prompt, class_name) == token


def test_image_seed_is_a_stable_sha256_of_its_inputs():
    digest = hashlib.sha256(b"0\x1frun=dog-gsoft\x1fa sks dog\x1f3").digest()
    assert image_seed(0, "run=dog-gsoft", "a sks dog", 3) == int.from_bytes(digest[:8], "big") >> 1
    variants = {image_seed(*args) for args in [(0, "r", "p", 0), (1, "r", "p", 0), (0, "s", "p", 0), (0, "r", "q", 0),
                                               (0, "r", "p", 1)]}  # fmt: skip
    assert len(variants) == 5 and all(0 <= s < 2**63 for s in variants)


@pytest.mark.parametrize("count, processes", [(0, 2), (1, 2), (7, 2), (10, 3), (5, 8)])
def test_shards_are_disjoint_covering_and_balanced(count, processes):
    items = list(range(count))
    parts = [shard(items, i, processes) for i in range(processes)]
    assert sorted(x for part in parts for x in part) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize(
    "entry, label, path", [("out/run", None, "out/run"), ("GSOFT r=4=out/run", "GSOFT r", "4=out/run"),
                           ("gsoft=out/run", "gsoft", "out/run")],
)  # fmt: skip
def test_split_label(entry, label, path):
    assert split_label(entry) == (label, Path(path))


def _row(subject, kind, n, clip_i, clip_t, dino=None, family="sd", scale=1.0):
    return {"method": "m", "subject": subject, "prompt": f"{kind}{n}", "clip_i": clip_i, "clip_t": clip_t,
            "dino": dino, "n": n, "kind": kind, "run": f"r-{family}", "family": family, "scale": scale}  # fmt: skip


def test_summary_aggregates_the_protocol_way():
    """CLIP-I from base-prompt rows, CLIP-T from contextual rows (image-weighted), then mean and std over subjects."""
    from types import SimpleNamespace

    from dreambooth_gs.evaluate.report import mean_std, subject_scores, summary_markdown

    rows = [_row("a", "base", 2, 0.8, 0.9), _row("a", "prompt", 1, 0.5, 0.3), _row("a", "prompt", 3, 0.7, 0.1),
            _row("b", "base", 2, 0.6, 0.9), _row("b", "prompt", 1, 0.4, 0.35)]  # fmt: skip
    scores = subject_scores(rows)[("m", "sd", 1.0)]
    assert scores["a"]["CLIP-I"] == pytest.approx(0.8) and scores["a"]["CLIP-T"] == pytest.approx(0.15)
    assert scores["a"]["CLIP-I ctx"] == pytest.approx(0.65) and scores["a"]["DINO"] is None
    assert mean_std([0.8, 0.6]) == (pytest.approx(0.7), pytest.approx(0.1414, abs=1e-4))
    assert mean_std([0.5, None]) == (0.5, None)
    runs = [SimpleNamespace(label="m", family="sd", num_parameters=1234)]
    summary = summary_markdown(rows, runs, {"bad": "no adapter"}, [], {})
    assert "| m | sd | 1,234 | 2 | 0.7000 ± 0.1414 | 0.2500 ± 0.1414 | – |" in summary
    assert "| a | 0.8000 | 0.1500 | – | 0.6500 | – |" in summary and "- `bad`: no adapter" in summary


def test_summary_keeps_model_families_apart():
    """One method on two families: a row and a table each, never one pooled row."""
    from types import SimpleNamespace

    from dreambooth_gs.evaluate.report import subject_scores, summary_markdown

    rows = [_row("a", "base", 2, 0.8, 0.9), _row("a", "prompt", 1, 0.5, 0.3),
            _row("a", "base", 2, 0.4, 0.9, family="flux"), _row("a", "prompt", 1, 0.5, 0.1, family="flux")]  # fmt: skip
    assert set(subject_scores(rows)) == {("m", "sd", 1.0), ("m", "flux", 1.0)}
    runs = [
        SimpleNamespace(label="m", family="sd", num_parameters=10),
        SimpleNamespace(label="m", family="flux", num_parameters=20),
    ]
    summary = summary_markdown(rows, runs, {}, [], {})
    assert "| m | sd | 10 | 1 | 0.8000 | 0.3000 | – |" in summary
    assert "| m | flux | 20 | 1 | 0.4000 | 0.1000 | – |" in summary
    assert "## m, sd (10 trainable parameters)" in summary and "## m, flux (20 trainable parameters)" in summary


def test_summary_has_a_row_per_strength():
    """A sweep: one line (and one table) per method and strength, the strength named; the curve in strength order."""
    from types import SimpleNamespace

    from dreambooth_gs.evaluate.report import strength_curves, summary_markdown

    rows = [_row("a", "base", 2, 0.8 - s / 10, 0.9, scale=s) for s in (1.0, 0.0, 0.5)]
    rows += [_row("a", "prompt", 1, 0.5, 0.3 - s / 10, scale=s) for s in (1.0, 0.0, 0.5)]
    summary = summary_markdown(rows, [SimpleNamespace(label="m", family="sd", num_parameters=10)], {}, [], {})
    assert "| method | family | strength | trainable params | subjects |" in summary
    for strength, clip_i, clip_t in [("0", "0.8000", "0.3000"), ("0.5", "0.7500", "0.2500"), ("1", "0.7000", "0.2000")]:
        assert f"| m | sd | {strength} | 10 | 1 | {clip_i} | {clip_t} | – |" in summary
        assert f"## m, sd, strength {strength} (10 trainable parameters)" in summary
    assert strength_curves(rows) == {("m", "sd"): [pytest.approx((s, 0.3 - s / 10, 0.8 - s / 10)) for s in (0, 0.5, 1)]}
    plain = summary_markdown([r for r in rows if r["scale"] == 1], [], {}, [], {})
    assert "strength" not in plain  # strength 1 alone: the tables of before


@pytest.mark.parametrize("scale, suffix", [(1.0, ""), (1, ""), (0.0, "@s0"), (0.5, "@s0.5"), (1.25, "@s1.25"),
                                           (-0.5, "@s-0.5"), (1 / 3, "@s0.3333333333333333")])  # fmt: skip
def test_a_run_at_a_strength_has_its_own_folder_and_the_same_seeds(tmp_path, scale, suffix):
    from dreambooth_gs.evaluate.plan import RunSpec, at_strength

    run = RunSpec("out/dog", Path("out/dog"), "dog-abc123", "gsoft", "gsoft", 10, "base", "dog", "dog", "sks", (),
                  "objects", "0" * 64)  # fmt: skip
    strength_run = at_strength(run, scale)
    assert strength_run.run_id == f"dog-abc123{suffix}" and strength_run.scale == scale
    assert strength_run.name == ("out/dog" if scale == 1 else f"out/dog at strength {suffix[2:]}")
    plain, at_scale = (plan_jobs(r, tmp_path, 2, 3, max_prompts=2) for r in (run, strength_run))
    assert [j.seed for j in at_scale] == [j.seed for j in plain]  # a paired sweep
    assert all(j.path.relative_to(tmp_path).parts[0] == strength_run.run_id for j in at_scale)


# -- end to end on the tiny pipeline --------------------------------------------------------------------------------

FAST_EVAL = ["--clip_model", "tiny-random", "--dino_model", "tiny-random", "--images_per_prompt", "1"]
FAST_EVAL += ["--base_images", "2", "--max_prompts", "2", "--num_inference_steps", "2", "--resolution", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_cache):
    """Two runs (gsoft, lora) of the trainer on the demo subject, 1 step each, with a temporary model cache."""
    from train_dreambooth_gsoft import main, parse_args

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for method in ("gsoft", "lora"):
        flags = ["--output_dir", str(root / method), "--adapter", method, "--max_train_steps", "1"]
        flags += ["--train_batch_size", "2", "--report_to", "none", "--validation_prompt=", "--learning_rate", "1e-3"]
        runs[method] = main(parse_args(flags))
    return runs


def evaluate(output_dir: Path, runs: list, *flags: str) -> Path:
    args = ["--runs", *map(str, runs), "--output_dir", str(output_dir), *FAST_EVAL, *flags]
    return evaluate_clip.main(evaluate_clip.parse_args(args))


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """One evaluation of both runs plus two bad entries (no adapter, missing folder), which must not stop it."""
    no_adapter = tmp_path_factory.mktemp("no_adapter")
    out = tmp_path_factory.mktemp("eval")
    evaluate(out, [trained["gsoft"], trained["lora"], no_adapter, no_adapter / "missing"])
    return out, no_adapter


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_results_csv_has_a_row_per_run_and_prompt(evaluated):
    rows = _rows(evaluated[0])
    assert list(rows[0]) == [
        "method", "subject", "prompt", "clip_i", "clip_t", "dino", "n", "kind", "run", "family", "scale"
    ]  # fmt: skip
    assert {r["family"] for r in rows} == {"sd"} and {r["scale"] for r in rows} == {"1.0"}
    assert sorted((r["method"], r["prompt"], r["n"]) for r in rows) == sorted(
        (m, p, n)
        for m in ("gsoft", "lora")
        for p, n in [("a photo of sks toy", "2"), ("a sks toy in the jungle", "1"), ("a sks toy in the snow", "1")]
    )
    assert {r["subject"] for r in rows} == {"demo_subject"}
    assert all(-1 <= float(r[k]) <= 1 for r in rows for k in ("clip_i", "clip_t", "dino"))


def test_clip_t_scores_the_prompt_without_the_token(evaluated):
    out = evaluated[0]
    row = next(r for r in _rows(out) if r["method"] == "gsoft" and r["prompt"] == "a sks toy in the snow")
    (image_path,) = (out / "images").glob(f"{row['run']}/prompt-a_sks_toy_in_the_snow/*.png")
    clip = load_clip_scorer("tiny-random")
    images, text = clip.image_embeddings([Image.open(image_path)]), clip.text_embeddings(["a toy in the snow"])[0]
    assert float(row["clip_t"]) == pytest.approx(mean_cosine_to(images, text), abs=1e-5)


def test_summary_has_a_table_per_method_and_the_failures(evaluated, trained):
    out, no_adapter = evaluated
    summary = (out / "summary.md").read_text()
    for method in ("gsoft", "lora"):
        params = json.loads((trained[method] / "adapter_config.json").read_text())["num_parameters"]
        assert f"## {method}, sd ({params:,} trainable parameters)" in summary
        assert f"| {method} | sd | {params:,} | 1 |" in summary
    assert "| **mean** |" in summary and "| **std** |" in summary
    assert f"`{no_adapter}`: {no_adapter} has no adapter" in summary
    assert f"`{no_adapter / 'missing'}`: run folder {no_adapter / 'missing'} does not exist" in summary
    assert "tiny-random" in summary


def test_pngs_images_plots_and_grid(evaluated):
    out = evaluated[0]
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 2 * (2 + 1 + 1) and all(Image.open(p).size == (64, 64) for p in images)
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert plots == {"clip_scatter_gsoft.png", "clip_scatter_lora.png", "clip_scatter_methods.png"}
    grid = Image.open(out / "grids" / "demo_subject.png")
    assert grid.height > 2 * 64 and grid.width >= 120 + 4 * 64  # two method rows; real, base and two prompts


def test_resume_generates_only_missing_images(evaluated, trained, monkeypatch):
    out = evaluated[0]
    calls = []
    real_generate = evaluation.generate_images
    monkeypatch.setattr(evaluation, "generate_images", lambda *a, **k: calls.append(a[1]) or real_generate(*a, **k))
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    evaluate(out, [trained["gsoft"], trained["lora"]])
    assert calls == [] and {p: p.stat().st_mtime_ns for p in before} == before
    removed = sorted(before)[0]
    original = np.asarray(Image.open(removed)).astype(int)
    removed.unlink()
    evaluate(out, [trained["gsoft"], trained["lora"]])
    assert len(calls) == 1 and len(calls[0]) == 1  # one pipeline call for the one missing image
    assert np.abs(np.asarray(Image.open(removed)).astype(int) - original).max() <= 1  # the same seed, the same image
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != removed)


def test_sharded_generation_draws_the_same_images(evaluated, trained, tmp_path):
    """What accelerate launch does with two processes: each generates its shard; together they equal one process."""
    options = evaluate_clip.parse_args(["--runs", str(trained["lora"]), "--output_dir", str(tmp_path), *FAST_EVAL])
    run = resolve_run(str(trained["lora"]), load_subjects(options.subjects_file))
    jobs = plan_jobs(run, tmp_path / "images", images_per_prompt=1, base_images=2, max_prompts=2)
    for index in (1, 0):
        mine = shard(jobs, index, 2)
        assert len(mine) == 2
        assert not evaluation.generate_missing(mine, {run.run_id: run}, options, "cpu", torch.float32)
    for job in jobs:
        single = np.asarray(Image.open(evaluated[0] / "images" / job.path.relative_to(tmp_path / "images")))
        assert np.abs(np.asarray(Image.open(job.path)).astype(int) - single.astype(int)).max() <= 1


def test_other_settings_are_not_mixed_into_existing_images(evaluated, trained):
    with pytest.raises(ValueError, match="every run failed.*other settings \\(num_inference_steps 2 -> 3"):
        evaluate(evaluated[0], [trained["gsoft"]], "--num_inference_steps", "3")


def _run_with_instance_dir(tmp_path: Path, source: Path, instance_dir: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(source, run)
    info = json.loads((run / "training_args.json").read_text())
    (run / "training_args.json").write_text(json.dumps({**info, "instance_data_dir": str(instance_dir)}))
    return run


BAD_RUNS = [  # (make the only run, part of the recorded failure)
    (lambda t, src: _run_with_instance_dir(t, src, t / "photos"), "subject 'photos' has no real images"),
    (lambda t, src: _run_with_instance_dir(t, src, (t / "empty").mkdir() or t / "empty"), "is empty"),
    (lambda t, src: t, "has no adapter"),
]


def test_names_that_are_not_utf8_are_trained_and_evaluated(tmp_path, trained):
    """A subject folder and image files whose names are not UTF-8 (os.fsdecode gives surrogate escapes): the
    trainer's dataset reads them, and the evaluator hashes, scores and reports them (names as \\xff escapes)."""
    from dreambooth_gs.resources import DEMO_SUBJECT_DIR
    from dreambooth_gs.train.data import DreamBoothDataset

    subject = tmp_path / os.fsdecode(b"toy\xfe")
    subject.mkdir()
    for index, image in enumerate(sorted(DEMO_SUBJECT_DIR.glob("*.png"))[:2]):
        shutil.copy(image, subject / os.fsdecode(b"dog\xff%d.png" % index))
    assert DreamBoothDataset(subject, "a sks toy", resolution=64)[1]["instance_images"].shape == (3, 64, 64)
    out = evaluate(tmp_path / "eval", [_run_with_instance_dir(tmp_path, trained["gsoft"], subject)])
    rows = _rows(out)
    assert len(rows) == 3 and {r["subject"] for r in rows} == {"toy\\xfe"}
    assert "| toy\\xfe |" in (out / "summary.md").read_text(encoding="utf-8")
    assert (out / "grids" / "toy.png").is_file() and (out / "plots" / "clip_scatter_gsoft.png").is_file()


@pytest.mark.parametrize("make_run, message", BAD_RUNS, ids=[m for _, m in BAD_RUNS])
def test_bad_runs_are_recorded_and_fail_only_when_all_fail(tmp_path, trained, make_run, message):
    bad = make_run(tmp_path, trained["gsoft"])
    with pytest.raises(ValueError, match=f"every run failed .*{message}"):
        evaluate(tmp_path / "eval", [bad])
    assert message in (tmp_path / "eval" / "summary.md").read_text()


@pytest.mark.parametrize(
    "flags, message",
    [(["--prompt_set", "animals"], "unknown prompt set 'animals'"),
     (["--clip_model", "ViT-Q-99"], "unknown CLIP model 'ViT-Q-99'")],
)  # fmt: skip
def test_cli_bad_input_is_one_line(tmp_path, trained, capsys, flags, message):
    args = evaluate_clip.parse_args(
        ["--runs", str(trained["gsoft"]), "--output_dir", str(tmp_path), *FAST_EVAL, *flags]
    )
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_clip.main, args, "evaluate_clip.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("evaluate_clip.py: error: ") and message in err[-1]
    assert not list(tmp_path.rglob("*.png"))  # nothing generated


@pytest.mark.parametrize(
    "flags, message",
    [(["--images_per_prompt", "0"], "images_per_prompt must be at least 1"),
     (["--resolution", "60"], "multiple of 8"), (["--dtype", "fp8"], "invalid choice"),
     (["--adapter_scale", "0", "nan"], "finite numbers"), (["--adapter_scale"], "expected at least one argument")],
)  # fmt: skip
def test_cli_rejects_bad_numbers(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_clip.parse_args(["--runs", "out/run", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_adapter_scale_defaults_to_one_and_keeps_each_strength_once():
    assert evaluate_clip.parse_args(["--runs", "out/run"]).adapter_scale == [1.0]
    args = evaluate_clip.parse_args(["--runs", "out/run", "--adapter_scale", "0", "1", "-0", "0.5", "1.0"])
    assert args.adapter_scale == [0.0, 1.0, 0.5] and str(args.adapter_scale[0]) == "0.0"


# -- a strength sweep: --adapter_scale 0 0.5 1 ----------------------------------------------------------------------

SWEEP = ["--adapter_scale", "0", "0.5", "1.0"]


@pytest.fixture(scope="module")
def swept(evaluated, trained, tmp_path_factory):
    """The gsoft run and a constrained PEFT OFT run (1 step; coft loads at strength 1 only) swept over strengths 0,
    0.5 and 1, in a copy of the plain evaluation's output folder (its strength-1 images are there already)."""
    from train_dreambooth_gsoft import main, parse_args

    oft = tmp_path_factory.mktemp("runs") / "coft"
    flags = ["--output_dir", str(oft), "--adapter", "oft", "--max_train_steps", "1", "--train_batch_size", "2"]
    main(parse_args([*flags, "--report_to", "none", "--validation_prompt="]))
    document = json.loads((oft / "adapter_config.json").read_text())
    document["config"]["coft"] = True  # the trainer has no flag for it: what a coft folder from elsewhere holds
    (oft / "adapter_config.json").write_text(json.dumps(document))
    out = tmp_path_factory.mktemp("sweep") / "eval"
    shutil.copytree(evaluated[0], out)  # copy2: modification times kept
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    evaluate(out, [trained["gsoft"]])  # the plain evaluation (its images are there: it only scores)
    plain = _rows(out)
    evaluate(out, [trained["gsoft"], oft], *SWEEP)
    return out, oft, before, plain


def test_a_sweep_scores_each_run_at_each_strength(swept, trained):
    out, oft, _, _ = swept
    rows = _rows(out)
    keys = [(r["method"], r["scale"]) for r in rows]  # three prompts (base + two) per run and strength
    assert sorted(keys) == sorted([("gsoft", "0.0"), ("gsoft", "0.5"), ("gsoft", "1.0"), ("oft", "1.0")] * 3)
    assert {r["run"].partition("@")[2] for r in rows if r["method"] == "gsoft"} == {"s0", "s0.5", ""}
    summary = (out / "summary.md").read_text()
    params = json.loads((trained["gsoft"] / "adapter_config.json").read_text())["num_parameters"]
    for strength in ("0", "0.5", "1"):
        assert f"| gsoft | sd | {strength} | {params:,} | 1 |" in summary
    failures = summary.split("## Failures")[1].split("## Settings")[0].strip().splitlines()
    assert failures == [
        f"- `{oft} at strength {s}`: generation failed: {oft} is a constrained OFT (coft), whose rotation is "
        f"projected at every use: it loads at scale 1.0 only (got {s})"
        for s in ("0", "0.5")
    ]
    assert (out / "plots" / "clip_strength.png").is_file()
    assert Image.open(out / "grids" / "demo_subject.png").height > 4 * 64  # a row per run and strength
    record = json.loads(next((out / "images").glob("*@s0.5/generation.json")).read_text())
    assert record["adapter_scale"] == 0.5


def test_strength_one_of_a_sweep_is_the_plain_evaluation_reused(swept):
    out, _, before, plain = swept
    assert len(plain) == 3 and [r for r in _rows(out) if r["method"] == "gsoft" and r["scale"] == "1.0"] == plain
    assert {p: p.stat().st_mtime_ns for p in before} == before  # no image of the plain evaluation drawn again


def test_strength_zero_of_a_gs_adapter_draws_the_base_models_images(swept, trained):
    """s = 0: Cayley(0) = I and the scale vector 1 + 0 (d - 1) = 1, so the images are the base model's, pixel for
    pixel (the same seeds, prompts and batch as the evaluator)."""
    from dreambooth_gs.adapters.sampling import generate_images, load_pipeline
    from dreambooth_gs.evaluate.plan import at_strength

    out = swept[0]
    run = resolve_run(str(trained["gsoft"]), load_subjects(SUBJECTS_FILE))
    zero, one = (plan_jobs(at_strength(run, s), out / "images", 1, 2, max_prompts=2) for s in (0.0, 1.0))
    base = load_pipeline(run.base_model)  # no adapter
    images = generate_images(base, [j.prompt for j in zero], [j.seed for j in zero], 2, 7.0, height=64, width=64)
    for job, image in zip(zero, images, strict=True):
        assert np.array_equal(np.asarray(Image.open(job.path)), np.asarray(image))
    assert any(  # the comparison can fail: the trained adapter (s = 1) draws other images from the same seeds
        not np.array_equal(np.asarray(Image.open(a.path)), np.asarray(Image.open(b.path)))
        for a, b in zip(zero, one, strict=True)
    )


# -- load_adapter into a pipeline: the same images as the in-memory adapter ------------------------------------------

METHOD_FLAGS = {  # trainer options of each method on the tiny model
    "gsoft": {},
    "double_gsoft": {"gsoft_nblocks": 2},
    "boft": {},
    "lora": {"rank": 2},
    "oft": {},
    "full": {},
}


@pytest.fixture(scope="module")
def tiny_pipeline(trained):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    base = json.loads((trained["gsoft"] / "training_args.json").read_text())["base_model"]
    pipeline = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _pipeline_with(pipeline, unet):
    from diffusers import StableDiffusionPipeline

    with_unet = StableDiffusionPipeline(**{**pipeline.components, "unet": unet})
    with_unet.set_progress_bar_config(disable=True)
    return with_unet


def _latents(pipeline) -> torch.Tensor:
    from dreambooth_gs.adapters.sampling import generate_images

    return torch.stack(generate_images(pipeline, ["a sks toy"], [7], 2, 7.0, output_type="latent"))  # (1, 4, 8, 8)


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_load_adapter_gives_the_in_memory_images(tmp_path, tiny_pipeline, method):
    from dreambooth_gs.train.models import add_adapter
    from dreambooth_gs.train.options import TrainingOptions, with_demo_defaults

    options = with_demo_defaults(TrainingOptions(adapter=method, **METHOD_FLAGS[method]))
    trained_unet, _ = add_adapter(copy.deepcopy(tiny_pipeline.unet), options)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stands in for training: move every adapter parameter away from its initial value
        for param in (p for p in trained_unet.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    expected = _latents(_pipeline_with(tiny_pipeline, trained_unet))
    assert (expected - _latents(tiny_pipeline)).abs().max() > 1e-3  # the adapter matters: the comparison can fail
    save_adapter(trained_unet, tmp_path, base_model="tiny")
    for merge in (False, True):
        pipeline = _pipeline_with(tiny_pipeline, copy.deepcopy(tiny_pipeline.unet))
        load_adapter(pipeline, tmp_path, merge=merge)
        torch.testing.assert_close(_latents(pipeline), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "writer, error, reason",
    [("images", OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
     ("tables", OSError(errno.ENOSPC, "No space left on device"), "the disk is full")],
)  # fmt: skip
def test_a_failed_write_is_one_line(tmp_path, trained, capsys, monkeypatch, writer, error, reason):
    """Issue 30: a read-only or full output folder ended the evaluator in a traceback."""
    import PIL.Image

    from dreambooth_gs.evaluate import report as eval_report

    def fail(*args, **kwargs):
        raise error

    if writer == "images":
        monkeypatch.setattr(PIL.Image.Image, "save", fail)
    else:
        monkeypatch.setattr(eval_report.Path, "write_text", fail)
    args = evaluate_clip.parse_args(["--runs", str(trained["gsoft"]), "--output_dir", str(tmp_path), *FAST_EVAL])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate_clip.main, args, "evaluate_clip.py")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert (
        err.strip().splitlines()[-1].startswith("evaluate_clip.py: error: ") and reason in err.strip().splitlines()[-1]
    )
