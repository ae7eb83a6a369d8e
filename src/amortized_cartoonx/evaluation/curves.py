"""Rate-distortion curves (the paper's Fig. 7a and 7b) from a relevance ranking, and their areas.

A method gives, per image, a relevance score for every channel-shared position of its representation
(``relevance: (N, K)`` in :meth:`~amortized_cartoonx.wavelets.Coefficients.flatten` order of a mask;
higher = more relevant). With ``k(r) = round(r * K)`` for the rates ``r`` of a grid (:func:`rate_grid`; by default
:data:`DEFAULT_RATES`, dense at low rates):

- curve ``keep`` (a): keep the ``k(r)`` most relevant positions, replace all others with adaptive Gaussian
  noise; lower is better.
- curve ``randomise`` (b): replace the ``k(r)`` most relevant positions with noise, keep the others; higher is
  better.

Both are obfuscations with a binary mask ``s`` through the one RDE machinery
(:meth:`RDEObjective.distortions`, i.e. ``y = clamp(f(s * h + (1 - s) * v), 0, 1)``), with the ``l2``
distortion ``||p(x) - p(y)||_2`` averaged over ``L`` noise draws. The same draws serve every rate, both curves
and every method in the same representation (common random numbers), so differences between methods are not
noise-draw luck.

Where no position is randomised (``keep`` at ``r = 1``, ``randomise`` at ``r = 0``) the obfuscation is the
image itself and the distortion is exactly 0 by definition; it is not computed (it would only measure the
DWT round trip's float error). Ties in the relevance are broken by a seeded random permutation, never by
position (which would favour the top-left of an image or the low-pass band).

Phase 2 of the run (:func:`measure_curves`) measures both curves of every method and image, on the image's own
seeded noise draws (stream ``EVAL_NOISE``, the same for every method of a representation) and tie-breaking
(stream ``EVAL_TIES``); the cache keeps them per image (``curves/<method>/<hash>/<image id>.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..rde import RDEObjective, RDEProblem, make_generators
from ..seeding import Stream, stream_seeds
from ..wavelets import Coefficients
from .cache import CachedMap, JsonStore, is_numbers, settings_hash

if TYPE_CHECKING:
    from .attribution import EvaluationMethod
    from .context import RunContext
    from .explanations import ExplainedImage

#: Curve names, in the order of the paper's panels.
KEEP = "keep"
RANDOMISE = "randomise"
CURVES = (KEEP, RANDOMISE)


#: The default rate grid: dense at low rates, where the curves (a) of the wavelet methods fall (CartoonX keeps
#: well under 10% of the coefficients), a roughly 1-2-5 series from 0.001 to 0.1, then steps of 0.1. 21 points,
#: so it costs what the former default (21 evenly spaced points) did.
DEFAULT_RATES = (
    0.0,
    0.001,
    0.002,
    0.005,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
)


def rate_grid(spec: int | Sequence[float] = DEFAULT_RATES) -> list[float]:
    """The rates of a grid spec: an int ``K`` gives ``K`` rates evenly spaced on [0, 1] (both ends included);
    a sequence is the grid itself, which must rise strictly from 0 to 1.

    Raises:
        ConfigError: fewer than 2 rates, or a sequence that does not rise strictly from 0 to 1.
    """
    if isinstance(spec, bool):
        raise ConfigError(f"rates must be a number of points or a list of rates, got {spec!r}")
    if isinstance(spec, int | np.integer):
        if spec < 2:
            raise ConfigError(f"rates must be at least 2 (0 and 1), got {spec}")
        return [i / (int(spec) - 1) for i in range(int(spec))]
    rates = [float(r) for r in spec]
    if len(rates) < 2:
        raise ConfigError(f"rates must be at least 2 (0 and 1), got {len(rates)}")
    inside = all(0.0 <= r <= 1.0 for r in rates)  # also refuses NaN
    if not inside or rates[0] != 0.0 or rates[-1] != 1.0 or any(b <= a for a, b in zip(rates, rates[1:])):
        raise ConfigError(f"a rate grid must rise strictly from 0 to 1, got {', '.join(f'{r:g}' for r in rates)}")
    return rates


def rate_counts(rates: Sequence[float], num_positions: int) -> list[int]:
    """``k(r) = round(r * K)`` clipped to [0, K]; exact at both ends (0 -> 0, 1 -> K)."""
    return [min(num_positions, max(0, int(np.floor(r * num_positions + 0.5)))) for r in rates]


def rank_positions(relevance: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """``(N, K)`` long: the rank of every position (0 = most relevant), ties broken at random.

    Args:
        relevance: ``(N, K)`` scores; higher = more relevant. NaNs rank last.
        generators: one CPU generator per image for the tie-breaking permutation.
    """
    num_images, num_positions = relevance.shape
    scores = torch.nan_to_num(relevance.detach().float().cpu(), nan=-float("inf"))
    ranks = torch.empty(num_images, num_positions, dtype=torch.long)
    for n, gen in enumerate(generators):
        perm = torch.randperm(num_positions, generator=gen)
        order = perm[torch.argsort(scores[n, perm], descending=True, stable=True)]  # positions, best first
        ranks[n, order] = torch.arange(num_positions)
    return ranks.to(relevance.device)


def binary_masks(ranks: Tensor, counts: Sequence[int], curve: str) -> Tensor:
    """``(N, M, K)`` float masks, one per count: 1 = keep the coefficient, 0 = replace it with noise.

    ``keep``: keep the ``count`` best-ranked positions. ``randomise``: replace them and keep the rest.
    """
    thresholds = torch.as_tensor(list(counts), device=ranks.device).view(1, -1, 1)
    top = ranks.unsqueeze(1) < thresholds  # (N, M, K): among the `count` most relevant
    keep = top if curve == KEEP else ~top
    return keep.float()


def randomised_counts(counts: Sequence[int], num_positions: int, curve: str) -> list[int]:
    """How many positions each mask of :func:`binary_masks` replaces with noise."""
    return [num_positions - k if curve == KEEP else k for k in counts]


def _repeat_problem(problem: RDEProblem, times: int) -> RDEProblem:
    """The problem with every image repeated ``times`` times in a row (image-major)."""

    def rep(t: Tensor) -> Tensor:
        return t.repeat_interleave(times, dim=0)

    return RDEProblem(
        images=rep(problem.images),
        coeffs=problem.coeffs.map(rep),
        stats=problem.stats,  # not used by distortions()
        logits=rep(problem.logits),
        target=rep(problem.target),
        link=problem.link,
    )


@torch.no_grad()
def masked_distortions(
    objective: RDEObjective,
    problem: RDEProblem,
    masks: Tensor,
    noise: Coefficients,
    max_batch: int = 128,
) -> Tensor:
    """``(N, M)``: the mean distortion over the noise draws of every binary mask.

    Args:
        objective: the evaluation objective (its distortion, e.g. ``l2``).
        problem: the prepared batch (``N`` images).
        masks: ``(N, M, K)`` flat channel-shared masks.
        noise: the draws, bands ``(N, L, C, ...)``; the same for every mask of an image.
        max_batch: classifier inputs per forward pass (``images x masks x draws``); bounds memory.
    """
    num_images, num_masks, _ = masks.shape
    num_draws = noise.lowpass.shape[1]
    per_chunk = max(1, max_batch // max(1, num_images * num_draws))
    out = torch.empty(num_images, num_masks, device=masks.device)
    for lo in range(0, num_masks, per_chunk):
        hi = min(lo + per_chunk, num_masks)
        m = hi - lo
        rows = _repeat_problem(problem, m)  # row n * m + i: image n, mask lo + i
        flat = masks[:, lo:hi].reshape(num_images * m, -1).to(problem.coeffs.dtype)
        mask = problem.coeffs.unflatten(flat)  # bands (N * m, 1, ...)
        draws = noise.map(lambda b, m=m: b.repeat_interleave(m, dim=0))
        d = objective.distortions(rows, mask, draws)  # (N * m, L)
        out[:, lo:hi] = d.mean(1).reshape(num_images, m)
    return out


@dataclass
class CurveResult:
    """Curves of a batch of N images: ``keep`` and ``randomise`` each ``(N, R)`` on ``rates`` ``(R,)``."""

    rates: list[float]
    keep: Tensor
    randomise: Tensor

    def curve(self, name: str) -> Tensor:
        return self.keep if name == KEEP else self.randomise


def rate_distortion_curves(
    objective: RDEObjective,
    problem: RDEProblem,
    relevance: Tensor,
    noise: Coefficients,
    rates: Sequence[float],
    tie_generators: Sequence[torch.Generator],
    max_batch: int = 128,
) -> CurveResult:
    """Curves (a) and (b) for ``relevance: (N, K)`` on the prepared ``problem`` and noise draws ``noise``.

    Entries where nothing is randomised are exactly 0 (see the module docstring).
    """
    num_positions = problem.coeffs.numel_per_channel()
    if relevance.shape != (problem.images.shape[0], num_positions):
        raise ValueError(
            f"relevance of shape {tuple(relevance.shape)} does not fit {problem.images.shape[0]} images "
            f"with {num_positions} positions"
        )
    ranks = rank_positions(relevance, tie_generators).to(problem.images.device)
    counts = rate_counts(rates, num_positions)
    result = {}
    for curve in CURVES:
        values = torch.zeros(problem.images.shape[0], len(rates), device=problem.images.device)
        todo = [i for i, c in enumerate(randomised_counts(counts, num_positions, curve)) if c > 0]
        if todo:
            masks = binary_masks(ranks, [counts[i] for i in todo], curve)
            values[:, todo] = masked_distortions(objective, problem, masks, noise, max_batch)
        result[curve] = values.cpu()
    return CurveResult(rates=list(rates), keep=result[KEEP], randomise=result[RANDOMISE])


def area(rates: Sequence[float], values: Sequence[float], upto: float | None = None) -> float:
    """The trapezoid area under ``values`` over ``rates`` (any spacing), on ``[rates[0], upto]`` (all of it by
    default).

    ``upto`` inside the grid linearly interpolates the curve's value there.
    """
    x = np.asarray(rates, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if upto is not None and upto < x[-1]:
        inside = x < upto
        x = np.append(x[inside], upto)
        y = np.append(y[inside], np.interp(upto, np.asarray(rates, dtype=np.float64), np.asarray(values)))
    return float(np.trapezoid(y, x)) if hasattr(np, "trapezoid") else float(np.trapz(y, x))


# ---- phase 2 of the run -------------------------------------------------------------------------------------------
def evaluation_noise(objective: RDEObjective, problem: RDEProblem, seeds: Sequence[int], draws: int) -> Coefficients:
    """``draws`` noise draws per image, bands ``(N, L, C, ...)``, from the images' seeds (stream ``EVAL_NOISE``)."""
    generators = make_generators(stream_seeds(seeds, Stream.EVAL_NOISE), problem.images.device)
    return objective.sample_noise(problem, draws, generators)


