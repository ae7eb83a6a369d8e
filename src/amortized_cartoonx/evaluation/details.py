"""The detail part of an explanation: its fine-scale wavelet coefficients, and where in the image they sit.

CartoonX's explanation ``f(s * h)`` is a low-pass blob plus edges: the pixel relevance of :mod:`.maps` (the
energy of what the mask keeps) is dominated by the kept low-pass band, and cannot see whether the mask keeps the
fine-scale coefficients on an object's outline. This module gives the ground-truth metrics two wavelet-aware
maps, for every method, from the **explanation coefficients** ``c: (N, C, ...)`` in the evaluation's DWT:

- wavelet masks (CartoonX, amortized, warm start, random wavelets): ``c = s * h``, the coefficients the mask
  keeps (``h = DWT(x)``, colour);
- pixel masks (Pixel RDE, random pixels): ``c = DWT(s * (x - mu))``, the DWT of what the mask keeps above the
  all-noise mean image (the image whose energy is their pixel relevance R, :mod:`.maps`);
- attribution methods (the gradient baselines): ``c = DWT(R)``, the DWT of their relevance map R.

Only the detail coefficients (levels 1..J) count; the low-pass band is dropped.

1. **Coefficient energy map** ``M: (N, H, W)`` (:attr:`DetailView.coefficient_energy`): each detail position
   ``k`` carries the weight ``w_k = sum_c c_k^2`` (its energy; the mask-weighted coefficient energy
   ``s_k^2 sum_c h_{c,k}^2`` for a wavelet mask), spread over the image as the energy of its synthesis basis
   function: ``M(x) = sum_k w_k psi_k(x)^2`` (:class:`DetailFootprint`), with ``psi_k`` the inverse DWT of a unit
   coefficient at ``k``. The db wavelets are orthonormal, so ``psi_k^2`` sums to 1 (less what a border
   coefficient's basis function puts outside the image): each coefficient's energy lands exactly where its basis
   function lives, at its own scale, with no band-grid upsampling to misalign. The shares of M on the object and
   on its outline band say where the kept fine-scale structure sits.
2. **Detail part** ``D: (N, H, W)`` (:attr:`DetailView.detail_energy`): ``sum_c f(c_detail)_c^2``, the energy of
   the explanation minus its low-pass reconstruction (``f(c) - f(c_lowpass) = f(c_detail)`` by linearity), for
   the pointing game.
"""

from __future__ import annotations

from dataclasses import dataclass

import pywt
import torch
from torch import Tensor

from ..rde import band_statistics
from ..wavelets import Coefficients, Representation, WaveletRepresentation
from .attribution import MASK, EvaluationMethod


class DetailFootprint:
    """Spreads a weight per detail coefficient over the image as its basis function's energy (module docstring).

    ``M(x) = sum_k w_k psi_k(x)^2`` exactly, with ``psi_k`` the inverse DWT of a unit coefficient at position ``k``
    (the representation's own inverse: same padding, same crops at the border). Basis functions of one level and
    orientation whose positions differ by at least ``L - 1`` (``L`` the filter length) on an axis do not overlap,
    so the coefficients of one level and orientation are decoded in ``(L - 1)^2`` interleaved groups, each group's
    square is the sum of its members' squares, and the groups add up: ``3 J (L - 1)^2`` inverse DWTs per image
    (375 for db3 and J = 5) instead of one per coefficient.

    Args:
        wavelet: the DWT whose coefficients are mapped.
    """

    def __init__(self, wavelet: WaveletRepresentation) -> None:
        if not isinstance(wavelet, WaveletRepresentation):
            raise TypeError(f"a footprint needs a wavelet representation, got {type(wavelet).__name__}")
        self.wavelet = wavelet
        #: positions this far apart on an axis have disjoint basis functions at every level
        self.stride = max(1, pywt.Wavelet(wavelet.wave).rec_len - 1)

    @torch.no_grad()
    def __call__(self, weights: Coefficients) -> Tensor:
        """``(N, H, W)``: every detail weight (bands ``(N, 1, ...)``, non-negative; the low-pass band is ignored)
        spread over the image as ``w_k psi_k^2``. The total is ``sum_k w_k ||psi_k||^2`` over the image: the
        weights' sum, less what the basis functions of border coefficients put outside the image."""
        return torch.stack(self.per_level(weights)).sum(0)

    @torch.no_grad()
    def per_level(self, weights: Coefficients) -> list[Tensor]:
        """The map of :meth:`__call__` level by level: ``J`` maps ``(N, H, W)``, finest first."""
        if any(bool((b < 0).any()) for b in weights.details):
            raise ValueError("footprint weights must be non-negative")
        num_images = weights.num_images
        height, width = weights.image_size
        maps = []
        for level, band in enumerate(weights.details):
            out = torch.zeros(num_images, height, width, device=weights.device, dtype=weights.dtype)
            rows, cols = band.shape[-2:]
            s_rows, s_cols = min(self.stride, rows), min(self.stride, cols)
            group = (torch.arange(rows, device=band.device) % s_rows)[:, None] * s_cols + (
                torch.arange(cols, device=band.device) % s_cols
            )[None, :]  # (rows, cols): the interleaved group of every position
            groups = s_rows * s_cols
            members = (group[None] == torch.arange(groups, device=band.device)[:, None, None]).to(band.dtype)
            for orientation in range(band.shape[2]):
                amplitude = band[:, 0, orientation].sqrt()  # (N, rows, cols)
                split = (amplitude[:, None] * members[None]).reshape(num_images * groups, 1, rows, cols)
                details = [
                    torch.zeros(num_images * groups, 1, *b.shape[2:], device=b.device, dtype=b.dtype)
                    for b in weights.details
                ]
                details[level][:, 0, orientation] = split[:, 0]
                lowpass = torch.zeros(
                    num_images * groups, 1, *weights.lowpass.shape[2:], device=band.device, dtype=band.dtype
                )
                decoded = self.wavelet.decode(weights.with_bands([lowpass, *details]))  # (N * G, 1, H, W)
                out += decoded.reshape(num_images, groups, height, width).pow(2).sum(1)
            maps.append(out)
        return maps


