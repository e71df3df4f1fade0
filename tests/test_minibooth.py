"""MiniBooth (benchmarks/minibooth): the world generator (determinism, captions that say what is drawn), the
held-out subjects (never in the world), the prompt files (in the world's grammar), the protocol's pieces (trainer
flags, run completeness, the learning-rate rule, paired differences), and a pretraining smoke run whose pipeline
loads in diffusers and whose CLIP loads in open_clip."""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.minibooth import driver  # noqa: E402
from benchmarks.minibooth.oracle import JUDGED_ATTRIBUTES, attribute_values  # noqa: E402
from benchmarks.minibooth.report import paired_difference  # noqa: E402
from benchmarks.minibooth.subjects import (  # noqa: E402
    SUBJECT_PATTERNS,
    Subject,
    check_held_out,
    load_subjects,
    render_instance,
)
from benchmarks.minibooth.world import (  # noqa: E402
    ATTRIBUTES,
    caption,
    load_world,
    parse_caption,
    random_caption,
    render_world,
    sample_scene,
    scene_rng,
    world_item,
)
from dreambooth_gs.evaluate.metrics import remove_token  # noqa: E402
from dreambooth_gs.evaluate.plan import format_prompt, load_prompt_set  # noqa: E402

MINIBOOTH = ROOT / "benchmarks" / "minibooth"
WORLD = load_world()
SUBJECTS, INSTANCE_COUNT = load_subjects(world=WORLD)


# -- the world ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, start, count", [(0, 0, 6), (1, 0, 6), (0, 100, 4)])
def test_world_is_deterministic_from_seed_and_index(seed, start, count):
    first, scenes = render_world(count, seed, WORLD, start=start)
    again, scenes_again = render_world(count, seed, WORLD, start=start)
    assert np.array_equal(first, again) and scenes == scenes_again
    assert first.shape == (count, 64, 64, 3) and first.dtype == np.uint8
    one, scene = world_item(seed, start + 2, WORLD)  # an item does not depend on the ones rendered before it
    assert np.array_equal(np.asarray(one), first[2]) and scene == scenes[2]


def test_other_seeds_give_other_worlds():
    assert not np.array_equal(render_world(4, 0, WORLD)[0], render_world(4, 1, WORLD)[0])


def test_full_caption_states_every_attribute():
    scene = sample_scene(scene_rng(0, 0), WORLD)
    scene = replace(scene, size="small", color="red", pattern="striped", shape="star", position="top left")
    scene = replace(scene, background_pattern="dotted", background_color="blue")
    assert caption(scene) == "a small red striped star on a dotted blue background, top left"
    assert caption(replace(scene, pattern="plain")) == "a small red star on a dotted blue background, top left"


@pytest.mark.parametrize("seed", range(4))
def test_captions_parse_back_to_the_scene_attributes(seed):
    rng = random.Random(seed)
    for index in range(150):
        scene = sample_scene(scene_rng(seed, index), WORLD)
        keep = {name: rng.random() < 0.5 for name in ATTRIBUTES}
        said = parse_caption(caption(scene, keep), WORLD)
        expected = {name: getattr(scene, name) for name in ATTRIBUTES if keep[name]}
        if scene.pattern == "plain":
            expected.pop("pattern", None)  # a plain object is not called plain
        assert said == expected | {"shape": scene.shape}, caption(scene, keep)


def test_random_captions_mention_attributes_at_the_configured_rates():
    rng = random.Random(0)
    scenes = [sample_scene(scene_rng(0, i), WORLD) for i in range(3000)]
    said = [parse_caption(random_caption(s, rng, WORLD), WORLD) for s in scenes]
    for name in ("size", "color", "position"):
        rate = sum(name in x for x in said) / len(said)
        assert abs(rate - WORLD.caption_keep[name]) < 0.04, (name, rate)


@pytest.mark.parametrize("text", ["a red", "a red star on a background", "an orange star", "a star, left"])
def test_text_outside_the_grammar_is_not_a_caption(text):
    with pytest.raises(ValueError, match="not a MiniBooth caption"):
        parse_caption(text, WORLD)


def test_object_and_background_colours_differ():
    assert all(s.color != s.background_color for s in (sample_scene(scene_rng(3, i), WORLD) for i in range(2000)))


# -- held-out subjects ----------------------------------------------------------------------------------------------


def test_subjects_are_held_out_of_the_world():
    palette = set(WORLD.colors.values())
    scenes = [sample_scene(scene_rng(0, i), WORLD) for i in range(2000)]
    world_patterns = {s.pattern for s in scenes} | {s.background_pattern for s in scenes}
    for subject in SUBJECTS:
        assert {subject.color, subject.accent}.isdisjoint(palette)
        assert subject.pattern not in world_patterns and subject.pattern in SUBJECT_PATTERNS
        assert subject.class_name in WORLD.shapes  # its class noun is a word the base model knows
    assert sum(s.sweep for s in SUBJECTS) == 1 and len(SUBJECTS) >= 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"color": (215, 45, 45)}, "palette"),  # the world's red
        ({"pattern": "striped"}, "exists in the world"),
        ({"body": "blob"}, "world shape"),
        ({"class_name": "toy"}, "world shape"),
    ],
)
def test_subjects_that_the_world_contains_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        check_held_out([replace(SUBJECTS[0], **change)], WORLD)


@pytest.mark.parametrize("subject", SUBJECTS, ids=lambda s: s.name)
def test_instance_pictures_are_deterministic_and_varied(subject: Subject):
    pictures = [np.asarray(render_instance(subject, WORLD, 0, k)) for k in range(INSTANCE_COUNT)]
    assert np.array_equal(pictures[0], np.asarray(render_instance(subject, WORLD, 0, 0)))
    assert len({p.tobytes() for p in pictures}) == INSTANCE_COUNT
    assert 4 <= INSTANCE_COUNT <= 5


