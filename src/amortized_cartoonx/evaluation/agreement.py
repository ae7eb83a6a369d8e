"""How closely one mask agrees with another (a prediction with the optimizer's), beyond their losses."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError


def average_ranks(values: Tensor) -> Tensor:
    """``(K,) -> (K,)`` float64 ranks 0..K-1, ties sharing their average rank (as Spearman's rho needs)."""
    ordered, order = values.sort()
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    averages = ends - (counts.double() + 1) / 2  # mean of the ranks ends-counts .. ends-1
    ranks = torch.empty(values.shape[0], dtype=torch.float64, device=values.device)
    ranks[order] = averages[inverse]
    return ranks


@torch.no_grad()
def mask_agreement(pred: Tensor, ref: Tensor, top_fraction: float = 0.1) -> dict[str, Tensor]:
    """How well the masks ``pred`` agree with ``ref``, both flat ``(N, K)``.

    Returns ``spearman (N,)``: the rank correlation of the mask values (ties get average ranks; 0 when either
    mask is constant), and ``top_overlap (N,)``: the share of ``ref``'s top ``top_fraction`` coefficients that
    are also in ``pred``'s (ties at the threshold are broken arbitrarily by ``topk``).
    """
    if pred.shape != ref.shape or pred.ndim != 2:
        raise InputError(f"masks to compare must both be (N, K), got {tuple(pred.shape)} and {tuple(ref.shape)}")
    count = max(1, round(top_fraction * pred.shape[1]))
    spearman, overlap = [], []
    for a, b in zip(pred.float(), ref.float()):
        ra, rb = average_ranks(a), average_ranks(b)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denominator = (ra.square().sum() * rb.square().sum()).sqrt()
        spearman.append((ra * rb).sum() / denominator if denominator > 0 else denominator.new_zeros(()))
        top_a = torch.zeros_like(a, dtype=torch.bool)
        top_b = torch.zeros_like(b, dtype=torch.bool)
        top_a[a.topk(count).indices] = True
        top_b[b.topk(count).indices] = True
        overlap.append((top_a & top_b).sum().double() / count)
    return {"spearman": torch.stack(spearman).float(), "top_overlap": torch.stack(overlap).float()}
