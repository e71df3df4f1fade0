"""LipConvnet-n (Singla & Feizi, ICML 2021): a 1-Lipschitz CNN of orthogonal convolutions, with SOC or GS-SOC.

Five blocks of ``n / 5`` layers; the last layer of each block downsamples by the invertible 2x2 space-to-depth
reshaping and doubles the channels (``init_channels`` = 32 after the first block's first layer, 1024 at the end for
LipConvnet-n on 32x32 inputs). The head is a 1-Lipschitz linear layer (an orthogonal 1x1 SOC on the flattened
features, truncated to the classes). Every piece is orthogonal, an isometric embedding (zero channel padding), a
coordinate projection (channel truncation) or MaxMin, so the network is 1-Lipschitz end to end.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as lf
from .layers import GSSOC, SOC, MaxMinPermuted

CONV_TYPES = ("soc", "gs_soc")
DEFAULT_GS_GROUPS = (4, 1)
DOWNSAMPLINGS = 5  # one 2x2 space-to-depth per block


def _uniform_bias(channels: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(channels)
    return nn.Parameter(torch.empty(channels).uniform_(-bound, bound))


class LipConvLayer(nn.Module):
    """One 1-Lipschitz layer: [space-to-depth] -> zero-pad channels to ``width`` -> orthogonal conv -> keep the first
    ``out_channels`` -> [GS 1x1 stage] -> bias -> MaxMinPermuted.

    ``width = max(out_channels, in_channels * stride^2)``. For ``conv="gs_soc"`` with ``groups=(g1, g2)`` the
    orthogonal conv is ``GSSOC(width, (g1, None))`` and the 1x1 stage ``GSSOC(out_channels, (g2, None), 1)``, so a
    layer that keeps its width is exactly ``GSSOC(width, (g1, g2))``; where channels are truncated (strided layers)
    the 1x1 stage runs on the kept ``out_channels`` only, as in the GS authors' code.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        kernel_size: int,
        conv: str,
        groups: tuple[int, int | None] | None,
        paired: bool = False,
        soc_options: dict | None = None,
    ) -> None:
        super().__init__()
        soc_options = soc_options or {}
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.width = max(out_channels, in_channels * stride * stride)
        if conv == "soc":
            self.conv = SOC(self.width, kernel_size, **soc_options)
            self.mix = None
        else:
            first, second = groups
            self.conv = GSSOC(self.width, (first, None), kernel_size, paired, **soc_options)
            self.mix = GSSOC(out_channels, (second, None), 1, paired, **soc_options) if second is not None else None
        self.bias = _uniform_bias(out_channels)
        self.activation = MaxMinPermuted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = lf.space_to_depth(x, self.stride)  # (B, C*s*s, H/s, W/s)
        x = self.conv(lf.pad_channels(x, self.width))[:, : self.out_channels]  # (B, out, H', W')
        if self.mix is not None:
            x = self.mix(x)
        return self.activation(x + self.bias.view(1, -1, 1, 1))


class LipLinear(nn.Module):
    """1-Lipschitz linear head: flatten, zero-pad, orthogonal 1x1 SOC, keep the first ``out_features``, bias."""

    def __init__(self, in_features: int, out_features: int, soc_options: dict | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.width = max(in_features, out_features)
        self.conv = SOC(self.width, 1, **(soc_options or {}))
        self.bias = _uniform_bias(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = lf.pad_channels(x.flatten(1)[:, :, None, None], self.width)  # (B, width, 1, 1)
        return self.conv(x)[:, : self.out_features, 0, 0] + self.bias  # (B, out_features)


def _layer_error(conv: str, groups, paired: bool, width: int, out_channels: int, index: int) -> str | None:
    """Why ``groups`` do not fit layer ``index`` (its conv width and kept channels), or None."""
    if conv != "gs_soc":
        return None
    first, second = groups
    unit = 2 if paired else 1
    for g, channels, what in ((first, width, "conv width"), (second, out_channels, "output channels")):
        if g is not None and channels % (g * unit):
            return (
                f"groups={groups}{' (paired)' if paired else ''} do not fit layer {index}: {what} {channels} is not "
                f"divisible by {g * unit}; choose groups that divide every layer's channel count (powers of 2)"
            )
    return None


class LipConvnet(nn.Module):
    """LipConvnet-``depth`` with ``conv="soc"`` (SOC baseline) or ``"gs_soc"`` (GS-SOC with ``groups=(g1, g2)``;
    ``g2=None`` is the single-layer ``(g1, -)`` variant). 1-Lipschitz from input to logits.

    ``paired`` selects the paired channel shuffle for GS-SOC; ``soc_options`` go to every SOC (``train_terms``,
    ``eval_terms``, ...). ``config`` holds the constructor arguments (saved with checkpoints).
    """

    def __init__(
        self,
        depth: int = 15,
        num_classes: int = 100,
        conv: str = "soc",
        groups: tuple[int, int | None] | None = None,
        init_channels: int = 32,
        input_size: int = 32,
        in_channels: int = 3,
        paired: bool = False,
        soc_options: dict | None = None,
    ) -> None:
        super().__init__()
        if conv not in CONV_TYPES:
            raise ValueError(f"conv={conv!r} is not one of {CONV_TYPES}")
        if depth <= 0 or depth % DOWNSAMPLINGS:
            raise ValueError(f"LipConvnet depth must be a positive multiple of 5 (5 blocks), got {depth}")
        if input_size % 2**DOWNSAMPLINGS:
            raise ValueError(f"input_size must be divisible by 32 (five 2x2 downsamplings), got {input_size}")
        if conv == "soc" and groups is not None:
            raise ValueError(f"groups={groups} only apply to conv='gs_soc'; SOC is dense (leave groups unset)")
        if conv == "gs_soc":
            groups = DEFAULT_GS_GROUPS if groups is None else tuple(groups)
            if len(groups) != 2 or not isinstance(groups[0], int) or not isinstance(groups[1], (int, type(None))):
                raise ValueError(f"groups must be (g1, g2) or (g1, None) with integers, got {groups!r}")
        self.config = {
            "depth": depth,
            "num_classes": num_classes,
            "conv": conv,
            "groups": list(groups) if groups is not None else None,
            "init_channels": init_channels,
            "input_size": input_size,
            "in_channels": in_channels,
            "paired": paired,
            "soc_options": dict(soc_options or {}),
        }
        layers_per_block = depth // DOWNSAMPLINGS
        layers = []
        channels = in_channels
        for block in range(DOWNSAMPLINGS):
            planes = init_channels if block == 0 else channels
            for position in range(layers_per_block):
                last = position == layers_per_block - 1
                stride = 2 if last else 1
                kernel_size = 1 if last and block == DOWNSAMPLINGS - 1 else 3
                out_channels = planes * stride
                width = max(out_channels, channels * stride * stride)
                error = _layer_error(conv, groups, paired, width, out_channels, len(layers))
                if error:
                    raise ValueError(error)
                layers.append(
                    LipConvLayer(channels, out_channels, stride, kernel_size, conv, groups, paired, soc_options)
                )
                channels = out_channels
        self.layers = nn.Sequential(*layers)
        side = input_size // 2**DOWNSAMPLINGS
        self.head = LipLinear(channels * side * side, num_classes, soc_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))
