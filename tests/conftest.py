"""Shared fixtures: tiny random-weight models, adapter randomisation and dense reference builders.

Nothing here calls :mod:`dreambooth_gs.gs.functional`: the ``ref`` fixture builds permutations, orthogonal blocks and
GS matrices densely from the paper's formulas, so tests can cross-check the library's fast paths against them.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections import OrderedDict  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# Per-dtype tolerances for cross-checks of independent paths: (rtol, atol relative to the reference's max |value|).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float64: (1e-10, 1e-10)}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """``actual`` ~ ``expected`` within the tolerance of ``dtype`` (atol scaled by the size of ``expected``)."""
    rtol, atol = TOLERANCES[dtype]
    expected = expected.to(actual.dtype)
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def _shuffle_sigma(k: int, n: int) -> list[int]:
    """sigma(i) = (i mod k) * (n / k) + floor(i / k), straight from the formula, one entry at a time."""
    return [(i % k) * (n // k) + i // k for i in range(n)]


def _shuffle_matrix(k: int, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense P(k, n) with P[sigma(i), i] = 1."""
    p = torch.zeros(n, n, dtype=dtype)
    for i, s in enumerate(_shuffle_sigma(k, n)):
        p[s, i] = 1
    return p


def _gather_matrix(gather: torch.Tensor | None, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense P with P x == x[gather] (rows of the identity picked by ``gather``); identity for None."""
    eye = torch.eye(n, dtype=dtype)
    return eye if gather is None else eye[gather]


def _cayley(a: torch.Tensor) -> torch.Tensor:
    """(I + K)(I - K)^-1 with K = (A - A^T)/2, in float64 with an explicit inverse."""
    k = (a.double() - a.double().mT) / 2
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    return (eye + k) @ torch.linalg.inv(eye - k)


def _block_diag(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks.double().unbind(0))


def _gsoft_matrix(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Dense Q = P^T L P R with P = P(r, d), from the blocks (r, b, b) of L and R."""
    r, b, _ = right.shape
    p = _shuffle_matrix(r, r * b)
    return p.T @ _block_diag(left) @ p @ _block_diag(right)


def _boft_matrix(blocks: torch.Tensor, gathers: list[torch.Tensor]) -> torch.Tensor:
    """Dense Q = prod_{i=0..m-1} P_i B_i P_i^T, P_i x == x[gathers[i]], B_i = block_diag(blocks[i])."""
    n = blocks.shape[1] * blocks.shape[2]
    q = torch.eye(n, dtype=torch.float64)
    for factor, gather in zip(blocks, gathers):
        p = _gather_matrix(gather, n)
        q = q @ p @ _block_diag(factor) @ p.T
    return q


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny SD pipeline folder, built once per session into the session's temporary folder."""
    from dreambooth_gs.tiny.pipelines import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.getbasetemp() / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """Build the demo pipeline into a temporary cache (not the user's home), once per test module that asks."""
    previous = os.environ.get("DREAMBOOTH_GS_CACHE")
    os.environ["DREAMBOOTH_GS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("DREAMBOOTH_GS_CACHE")
    else:
        os.environ["DREAMBOOTH_GS_CACHE"] = previous


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """Dense reference math (float64) built from the formulas, independent of dreambooth_gs.gs.functional."""
    return SimpleNamespace(
        shuffle_sigma=_shuffle_sigma,
        shuffle_matrix=_shuffle_matrix,
        gather_matrix=_gather_matrix,
        cayley=_cayley,
        block_diag=_block_diag,
        gsoft_matrix=_gsoft_matrix,
        boft_matrix=_boft_matrix,
    )


@pytest.fixture(scope="session")
def assert_close():
    return _assert_close


def _make_unet(seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        cross_attention_dim=32,
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return unet.eval()


@pytest.fixture
def make_unet():
    """Factory for a tiny diffusers UNet2DConditionModel (random weights; same seed -> same weights)."""
    return _make_unet


@pytest.fixture
def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    timestep = torch.tensor([10])
    encoder_hidden_states = torch.randn(1, 3, 32, generator=g)
    return sample, timestep, encoder_hidden_states


def _unet_out(unet: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(*inputs).sample


@pytest.fixture(scope="session")
def unet_out():
    return _unet_out


def _make_mlp(seed: int = 0, dims: tuple[int, int, int] = (16, 32, 24), bias: bool = True) -> nn.Sequential:
    """fc1 -> GELU -> fc2 with named Linears, the plain-torch stand-in for a model."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(dims[0], dims[1], bias=bias), act=nn.GELU(), fc2=nn.Linear(dims[1], dims[2], bias=bias)
        )
    )


@pytest.fixture
def make_mlp():
    return _make_mlp


def _randomize_adapter(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Move every gsoft_ parameter away from its identity init: blocks ~ N(0, std), scales ~ 1 + N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rpartition(".")[2]
            if not leaf.startswith("gsoft_"):
                continue
            noise = torch.randn(param.shape, generator=g) * std
            param.copy_((1 + noise) if leaf == "gsoft_s" else noise)


@pytest.fixture(scope="session")
def randomize_adapter():
    return _randomize_adapter


@pytest.fixture
def default_precision():
    """A fresh accelerate state before and after the test: accelerate keeps one mixed precision per process, so a
    test that trains in bf16 needs it reset (and leaves it reset for the next one)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
