"""torch.compile of the GS layers: no graph breaks (train mode, both forward sides) and compiled == eager, outputs and
gradients, to float tolerance. Compiling takes seconds, so the compiled cases are few and small."""

import pytest
import torch
from torch import nn

from dreambooth_gs import GSOFTConfig, GSOFTLinear


def _inductor_unavailable() -> str | None:
    """Why inductor cannot compile on this platform, or None (a tiny function compiled and run once)."""
    try:
        torch._dynamo.reset()
        torch.compile(lambda t: t * 2 + 1)(torch.ones(2))
    except Exception as error:  # noqa: BLE001 - any failure means: no compiler here
        return f"torch.compile (inductor) is unavailable here: {type(error).__name__}: {str(error)[:200]}"
    return None


UNAVAILABLE = _inductor_unavailable() if hasattr(torch, "compile") else "this torch has no torch.compile"
needs_compile = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


def gs_layer(method: str, forward_mode: str, d_in: int = 32, d_out: int = 24, seed: int = 0) -> GSOFTLinear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    factors = {"n_butterfly_factor": 2} if method == "boft" else {}
    layer = GSOFTLinear(base, GSOFTConfig(method=method, nblocks=4, forward_mode=forward_mode, **factors))
    with torch.no_grad():  # away from the identity, scale included, so every gradient is non-trivial
        for param in layer.adapter_parameters():
            param.add_(0.1 * torch.randn_like(param))
    return layer.train()


@needs_compile
@pytest.mark.parametrize("method", ["gsoft", "double_gsoft", "boft"])
@pytest.mark.parametrize("forward_mode", ["activation", "weight"])
def test_no_graph_breaks_in_forward_and_backward(method, forward_mode):
    """Dynamo traces a custom autograd Function's backward when it meets ``apply``: a ``Tensor.item()`` or a
    ``torch.autograd.grad`` in either shows as a break here."""
    layer = gs_layer(method, forward_mode)
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda v: layer(v).square().sum())(x)
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


@needs_compile
def test_compiled_forward_and_backward_equal_eager():
    """GSOFT (activation side, then weight side) feeding Double GSOFT (activation side), compiled once together; a
    second input of the same shape must not recompile."""
    model = nn.Sequential(
        gs_layer("gsoft", "activation", 32, 32, seed=1),
        gs_layer("gsoft", "weight", 32, 32, seed=2),
        gs_layer("double_gsoft", "activation", 32, 24, seed=3),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    upstream = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(4))

    def run(forward, x):
        x = x.clone().requires_grad_()
        for p in params:
            p.grad = None
        y = forward(x)
        y.backward(upstream)
        return y.detach(), [x.grad, *(p.grad.clone() for p in params)]

    torch._dynamo.reset()
    compiled = torch.compile(model)
    for seed in (5, 6):
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed))
        with torch._dynamo.config.patch(error_on_recompile=seed == 6):
            y_compiled, grads_compiled = run(compiled, x)
        y_eager, grads_eager = run(model, x)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads_compiled, grads_eager):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
