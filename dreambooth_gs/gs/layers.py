"""GSOFTLinear: a frozen nn.Linear (``base_layer``) with a GSOFT, Double GSOFT or BOFT orthogonal adapter.

    gsoft:         y = s * (W Q x) + bias            merged W' = diag(s) W Q
    double_gsoft:  y = s * (Q_out W Q_in x) + bias   merged W' = diag(s) Q_out W Q_in
    boft:          y = s * (W Q x) + bias            Q = prod_i P_i B_i P_i^T (BOFT's butterfly)

Trainable parameters carry the ``gsoft_`` prefix (``gsoft_L``, ``gsoft_R`` of shape ``(r, b, b)``; Double GSOFT's
``gsoft_in_*`` / ``gsoft_out_*``; BOFT's ``gsoft_butterfly`` ``(m, r, b, b)``; ``gsoft_s`` ``(out,)``) and are
float32 whatever the base dtype. Every path (activation-side forward, weight-side forward, merge, unmerge) goes
through :mod:`dreambooth_gs.gs.functional`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as gsf
from .config import GSOFTConfig, divisors, is_target

ADAPTER_PREFIX = "gsoft_"

# How many matmul FLOPs cost as much as streaming one activation element through memory once, by device type.
# CPU: fitted to forward + backward timings of both sides at the SD UNet's attention shapes (1 and 2 threads; 100,
# from ~190 GFLOP/s matmul over ~1.7 G element-passes/s, chose the slower side at 1024 x 320). GPUs favour matmuls;
# CUDA's 600 is a guess, not yet measured: benchmarks/fit_cost_model.py --device cuda fits it (benchmarks/gpu_check.sh).
FLOPS_PER_ELEMENT_PASS = {"cpu": 70.0, "cuda": 600.0}
# Memory passes over the activations that one rotation costs: forward + backward (inputs, blocks, gradients).
ROTATION_PASSES = {True: 13, False: 4}  # keyed by "adapter gradients needed"


def dimension_error(config: GSOFTConfig, module_name: str, in_features: int, out_features: int) -> str | None:
    """Why ``config`` cannot adapt a Linear of these sizes (a message naming the module), or None if it can."""
    dims = {"in_features": in_features}
    if config.method == "double_gsoft":
        dims["out_features"] = out_features
    for dim_name, dim in dims.items():
        if config.blocks_for(dim) is None:
            what = f"nblocks={config.nblocks}" if config.nblocks is not None else f"block_size={config.block_size}"
            return (
                f"{what} does not divide {dim_name}={dim} of {module_name}; valid "
                f"{'block counts' if config.nblocks is not None else 'block sizes'}: "
                f"{', '.join(map(str, divisors(dim)))}"
            )
    if config.method == "boft" and config.n_butterfly_factor > 1:
        r = config.blocks_for(in_features)
        b = in_features // r
        m = config.n_butterfly_factor
        if r % 2 ** (m - 1) or b % 2:
            return (
                f"BOFT with {m} butterfly factors needs an even block size and a block count divisible by "
                f"{2 ** (m - 1)}; {module_name} (in_features={in_features}) gets {r} blocks of size {b}"
            )
    return None


def choose_forward_side(
    n_tokens: int, in_features: int, out_features: int, double: bool, needs_grad: bool, device_type: str
) -> str:
    """'activation' or 'weight': the cheaper place to apply the rotation for these shapes.

    Activation side: a few memory-bound passes over the ``n_tokens`` rows (both dimensions for Double GSOFT).
    Weight side: the same passes over the weight's rows, plus, when adapter gradients are needed, the full weight
    gradient ``grad_y^T x`` (one extra matmul the frozen base layer never pays).
    """
    passes = ROTATION_PASSES[needs_grad]
    rotated = in_features + (out_features if double else 0)
    activation_cost = passes * n_tokens * rotated
    weight_cost = passes * out_features * in_features * (2 if double else 1)
    if needs_grad:
        weight_cost += 2 * n_tokens * in_features * out_features / FLOPS_PER_ELEMENT_PASS.get(device_type, 600.0)
    return "weight" if weight_cost < activation_cost else "activation"


def rotate_rows(
    rows: torch.Tensor,
    method: str,
    blocks: dict[str, torch.Tensor],
    gathers: list[torch.Tensor | None] | None,
    side: str = "in",
    transpose: bool = False,
) -> torch.Tensor:
    """``rows @ Q_side`` (``transpose``: ``rows @ Q_side^T``) for ``rows`` ``(n, d)``, in ``rows``' dtype; ``blocks``
    are a method's orthogonal blocks by parameter name (``gsoft_L`` / ``gsoft_R``, Double GSOFT's ``gsoft_in_*`` /
    ``gsoft_out_*``, BOFT's ``gsoft_butterfly`` with its ``gathers``)."""
    if method == "boft":
        apply = gsf.boft_apply_transposed if transpose else gsf.boft_apply
        return apply(rows, blocks["gsoft_butterfly"].to(rows.dtype), gathers)
    prefix = "gsoft_" if method == "gsoft" else f"gsoft_{side}_"
    left, right = blocks[prefix + "L"].to(rows.dtype), blocks[prefix + "R"].to(rows.dtype)
    return gsf.gs_apply(rows, left, right, transpose=transpose)


