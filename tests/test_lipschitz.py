"""dreambooth_gs.lipschitz: SOC / GS-SOC are orthogonal, the shuffles match their formulas and the GS core,
LipConvnet is 1-Lipschitz, certificates follow margin > sqrt(2) L r, checkpoints round-trip, the script runs."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from dreambooth_gs.gs import functional as gsf
from dreambooth_gs.lipschitz import (
    GSSOC,
    SOC,
    ChannelShuffle,
    LipConvnet,
    MaxMinPermuted,
    certified_accuracy,
    certified_radius,
)
from dreambooth_gs.lipschitz import functional as lf
from dreambooth_gs.lipschitz import training as lt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_lipconvnet  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Orthogonal convolutions
# ---------------------------------------------------------------------------------------------------------------

NORM_CASES = [  # (id, factory, channels)
    ("soc_3x3", lambda: SOC(8, 3), 8),
    ("soc_grouped", lambda: SOC(8, 3, groups=2), 8),
    ("soc_1x1", lambda: SOC(8, 1), 8),
    ("soc_5x5", lambda: SOC(4, 5), 4),
    ("gssoc_4_1", lambda: GSSOC(8, (4, 1)), 8),
    ("gssoc_4_none", lambda: GSSOC(8, (4, None)), 8),
    ("gssoc_2_2_paired", lambda: GSSOC(16, (2, 2), paired=True), 16),
]


@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["init", "large_weights"])
@pytest.mark.parametrize("name,factory,channels", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_norm_preserved_in_eval_mode(name, factory, channels, scale):
    torch.manual_seed(0)
    module = factory().eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(scale)  # the spectral rescaling must keep the 12-term series accurate
        x = torch.randn(3, channels, 7, 5)
        ratio = module(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert torch.allclose(ratio, torch.ones(3), atol=1e-3), ratio


JACOBIAN_CASES = [
    ("soc", lambda: SOC(4, 3)),
    ("soc_grouped", lambda: SOC(4, 3, groups=2)),
    ("gssoc_2_1", lambda: GSSOC(4, (2, 1))),
    ("gssoc_2_none", lambda: GSSOC(4, (2, None))),
    ("gssoc_2_2_paired", lambda: GSSOC(4, (2, 2), paired=True)),
]


@pytest.mark.parametrize("name,factory", JACOBIAN_CASES, ids=[c[0] for c in JACOBIAN_CASES])
def test_jacobian_is_orthogonal(name, factory):
    torch.manual_seed(1)
    module = factory().double().eval()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(module, x).reshape(64, 64)
    eye = torch.eye(64, dtype=torch.float64)
    assert (jacobian.T @ jacobian - eye).abs().max() < 1e-8


@pytest.mark.parametrize("kernel_size,groups", [(1, 1), (3, 1), (3, 2), (5, 1)])
def test_conv_transpose_kernel_is_the_adjoint(kernel_size, groups):
    torch.manual_seed(2)
    kernel = torch.randn(groups, 3, 3, kernel_size, kernel_size, dtype=torch.float64)
    x = torch.randn(2, 3 * groups, 6, 5, dtype=torch.float64)
    y = torch.randn(2, 3 * groups, 6, 5, dtype=torch.float64)
    lhs = (lf.grouped_conv(x, kernel) * y).sum()
    rhs = (x * lf.grouped_conv(y, lf.conv_transpose_kernel(kernel))).sum()
    assert torch.allclose(lhs, rhs)
    skew = lf.skew_kernel(kernel)  # <L x, x> = 0 for a skew operator
    assert (lf.grouped_conv(x, skew) * x).sum().abs() < 1e-9


@pytest.mark.parametrize("groups,channels", [(1, 8), (4, 8), (2, 6)])
def test_gssoc_1x1_equals_the_gs_core_matrix(groups, channels):
    """GSSOC with 1x1 kernels is the GS matrix B2 P(g2) B1 P(g1) with B_i = exp(L_i), built by the GS core."""
    torch.manual_seed(3)
    module = GSSOC(channels, (groups, 2), kernel_size=1).double().eval()
    x = torch.randn(5, channels, 1, 1, dtype=torch.float64)
    blocks = [torch.linalg.matrix_exp(conv.kernel()[..., 0, 0]) for conv in (module.conv1, module.conv2)]
    gathers = [gsf.permutation_gather_index(gsf.shuffle_permutation(k, channels)) for k in (groups, 2)]
    expected = gsf.gs_multiply(x[:, :, 0, 0], blocks, [*gathers, None])
    assert torch.allclose(module(x)[:, :, 0, 0], expected, atol=1e-8)


def test_power_iteration_finds_the_four_matrix_norms():
    torch.manual_seed(4)
    kernel = torch.randn(2, 6, 6, 3, 3, dtype=torch.float64)
    vectors = lf.power_iteration(kernel, lf.init_power_vectors(kernel.shape, dtype=torch.float64), 200)
    norms = torch.stack([torch.linalg.matrix_norm(lf._matrix_view(kernel, m), 2) for m in range(4)])  # (4, g)
    assert torch.allclose(lf.spectral_bound(kernel, vectors), norms.amin(0), rtol=1e-6)


def test_training_refreshes_power_vectors_and_eval_does_not():
    torch.manual_seed(5)
    module = SOC(4, 3)
    before = module.power_vector_0.clone()
    module.eval()(torch.randn(1, 4, 5, 5))
    assert torch.equal(module.power_vector_0, before) and module.steps == 0
    module.train()
    with torch.no_grad():
        module.weight.add_(torch.randn_like(module.weight))
    x = torch.randn(2, 4, 5, 5)
    loss = module(x).sum() + module(x).sum()  # two forwards before one backward must not break autograd
    loss.backward()
    assert module.steps == 2 and not torch.equal(module.power_vector_0, before)


# ---------------------------------------------------------------------------------------------------------------
# Channel shuffles, space-to-depth, MaxMin
# ---------------------------------------------------------------------------------------------------------------

SHUFFLE_CASES = [(1, 8), (2, 8), (4, 8), (2, 12), (3, 12), (4, 16)]


@pytest.mark.parametrize("groups,channels", SHUFFLE_CASES)
def test_paired_shuffle_matches_its_formula(groups, channels):
    k, n = groups, channels
    sigma = [(i // 2 % k) * (n // k) + 2 * (i // (2 * k)) + i % 2 for i in range(n)]  # the formula
    assert lf.channel_shuffle_permutation(k, n, paired=True).tolist() == sigma
    x = torch.randn(2, n, 3, 3)
    assert torch.equal(ChannelShuffle(k, paired=True)(x)[:, sigma], x)  # (P x)[sigma(i)] = x[i]


@pytest.mark.parametrize("groups,channels", SHUFFLE_CASES)
def test_unpaired_shuffle_is_the_gs_core_permutation(groups, channels):
    k, n = groups, channels
    x = torch.randn(2, n, 3, 3)
    y = ChannelShuffle(k)(x)
    sigma = gsf.shuffle_permutation(k, n)
    assert torch.equal(lf.channel_shuffle_permutation(k, n), sigma)
    assert torch.equal(y[:, sigma], x)
    assert torch.equal(y, gsf.apply_shuffle(x.movedim(1, -1), k).movedim(-1, 1))  # the core's P(k, n) x
    shufflenet_k = x.view(2, k, n // k, 3, 3).transpose(1, 2).reshape(2, n, 3, 3)  # ShuffleNet with k groups
    assert torch.equal(ChannelShuffle(k)(shufflenet_k), x)  # ... is P(k, n)^T


@pytest.mark.parametrize("groups,channels,paired", [(3, 8, False), (4, 12, True), (2, 6, True)])
def test_shuffle_rejects_groups_that_do_not_divide(groups, channels, paired):
    with pytest.raises(ValueError, match="divid"):
        ChannelShuffle(groups, paired)(torch.randn(1, channels, 2, 2))


def test_space_to_depth_and_maxmin_permute_entries():
    x = torch.randn(2, 3, 4, 6)
    y = lf.space_to_depth(x, 2)
    assert y.shape == (2, 12, 2, 3) and torch.equal(y.flatten().sort().values, x.flatten().sort().values)
    with pytest.raises(ValueError, match="divisible"):
        lf.space_to_depth(torch.randn(1, 1, 3, 4), 2)
    pairs = torch.tensor([3.0, 1.0, -2.0, 5.0, 0.0, 0.0]).view(1, 6, 1, 1)
    assert MaxMinPermuted()(pairs).flatten().tolist() == [3.0, 1.0, 5.0, -2.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="even"):
        MaxMinPermuted()(torch.randn(1, 3, 2, 2))


# ---------------------------------------------------------------------------------------------------------------
# LipConvnet
# ---------------------------------------------------------------------------------------------------------------

NET_CASES = [("soc", None, False), ("gs_soc", (4, None), False), ("gs_soc", (4, 1), False), ("gs_soc", (2, 2), True)]


@pytest.mark.parametrize("conv,groups,paired", NET_CASES, ids=["soc", "gs_4_none", "gs_4_1", "gs_2_2_paired"])
def test_lipconvnet_is_1_lipschitz(conv, groups, paired):
    torch.manual_seed(6)
    net = LipConvnet(5, 10, conv, groups, init_channels=8, paired=paired, soc_options={"init_power_iters": 5})
    net.eval()  # the Lipschitz bound holds whatever the power iteration's accuracy: skip most of it
    x = torch.randn(12, 3, 32, 32)
    y = torch.cat([torch.randn(6, 3, 32, 32), x[6:] + 1e-2 * torch.randn(6, 3, 32, 32)])  # far and close pairs
    with torch.no_grad():
        ratio = (net(x) - net(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max() <= 1 + 1e-4, ratio
    jacobian = torch.autograd.functional.jacobian(net, x[:1]).reshape(10, -1)  # local Lipschitz constant
    assert torch.linalg.matrix_norm(jacobian, 2) <= 1 + 1e-4


PAPER_PARAMETERS = [  # (conv, groups, our exact count, paper's millions): GS paper, LipConvnet-15 on CIFAR-100
    ("soc", None, 24_066_020, 24.1),
    ("gs_soc", (4, None), 6_805_988, 6.81),
    ("gs_soc", (4, 1), 8_901_092, 8.91),
]


@pytest.mark.parametrize("conv,groups,count,paper", PAPER_PARAMETERS, ids=["soc", "gs_4_none", "gs_4_1"])
def test_lipconvnet15_parameter_counts_match_the_paper(conv, groups, count, paper):
    with torch.device("meta"):
        net = LipConvnet(15, 100, conv, groups)
    ours = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert ours == count and abs(ours / 1e6 - paper) / paper < 0.005


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"depth": 7}, "multiple of 5"),
        ({"input_size": 48}, "divisible by 32"),
        ({"conv": "bcop"}, "not one of"),
        ({"conv": "soc", "groups": (4, 1)}, "only apply"),
        ({"conv": "gs_soc", "groups": (3, 1)}, "not divisible by 3"),
        ({"conv": "gs_soc", "groups": (4,)}, "g1, g2"),
    ],
)
def test_lipconvnet_rejects_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        LipConvnet(**kwargs)


CERTIFICATE_CASES = [  # (logits, labels, radius, lipschitz, (accuracy, certified accuracy))
    ([[1.0, 0.0], [0.0, 0.3]], [0, 1], 0.5, 1.0, (1.0, 0.5)),  # margins 1.0 and 0.3 vs sqrt(2) * 0.5 = 0.707
    ([[0.0, 5.0]], [0], 0.1, 1.0, (0.0, 0.0)),  # a wrong prediction is never certified
    ([[1.0, 0.0]], [0], 0.5, 2.0, (1.0, 0.0)),  # L = 2 doubles the margin needed: 1.414
    ([[0.25, 0.0, -1.0], [0.0, 0.15, 0.1]], [0, 1], 36 / 255, 1.0, (1.0, 0.5)),  # sqrt(2) * 36/255 = 0.1997
]


@pytest.mark.parametrize("logits,labels,radius,lipschitz,expected", CERTIFICATE_CASES)
def test_certified_accuracy_on_hand_made_logits(logits, labels, radius, lipschitz, expected):
    result = certified_accuracy(torch.tensor(logits), torch.tensor(labels), radius, lipschitz)
    assert result == pytest.approx(expected)


def test_certified_radius_is_margin_over_sqrt2_lipschitz():
    radius = certified_radius(torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 4.0]]), lipschitz=2.0)
    assert radius.tolist() == pytest.approx([2 / (2 * math.sqrt(2)), 4 / (2 * math.sqrt(2))])


# ---------------------------------------------------------------------------------------------------------------
# Training script and checkpoints
# ---------------------------------------------------------------------------------------------------------------

SMOKE_ARGS = ["--synthetic", "--synthetic_samples", "8", "--max_steps", "2", "--depth", "5", "--init_channels", "8"]
SMOKE_ARGS += ["--batch_size", "4", "--num_classes", "10", "--no_progress"]


def test_two_step_smoke_training_and_checkpoint_round_trip(tmp_path):
    args = train_lipconvnet.parse_args([*SMOKE_ARGS, "--output_dir", str(tmp_path)])
    metrics = train_lipconvnet.main(args)
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_train_loss"])
    checkpoint = tmp_path / "lipconvnet.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        names = list(handle.keys())
    assert all(name.rsplit(".", 1)[-1] in ("weight", "bias") or ".power_vector_" in name for name in names)
    model = lt.load_checkpoint(checkpoint)
    assert model.config["conv"] == "gs_soc" and model.config["groups"] == [4, 1]
    held_out = lt.synthetic_dataset(8, 10, 32, seed=args.seed + 1)
    again = lt.evaluate(model, DataLoader(held_out, 4), torch.device("cpu"), lt.pixel_lipschitz())
    assert again["accuracy"] == metrics["eval"]["accuracy"]
    assert again["loss"] == pytest.approx(metrics["eval"]["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--train_dir", "/definitely/missing"], "does not exist"),
        (["--synthetic", "--groups", "3,1", "--max_steps", "1"], "not divisible by 3"),
    ],
)
def test_script_reports_bad_input_in_one_line(argv, message, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["train_lipconvnet.py", *argv, "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "train_lipconvnet.py"), run_name="__main__")
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_script_argument_errors():
    for argv in ([], ["--synthetic", "--cifar100_root", "x"], ["--synthetic", "--conv", "soc", "--groups", "4,1"]):
        with pytest.raises(SystemExit):
            train_lipconvnet.parse_args(argv)
    assert train_lipconvnet.parse_args(["--synthetic", "--groups", "4,-"]).groups == (4, None)