# -- prompts --------------------------------------------------------------------------------------------------------


def test_contextual_prompts_are_in_the_world_grammar():
    templates = load_prompt_set(str(MINIBOOTH / "prompts.txt"))
    assert len(templates) >= 12
    for template in templates:
        for subject in SUBJECTS:
            prompt = format_prompt(template, "sks", subject.class_name)
            assert "sks" in prompt
            parse_caption(remove_token(prompt, "sks"), WORLD)  # what CLIP-T scores is a world caption


def test_sample_prompts_are_world_captions():
    lines = (MINIBOOTH / "sample_prompts.txt").read_text().splitlines()
    prompts = [line for line in lines if line and not line.startswith("#")]
    assert prompts and all(parse_caption(p, WORLD) for p in prompts)


# -- protocol pieces ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["full", "smoke", "flow", "flow_smoke"])
def test_every_planned_run_has_valid_trainer_flags(tmp_path, profile):
    from train_dreambooth_gsoft import parse_args

    protocol = driver.load_protocol(profile)
    plans = driver.sweep_plans(protocol, "crowned_triangle", tmp_path)
    plans += driver.main_plans(protocol, ["zigzag_star"], {m: 1e-4 for m in protocol.methods}, tmp_path)
    assert len({p.output_dir for p in plans}) == len(plans)
    for plan in plans:
        options = parse_args(driver.trainer_argv(plan, protocol, tmp_path / "sd", tmp_path / plan.subject))
        assert options.adapter == plan.method and options.learning_rate == pytest.approx(plan.learning_rate)
        assert options.output_dir == str(plan.output_dir)


def test_unknown_methods_and_profiles_are_refused():
    with pytest.raises(ValueError, match="unknown methods"):
        driver.load_protocol("full", methods=["gsoft", "dora"])
    with pytest.raises(ValueError, match="unknown profile"):
        driver.load_protocol("huge")
    with pytest.raises(ValueError, match="the flow profile compares lora, gsoft"):
        driver.load_protocol("flow", methods=["gsoft", "full"])  # a method of the file that the profile leaves out


def test_a_profile_compares_its_own_methods_only():
    assert set(driver.load_protocol("flow").methods) == {"lora", "gsoft", "double_gsoft", "boft", "oft"}
    assert set(driver.load_protocol("flow", methods=["gsoft"]).methods) == {"gsoft"}
    assert "full" in driver.load_protocol("v2").methods  # profiles without a list compare every method


def test_a_run_is_complete_only_with_every_file_and_the_same_flags(tmp_path):
    argv = ["--adapter", "gsoft", "--learning_rate", "1e-4"]
    for name in driver.RUN_FILES[:-1]:
        (tmp_path / name).write_text("{}")
    assert not driver.is_complete(tmp_path, argv)
    (tmp_path / driver.RECORD_FILE).write_text(json.dumps({"argv": argv}))
    assert driver.is_complete(tmp_path, argv)
    assert not driver.is_complete(tmp_path, [*argv[:-1], "2e-4"])


def _fake_trainer(calls: list, fail_on: str | None = None, pause: float = 0.05):
    """A stand-in for run_logged: records each run (and how many ran at once), writes a finished run folder."""
    running = []

    def run(command, log_file, env):
        argv = command[2:]
        output_dir = Path(argv[argv.index("--output_dir") + 1])
        running.append(output_dir)
        calls.append((output_dir, len(running), env["MINIBOOTH_CONCURRENT_RUNS"]))
        time.sleep(pause)
        running.remove(output_dir)
        if fail_on and fail_on in str(output_dir):
            raise RuntimeError(f"train_one.py failed (exit 1); see {log_file}")
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in driver.RUN_FILES:
            (output_dir / name).write_text(json.dumps({"argv": argv}))

    return run


@pytest.mark.parametrize("jobs", [1, 2])
def test_runs_train_jobs_at_a_time_and_finished_ones_are_skipped(tmp_path, monkeypatch, jobs):
    protocol = driver.load_protocol("smoke")
    plans = driver.sweep_plans(protocol, "crowned_triangle", tmp_path)
    calls: list = []
    monkeypatch.setattr(driver, "run_logged", _fake_trainer(calls, pause=0.2))
    first = plans[:3]
    driver.train_runs(first, protocol, tmp_path / "sd", tmp_path / "subjects", 1, lambda message: None, jobs)
    assert sorted(c[0] for c in calls) == sorted(p.output_dir for p in first)
    assert max(c[1] for c in calls) == jobs and {c[2] for c in calls} == {str(jobs)}
    calls.clear()
    driver.train_runs(plans, protocol, tmp_path / "sd", tmp_path / "subjects", 1, lambda message: None, jobs)
    assert sorted(c[0] for c in calls) == sorted(p.output_dir for p in plans[3:])  # the first three: skipped


def test_a_failed_run_stops_the_others_from_starting(tmp_path, monkeypatch):
    protocol = driver.load_protocol("smoke")
    plans = driver.sweep_plans(protocol, "crowned_triangle", tmp_path)
    assert len(plans) >= 6
    calls: list = []
    monkeypatch.setattr(driver, "run_logged", _fake_trainer(calls, fail_on=str(plans[0].output_dir), pause=0.2))
    with pytest.raises(RuntimeError, match="train_one.py failed"):
        driver.train_runs(plans, protocol, tmp_path / "sd", tmp_path / "subjects", 1, lambda message: None, 2)
    assert len(calls) < len(plans)


