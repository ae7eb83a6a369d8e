"""Masks as functions of free logits: the mask predictor's output map, shared by the optimizer's ``logit`` form.

``logits_to_mask(z, s) = clamp((1 + 2 s) * sigmoid(z) - s, 0, 1)``: the plain sigmoid for ``s = 0``; for
``s > 0`` a stretched sigmoid that reaches exactly 0 and 1 at finite logits (``|z| >= logit((1 + s) / (1 + 2 s))``),
as the exact optimizer's projected masks do, so no sigmoid tail costs ``l1_lambda * floor``.
:func:`mask_to_logits` is its inverse on (0, 1) and maps 0 and 1 to the edges of the clamp.
Pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def logits_to_mask(logits: Tensor, stretch: float = 0.0) -> Tensor:
    """``clamp((1 + 2 * stretch) * sigmoid(logits) - stretch, 0, 1)``; the plain sigmoid when ``stretch`` is 0.

    The clamp passes gradients straight through (the value is clamped, the gradient is the stretched
    sigmoid's), like the exact optimizer's projection: a coefficient at 0 can come back.
    """
    mask = torch.sigmoid(logits)
    if stretch == 0.0:
        return mask
    stretched = (1.0 + 2.0 * stretch) * mask - stretch
    return stretched + (stretched.clamp(0.0, 1.0) - stretched).detach()


def sigmoid_for_mask(mask: Tensor, stretch: float) -> Tensor:
    """``(mask + stretch) / (1 + 2 * stretch)``: the sigmoid value whose stretched mask is ``mask`` (in [0, 1]),
    strictly inside (0, 1) when ``stretch > 0``."""
    return (mask + stretch) / (1.0 + 2.0 * stretch)


def mask_to_logits(mask: Tensor, stretch: float = 0.0, eps: float = 1e-3) -> Tensor:
    """Logits whose :func:`logits_to_mask` is ``mask`` (in [0, 1]); with ``stretch = 0`` the mask is first clipped
    to ``[eps, 1 - eps]`` (a sigmoid never reaches 0 or 1), with ``stretch > 0`` 0 and 1 map to the clamp's edges."""
    if stretch == 0.0:
        return torch.logit(mask.clamp(eps, 1.0 - eps))
    return torch.logit(sigmoid_for_mask(mask.clamp(0.0, 1.0), stretch))


__all__ = ["logits_to_mask", "mask_to_logits", "sigmoid_for_mask"]
