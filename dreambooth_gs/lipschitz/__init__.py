"""GS orthogonal convolutions (GS-SOC) and the 1-Lipschitz LipConvnet (Gorbunov et al., NeurIPS 2024, section 6).

``SOC`` (skew orthogonal convolution), ``ChannelShuffle`` (the GS core's ``P(k, n)`` on channels, optionally
pair-preserving), ``GSSOC`` (grouped SOCs interleaved with shuffles), ``MaxMinPermuted`` and ``LipConvnet``; the
pure math is in :mod:`dreambooth_gs.lipschitz.functional`, training and checkpoints in
:mod:`dreambooth_gs.lipschitz.training`.

May import :mod:`dreambooth_gs.gs` (the shuffle permutations of its functional core) only: it knows nothing of
diffusion models.
"""

from . import functional
from .functional import certified_accuracy, certified_radius
from .layers import GSSOC, SOC, ChannelShuffle, MaxMinPermuted
from .lipconvnet import LipConvLayer, LipConvnet, LipLinear

__all__ = [
    "GSSOC",
    "SOC",
    "ChannelShuffle",
    "LipConvLayer",
    "LipConvnet",
    "LipLinear",
    "MaxMinPermuted",
    "certified_accuracy",
    "certified_radius",
    "functional",
]
