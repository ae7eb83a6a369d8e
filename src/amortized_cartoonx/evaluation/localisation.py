"""Ground-truth localisation: where a method's pixel relevance falls, when the truth is known.

An images folder may hold ``ground_truth.safetensors`` (the synthetic cartoon benchmark writes one) with the
pixel masks of each image's decisive object and of its distractors. Its format, its reader and the metrics
belong to the benchmark (:mod:`amortized_cartoonx.ground_truth`): ``energy_share(R, object_mask,
distractor_mask)`` (the shares of R on the object, the distractors and the background) and
``pointing_game(R, object_mask)``, on a non-negative relevance map ``R: (N, H, W)``. How each method's
output becomes R is the evaluation's choice, defined in :mod:`.maps`.

Phase 4 of the run (:func:`localise`) scores every method's explanations when the folder has ground truth; it is
cheap and not cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..ground_truth import GROUND_TRUTH_FILE, energy_share, masks_for, pointing_game, read_ground_truth
from .cache import batches, progress_bar
from .maps import pixel_relevance

if TYPE_CHECKING:
    from .attribution import EvaluationMethod
    from .context import RunContext
    from .explanations import ExplainedImage


def find_ground_truth(folder: str | Path) -> Path | None:
    """``folder/ground_truth.safetensors`` when it exists, else None."""
    path = Path(folder) / GROUND_TRUTH_FILE
    return path if path.is_file() else None


def load_ground_truth_masks(path: str | Path, ids: Sequence[str], size: int) -> tuple[Tensor, Tensor]:
    """``(object_mask, distractor_mask)``, each ``(len(ids), size, size)`` bool, in the order of ``ids``.

    Raises:
        InputError: an unreadable file, or an image without masks.
    """
    return masks_for(read_ground_truth(Path(path).parent), list(ids), size)


def localisation_metrics(relevance: Tensor, object_mask: Tensor, distractor_mask: Tensor) -> dict[str, Tensor]:
    """Per image ``(N,)``: ``energy_object``, ``energy_distractors``, ``energy_background`` (shares of R, summing
    to 1) and ``pointing_game`` (1 when the strongest point of R hits the object, else 0)."""
    relevance = relevance.clamp_min(0.0)
    shares = energy_share(relevance, object_mask, distractor_mask)
    out = {f"energy_{k}": v.float() for k, v in shares.items()}
    out["pointing_game"] = pointing_game(relevance, object_mask).float()
    return out


def localise(
    run: RunContext, methods: dict[str, EvaluationMethod], explained: dict[str, dict[str, ExplainedImage]]
) -> dict[str, dict[str, np.ndarray]]:
    """Per method, metric name -> ``(n,)`` over the run's images; ``{}`` when the folder has no ground truth."""
    path = find_ground_truth(run.images.folder)
    if path is None:
        return {}
    ids = run.ids
    object_mask, distractor_mask = load_ground_truth_masks(path, ids, run.images.size)
    values: dict[str, dict[str, list[float]]] = {name: {} for name in methods}
    with progress_bar(len(ids), "ground truth", run.config.progress) as bar:
        for batch in batches(range(len(ids)), run.config.batch_size):
            images = run.images.load(batch)
            obj = object_mask[batch].to(run.device)
            dis = distractor_mask[batch].to(run.device)
            for name, method in methods.items():
                relevance = torch.stack([explained[name][ids[i]].relevance for i in batch]).to(run.device)
                maps = pixel_relevance(method, images, relevance)  # (n, H, W)
                for metric, v in localisation_metrics(maps, obj, dis).items():
                    values[name].setdefault(metric, []).extend(v.detach().cpu().double().tolist())
            bar.update(len(batch))
    return {name: {k: np.asarray(v) for k, v in metrics.items()} for name, metrics in values.items()}
