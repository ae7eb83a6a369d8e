"""From a method's relevance to pixels: the relevance map R (ground truth) and the picture (example grid).

**The pixel relevance map** ``R: (N, H, W)``, non-negative, on which the ground-truth metrics are computed:

- attribution methods (the gradient baselines): the ranking score itself, ``|attribution|`` summed over the
  colour channels (Grad-CAM: its upsampled non-negative map);
- mask methods (CartoonX, Pixel RDE, amortized, warm start, and the random orderings, whose score is a
  uniform "mask"): the energy, per pixel, of what the mask keeps relative to the obfuscation's mean::

      R = sum_c ( f(s * (h - mu)) )_c^2

  with ``h`` the image's coefficients, ``mu`` the adaptive noise's mean of each band (:func:`band_statistics`)
  and ``f`` the representation's inverse. The obfuscation's expected value (before clamping) is
  ``f(s * h + (1 - s) * mu) = f(mu) + f(s * (h - mu))``: ``f(s * (h - mu))`` is exactly the part of the image
  the mask keeps above the all-noise mean image, and R is its energy. For pixel masks this is
  ``s^2 * sum_c (x_c - mu)^2``; for wavelet masks the inverse DWT puts every kept coefficient's contribution at
  its exact place and scale, with no band-grid upsampling (which would be off by the DWT's padding).

**The picture** of the example grid ``(N, 1, H, W)`` in [0, 1]: wavelet masks show the CartoonX explanation
``clamp(f(s * DWT(grey(x))), 0, 1)`` in grey; pixel masks (Pixel RDE, random pixels) show the mask itself and
attribution methods their ranking score scaled by each image's 99th percentile (the usual saliency display:
a few extreme pixels do not darken the rest), as heat maps.

Phase 5 of the run (:func:`example_pictures`) draws the pictures of the first images for the example grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..rde import band_statistics
from ..wavelets import grey
from .attribution import MASK, EvaluationMethod

if TYPE_CHECKING:
    from .context import RunContext
    from .explanations import ExplainedImage

#: Attribution heat maps are scaled so that this quantile of each image's map is full brightness.
DISPLAY_QUANTILE = 0.99


@torch.no_grad()
def mask_energy_map(representation, images: Tensor, mask: Tensor) -> Tensor:
    """``(N, H, W)``: ``sum_c f(s * (h - mu))_c^2`` for ``images: (N, C, H, W)`` and a flat mask ``(N, K)``."""
    coeffs = representation.encode(images)
    stats = band_statistics(coeffs)
    centred = coeffs.with_bands(
        [b - stats.mean[:, g].reshape(-1, *([1] * (b.ndim - 1))) for g, b in enumerate(coeffs.bands)]
    )
    kept = representation.decode(centred * coeffs.unflatten(mask.to(coeffs.dtype)))  # (N, C, H, W)
    return kept.pow(2).sum(1)


@torch.no_grad()
def pixel_relevance(method: EvaluationMethod, images: Tensor, relevance: Tensor) -> Tensor:
    """``(N, H, W)`` the non-negative pixel relevance map R of ``method`` (see the module docstring)."""
    if method.kind == MASK:
        return mask_energy_map(method.representation, images, relevance)
    height, width = images.shape[-2:]
    return relevance.reshape(-1, height, width).clamp_min(0.0)


@torch.no_grad()
def display_image(method: EvaluationMethod, images: Tensor, relevance: Tensor) -> Tensor:
    """``(N, 1, H, W)`` in [0, 1]: the explanation image (wavelet masks) or the heat map (pixel methods)."""
    representation = method.representation
    if method.kind == MASK and representation.name != "pixel":
        coeffs = representation.encode(grey(images))
        return representation.decode(coeffs * coeffs.unflatten(relevance.to(coeffs.dtype))).clamp(0.0, 1.0)
    height, width = images.shape[-2:]
    heat = relevance.reshape(-1, 1, height, width).clamp_min(0.0)
    if method.kind == MASK:  # a pixel mask is already on its absolute [0, 1] scale
        return heat.clamp_max(1.0)
    scale = heat.flatten(1).quantile(DISPLAY_QUANTILE, dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (heat / scale).clamp_max(1.0)


@dataclass
class Examples:
    """The example grid: ``images (n, 3, H, W)`` (None when no example is shown), per method its ``pictures
    (n, 1, H, W)`` and the explained classes ``targets`` (n,)."""

    images: Tensor | None
    pictures: dict[str, Tensor]
    targets: dict[str, list[int]]


def example_pictures(
    run: RunContext, methods: dict[str, EvaluationMethod], explained: dict[str, dict[str, ExplainedImage]]
) -> Examples:
    """The pictures of the first ``run.config.examples`` images for every method (on the CPU)."""
    ids = run.ids[: run.config.examples]
    targets = {name: [explained[name][i].target for i in ids] for name in methods}
    if not ids:
        return Examples(None, {}, targets)
    images = run.images.load(range(len(ids)))
    pictures = {}
    for name, method in methods.items():
        relevance = torch.stack([explained[name][i].relevance for i in ids]).to(run.device)
        pictures[name] = display_image(method, images, relevance).cpu()
    return Examples(images.cpu(), pictures, targets)
