"""benchmarks/fit_cost_model.py: the fit recovers the constant of synthetic timings made from the cost model, its
terms are choose_forward_side's, and the agreement counts go through choose_forward_side itself."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import fit_cost_model as fcm  # noqa: E402
from dreambooth_gs.gs import layers  # noqa: E402

# (in = out, double, token counts): both methods, widths and token counts on both sides of the break-even point
SHAPES = [
    (320, False, (256, 1024, 4096, 16384)),
    (640, False, (256, 2048, 8192, 65536)),
    (1280, False, (308, 4096, 16384)),
    (320, True, (308, 4096, 65536)),
]


def synthetic(constant: float, alpha: float = 2e-11, noise: float = 0.0, seed: int = 0) -> list[fcm.Timing]:
    """Timings from the timing model itself: floor = the two matmuls, a per-shape cost, alpha and beta = alpha / C."""
    rng = random.Random(seed)
    beta = alpha / constant
    timings = []
    for d, double, tokens in SHAPES:
        shared = 1e-5 * d / 320  # what both sides pay alike at this shape (the Cayley, launches)
        for n in tokens:
            probe = fcm.Timing(n, d, d, double, 0.0, 0.0, 0.0)
            act_passes, weight_passes, weight_flops = fcm.cost_terms(probe)
            floor = 4 * n * d * d * beta + 2e-6
            sides = {
                "activation": floor + shared + alpha * act_passes,
                "weight": floor + shared + alpha * weight_passes + beta * weight_flops,
            }
            jitter = {k: v * (1 + rng.uniform(-noise, noise)) for k, v in sides.items()}
            timings.append(fcm.Timing(n, d, d, double, floor, jitter["activation"], jitter["weight"]))
    return timings


@pytest.mark.parametrize("constant", [70.0, 600.0, 3000.0])
def test_fit_recovers_the_constant_of_noiseless_timings(constant):
    fit = fcm.fit_constant(synthetic(constant))
    assert fit.constant == pytest.approx(constant, rel=1e-6)
    assert fit.alpha == pytest.approx(2e-11, rel=1e-6)
    assert fit.intercepts[(640, 640, False)] == pytest.approx(2e-5, rel=1e-4)
    assert fit.rms_relative_error < 1e-9


@pytest.mark.parametrize("constant", [70.0, 600.0])
def test_fit_is_close_under_two_percent_noise(constant):
    fit = fcm.fit_constant(synthetic(constant, noise=0.02, seed=1))
    assert fit.constant == pytest.approx(constant, rel=0.25)
    assert 0 < fit.rms_relative_error < 0.03


@pytest.mark.parametrize("constant", [30.0, 70.0, 600.0, 5000.0])
def test_the_fitted_constant_picks_the_faster_side_everywhere(constant):
    timings = synthetic(constant)
    sides = {t.faster for t in timings}
    assert sides == {"activation", "weight"}  # the cases straddle the break-even point: the count can fail
    fitted = fcm.fit_constant(timings).constant
    assert fcm.agreement(timings, fitted, "cuda") == len(timings)
    assert fcm.time_lost(timings, fitted, "cuda") == 0
    wrong = constant / 30 if constant > 100 else constant * 30
    assert fcm.agreement(timings, wrong, "cuda") < len(timings)
    assert fcm.time_lost(timings, wrong, "cuda") > 0
    best, runs = fcm.best_constants(timings, "cuda")
    assert best == len(timings) and any(lo <= constant * 1.07 and constant / 1.07 <= hi for lo, hi in runs)


@pytest.mark.parametrize("constant", [20.0, 70.0, 600.0, math.inf])
@pytest.mark.parametrize(("d_in", "d_out", "double"), [(320, 320, False), (640, 1280, False), (320, 640, True)])
def test_cost_terms_are_the_ones_choose_forward_side_weighs(constant, d_in, d_out, double):
    for n in (1, 77, 1000, 4096, 50_000, 10**6):
        act_passes, weight_passes, weight_flops = fcm.cost_terms(fcm.Timing(n, d_in, d_out, double, 0, 0, 0))
        expected = "weight" if weight_passes + weight_flops / constant < act_passes else "activation"
        with fcm.flops_per_element_pass("cuda", constant):
            assert layers.choose_forward_side(n, d_in, d_out, double, True, "cuda") == expected
    assert layers.FLOPS_PER_ELEMENT_PASS["cuda"] == 600.0  # the swap is undone


def test_one_token_count_per_shape_is_refused():
    timings = [t for t in synthetic(70.0) if t.in_features != 320 or t.tokens == 256 or t.double]
    with pytest.raises(ValueError, match=r"shape \(320, 320, False\) has timings at one token count"):
        fcm.fit_constant(timings)


def test_saved_timings_refit_without_a_device_into_their_devices_section(tmp_path, monkeypatch, capsys):
    import json
    from dataclasses import asdict

    timings = synthetic(600.0)
    meta = {"device": "cuda", "machine": "a test", "rounds": 1, "repeats": 1, "load": "no load"}
    path = tmp_path / "timings.json"
    path.write_text(json.dumps({"meta": meta, "runs": {"bf16": [asdict(t) for t in timings]}}))
    docs = tmp_path / "benchmarks.md"
    docs.write_text("before\n<!-- cost_model_cuda:begin -->\nnot measured\n<!-- cost_model_cuda:end -->\nafter\n")
    monkeypatch.setattr(fcm, "DOCS", docs)
    fcm.main(["--load", str(path)])  # no --device: the file says cuda, and no GPU is needed
    out = capsys.readouterr().out
    assert "C = alpha / beta = **600**" in out
    assert f"the fitted one in {len(timings)} / {len(timings)} cases" in out
    text = docs.read_text()
    assert "not measured" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert "### The auto side's cost model on CUDA (a test)" in text and "**bf16** (autocast)" in text
