"""Panel (c) of Fig. 7: the exact optimizer over a grid of lambda, final distortion against mean mask.

For CartoonX and Pixel RDE, each lambda of the grid runs the same exact optimizer as the main evaluation
(``l1_lambda`` overridden, optionally fewer steps). The resulting continuous mask ``s`` is then measured
like the curves: the ``l2`` distortion ``||p(x) - p(y)||_2`` of ``y = clamp(f(s * h + (1 - s) * v), 0, 1)``
averaged over the evaluation's noise draws (the same draws as curves (a) and (b)), against the mean of
``s`` (the paper's normalised l1 norm). The optimizer's own final distortion (its training measure,
``--distortion``) is recorded too.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from ..methods import EXACT_METHODS
from ..optimizer import CartoonX, OptimizerConfig, PixelRDE
from ..rde import RDEObjective
from ..wavelets import Coefficients

#: The methods panel (c) applies to: the exact optimizers.
LAMBDA_METHODS: tuple[str, ...] = EXACT_METHODS
#: Panel (c)'s default grids, spanning the paper's ranges (20..80 for CartoonX, 3..20 for Pixel RDE).
DEFAULT_LAMBDAS: dict[str, tuple[float, ...]] = {
    "cartoonx": (10.0, 20.0, 40.0, 80.0),
    "pixel-rde": (2.0, 4.0, 8.0, 16.0),
}


def lambda_optimizer(method: str, classifier, config: OptimizerConfig, l1_lambda: float, steps: int | None, dwt: dict):
    """The exact optimizer of ``method`` at ``l1_lambda`` (and ``steps`` when given)."""
    cfg = dataclasses.replace(config, l1_lambda=float(l1_lambda), steps=config.steps if steps is None else steps)
    if method == "pixel-rde":
        return PixelRDE(classifier, config=cfg)
    return CartoonX(classifier, config=cfg, **dwt)


@torch.no_grad()
def measure_masks(objective: RDEObjective, images: Tensor, target: Tensor, mask: Coefficients, noise) -> Tensor:
    """``(N,)``: the evaluation distortion of the continuous ``mask`` on the draws ``noise``."""
    problem = objective.prepare(images, target)
    return objective.distortions(problem, mask, noise).mean(1)


def lambda_points(
    optimizer,
    objective: RDEObjective,
    images: Tensor,
    target: Tensor,
    seeds: Sequence[int],
    noise,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Optimise one batch at one lambda; per image ``mask_mean``, ``distortion`` (evaluation measure),
    ``optimizer_distortion`` (the optimizer's measure), all ``(N,)``, and ``seconds`` (the batch's)."""
    start = time.perf_counter()
    exp = optimizer.explain(images, target, seeds=list(seeds), progress=progress)
    seconds = time.perf_counter() - start
    distortion = measure_masks(objective, images, exp.target, exp.mask, noise)
    return {
        "mask_mean": exp.mask_mean.detach().float().cpu(),
        "distortion": distortion.float().cpu(),
        "optimizer_distortion": exp.distortion.detach().float().cpu(),
        "seconds": torch.tensor(seconds),
    }
