"""Panel (c) of Fig. 7: the exact optimizer over a grid of lambda, final distortion against mean mask.

For CartoonX and Pixel RDE, each lambda of the grid runs the same exact optimizer as the main evaluation
(``l1_lambda`` overridden, optionally fewer steps). The resulting continuous mask ``s`` is then measured
like the curves: the ``l2`` distortion ``||p(x) - p(y)||_2`` of ``y = clamp(f(s * h + (1 - s) * v), 0, 1)``
averaged over the evaluation's noise draws (the same draws as curves (a) and (b)), against the mean of
``s`` (the paper's normalised l1 norm). The optimizer's own final distortion (its training measure,
``--distortion``) is recorded too.

Phase 3 of the run (:func:`lambda_panel`) caches one record per image and lambda
(``lambda/<method>/<hash>/<image id>.json``); the images are the first ``lambda_limit`` of the run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..methods import EXACT_METHODS
from ..optimizer import CartoonX, OptimizerConfig, PixelRDE
from ..rde import RDEObjective
from ..wavelets import Coefficients
from .cache import CachedMap, JsonStore, is_number, settings_hash
from .curves import evaluation_noise

if TYPE_CHECKING:
    from .attribution import EvaluationMethod, MethodContext
    from .context import RunContext
    from .explanations import ExplainedImage

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


# ---- phase 3 of the run -------------------------------------------------------------------------------------------
@dataclass
class LambdaPanel:
    """Panel (c): per method, one point per (lambda, image) ``{"image", "lambda", "mask_mean", "distortion",
    "optimizer_distortion", "seconds"}``, and how many optimisations this run ``computed`` per method."""

    points: dict[str, list[dict]]
    computed: dict[str, int]


def lambda_key(run: RunContext, optimizer) -> str:
    """The cache key of one lambda's optimisations: the optimizer's settings (its seed aside: per-image seeds
    are passed), the classifier, the images and the evaluation's measure."""
    settings = dict(optimizer.settings())
    settings.pop("seed", None)
    cfg = run.config
    return settings_hash(
        {
            "kind": "lambda",
            **settings,
            **run.identity,
            "image_size": run.images.size,
            "seed": cfg.seed,
            "noise_draws": cfg.noise_draws,
            "eval_distortion": cfg.distortion,
            "eval_obfuscation": cfg.obfuscation,
            "device": run.device.type,
            **({} if run.config.target is None else {"target": run.target_identity()}),
        }
    )


def lambda_panel(
    run: RunContext,
    methods: dict[str, EvaluationMethod],
    explained: dict[str, dict[str, ExplainedImage]],
    context: MethodContext,
) -> LambdaPanel:
    """Panel (c) for every method of :data:`LAMBDA_METHODS` that runs and has a grid in ``run.config.lambdas``,
    explaining the class its own explanations explained."""
    cfg = run.config
    dwt = {"wave": context.wave, "levels": context.levels, "mode": context.mode}
    panel = LambdaPanel({}, {})
    for name in LAMBDA_METHODS:
        grid = cfg.lambdas.get(name, ())
        if name not in methods or not grid:
            continue
        objective = run.objective(methods[name].representation)
        targets = {image_id: record.target for image_id, record in explained[name].items()}
        points: list[dict] = []
        computed = 0
        for lam in grid:
            optimizer = lambda_optimizer(name, run.classifier, context.optimizer, lam, cfg.lambda_steps, dwt)
            found = _optimise(run, name, float(lam), optimizer, objective, targets)
            computed += found.computed
            points.extend({"image": image_id, **record} for image_id, record in found.records.items())
        panel.points[name] = points
        panel.computed[name] = computed
    return panel


def _optimise(
    run: RunContext, name: str, lam: float, optimizer, objective: RDEObjective, targets: dict[str, int]
) -> CachedMap[dict]:
    """One lambda's points on the first ``lambda_limit`` images, explaining ``targets`` (image id -> class)."""
    cfg = run.config
    ids = run.ids

    def compute(indices: list[int]) -> list[dict]:
        images = run.images.load(indices)
        seeds = run.seeds(indices)
        target = torch.tensor([targets[ids[i]] for i in indices], device=run.device)
        noise = evaluation_noise(objective, objective.prepare(images, target), seeds, cfg.noise_draws)
        values = lambda_points(optimizer, objective, images, target, seeds, noise, cfg.progress)
        return [
            {
                "lambda": lam,
                "mask_mean": float(values["mask_mean"][j]),
                "distortion": float(values["distortion"][j]),
                "optimizer_distortion": float(values["optimizer_distortion"][j]),
                "seconds": float(values["seconds"]) / len(indices),
            }
            for j in range(len(indices))
        ]

    def valid(record: dict) -> bool:
        return record["lambda"] == lam and all(
            is_number(record[k]) for k in ("mask_mean", "distortion", "optimizer_distortion", "seconds")
        )

    store = JsonStore(run.cache, "lambda", name, lambda_key(run, optimizer), valid)
    return run.cached(store, compute, f"lambda {name} {lam:g}", count=cfg.lambda_limit)
