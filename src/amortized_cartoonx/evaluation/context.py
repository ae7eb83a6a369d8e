"""What every phase of the run reads: the images, the classifier, the settings and the cache (:class:`RunContext`).

Every image's randomness derives from its own seed, a hash of the global seed and the image's file name
(:func:`~amortized_cartoonx.seeding.item_seed`), so results do not depend on the batch, the order or ``--limit``,
and the cache is per image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..classifiers import classifier_identity
from ..errors import InputError
from ..images import list_images, load_images, to_channels
from ..rde import DEFAULT_LINK, RDEObjective
from ..seeding import item_seed
from ..wavelets import Representation
from .cache import CachedMap, R, ResultCache, Store, cached_map
from .config import EvaluationConfig


@dataclass
class ImageSet:
    """The run's images: ``files`` of ``folder`` (sorted by name), loaded on demand as ``(n, channels, size,
    size)`` on ``device`` (``channels`` 1: greyscale, by the luma of the RGB file)."""

    folder: Path
    files: list[Path]
    size: int
    device: torch.device
    channels: int = 3

    @classmethod
    def from_folder(
        cls, folder: str | Path, size: int, device: torch.device, limit: int | None = None, channels: int = 3
    ) -> ImageSet:
        """The first ``limit`` images of ``folder`` (all by default), in ``channels`` channels.

        Raises:
            InputError: a missing or empty folder, or two images with the same file name.
        """
        files = list_images(folder)
        files = files[:limit] if limit else files
        if len({p.name for p in files}) != len(files):
            raise InputError(f"two images in {folder} share a file name")
        return cls(Path(folder), files, size, device, channels)

    @property
    def ids(self) -> list[str]:
        """The image ids: file names (the cache and the seeds key on them)."""
        return [p.name for p in self.files]

    def contents(self) -> dict[str, str]:
        """Image id -> the SHA-256 of its file: the cache keeps a result with the content it was computed on, so
        another file of the same name (another folder, an edited image) is not served an old result."""
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in self.files}

    def load(self, indices: Sequence[int]) -> Tensor:
        """``(len(indices), channels, size, size)`` in [0, 1] on the run's device."""
        images = load_images([self.files[i] for i in indices], self.size)
        return to_channels(images, self.channels).to(self.device)


def check_targets(target: int | dict[str, int] | None, ids: Sequence[str], source: str = "the target mapping") -> None:
    """Raise an :class:`InputError` when ``target`` (:attr:`~.config.EvaluationConfig.target`) is a mapping
    without an entry for one of the image ``ids``; ``source`` names the mapping in the message."""
    if isinstance(target, dict):
        missing = [i for i in ids if i not in target]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise InputError(f"{source} names no class for {len(missing)} of the {len(ids)} images: {shown}")


def cache_identity(spec: str, classifier, channels: int = 3, link: str = DEFAULT_LINK) -> dict:
    """What identifies the classifier in every cache key: its spec, a model file's SHA-256 and the digest of its
    weights (from :func:`~amortized_cartoonx.classifiers.classifier_identity`; a file's absolute path is left
    out, the content identifies it; ``synthetic`` or ``package.module:callable`` may load other weights after a
    retraining), the input normalisation, the channels when not RGB, and the link (left out of the hash at
    softmax, like every :data:`~amortized_cartoonx.optimizer.LATER_DEFAULTS` setting)."""
    identity = classifier_identity(spec, classifier)
    out: dict = {"classifier": identity["classifier"]}
    if identity["classifier_sha256"]:
        out["classifier_sha256"] = identity["classifier_sha256"]
    if identity["classifier_weights_sha256"]:  # the weights themselves: a spec's text may load other ones later
        out["classifier_weights_sha256"] = identity["classifier_weights_sha256"]
    normalization = getattr(classifier, "normalization", None)
    out["normalization"] = list(normalization) if normalization else None
    if channels != 3:  # keyed only when greyscale: the keys of RGB runs stay those of earlier versions
        out["channels"] = channels
    out["link"] = link
    return out


@dataclass
class RunContext:
    """What every phase reads.

    Attributes:
        classifier: the frozen classifier (on the images' device).
        images: the run's images.
        config: the run's settings.
        cache: the per-image results (``ResultCache(None)`` caches nothing).
        identity: the classifier's part of every cache key (:func:`cache_identity`).
        link: how the classifier's logits become probabilities (:data:`~amortized_cartoonx.rde.LINKS`), for the
            measure as for the explainers. Default ``softmax``.
    """

    classifier: Callable[[Tensor], Tensor]
    images: ImageSet
    config: EvaluationConfig
    cache: ResultCache
    identity: dict
    link: str = DEFAULT_LINK

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def ids(self) -> list[str]:
        return self.images.ids

    def seeds(self, indices: Sequence[int]) -> list[int]:
        """The per-image seeds of the images at ``indices``."""
        ids = self.ids
        return [item_seed(ids[i], self.config.seed) for i in indices]

    def targets(self, indices: Sequence[int]) -> Tensor | None:
        """``(len(indices),)`` the classes to explain in the images at ``indices`` (``config.target``), or None:
        the class the classifier predicts."""
        target = self.config.target
        if target is None:
            return None
        ids = self.ids
        values = [target[ids[i]] for i in indices] if isinstance(target, dict) else [target] * len(indices)
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def target_identity(self, run_images_only: bool = False) -> str | int | dict[str, int]:
        """``config.target`` as plain values: ``"predicted"`` (the default), the class, or the given mapping.

        Args:
            run_images_only: the mapping's entries for the run's images only (for the records). Default False:
                the whole mapping, as the cache keys take it (so runs with another ``limit`` on the same labels
                share their results; editing one label recomputes every image).
        """
        target = self.config.target
        if target is None:
            return "predicted"
        if isinstance(target, dict):
            return {str(k): int(target[k]) for k in (self.ids if run_images_only else sorted(target))}
        return int(target)

    def objective(self, representation: Representation) -> RDEObjective:
        """The evaluation's measure in ``representation``: its obfuscation and distortion, no sparsity term."""
        return RDEObjective(
            self.classifier, representation, 0.0, self.config.obfuscation, self.config.distortion, self.link
        )

    def cached(
        self, store: Store[R], compute: Callable[[list[int]], Sequence[R]], desc: str, count: int | None = None
    ) -> CachedMap[R]:
        """:func:`~.cache.cached_map` over the first ``count`` images (all by default) in the run's batches, or over
        this shard's share of them (``config.shard``: positions k, k + n, ...); ``compute`` gets indices into the
        run's images."""
        ids = self.ids if count is None else self.ids[:count]
        positions = list(range(len(ids)))
        if self.config.shard is not None:
            k, n = self.config.shard
            positions = positions[k::n]
        return cached_map(
            [ids[i] for i in positions],
            store,
            lambda batch: compute([positions[j] for j in batch]),
            batch_size=self.config.batch_size,
            desc=desc,
            progress=self.config.progress,
        )
