"""Ground-truth localisation: where a method's pixel relevance falls, when the truth is known.

An images folder may hold ``ground_truth.safetensors`` (the synthetic cartoon benchmark writes one) with the
pixel masks of each image's decisive object and of its distractors. Its format, its reader and the metrics
belong to the benchmark (:mod:`amortized_cartoonx.ground_truth`): ``energy_share(R, object_mask,
distractor_mask)`` (the shares of R on the object, the distractors and the background) and
``pointing_game(R, object_mask)``, on a non-negative relevance map ``R: (N, H, W)``. How each method's
output becomes R is the evaluation's choice, defined in :mod:`.maps`.

Per image and method (:func:`localisation_metrics`):

- on the pixel relevance R (:mod:`.maps`): ``energy_object``, ``energy_distractors``, ``energy_background`` (the
  shares of R), ``energy_outline`` (the share of R on the outline band, :func:`~..ground_truth.outline_band`)
  and ``pointing_game``;
- wavelet-aware, on the explanation's detail part (:mod:`.details`): ``detail_object``, ``detail_distractors``,
  ``detail_outline`` (the shares of the coefficient energy map M: where the kept fine-scale coefficients sit)
  and ``detail_pointing_game`` (the pointing game on the energy D of the explanation minus its low-pass
  reconstruction); level by level (``j = 1`` the finest), ``detail_fraction_level{j}`` (level j's share of M's
  total: which scales the explanation keeps; NaN without any detail energy) and ``detail_outline_level{j}``
  (level j's share on the outline band).

Every share of an all-zero map is the region's area fraction (chance), and its pointing game a miss; the area
fractions themselves (:func:`chance_levels`) are reported once, as the reference.

Phase 4 of the run (:func:`localise`) scores every method's explanations when the folder has ground truth; it is
cheap and not cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..ground_truth import (
    DEFAULT_OUTLINE_RADIUS,
    GROUND_TRUTH_FILE,
    area_share,
    energy_share,
    masks_for,
    outline_band,
    pointing_game,
    read_ground_truth,
    region_share,
)
from ..wavelets import WaveletRepresentation
from .cache import batches, progress_bar
from .details import DetailMaps, DetailView
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


def localisation_metrics(
    relevance: Tensor,
    object_mask: Tensor,
    distractor_mask: Tensor,
    detail: DetailView | None = None,
    outline_radius: int = DEFAULT_OUTLINE_RADIUS,
) -> dict[str, Tensor]:
    """Per image ``(N,)``, the metrics of the module docstring.

    Args:
        relevance: ``(N, H, W)`` the pixel relevance R.
        object_mask, distractor_mask: ``(N, H, W)`` bool.
        detail: the wavelet-aware maps (:class:`~.details.DetailView`); None leaves the ``detail_*`` metrics out.
        outline_radius: the outline band's half-width in pixels.

    Returns:
        ``energy_object``, ``energy_distractors``, ``energy_background`` (shares of R, summing to 1),
        ``energy_outline``, ``pointing_game`` (1 when the strongest point of R hits the object, else 0), and with
        ``detail``: ``detail_object``, ``detail_distractors``, ``detail_outline``, ``detail_pointing_game`` and
        per level ``detail_fraction_level{j}``, ``detail_outline_level{j}``.
    """
    relevance = relevance.clamp_min(0.0)
    band = outline_band(object_mask, outline_radius)
    shares = energy_share(relevance, object_mask, distractor_mask)
    out = {f"energy_{k}": v.float() for k, v in shares.items()}
    out["energy_outline"] = region_share(relevance, band).float()
    out["pointing_game"] = pointing_game(relevance, object_mask).float()
    if detail is not None:
        m = detail.coefficient_energy.clamp_min(0.0)
        detail_shares = energy_share(m, object_mask, distractor_mask)
        out["detail_object"] = detail_shares["object"].float()
        out["detail_distractors"] = detail_shares["distractors"].float()
        out["detail_outline"] = region_share(m, band).float()
        out["detail_pointing_game"] = pointing_game(detail.detail_energy.clamp_min(0.0), object_mask).float()
        total = m.sum(dim=(1, 2))
        for j, level in enumerate(detail.levels, start=1):
            fraction = level.sum(dim=(1, 2)) / total
            out[f"detail_fraction_level{j}"] = torch.where(total > 0, fraction, torch.nan).float()
            out[f"detail_outline_level{j}"] = region_share(level.clamp_min(0.0), band).float()
    return out


def chance_levels(
    object_mask: Tensor, distractor_mask: Tensor, outline_radius: int = DEFAULT_OUTLINE_RADIUS
) -> dict[str, Tensor]:
    """Per image ``(N,)``: the area fractions of the ``object``, the ``distractors`` (outside the object) and
    the ``outline`` band: the shares a uniform map gets (the chance level of every share)."""
    obj = object_mask.bool()
    return {
        "object": area_share(obj),
        "distractors": area_share(distractor_mask.bool() & ~obj),
        "outline": area_share(outline_band(obj, outline_radius)),
    }


@dataclass
class Localisation:
    """Phase 4's result (all empty when the folder has no ground truth).

    Attributes:
        metrics: per method, metric name -> ``(n,)``.
        chance: region -> ``(n,)`` area fractions (:func:`chance_levels`).
        example_regions: ``(e, H, W)`` uint8 for the first ``config.examples`` images: 0 background, 1 object,
            2 outline band (drawn over the object), 3 distractors; None without ground truth.
        example_detail: per method, ``(e, H, W)`` its coefficient energy map M (:mod:`.details`) of those images.
    """

    metrics: dict[str, dict[str, np.ndarray]]
    chance: dict[str, np.ndarray]
    example_regions: Tensor | None = None
    example_detail: dict[str, Tensor] = field(default_factory=dict)


def localise(
    run: RunContext,
    methods: dict[str, EvaluationMethod],
    explained: dict[str, dict[str, ExplainedImage]],
    wavelet: WaveletRepresentation,
) -> Localisation:
    """Score every method's explanations of the run's images against the ground truth (when the folder has it).

    Args:
        wavelet: the evaluation's DWT, in which the detail part of every explanation is taken (:mod:`.details`).
    """
    path = find_ground_truth(run.images.folder)
    if path is None:
        return Localisation({}, {})
    ids = run.ids
    radius = run.config.outline_radius
    object_mask, distractor_mask = load_ground_truth_masks(path, ids, run.images.size)
    detail_maps = DetailMaps(wavelet)
    values: dict[str, dict[str, list[float]]] = {name: {} for name in methods}
    example_detail: dict[str, list[Tensor]] = {}
    chance = {k: v.double().numpy() for k, v in chance_levels(object_mask, distractor_mask, radius).items()}
    with progress_bar(len(ids), "ground truth", run.config.progress) as bar:
        for batch in batches(range(len(ids)), run.config.batch_size):
            images = run.images.load(batch)
            obj = object_mask[batch].to(run.device)
            dis = distractor_mask[batch].to(run.device)
            details = {}
            for name, method in methods.items():
                relevance = torch.stack([explained[name][ids[i]].relevance for i in batch]).to(run.device)
                maps = pixel_relevance(method, images, relevance)  # (n, H, W)
                detail = detail_maps(method, images, relevance)
                details[name] = detail.coefficient_energy
                for metric, v in localisation_metrics(maps, obj, dis, detail, radius).items():
                    values[name].setdefault(metric, []).extend(v.detach().cpu().double().tolist())
            for name in methods:
                if batch[0] < run.config.examples:
                    shown = [k for k, i in enumerate(batch) if i < run.config.examples]
                    example_detail.setdefault(name, []).append(details[name][shown].cpu())
            bar.update(len(batch))
    metrics = {name: {k: np.asarray(v) for k, v in m.items()} for name, m in values.items()}
    shown = min(run.config.examples, len(ids))
    regions = None
    if shown:
        obj, dis = object_mask[:shown], distractor_mask[:shown]
        regions = torch.zeros(obj.shape, dtype=torch.uint8)
        regions[dis & ~obj] = 3
        regions[obj] = 1
        regions[outline_band(obj, radius)] = 2
    return Localisation(
        metrics, chance, regions, {name: torch.cat(maps) for name, maps in example_detail.items() if maps}
    )
