"""A resumable on-disk cache of evaluation results, keyed by (image id, method, settings hash).

Layout under ``ROOT`` (the evaluation's ``DIR/cache``)::

    explanations/<method>/<hash>/<image id>.safetensors   relevance (K,), target, scalars; metadata JSON
    curves/<method>/<hash>/<image id>.json                 the keep/randomise curves of one image
    lambda/<method>/<hash>/<image id>.json                 panel (c): one optimisation at one lambda

Every file is written atomically, so an interrupted evaluation leaves only complete entries and the next run
computes only what is missing. Only tensors (safetensors) and JSON are stored: reading the cache never runs
code. The hash covers every setting that changes the result (see :func:`settings_hash`); a new method or a
changed setting gets a new folder and never invalidates the others.

Every cached phase of the run goes through :func:`cached_map`: load what is cached, compute the missing images in
batches (with a progress bar), save each batch as soon as it is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..io import atomic_write, atomic_write_text
from ..optimizer import without_later_defaults

logger = logging.getLogger(__name__)

#: Bumped when the meaning of a cached result changes; part of every hash.
CACHE_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def settings_hash(settings: dict) -> str:
    """A short stable hash of a JSON-serialisable settings dict (key order does not matter; optimizer settings added
    later are left out at their earlier value, so older caches stay valid)."""
    settings = without_later_defaults(settings)
    text = json.dumps({"cache_version": CACHE_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def safe_name(image_id: str) -> str:
    """A file-name-safe version of an image id; ids that needed changes get a short hash suffix."""
    cleaned = _UNSAFE.sub("_", image_id)
    if cleaned != image_id or cleaned.startswith("."):
        cleaned = f"{cleaned.lstrip('.')}-{hashlib.sha256(image_id.encode()).hexdigest()[:8]}"
    return cleaned


class ResultCache:
    """Per-image results of one evaluation folder. ``ResultCache(None)`` caches nothing (for ``--no-cache``)."""

    def __init__(self, root: str | Path | None, contents: dict[str, str] | None = None) -> None:
        self.root = Path(root) if root is not None else None
        #: image id -> its content digest (:meth:`ImageSet.contents`), part of each image's file name
        self.contents = dict(contents or {})

    def with_contents(self, contents: dict[str, str]) -> ResultCache:
        """The same folder, keyed also by the images' contents."""
        return ResultCache(self.root, contents)

    def _path(self, kind: str, method: str, key: str, image_id: str, suffix: str) -> Path | None:
        if self.root is None:
            return None
        digest = self.contents.get(image_id)
        name = safe_name(image_id) + (f".{digest[:16]}" if digest else "")
        return self.root / kind / method / key / f"{name}{suffix}"

    # ---- tensors + metadata (explanations) ----------------------------------------------------------------
    def load_tensors(self, kind: str, method: str, key: str, image_id: str) -> tuple[dict[str, Tensor], dict] | None:
        """``(tensors, metadata)`` or None when absent or unreadable (an unreadable file is recomputed)."""
        path = self._path(kind, method, key, image_id, ".safetensors")
        if path is None or not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("json", "{}"))
        except (SafetensorError, OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache file %s (%s)", path, exc)
            return None
        return tensors, meta

    def save_tensors(
        self, kind: str, method: str, key: str, image_id: str, tensors: dict[str, Tensor], metadata: dict
    ) -> None:
        path = self._path(kind, method, key, image_id, ".safetensors")
        if path is None:
            return
        payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"json": json.dumps(metadata, sort_keys=True, default=str)}
        atomic_write(path, lambda tmp: save_file(payload, str(tmp), metadata=meta))

    # ---- JSON (curves, lambda points) -----------------------------------------------------------------------
    def load_json(self, kind: str, method: str, key: str, image_id: str) -> dict | None:
        path = self._path(kind, method, key, image_id, ".json")
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache file %s (%s)", path, exc)
            return None

    def save_json(self, kind: str, method: str, key: str, image_id: str, record: dict) -> None:
        path = self._path(kind, method, key, image_id, ".json")
        if path is None:
            return
        atomic_write_text(path, json.dumps(record, sort_keys=True))


def as_scalar_tensors(values: dict[str, float]) -> dict[str, Tensor]:
    """Plain floats as 0-d float64 tensors (for a safetensors file)."""
    return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in values.items()}


R = TypeVar("R")


class Store(Protocol[R]):
    """Where one phase keeps the records of one (method, settings hash): one record per image id."""

    def load(self, image_id: str) -> R | None:
        """The cached record, or None when absent or unreadable."""
        ...

    def save(self, image_id: str, record: R) -> None: ...


def is_number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_numbers(value: object, length: int | None = None) -> bool:
    """A list of finite numbers (of ``length`` when given)."""
    return isinstance(value, list) and (length is None or len(value) == length) and all(map(is_number, value))


@dataclass
class JsonStore:
    """JSON records (dicts of plain values) under ``kind/method/key/`` of ``cache``.

    ``valid(record)`` says whether a cached record has the structure the phase needs; a record that parses but
    fails it (a hand-edited or foreign file) is ignored with a warning and recomputed, like an unreadable one.
    """

    cache: ResultCache
    kind: str
    method: str
    key: str
    valid: Callable[[dict], bool] = lambda record: True

    def load(self, image_id: str) -> dict | None:
        record = self.cache.load_json(self.kind, self.method, self.key, image_id)
        if record is None:
            return None
        try:
            ok = isinstance(record, dict) and bool(self.valid(record))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            logger.warning("ignoring a %s cache record of %s with unexpected content; recomputing", self.kind, image_id)
            return None
        return record

    def save(self, image_id: str, record: dict) -> None:
        self.cache.save_json(self.kind, self.method, self.key, image_id, record)


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A transient progress bar over ``total`` images."""
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def batches(indices: Sequence[int], size: int) -> list[list[int]]:
    """``indices`` in consecutive chunks of at most ``size``."""
    return [list(indices[lo : lo + size]) for lo in range(0, len(indices), size)]


@dataclass
class CachedMap(Generic[R]):
    """The records of a phase: ``records`` (image id -> record, in the order of the ids) and how many of them
    this run ``computed`` (the others came from the cache)."""

    records: dict[str, R]
    computed: int


def cached_map(
    ids: Sequence[str],
    store: Store[R],
    compute: Callable[[list[int]], Sequence[R]],
    *,
    batch_size: int,
    desc: str,
    progress: bool = True,
) -> CachedMap[R]:
    """One record per id: loaded from ``store`` when cached, else computed and saved.

    Args:
        ids: the image ids.
        store: where the records are cached.
        compute: ``compute(indices) -> records``, one record per index into ``ids`` (a batch of at most
            ``batch_size``); each batch is saved as soon as it returns, so an interruption loses one batch at most.
        batch_size: images per ``compute`` call.
        desc: the progress bar's label.
        progress: show the progress bar.
    """
    found: dict[str, R] = {}
    for image_id in ids:
        hit = store.load(image_id)
        if hit is not None:
            found[image_id] = hit
    missing = [i for i, image_id in enumerate(ids) if image_id not in found]
    with progress_bar(len(missing), desc, progress) as bar:
        for batch in batches(missing, batch_size):
            for i, record in zip(batch, compute(batch), strict=True):
                store.save(ids[i], record)
                found[ids[i]] = record
            bar.update(len(batch))
    return CachedMap({image_id: found[image_id] for image_id in ids}, len(missing))
