"""Phase 1 of the run: every method explains every image (batched), explaining the class the classifier predicts.

Per image the cache keeps the relevance ``(K,)``, the explained class, the method's scalars and the seconds
(``explanations/<method>/<hash>/<image id>.safetensors``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .attribution import EvaluationMethod
from .cache import CachedMap, ResultCache, as_scalar_tensors, settings_hash
from .context import RunContext

KIND = "explanations"

logger = logging.getLogger(__name__)


@dataclass
class ExplainedImage:
    """One method's explanation of one image.

    Attributes:
        relevance: ``(K,)`` float32 on the CPU, the score of every position of the method's representation.
        target: the explained class.
        seconds: seconds per explanation (the batch's time shared out).
        scalars: the method's extra values (mask methods: ``mask_mean``, ``loss``, ...).
    """

    relevance: Tensor
    target: int
    seconds: float
    scalars: dict[str, float]


@dataclass
class ExplanationStore:
    """:class:`ExplainedImage` records as safetensors (tensors) with JSON metadata (method, image, seconds)."""

    cache: ResultCache
    method: str
    key: str
    #: K, the positions of the method's representation at the run's image size (a cached relevance of another
    #: length is recomputed); None: not checked.
    length: int | None = None

    def load(self, image_id: str) -> ExplainedImage | None:
        hit = self.cache.load_tensors(KIND, self.method, self.key, image_id)
        if hit is None:
            return None
        tensors, meta = hit
        try:
            relevance, target = tensors["relevance"], tensors["target"]
            if relevance.ndim != 1 or not relevance.is_floating_point() or not bool(torch.isfinite(relevance).all()):
                raise ValueError("relevance is not a finite vector")
            if self.length is not None and relevance.numel() != self.length:
                raise ValueError(f"relevance has {relevance.numel()} entries, not {self.length}")
            if target.numel() != 1 or target.is_floating_point() or int(target) < 0:
                raise ValueError("target is not a class index")
            return ExplainedImage(
                relevance=relevance,
                target=int(target),
                seconds=float(meta["seconds"]),
                scalars={k.split(".", 1)[1]: float(v) for k, v in tensors.items() if k.startswith("scalar.")},
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            logger.warning(
                "ignoring a cached explanation of %s with unexpected content (%s); recomputing", image_id, exc
            )
            return None

    def save(self, image_id: str, record: ExplainedImage) -> None:
        tensors = {
            "relevance": record.relevance,
            "target": torch.tensor(record.target, dtype=torch.long),
            **as_scalar_tensors({f"scalar.{k}": v for k, v in record.scalars.items()}),
        }
        meta = {"method": self.method, "image": image_id, "seconds": record.seconds}
        self.cache.save_tensors(KIND, self.method, self.key, image_id, tensors, meta)


def explanation_key(run: RunContext, method: EvaluationMethod) -> str:
    """The cache key of ``method``'s explanations: its settings, the classifier, the images and the seed (for a
    method whose result depends on it: :attr:`~.attribution.EvaluationMethod.seeded`)."""
    return settings_hash(
        {
            "kind": "explanation",
            **method.settings(),
            **run.identity,
            "image_size": run.images.size,
            **({"seed": run.config.seed} if method.seeded else {}),
            "target": run.target_identity(),
            "device": run.device.type,
        }
    )


def explain_images(
    run: RunContext,
    method: EvaluationMethod,
    key: str,
    targets: dict[str, int] | None = None,
    count: int | None = None,
) -> CachedMap[ExplainedImage]:
    """Every image's :class:`ExplainedImage` under ``method`` (cached under ``key``).

    Args:
        targets: image id -> the class to explain; None: the run's rule (``config.target``, by default the class the
            classifier predicts).
        count: only the first ``count`` images of the run (all by default).
    """
    ids = run.ids

    def compute(indices: list[int]) -> list[ExplainedImage]:
        if targets is not None:
            target = torch.tensor([targets[ids[i]] for i in indices], device=run.device)
        else:
            target = run.targets(indices)
        att = method.attribute(run.images.load(indices), target, seeds=run.seeds(indices))
        return [
            ExplainedImage(
                relevance=att.relevance[j].detach().float().cpu(),
                target=int(att.target[j]),
                seconds=att.seconds / len(indices),
                scalars={k: float(v[j]) for k, v in att.scalars.items()},
            )
            for j in range(len(indices))
        ]

    length = method.representation.encode(torch.zeros(1, 1, run.images.size, run.images.size)).numel_per_channel()
    store = ExplanationStore(run.cache, method.name, key, length)
    return run.cached(store, compute, f"explain {method.name}", count)