@pytest.mark.parametrize(
    "scores, base_clip_t, chosen",
    [
        ({1e-4: (0.70, 0.30), 1e-3: (0.80, 0.29), 1e-2: (0.90, 0.20)}, 0.30, 1e-3),  # 1e-2 loses the prompts
        ({1e-4: (0.70, 0.30), 1e-3: (0.70, 0.30)}, 0.30, 1e-4),  # a tie goes to the smaller rate
        ({1e-4: (0.70, 0.20), 1e-3: (0.80, 0.10)}, 0.30, 1e-4),  # none keeps CLIP-T: the best CLIP-T
    ],
)
def test_learning_rate_rule(scores, base_clip_t, chosen):
    scores = {lr: {"clip_i": i, "clip_t": t} for lr, (i, t) in scores.items()}
    assert driver.choose_learning_rate(scores, base_clip_t, tolerance=0.1) == chosen


@pytest.mark.parametrize(
    "a, b, mean, half_width",
    [
        ({"x": 1.0, "y": 3.0}, {"x": 0.0, "y": 0.0}, 2.0, 12.706),  # t(1) x stdev sqrt(2) / sqrt(2)
        ({"x": 1.0, "y": 1.0, "z": 1.0}, {"x": 0.5, "y": 0.5, "z": 0.5}, 0.5, 0.0),
        ({"x": 1.0}, {"x": 0.25, "w": 9.0}, 0.75, None),
    ],
)
def test_paired_difference(a, b, mean, half_width):
    got_mean, got_half_width, _ = paired_difference(a, b)
    assert got_mean == pytest.approx(mean)
    assert got_half_width == (None if half_width is None else pytest.approx(half_width))


def test_the_report_pairs_the_protocol_s_comparisons_beside_the_reference():
    from benchmarks.minibooth.report import noise_lines

    base = {s: {"clip_i": 0.1} for s in "abc"}
    per_subject = {
        "lora": {s: {"clip_i": 0.3} for s in "abc"},
        "gsoft": {"a": {"clip_i": 0.4}, "b": {"clip_i": 0.4}, "c": {"clip_i": 0.4}},
        "boft": {"a": {"clip_i": 0.2}, "b": {"clip_i": 0.3}, "c": {"clip_i": 0.4}},
    }
    lines = noise_lines(per_subject, base, "lora", [("gsoft", "boft"), ("gsoft", "oft")])
    assert "- gsoft vs boft: CLIP-I +0.100 ± 0.248 (within noise, 3 subjects)" in lines  # t(2) x 0.1 / sqrt(3)
    assert "- gsoft vs lora: CLIP-I +0.100 ± 0.000 (higher, 3 subjects)" in lines
    assert not any(line.startswith(("- boft vs gsoft", "- gsoft vs oft")) for line in lines)  # only listed pairs
    assert len(lines) == 3 + 2 + 1  # each vs base, gsoft and boft vs lora, gsoft vs boft


def test_the_protocol_keeps_only_comparisons_of_methods_it_runs():
    assert ("gsoft", "boft") in driver.load_protocol("flow").comparisons
    assert driver.load_protocol("flow", methods=["lora", "gsoft"]).comparisons == ()


# -- pretraining smoke ----------------------------------------------------------------------------------------------


