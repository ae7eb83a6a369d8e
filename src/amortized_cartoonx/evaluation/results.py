"""The results of an evaluation run, as the report reads them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from .curves import CURVES, area

if TYPE_CHECKING:
    from .sanity import SanityResults


def mean_se(values: Sequence[float]) -> dict[str, float | int]:
    """``{"mean", "se", "n"}``: the mean and its standard error (sample std / sqrt(n); 0 for one value)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "se": se, "n": int(arr.size)}


def sign_test(better: int, worse: int) -> float:
    """The two-sided exact sign test's p-value for ``better`` against ``worse`` paired outcomes (ties left out):
    the chance, if either outcome had probability 1/2, of a split at least this uneven; 1.0 without outcomes."""
    n = better + worse
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2.0**n
    return float(min(1.0, 2.0 * tail))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` for testing them together (in their order): the family-wise
    error stays at the level used, whatever the tests' dependence. The k-th smallest p becomes the largest of
    ``(m - j) * p_(j)`` over j <= k (m tests, j from 0), capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * float(p_values[i])))
        adjusted[i] = running
    return adjusted


def paired_difference(values: Sequence[float], reference: Sequence[float], lower_is_better: bool) -> dict:
    """``values`` against ``reference`` on the same images (pairs with a non-finite value left out).

    Returns:
        ``{"mean", "se", "n"}`` of the differences ``values - reference`` (:func:`mean_se`), ``better`` and
        ``worse``: images on which ``values`` beats or loses to ``reference`` (lower or higher, by
        ``lower_is_better``; equal values count as neither), and ``p``: the :func:`sign_test` of the two counts.
    """
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need one per image each, got {a.shape} and {b.shape}")
    finite = np.isfinite(a) & np.isfinite(b)
    diff = (a - b)[finite]
    wins = int((diff < 0).sum() if lower_is_better else (diff > 0).sum())
    losses = int((diff > 0).sum() if lower_is_better else (diff < 0).sum())
    return {**mean_se(diff.tolist()), "better": wins, "worse": losses, "p": sign_test(wins, losses)}


@dataclass
class MethodResults:
    """One method's per-image results (images in the run's order).

    Attributes:
        keep, randomise: ``(n, R)`` curves (a) and (b).
        seconds: ``(n,)`` seconds per explanation.
        targets: ``(n,)`` explained classes.
        ground_truth: metric name -> ``(n,)`` (empty without ground truth).
        scalars: extra per-image values of mask methods (mask_mean, ...).
    """

    name: str
    representation: str
    kind: str
    keep: np.ndarray
    randomise: np.ndarray
    seconds: np.ndarray
    targets: np.ndarray
    ground_truth: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, np.ndarray] = field(default_factory=dict)

    def areas(self, rates: Sequence[float], early_rate: float) -> dict[str, np.ndarray]:
        """Per image: ``area_keep``, ``area_randomise`` over [0, 1] and ``*_early`` over [0, early_rate]."""
        out = {}
        for curve in CURVES:
            values = getattr(self, curve)
            out[f"area_{curve}"] = np.array([area(rates, v) for v in values])
            out[f"area_{curve}_early"] = np.array([area(rates, v, upto=early_rate) for v in values])
        return out


@dataclass
class EvaluationResults:
    """Everything the report needs.

    Attributes:
        ids: the image ids, in the run's order.
        rates: the rate grid ``(R,)``.
        methods: per method that ran, its :class:`MethodResults`.
        skipped: ``name -> reason`` of the methods that cannot run on this classifier.
        lambda_points: panel (c) per method (see :class:`~.lambdas.LambdaPanel`).
        examples: per method the example pictures ``(n, 1, H, W)``; example_images ``(n, 3, H, W)`` or None;
            example_targets: per method the explained classes of the examples.
        settings: the run's settings as plain values.
        computed: phase -> method -> images computed by this run (the rest came from the cache).
        has_ground_truth: whether the folder had ground truth (then ``MethodResults.ground_truth`` is filled).
        ground_truth_chance: region (``object``, ``distractors``, ``outline``) -> ``(n,)`` its area fraction per
            image, the chance level of the shares (empty without ground truth).
        ground_truth_examples: ``(regions, detail)`` of the first example images (see
            :class:`~.localisation.Localisation`: ``example_regions``, ``example_detail``), ``(None, {})`` without.
        sanity: the sanity checks by model randomisation (:class:`~.sanity.SanityResults`), or None.
    """

    ids: list[str]
    rates: list[float]
    methods: dict[str, MethodResults]
    skipped: dict[str, str]
    lambda_points: dict[str, list[dict]]
    examples: dict[str, Tensor]
    example_images: Tensor | None
    example_targets: dict[str, list[int]]
    settings: dict
    computed: dict[str, dict[str, int]]
    has_ground_truth: bool
    ground_truth_chance: dict[str, np.ndarray] = field(default_factory=dict)
    ground_truth_examples: tuple[Tensor | None, dict[str, Tensor]] = (None, {})
    sanity: SanityResults | None = None