def transform_weight(
    weight: torch.Tensor,
    method: str,
    blocks: dict[str, torch.Tensor],
    gathers: list[torch.Tensor | None] | None,
    scale: torch.Tensor | None,
    inverse: bool = False,
) -> torch.Tensor:
    """``diag(d) Q_out W Q_in`` (``inverse``: ``Q_out^T diag(1/d) W Q_in^T``) in float32 for ``W`` ``(out, in)``
    (``Q_out = I`` but for Double GSOFT): the merged weight of one adapter, shared by this module's layer and the
    PEFT layer of :mod:`dreambooth_gs.methods.peft_gs`."""
    w = weight.float()
    if inverse and scale is not None:
        w = w / scale.float()[:, None]
    w = rotate_rows(w, method, blocks, gathers, "in", transpose=not inverse)  # rows: W Q_in (or W Q_in^T)
    if method == "double_gsoft":
        w = rotate_rows(w.T, method, blocks, gathers, "out", transpose=inverse).T  # columns: Q_out W (or Q_out^T W)
    if not inverse and scale is not None:
        w = w * scale.float()[:, None]
    return w


def _fold_double_gsoft(weight, in_left, in_right, out_left, out_right) -> torch.Tensor:
    """Double GSOFT's ``Q_out W Q_in`` from its four block tensors: the rows of ``W`` by ``Q_in^T``, then its
    columns by ``Q_out``."""
    return gsf.gs_rotate_weight_columns(gsf.gs_rotate_weight(weight, in_left, in_right), out_left, out_right)


class GSOFTLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` with a GS orthogonal adapter; identity at initialisation."""

    def __init__(self, base_layer: nn.Linear, config: GSOFTConfig, name: str = "linear") -> None:
        super().__init__()
        error = dimension_error(config, name, base_layer.in_features, base_layer.out_features)
        if error:
            raise ValueError(error)
        self.base_layer = base_layer
        self.config_dict = config.adapter_dict()  # what save_adapter writes; all layers of one injection share it
        self.method = config.method
        self.parametrization = config.parametrization
        weight_side = config.forward_mode == "auto" and is_target(name, config.weight_side_modules)
        self.forward_mode = "weight" if weight_side else config.forward_mode
        self.merged = False
        self.adapter_enabled = True
        # Gradient accumulation (see set_block_reuse): this optimizer step's blocks with their graph to the
        # parameters, and the detached copies every micro-step uses (their gradients accumulate there)
        self.reuse_blocks = False
        self._step_blocks: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        d_in, d_out = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=torch.float32, device=device))

        self.nblocks_in = config.blocks_for(d_in)
        self.nblocks_out = config.blocks_for(d_out) if config.method == "double_gsoft" else None
        r, b = self.nblocks_in, d_in // self.nblocks_in
        if config.method == "gsoft":
            self.gsoft_L, self.gsoft_R = zeros(r, b, b), zeros(r, b, b)
        elif config.method == "double_gsoft":
            r_out, b_out = self.nblocks_out, d_out // self.nblocks_out
            self.gsoft_in_L, self.gsoft_in_R = zeros(r, b, b), zeros(r, b, b)
            self.gsoft_out_L, self.gsoft_out_R = zeros(r_out, b_out, b_out), zeros(r_out, b_out, b_out)
        else:
            m = config.n_butterfly_factor
            self.gsoft_butterfly = zeros(m, r, b, b)
            perms = [gsf.butterfly_permutation(d_in, r, b, i) for i in range(m)]
            self._gather_slots = []  # derived, never saved: non-persistent buffers (or None for identity)
            for i, gather in enumerate(gsf.boft_gathers(perms)):
                self._gather_slots.append(gather is not None)
                if gather is not None:
                    self.register_buffer(f"boft_gather_{i}", gather.to(device), persistent=False)
        self.gsoft_s = nn.Parameter(torch.ones(d_out, dtype=torch.float32, device=device)) if config.scale else None

    # -- the transform ----------------------------------------------------------------------------------------

    def _boft_gathers(self) -> list[torch.Tensor | None]:
        return [getattr(self, f"boft_gather_{i}") if kept else None for i, kept in enumerate(self._gather_slots)]

    def orthogonal_factors(self, strength: float = 1.0) -> dict[str, torch.Tensor]:
        """The orthogonal blocks of every factor (float32), in as few batched solves as the shapes allow; at
        ``strength`` ``s`` each block is ``Cayley(s K)`` of its generator (``gsf.orthogonal_blocks_at_strength``).

        With :attr:`reuse_blocks` on (the trainer's gradient accumulation), a forward with gradients returns the
        same blocks until :meth:`flush_reused_blocks`: computed once, as detached copies that collect every
        micro-step's gradient, pushed through the Cayley map into the parameters once per optimizer step."""
        if self.reuse_blocks and strength == 1 and torch.is_grad_enabled():
            if self._step_blocks is None:
                computed = self._compute_orthogonal_factors(1.0)
                copies = {
                    name: blocks.detach().requires_grad_(blocks.requires_grad) for name, blocks in computed.items()
                }
                self._step_blocks = (computed, copies)
            return self._step_blocks[1]
        return self._compute_orthogonal_factors(strength)

    def flush_reused_blocks(self) -> None:
        """Backpropagate the block gradients the micro-steps accumulated (see :meth:`orthogonal_factors`) through
        the Cayley map into the parameters, once; the next forward computes the blocks afresh. A no-op when
        nothing was reused."""
        if self._step_blocks is None:
            return
        computed, copies = self._step_blocks
        self._step_blocks = None
        pairs = [(computed[name], copy.grad) for name, copy in copies.items() if copy.grad is not None]
        if pairs:
            torch.autograd.backward([blocks for blocks, _ in pairs], [grad for _, grad in pairs])

    def _compute_orthogonal_factors(self, strength: float) -> dict[str, torch.Tensor]:
        names = [n for n, _ in self.named_parameters(recurse=False) if n != "gsoft_s"]
        params = [getattr(self, n) for n in names]
        flat = [p.reshape(-1, *p.shape[-2:]) for p in params]  # (blocks, b, b) each
        out: dict[str, torch.Tensor] = {}
        by_size: dict[int, list[int]] = {}
        for i, p in enumerate(flat):
            by_size.setdefault(p.shape[-1], []).append(i)
        for indices in by_size.values():
            stacked = torch.cat([flat[i] for i in indices])  # (blocks of this size, b, b)
            blocks = gsf.orthogonal_blocks_at_strength(stacked, strength, self.parametrization)
            for i, chunk in zip(indices, blocks.split([flat[i].shape[0] for i in indices])):
                out[names[i]] = chunk.view(params[i].shape)
        return out

    def _gs_blocks(
        self, factors: dict[str, torch.Tensor], side: str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(L, R)`` blocks of GSOFT's ``Q`` (Double GSOFT: of ``Q_side``, ``side`` 'in' or 'out') in ``dtype``."""
        prefix = "gsoft_" if self.method == "gsoft" else f"gsoft_{side}_"
        return factors[prefix + "L"].to(dtype), factors[prefix + "R"].to(dtype)

    def _transform_weight(
        self,
        weight: torch.Tensor,
        inverse: bool = False,
        factors: dict[str, torch.Tensor] | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """``diag(s) Q_out W Q_in`` (or its inverse) computed in float32 (``factors``: the orthogonal blocks, if
        already computed); ``strength``: the adapter at that strength (blocks and scale vector alike)."""
        factors = self.orthogonal_factors(strength) if factors is None else factors
        scale = None if self.gsoft_s is None else gsf.scale_at_strength(self.gsoft_s, strength)
        gathers = self._boft_gathers() if self.method == "boft" else None
        return transform_weight(weight, self.method, factors, gathers, scale, inverse)

    def merged_weight(self, strength: float = 1.0) -> torch.Tensor:
        """The weight with the adapter folded in, in the base weight's dtype; at ``strength`` ``s`` each block is
        ``Cayley(s K)`` and the scale vector ``1 + s (d - 1)`` (``s = 0``: the base weight, ``s = 1``: the adapter)."""
        weight = self._transform_weight(self.base_layer.weight, strength=strength)
        return weight.to(self.base_layer.weight.dtype)

    # -- forward ----------------------------------------------------------------------------------------------

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter_parameters())

    def forward_side(self, x: torch.Tensor, needs_grad: bool | None = None) -> str:
        """Where this call applies the rotation ('activation' or 'weight'); see :func:`choose_forward_side`."""
        if self.forward_mode != "auto":
            return self.forward_mode
        needs_grad = self._needs_grad() if needs_grad is None else needs_grad
        n_tokens = x.numel() // max(x.shape[-1], 1)
        return choose_forward_side(
            n_tokens,
            self.base_layer.in_features,
            self.base_layer.out_features,
            self.method == "double_gsoft",
            needs_grad,
            x.device.type,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        needs_grad = self._needs_grad()
        if self.forward_side(x, needs_grad) == "weight":
            if needs_grad:  # W' recomputed in backward from the blocks: only x is kept, as for the frozen layer
                factors = self.orthogonal_factors()  # once: backward reuses them
                blocks = [*factors.values(), *([self.gsoft_s] if self.gsoft_s is not None else [])]
                return gsf.recomputed_weight_linear(
                    x, bias, lambda: self._transform_weight(weight, factors=factors), blocks
                )
            return F.linear(x, self._transform_weight(weight).to(x.dtype), bias)
        factors = self.orthogonal_factors()
        scale = None if self.gsoft_s is None else self.gsoft_s.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        if self.method == "gsoft":  # s * (W Q x) + bias in one node that keeps x (and y for the scale's gradient)
            return gsf.gs_linear(x, *self._gs_blocks(factors, "in", x.dtype), weight, scale, bias)
        if self.method == "boft":
            gathers = self._boft_gathers()
            plan = gsf.RotationPlan(
                lambda v, blocks: gsf.boft_apply(v, blocks, gathers),
                n_in=1,
                fold_weight=lambda w, blocks: gsf.boft_apply_transposed(w, blocks, gathers),  # W Q: rows by Q^T
            )
            blocks = [factors["gsoft_butterfly"].to(x.dtype)]
        else:  # Double GSOFT: Q_out W Q_in
            plan = gsf.RotationPlan(
                gsf.gs_apply,
                2,
                rotate_out=gsf.gs_apply,
                backward_out=gsf.gs_rotation_backward_from_output,
                backward_in=gsf.gs_rotation_backward,
                fold_weight=_fold_double_gsoft,
            )
            blocks = [*self._gs_blocks(factors, "in", x.dtype), *self._gs_blocks(factors, "out", x.dtype)]
        return gsf.rotated_linear(x, weight, plan, blocks, scale, bias)

    # -- merge / unmerge / enable -----------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight`` (forward then costs what the base layer costs)."""
        if self.merged:
            return
        self.base_layer.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly up to rounding: ``W = Q_out^T diag(1/s) W' Q_in^T`` (Q is orthogonal)."""
        if not self.merged:
            return
        if self.gsoft_s is not None and bool((self.gsoft_s == 0).any()):
            raise ValueError(
                "cannot unmerge: the scale vector gsoft_s has zero entries, so the merge is not invertible"
            )
        base = self._transform_weight(self.base_layer.weight, inverse=True)
        self.base_layer.weight.copy_(base.to(self.base_layer.weight.dtype))
        self.merged = False

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters(recurse=False) if n.startswith(ADAPTER_PREFIX)]

    def extra_repr(self) -> str:
        d_in, d_out = self.base_layer.in_features, self.base_layer.out_features
        parts = [f"method={self.method}", f"in_features={d_in}", f"out_features={d_out}"]
        parts.append(f"nblocks={self.nblocks_in}, block_size={d_in // self.nblocks_in}")
        if self.method == "double_gsoft":
            parts.append(f"nblocks_out={self.nblocks_out}, block_size_out={d_out // self.nblocks_out}")
        if self.method == "boft":
            parts.append(f"n_butterfly_factor={self.gsoft_butterfly.shape[0]}")
        parts.append(f"scale={self.gsoft_s is not None}, merged={self.merged}")
        return ", ".join(parts)


def set_block_reuse(models: Iterable[nn.Module], enabled: bool) -> None:
    """Turn :attr:`GSOFTLinear.reuse_blocks` on or off in every GS layer of ``models``: on, each optimizer step
    computes the orthogonal blocks once for all its micro-steps, and :func:`flush_reused_blocks` must run before
    each optimizer step."""
    for model in models:
        for module in model.modules():
            if isinstance(module, GSOFTLinear):
                module.reuse_blocks = enabled
                module._step_blocks = None


def flush_reused_blocks(models: Iterable[nn.Module]) -> None:
    """:meth:`GSOFTLinear.flush_reused_blocks` on every GS layer of ``models``: the parameters get this optimizer
    step's gradients."""
    for model in models:
        for module in model.modules():
            if isinstance(module, GSOFTLinear):
                module.flush_reused_blocks()