def test_pretraining_smoke_gives_loadable_models_and_is_cached(tmp_path):
    import open_clip
    from diffusers import StableDiffusionPipeline

    from benchmarks.minibooth import pretrain as script

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star\n")
    argv = ["--smoke", "--cache_dir", str(tmp_path / "cache"), "--num_images", "16", "--sample_prompts", str(prompts)]
    argv += ["--sample_seeds", "1", "--log_every", "1000"]
    with torch.random.fork_rng(devices=[]):
        result = script.pretrain(script.parse_args(argv), log=lambda message: None)
    assert (result.pipeline_dir / "samples.png").is_file()
    fidelity = result.markers["fidelity"]  # the prompt-fidelity check ran, with both judges
    assert set(fidelity["clip"]["generated"]) == set(fidelity["oracle"]["generated"]) == set(JUDGED_ATTRIBUTES)
    assert set(result.markers["oracle"]["check_accuracy"]) == set(JUDGED_ATTRIBUTES)
    assert (result.oracle_dir / "oracle.safetensors").is_file()

    pipeline = StableDiffusionPipeline.from_pretrained(result.pipeline_dir)
    assert pipeline.safety_checker is None and pipeline.tokenizer.model_max_length == 32
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == 64
    assert pipeline.vae.config.scaling_factor != 1.0  # measured on the world's latents
    image = pipeline("a sks star", num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{result.clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{result.clip_dir}")
    with torch.no_grad():
        features = model.encode_image(preprocess(image)[None]), model.encode_text(tokenizer(["a red star"]))
    assert features[0].shape == features[1].shape == (1, 32)
    open_clip.add_model_config(result.clip_dir / "minibooth_clip.json")  # the named-config route works as well
    named = open_clip.create_model("minibooth_clip", pretrained=str(result.clip_dir / "open_clip_model.safetensors"))
    assert torch.equal(named.state_dict()["logit_scale"], model.state_dict()["logit_scale"])

    again = script.pretrain(script.parse_args(argv), log=lambda message: None)  # a second call reuses every stage
    assert again.markers == result.markers


@pytest.mark.parametrize("name", ["full", "smoke"])
def test_attention_projection_widths_suit_the_adapters(name):
    unet = json.loads((MINIBOOTH / "configs" / name / "unet.json").read_text())
    transformer = json.loads((MINIBOOTH / "configs" / name / "sd3" / "transformer.json").read_text())
    widths = {*unet["block_out_channels"], unet["cross_attention_dim"]}
    widths |= {transformer["num_attention_heads"] * transformer["attention_head_dim"]}  # every joint projection
    divisors = (4, 8, 32) if name == "full" else (4, 8)
    assert all(width % d == 0 for width in widths for d in divisors), widths


def test_flow_pretraining_smoke_gives_an_sd3_pipeline_the_trainer_fine_tunes(tmp_path):
    from benchmarks.minibooth import pretrain as script
    from dreambooth_gs import families
    from dreambooth_gs.adapters.sampling import generate_images, load_pipeline
    from train_dreambooth_gsoft import main, parse_args

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star\n")
    argv = ["--smoke", "--family", "sd3", "--cache_dir", str(tmp_path / "cache"), "--num_images", "16"]
    argv += ["--sample_prompts", str(prompts), "--sample_seeds", "1", "--log_every", "1000", "--fidelity_pictures", "0"]
    argv += ["--world_file", str(MINIBOOTH / "world_v2.json")]
    with torch.random.fork_rng(devices=[]):
        result = script.pretrain(script.parse_args(argv), log=lambda message: None)
    assert result.pipeline_dir.name.startswith("sd3-") and (result.pipeline_dir / "samples.png").is_file()
    family = families.detect(str(result.pipeline_dir))
    assert family.name == "sd3"
    pipeline = load_pipeline(str(result.pipeline_dir))
    assert pipeline.text_encoder_3 is None and pipeline.tokenizer.model_max_length == 32
    vae = pipeline.vae.config
    assert vae.shift_factor != 0.0 and vae.scaling_factor != 1.0  # measured on the world's latents
    (image,) = generate_images(pipeline, ["a sks star"], [0], 1, 5.0, pipeline_kwargs=family.sampling_kwargs())
    assert image.size == (64, 64)

    subject = tmp_path / "subject"
    subject.mkdir()
    for k in range(2):
        image.save(subject / f"{k}.png")
    flags = ["--pretrained_model_name_or_path", str(result.pipeline_dir), "--instance_data_dir", str(subject)]
    flags += ["--instance_prompt", "a sks star", "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1"]
    flags += ["--train_batch_size", "2", "--report_to", "none", "--gsoft_nblocks", "4"]
    main(parse_args(flags))
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_flow_pretraining_refuses_configs_that_do_not_fit(tmp_path):
    import shutil

    from benchmarks.minibooth import architectures as arch

    configs = shutil.copytree(arch.CONFIG_ROOT / "smoke", tmp_path / "configs")
    path = configs / "sd3" / "transformer.json"
    path.write_text(path.read_text().replace('"pooled_projection_dim": 32', '"pooled_projection_dim": 48'))
    with pytest.raises(ValueError, match="pooled_projection_dim must be the sum"):
        arch.check_compatible(configs, 64, "sd3")
    arch.check_compatible(configs, 64, "sd")  # the UNet side does not read sd3/


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_peak_rss_is_the_child_process_own_not_inherited_from_its_parent():
    """``ru_maxrss`` survives exec on Linux: a run started by the (large) pretraining process reported the parent's
    peak. The record's peak must be the child's own."""
    import subprocess

    from benchmarks.memory import peak_rss_mib

    ballast = torch.ones(64 * 2**20, dtype=torch.uint8)  # keep the parent's peak at least 64 MiB above the child's
    parent = peak_rss_mib()
    code = "from benchmarks.memory import peak_rss_mib; print(peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout)
    assert 0 < child < parent - 32, (child, parent)
    del ballast


def test_instance_ceiling_is_the_mean_over_distinct_pairs():
    from PIL import Image

    from benchmarks.minibooth.fidelity import instance_ceiling
    from dreambooth_gs.evaluate.metrics import ClipScorer, tiny_random_clip

    model, preprocess, tokenizer = tiny_random_clip()
    scorer = ClipScorer(model, preprocess, tokenizer)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    assert instance_ceiling(scorer, [pictures[0]] * 3) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        features = torch.nn.functional.normalize(
            model.encode_image(torch.stack([preprocess(p) for p in pictures])), dim=-1
        )
    pairs = [float(features[i] @ features[j]) for i in range(3) for j in range(3) if i != j]
    assert instance_ceiling(scorer, pictures) == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        instance_ceiling(scorer, pictures[:1])


def test_report_shows_the_ceiling_rows():
    from benchmarks.minibooth.report import MethodSummary, render_report

    base = {"a": {"clip_i": 0.2, "clip_t": 0.5}, "b": {"clip_i": 0.3, "clip_t": 0.4}}
    per_subject = {"lora": {"a": {"clip_i": 0.3, "clip_t": 0.45}, "b": {"clip_i": 0.4, "clip_t": 0.38}}}
    summary = MethodSummary("lora", 1e-4, 10, 0.1, 100.0, [0.3, 0.4], [0.45, 0.38])
    text = render_report([summary], base, per_subject, "lora", "header", {"a": 0.5, "b": 0.7})
    assert "| instance pictures vs each other (CLIP-I ceiling) | – | – | – | – | – | 0.600 ± 0.141 | – | – |" in text
    assert "| CLIP-I ceiling | 0.500 / – | 0.700 / – |" in text
    assert "ceiling" not in render_report([summary], base, per_subject, "lora", "header")


def test_report_header_says_how_step_times_were_taken(tmp_path):
    from benchmarks.minibooth.report import summarize, timing_conditions

    protocol = driver.load_protocol("smoke")
    plans = driver.sweep_plans(protocol, "crowned_triangle", tmp_path)[:3]
    for plan, (threads, runs) in zip(plans, [(1, 2), (1, 2), (2, None)]):
        plan.output_dir.mkdir(parents=True)
        record = {"num_threads": threads} | ({"concurrent_runs": runs} if runs else {})  # older records: no key
        (plan.output_dir / driver.RECORD_FILE).write_text(json.dumps(record))
        (plan.output_dir / "adapter_config.json").write_text("{}")
    summaries = summarize(plans, {p.output_dir: {"clip_i": 0.2, "clip_t": 0.4} for p in plans})
    expected = "1 thread(s) per run, 2 run(s) at a time; 2 thread(s) per run, 1 run(s) at a time"
    assert timing_conditions(summaries) == expected


def test_tradeoff_from_sweep_plots_every_rate_of_the_sweep_without_training(tmp_path, monkeypatch):
    from benchmarks.minibooth import tradeoff

    def scores(i, t):
        return {"clip_i": i, "clip_t": t}

    sweep = {"subject": "yellow_dotted_circle", "base": scores(0.1, 0.5), "methods": {}}
    sweep["methods"]["lora"] = {"chosen": 1e-3, "scores": {"0.01": scores(0.4, 0.2), "0.001": scores(0.3, 0.45)}}
    sweep["methods"]["gsoft"] = {"chosen": 6e-4, "scores": {"6e-05": scores(0.2, 0.48), "0.0006": scores(0.35, 0.4)}}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    monkeypatch.setattr(driver, "train_runs", lambda *a, **k: pytest.fail("--from_sweep trains nothing"))
    options = tradeoff.TradeoffOptions(profile="v2", methods=["lora", "gsoft"], work_dir=str(tmp_path), from_sweep=True)
    text = tradeoff.main(options).read_text()
    assert (tmp_path / "sweep_tradeoff.png").is_file()
    assert "| lora | **0.001** | 0.300 | 0.450 |" in text and "| lora | 0.01 | 0.400 | 0.200 |" in text
    assert "- gsoft: 0.256" in text  # at LoRA's CLIP-T 0.45: 5/8 of the way from (0.40, 0.35) to (0.48, 0.20)


class _AttributeScorer:
    """A stand-in ClipScorer whose embedding of a scene (a "picture") or of a caption is the normalised sum of one
    fixed random vector per (attribute, value) it shows: the candidate caption that shares most values wins."""

    def __init__(self, world, dim=512):
        generator = torch.Generator().manual_seed(0)
        self.world = world
        self.vectors = {}
        for attribute in JUDGED_ATTRIBUTES:
            for value in attribute_values(world)[attribute]:
                self.vectors[attribute, value] = torch.randn(dim, generator=generator)

    def _embed(self, values: dict) -> torch.Tensor:
        total = sum(self.vectors[a, values[a]] for a in JUDGED_ATTRIBUTES)
        return torch.nn.functional.normalize(total, dim=0)

    def image_embeddings(self, scenes):
        return torch.stack([self._embed({a: getattr(s, a) for a in JUDGED_ATTRIBUTES}) for s in scenes])

    def text_embeddings(self, texts):
        parsed = [{"pattern": "plain", **parse_caption(t, self.world)} for t in texts]
        return torch.stack([self._embed(p) for p in parsed])


def test_attribute_accuracy_ranks_the_candidate_captions_of_each_attribute():
    from benchmarks.minibooth.fidelity import attribute_accuracy

    world = load_world()
    scorer = _AttributeScorer(world)
    rng = random.Random(0)
    scenes = [sample_scene(rng, world) for _ in range(12)]
    assert attribute_accuracy(scorer, scenes, scenes, world) == dict.fromkeys(JUDGED_ATTRIBUTES, 1.0)
    # pictures whose colour is not the caption's: colour is always wrong, every other attribute still right
    recoloured = [replace(s, color=next(c for c in sorted(world.colors) if c != s.color)) for s in scenes]
    expected = {**dict.fromkeys(JUDGED_ATTRIBUTES, 1.0), "color": 0.0}
    assert attribute_accuracy(scorer, recoloured, scenes, world) == expected


def test_tradeoff_takes_the_grid_neighbours_and_interpolates_along_the_curve():
    from benchmarks.minibooth.tradeoff import neighbour_rates, value_at

    grid = [1e-4, 3e-4, 1e-3, 3e-3]
    assert neighbour_rates(grid, 3e-4) == [1e-4, 3e-4, 1e-3]
    assert neighbour_rates(grid, 1e-4) == [1e-4, 3e-4]
    assert neighbour_rates(grid, 3e-3) == [1e-3, 3e-3]
    curve = [(0.47, 0.25), (0.43, 0.35), (0.45, 0.31)]  # (CLIP-T, CLIP-I), in any order
    assert value_at(curve, 0.46) == pytest.approx(0.28)
    assert value_at(curve, 0.44) == pytest.approx(0.33)
    assert value_at(curve, 0.47) == pytest.approx(0.25)
    assert value_at(curve, 0.48) is None and value_at(curve, 0.42) is None


def test_tradeoff_curves_average_over_subjects_and_report_clip_i_at_the_reference_clip_t(tmp_path):
    from benchmarks.minibooth.tradeoff import method_curves, render_tradeoff

    plans, scores = [], {}
    points = {("lora", 1e-4): [(0.47, 0.26), (0.47, 0.28)], ("lora", 3e-4): [(0.45, 0.33), (0.45, 0.31)],
              ("gsoft", 2e-4): [(0.46, 0.30), (0.46, 0.30)], ("gsoft", 6e-4): [(0.44, 0.34), (0.44, 0.36)]}  # fmt: skip
    for (method, rate), runs in points.items():
        for subject, (clip_t, clip_i) in zip("ab", runs):
            folder = tmp_path / method / f"{rate:g}" / subject
            plans.append(driver.RunPlan("tradeoff", method, subject, 0, rate, folder, method))
            scores[folder] = {"clip_t": clip_t, "clip_i": clip_i}
    curves = method_curves(plans, scores)
    assert curves["lora"] == [(1e-4, pytest.approx(0.47), pytest.approx(0.27)), (3e-4, 0.45, pytest.approx(0.32))]
    text = render_tradeoff(curves, {"lora": 3e-4, "gsoft": 2e-4}, "lora", (0.2, 0.5), "probe")
    assert "| lora | **0.0003** | 0.320 | 0.450 |" in text and "| gsoft | 0.0006 | 0.350 | 0.440 |" in text
    assert "- lora: 0.320" in text and "- gsoft: 0.325" in text  # gsoft halfway between 0.44 and 0.46


def test_tradeoff_pairs_each_subject_at_the_reference_clip_t_and_leaves_out_curves_that_miss_it(tmp_path):
    from benchmarks.minibooth.tradeoff import oracle_columns, paired_at_reference, render_tradeoff

    # (subject, method, rate): (CLIP-T, CLIP-I, subject fidelity). On a, b, c GSOFT's curve passes LoRA's CLIP-T
    # halfway between its two rates, 0.05 CLIP-I and 0.1 subject fidelity above LoRA's point, with different
    # slopes per subject; on d it stays above LoRA's CLIP-T, so d is left out.
    runs = {}
    for subject, lora_t, lora_i in [("a", 0.45, 0.30), ("b", 0.40, 0.20), ("c", 0.50, 0.40)]:
        runs[(subject, "lora", 1e-3)] = (lora_t, lora_i, 0.5)
        runs[(subject, "gsoft", 2e-4)] = (lora_t + 0.02, lora_i + 0.02, 0.55)
        runs[(subject, "gsoft", 6e-4)] = (lora_t - 0.02, lora_i + 0.08, 0.65)
    runs[("d", "lora", 1e-3)] = (0.30, 0.3, 0.5)
    runs[("d", "gsoft", 2e-4)], runs[("d", "gsoft", 6e-4)] = (0.50, 0.9, 1.0), (0.40, 0.9, 1.0)
    plans, scores = [], {}
    for (subject, method, rate), (clip_t, clip_i, fidelity) in runs.items():
        folder = tmp_path / method / f"{rate:g}" / subject
        plans.append(driver.RunPlan("tradeoff", method, subject, 0, rate, folder, method))
        scores[folder] = {"clip_t": clip_t, "clip_i": clip_i, "subject_fidelity": fidelity, "context_fidelity": 0.7}
    chosen = {"lora": 1e-3, "gsoft": 6e-4}
    paired = paired_at_reference(plans, scores, "lora", 1e-3)
    mean, half_width, n = paired["gsoft"]["clip_i"]
    assert n == 3 and mean == pytest.approx(0.05) and half_width == pytest.approx(0.0, abs=1e-9)
    assert paired["gsoft"]["subject_fidelity"][0] == pytest.approx(0.1)
    assert "lora" not in paired
    curves = {"lora": [(1e-3, 0.4125, 0.3)], "gsoft": [(2e-4, 0.45, 0.4), (6e-4, 0.4, 0.5)]}
    text = render_tradeoff(curves, chosen, "lora", (0.2, 0.5), "probe", oracle_columns(plans, scores), {1e-3: paired})
    assert "| method | learning rate | CLIP-I | CLIP-T | subject fidelity | context fidelity |" in text
    assert "| gsoft | **0.0006** | 0.500 | 0.400 | 0.738 | 0.700 |" in text
    assert "- gsoft vs lora 0.001: CLIP-I +0.050 ± 0.000 (higher, 3 subjects); subject fidelity +0.100" in text


# -- MiniBooth v2: world-object subjects and the attribute oracle ----------------------------------------------------


def test_v2_world_never_draws_a_subject_and_is_v1_elsewhere():
    from benchmarks.minibooth.world import WORLD_V2_FILE

    world_v2 = load_world(WORLD_V2_FILE)
    subjects, _ = load_subjects(MINIBOOTH / "subjects_v2.json", world_v2)
    assert world_v2.held_out == {(s.shape, s.color) for s in subjects} and len(world_v2.held_out) == len(subjects)
    assert replace(world_v2, held_out=frozenset()) == WORLD  # world_v2.json extends world.json and adds nothing else
    for index in range(2000):
        v1, v2 = sample_scene(scene_rng(0, index), WORLD), sample_scene(scene_rng(0, index), world_v2)
        assert (v2.shape, v2.color) not in world_v2.held_out
        if (v1.shape, v1.color) not in world_v2.held_out:
            assert v1 == v2  # the same draws: only scenes showing a subject's pair are drawn again


def test_v2_subjects_follow_their_rule_and_are_refused_by_a_world_that_draws_them():
    from benchmarks.minibooth.subjects import WorldSubject
    from benchmarks.minibooth.world import WORLD_V2_FILE

    world_v2 = load_world(WORLD_V2_FILE)
    subjects, _ = load_subjects(MINIBOOTH / "subjects_v2.json", world_v2)
    colors, patterns = sorted(WORLD.colors), WORLD.object_patterns
    for k, subject in enumerate(subjects):  # the selection rule written in the file's comment
        assert isinstance(subject, WorldSubject)
        assert (subject.shape, subject.color, subject.pattern) == (
            WORLD.shapes[k % 8],
            colors[(2 * k + 1) % 9],
            patterns[k % 3],
        )
        assert subject.sweep == (k == 8)
    with pytest.raises(ValueError, match="not held out"):
        load_subjects(MINIBOOTH / "subjects_v2.json", WORLD)


def test_v2_instance_pictures_are_world_renders_of_the_subject():
    from benchmarks.minibooth.subjects import instance_scene
    from benchmarks.minibooth.world import WORLD_V2_FILE, render_scene

    world_v2 = load_world(WORLD_V2_FILE)
    subjects, count = load_subjects(MINIBOOTH / "subjects_v2.json", world_v2)
    for subject in subjects:
        scenes = [instance_scene(subject, world_v2, 0, k) for k in range(count)]
        assert all((s.shape, s.color, s.pattern) == (subject.shape, subject.color, subject.pattern) for s in scenes)
        assert all(s.background_color != subject.color and s.size in ("medium", "large") for s in scenes)
        pictures = [np.asarray(render_instance(subject, world_v2, 0, k)) for k in range(count)]
        assert np.array_equal(pictures[0], np.asarray(render_scene(scenes[0], world_v2)))
        assert len({p.tobytes() for p in pictures}) == count


def test_the_oracle_learns_the_world_attributes_and_round_trips(tmp_path):
    from benchmarks.minibooth.oracle import accuracy, save_oracle, train_oracle
    from dreambooth_gs.demo.oracle import load_oracle, predict

    with torch.random.fork_rng(devices=[]):
        oracle, losses = train_oracle(WORLD, 1500, steps=150, batch_size=32, lr=3e-3, seed=0, width=8, log_every=0)
    assert sum(losses[-20:]) < 0.6 * sum(losses[:20])
    images, scenes = render_world(200, 7, WORLD)  # fresh renders
    readings = predict(oracle, images)
    found = accuracy(readings, [{a: getattr(s, a) for a in JUDGED_ATTRIBUTES} for s in scenes])
    chance = {a: 1 / len(v) for a, v in attribute_values(WORLD).items()}
    assert found["color"] > 3 * chance["color"] and found["background_color"] > 3 * chance["background_color"]
    save_oracle(oracle, tmp_path, 64)
    assert predict(load_oracle(tmp_path), images) == readings


def test_oracle_fidelity_scores_the_subject_look_and_the_named_context(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from benchmarks.minibooth import fidelity
    from dreambooth_gs.evaluate.plan import slug

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {token} {class} on a striped yellow background\na red {token} {class}\n")
    run = SimpleNamespace(run_id="r", token="sks", class_name="circle", prompt_set=str(prompts))
    # what the stand-in oracle reads in each picture, by folder: (colour, pattern, background colour)
    seen = {
        ("base", "a sks circle"): [("blue", "plain", "red"), ("green", "plain", "red")],
        ("prompt", "a sks circle on a striped yellow background"): [
            ("blue", "plain", "yellow"),
            ("blue", "dotted", "red"),
        ],
        ("prompt", "a red sks circle"): [("red", "plain", "white"), ("blue", "plain", "white")],
    }
    readings = {}
    for (kind, prompt), looks in seen.items():
        folder = tmp_path / "images" / "r" / f"{kind}-{slug(prompt)}"
        folder.mkdir(parents=True)
        for k, (color, pattern, background) in enumerate(looks):
            path = folder / f"{k:03d}.png"
            Image.new("RGB", (8, 8)).save(path)
            readings[str(path)] = {"color": color, "pattern": pattern, "background_color": background,
                                   "background_pattern": "striped", "shape": "circle"}  # fmt: skip
    monkeypatch.setattr(fidelity, "predict", lambda oracle, images: [readings[i.filename] for i in images])
    look = {"color": "blue", "pattern": "plain"}
    scores = fidelity.oracle_fidelity(None, run, tmp_path / "images", "a {token} {class}", None, WORLD, look)
    assert scores == {
        "subject_fidelity": 0.5,  # one of the two base-prompt pictures is blue and plain
        "subject_color": 0.5,
        "subject_pattern": 1.0,  # both are plain
        "subject_fidelity_in_context": 0.5,  # the background prompt keeps the look once; the red prompt is not counted
        "context_fidelity": 4 / 6,  # yellow + striped, red + striped, striped only, then red once in two
    }
    assert set(fidelity.oracle_fidelity(None, run, tmp_path / "images", "a {token} {class}", None, WORLD, None)) == {
        "context_fidelity"
    }


def test_report_adds_the_oracle_columns_when_every_run_has_them():
    from benchmarks.minibooth.report import MethodSummary, render_report

    base = {"a": {"clip_i": 0.2, "clip_t": 0.5, "subject_fidelity": 0.1, "context_fidelity": 0.8}}
    per_subject = {"lora": {"a": {"clip_i": 0.3, "clip_t": 0.45, "subject_fidelity": 0.6, "context_fidelity": 0.7}}}
    oracle = {"subject_fidelity": [0.6, 0.7], "context_fidelity": [0.7, 0.6]}
    summary = MethodSummary("lora", 1e-4, 10, 0.1, 100.0, [0.3, 0.4], [0.45, 0.38], oracle=oracle)
    check = {"check_pictures": 8, "check_accuracy": {"color": 1.0}}
    text = render_report([summary], base, per_subject, "lora", "header", oracle_check=check)
    assert "| CLIP-I | CLIP-T | subject fidelity | context fidelity | runs |" in text
    assert "| 0.650 ± 0.071 | 0.650 ± 0.071 | 2 |" in text and "fresh world renders: color 1.000" in text
    assert "subject fidelity +0.500 (one subject" in text
    assert "the oracle's subject fidelity / subject colour" not in text  # needs both metrics
    base["a"]["subject_color"], per_subject["lora"]["a"]["subject_color"] = 0.25, 0.75
    summary.oracle["subject_color"] = [0.75, 0.75]
    text = render_report([summary], base, per_subject, "lora", "header", oracle_check=check)
    assert "| base | 0.10 / 0.25 |" in text and "| lora | 0.60 / 0.75 |" in text
    plain = MethodSummary("lora", 1e-4, 10, 0.1, 100.0, [0.3, 0.4], [0.45, 0.38])
    assert "| CLIP-I | CLIP-T | runs |" in render_report([plain], base, per_subject, "lora", "header")  # no columns


@pytest.mark.parametrize("script", ["pretrain", "run", "tradeoff", "train_one"])
def test_every_script_prints_its_help(script):
    """--help of each MiniBooth script exits 0 and describes its flags (pretrain.py's once crashed on a "10%")."""
    import os
    import subprocess

    path = ROOT / "benchmarks" / "minibooth" / f"{script}.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    result = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--" in result.stdout.split("usage:", 1)[1]
    assert "%%" not in result.stdout  # pretrain.py's "cosine to 10%": escaped once, by dreambooth_gs.cli


# -- the scripts' command lines: dreambooth_gs.cli's builder, as for the trainer -------------------------------------

SCRIPTS = {"run": "RunOptions", "pretrain": "PretrainOptions", "tradeoff": "TradeoffOptions"}  # script: options
DOCUMENTED = re.compile(r"benchmarks/minibooth/(run|pretrain|tradeoff)\.py((?: +--\w+(?: +[\w./]+)*)*)")


def minibooth_script(name: str):
    return importlib.import_module(f"benchmarks.minibooth.{name}")


def documented_command_lines() -> list[tuple[str, str]]:
    """``(script, flags)`` of every MiniBooth command line in docs/minibooth.md and the scripts' docstrings."""
    texts = [(ROOT / "docs" / "minibooth.md").read_text(), *(minibooth_script(s).__doc__ for s in SCRIPTS)]
    found = {(m[1], m[2].strip()) for text in texts for m in DOCUMENTED.finditer(text)}
    return sorted(line for line in found if "--help" not in line[1])


def test_every_documented_command_line_still_parses(monkeypatch):
    """The flags users type (docs, docstrings, protocol.json's pretraining flags) parse as they did."""
    monkeypatch.chdir(ROOT)  # --world_file benchmarks/minibooth/world_v2.json is relative to the checkout
    lines = documented_command_lines()
    assert len(lines) >= 15 and {s for s, _ in lines} == set(SCRIPTS)
    for script, flags in lines:
        minibooth_script(script).parse_args(flags.split())
    pretrain = minibooth_script("pretrain")
    for profile in json.loads(driver.PROTOCOL_FILE.read_text())["profiles"]:
        protocol = driver.load_protocol(profile)
        pretrain.parse_args([*protocol.pretrain_args, "--world_file", str(protocol.world_file)])


PARSED = [  # (script, flags, {field: value})
    ("run", [], {"profile": "full", "smoke": False, "jobs": 1, "methods": None, "until": "all", "seeds": None}),
    ("run", ["--smoke", "--until", "sweep", "--methods", "gsoft", "lora", "--seeds", "0", "1"],
     {"smoke": True, "until": "sweep", "methods": ["gsoft", "lora"], "seeds": [0, 1]}),
    ("run", ["--num_threads", "1", "--jobs", "2", "--max_subjects", "2"],
     {"num_threads": 1, "jobs": 2, "max_subjects": 2}),
    ("pretrain", [], {"smoke": False, "family": "sd", "vae_lr": 2e-3, "config_dir": None, "num_threads": None}),
    ("pretrain", ["--smoke", "--family", "sd3", "--vae_lr", "1e-3"], {"smoke": True, "family": "sd3", "vae_lr": 1e-3}),
    ("tradeoff", [], {"methods": None, "seed": 0, "profile": "full", "from_sweep": False}),
    ("tradeoff", ["--from_sweep", "--methods", "lora", "gsoft"], {"from_sweep": True, "methods": ["lora", "gsoft"]}),
]  # fmt: skip


@pytest.mark.parametrize("script, flags, expected", PARSED, ids=[f"{c[0]} {' '.join(c[1])}" for c in PARSED])
def test_flags_parse_with_the_dataclass_defaults(script, flags, expected):
    options = minibooth_script(script).parse_args(flags)
    assert {name: getattr(options, name) for name in expected} == expected


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_field_once_with_its_default(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    module = minibooth_script(script)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    fields = [f.name for f in dataclasses.fields(getattr(module, SCRIPTS[script]))]
    assert re.findall(r"^  --(\w+)", text, flags=re.MULTILINE) == fields  # one flag per field, no dashed twins
    assert re.search(r"--jobs INT .*\(default: 1\)" if script != "pretrain" else r"\(default: 3000\)", text, re.S)
    assert "%%" not in text
    if script == "pretrain":
        assert re.search(r"then cosine to 10%\.\s+\(default: 200\)", text)  # a help text with a "%" renders


BAD = [  # (script, flags, what the one line on stderr says)
    ("run", ["--job", "2"], "unknown flag --job; did you mean --jobs?"),
    ("run", ["--num-threads", "1"], "unknown flag --num-threads; did you mean --num_threads?"),
    ("run", ["--prof", "v2"], "unknown flag --prof; did you mean --profile?"),  # no abbreviations
    ("run", ["--until", "report"], "invalid choice: 'report'"),
    ("run", ["--jobs", "two"], "invalid int value: 'two'"),
    ("run", ["--smoke", "True"], "unexpected argument 'True'"),  # a switch takes no value
    ("run", ["--seeds"], "expected at least one argument"),
    ("pretrain", ["--vae_step", "3"], "unknown flag --vae_step; did you mean --vae_steps?"),
    ("pretrain", ["--oracle_width", "12"], "--oracle_width must be a multiple of 8"),  # __post_init__
    ("pretrain", ["--family", "flux"], "--family must be one of sd, sd3, got 'flux'"),
    ("pretrain", ["--world_file", "missing.json"], "--world_file missing.json does not exist"),
    ("pretrain", ["--num_images", "0"], "--num_images must be at least 1, got 0"),
    ("tradeoff", ["--from-sweep"], "unknown flag --from-sweep; did you mean --from_sweep?"),
    ("tradeoff", ["--seed", "0.5"], "invalid int value: '0.5'"),
]


@pytest.mark.parametrize("script, flags, message", BAD, ids=[f"{c[0]} {' '.join(c[1])}" for c in BAD])
def test_bad_flags_are_one_line_without_usage(script, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        minibooth_script(script).parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{script}.py: error: ") and message in err and "usage:" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("run", ["--profile", "nope"], "run.py: error: unknown profile 'nope'"),
        ("tradeoff", ["--profile", "v2", "--work_dir", "{tmp}"], "tradeoff.py: error: {tmp}/sweep.json not found"),
    ],
)
def test_errors_at_run_time_are_one_line(script, flags, message, tmp_path, capsys):
    from dreambooth_gs.cli import run_cli

    module = minibooth_script(script)
    options = module.parse_args([flag.format(tmp=tmp_path) for flag in flags])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(module.main, options, f"{script}.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(tmp=tmp_path)) and len(err.strip().splitlines()) == 1, err