@dataclass
class DetailView:
    """The two wavelet-aware maps of a batch of explanations (see the module docstring).

    Attributes:
        levels: ``J`` maps ``(N, H, W)``, finest first: level j's part of M.
        detail_energy: ``(N, H, W)`` D, the energy per pixel of the explanation's detail part.
    """

    levels: list[Tensor]
    detail_energy: Tensor

    @property
    def coefficient_energy(self) -> Tensor:
        """``(N, H, W)`` M, the detail coefficients' energy spread over their basis functions (all levels)."""
        return torch.stack(self.levels).sum(0)


class DetailMaps:
    """The wavelet-aware maps of any method's explanation, in the evaluation's DWT ``wavelet``.

    Wavelet masks are read in their own representation (the evaluation builds them with the same DWT).
    """

    def __init__(self, wavelet: WaveletRepresentation) -> None:
        self.wavelet = wavelet
        self._footprints: dict[str, DetailFootprint] = {}

    def footprint(self, representation: WaveletRepresentation) -> DetailFootprint:
        key = repr(sorted(representation.describe().items()))
        if key not in self._footprints:
            self._footprints[key] = DetailFootprint(representation)
        return self._footprints[key]

    @torch.no_grad()
    def coefficients(
        self, method: EvaluationMethod, images: Tensor, relevance: Tensor
    ) -> tuple[Coefficients, WaveletRepresentation]:
        """The explanation coefficients ``c`` (bands ``(N, C, ...)``) and the DWT they belong to.

        Args:
            method: the method (its kind and representation decide ``c``).
            images: ``(N, C, H, W)`` in [0, 1].
            relevance: ``(N, K)`` the method's scores (a mask for mask methods).
        """
        representation: Representation = method.representation
        if method.kind == MASK and isinstance(representation, WaveletRepresentation):
            coeffs = representation.encode(images)
            return coeffs * coeffs.unflatten(relevance.to(coeffs.dtype)), representation
        height, width = images.shape[-2:]
        if method.kind == MASK:  # a pixel mask: what it keeps above the all-noise mean image
            pixels = representation.encode(images)
            mean = band_statistics(pixels).mean[:, 0].view(-1, 1, 1, 1)
            kept = (images - mean) * relevance.reshape(-1, 1, height, width).to(images.dtype)
        else:
            kept = relevance.reshape(-1, 1, height, width).to(images.dtype).clamp_min(0.0)
        return self.wavelet.encode(kept), self.wavelet

    @torch.no_grad()
    def __call__(self, method: EvaluationMethod, images: Tensor, relevance: Tensor) -> DetailView:
        """The maps M and D of ``method``'s explanations of ``images`` (see :class:`DetailView`)."""
        coeffs, wavelet = self.coefficients(method, images, relevance)
        details = coeffs.with_bands([torch.zeros_like(coeffs.lowpass), *coeffs.details])
        weights = details.map(lambda b: b.pow(2).sum(1, keepdim=True))  # (N, 1, ...) energy per position
        return DetailView(
            levels=[m.clamp_min(0.0) for m in self.footprint(wavelet).per_level(weights)],
            detail_energy=wavelet.decode(details).pow(2).sum(1),
        )


__all__ = ["DetailFootprint", "DetailMaps", "DetailView"]