def tie_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image for :func:`rank_positions` (stream ``EVAL_TIES``)."""
    return [torch.Generator().manual_seed(s) for s in stream_seeds(seeds, Stream.EVAL_TIES)]


def curve_key(run: RunContext, explanation_key: str) -> str:
    """The cache key of the curves of the explanations cached under ``explanation_key``."""
    cfg = run.config
    return settings_hash(
        {
            "kind": "curves",
            "explanation": explanation_key,
            "rates": cfg.rates if isinstance(cfg.rates, int) else rate_grid(cfg.rates),
            "noise_draws": cfg.noise_draws,
            "distortion": cfg.distortion,
            "obfuscation": cfg.obfuscation,
            "seed": cfg.seed,
            "device": run.device.type,
        }
    )


def measure_curves(
    run: RunContext, method: EvaluationMethod, explained: dict[str, ExplainedImage], key: str
) -> CachedMap[dict]:
    """Per image ``{"rates", "keep", "randomise"}`` (lists of floats) of ``method``'s ``explained`` relevance."""
    rates = rate_grid(run.config.rates)
    objective = run.objective(method.representation)
    ids = run.ids

    def compute(indices: list[int]) -> list[dict]:
        records = [explained[ids[i]] for i in indices]
        seeds = run.seeds(indices)
        target = torch.tensor([r.target for r in records], device=run.device)
        problem = objective.prepare(run.images.load(indices), target)
        noise = evaluation_noise(objective, problem, seeds, run.config.noise_draws)
        relevance = torch.stack([r.relevance for r in records]).to(run.device)  # (n, K)
        result = rate_distortion_curves(
            objective, problem, relevance, noise, rates, tie_generators(seeds), run.config.max_batch
        )
        return [
            {"rates": rates, "keep": result.keep[j].tolist(), "randomise": result.randomise[j].tolist()}
            for j in range(len(indices))
        ]

    def valid(record: dict) -> bool:
        return (
            record["rates"] == rates
            and is_numbers(record["keep"], len(rates))
            and is_numbers(record["randomise"], len(rates))
        )

    store = JsonStore(run.cache, "curves", method.name, key, valid)
    return run.cached(store, compute, f"curves {method.name}")
