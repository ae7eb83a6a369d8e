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


def top_membership(values: Tensor, count: int) -> Tensor:
    """``(K,) -> (K,)`` float64: each entry's chance to be among the ``count`` largest when ties at the threshold
    are broken uniformly at random: 1 above the ``count``-th largest value, (``count`` - entries above) / (entries
    equal to it) for those equal to it, 0 below. Sums to ``count``."""
    threshold = values.topk(count).values[-1]
    above, tied = values > threshold, values == threshold
    chance = above.double()
    chance[tied] = float(count - int(above.sum())) / int(tied.sum())
    return chance


@torch.no_grad()
def mask_agreement(pred: Tensor, ref: Tensor, top_fraction: float = 0.1) -> dict[str, Tensor]:
    """How well the masks ``pred`` agree with ``ref``, both flat ``(N, K)``.

    Returns ``spearman (N,)``: the rank correlation of the mask values (ties get average ranks; 0 when either
    mask is constant), and ``top_overlap (N,)``: the share of ``ref``'s top ``top_fraction`` coefficients that
    are also in ``pred``'s, in expectation over random tie-breaks at either threshold (:func:`top_membership`):
    sparse masks tie most of their entries at 0, and a fixed tie-break (``topk``'s) picked the same zeros in both,
    so two unrelated sparse masks scored 0.94; now they score chance, ``top_fraction``. A mask with many entries
    tied at its threshold (fewer than ``top_fraction`` non-zero, or many exactly 1) has no well-defined top set:
    even two identical such masks score below 1 (0.14 at 0.5% non-zero), so read ``spearman`` for them.
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
        overlap.append((top_membership(a, count) * top_membership(b, count)).sum() / count)
    return {"spearman": torch.stack(spearman).float(), "top_overlap": torch.stack(overlap).float()}
