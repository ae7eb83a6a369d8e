"""Ground-truth localisation: where a method's pixel relevance falls, when the truth is known.

An images folder may hold ``ground_truth.safetensors`` (the synthetic cartoon benchmark writes one) with the
pixel masks of each image's decisive object and of its distractors. Its format, its reader and the metrics
belong to the benchmark (:mod:`amortized_cartoonx.ground_truth`): ``energy_share(R, object_mask,
distractor_mask)`` (the shares of R on the object, the distractors and the background) and
``pointing_game(R, object_mask)``, on a non-negative relevance map ``R: (N, H, W)``. How each method's
output becomes R is the evaluation's choice, defined in :mod:`.maps`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ..ground_truth import GROUND_TRUTH_FILE

logger = logging.getLogger(__name__)


def find_ground_truth(folder: str | Path) -> Path | None:
    """``folder/ground_truth.safetensors`` when it exists (and the metrics are available), else None."""
    path = Path(folder) / GROUND_TRUTH_FILE
    if not path.is_file():
        return None
    try:
        from .. import ground_truth  # noqa: F401
    except ImportError as exc:
        logger.warning("found %s but the ground-truth metrics are not available (%s); skipping them", path, exc)
        return None
    return path


def load_ground_truth_masks(path: str | Path, ids: Sequence[str], size: int) -> tuple[Tensor, Tensor]:
    """``(object_mask, distractor_mask)``, each ``(len(ids), size, size)`` bool, in the order of ``ids``.

    Raises:
        InputError: an unreadable file, or an image without masks.
    """
    from ..ground_truth import masks_for, read_ground_truth

    return masks_for(read_ground_truth(Path(path).parent), list(ids), size)


def localisation_metrics(relevance: Tensor, object_mask: Tensor, distractor_mask: Tensor) -> dict[str, Tensor]:
    """Per image ``(N,)``: ``energy_object``, ``energy_distractors``, ``energy_background`` (shares of R, summing
    to 1) and ``pointing_game`` (1 when the strongest point of R hits the object, else 0)."""
    from ..ground_truth import energy_share, pointing_game

    relevance = relevance.clamp_min(0.0)
    shares = energy_share(relevance, object_mask, distractor_mask)
    out = {f"energy_{k}": v.float() for k, v in shares.items()}
    out["pointing_game"] = pointing_game(relevance, object_mask).float()
    return out
