"""A resumable on-disk cache of evaluation results, keyed by (image id, method, settings hash).

Layout under ``ROOT`` (the evaluation's ``DIR/cache``)::

    explanations/<method>/<hash>/<image id>.safetensors   relevance (K,), target, scalars; metadata JSON
    curves/<method>/<hash>/<image id>.json                 the keep/randomise curves of one image
    lambda/<method>/<hash>/<image id>.json                 panel (c): one optimisation at one lambda

Every file is written atomically, so an interrupted evaluation leaves only complete entries and the next run
computes only what is missing. Only tensors (safetensors) and JSON are stored: reading the cache never runs
code. The hash covers every setting that changes the result (see :func:`settings_hash`); a new method or a
changed setting gets a new folder and never invalidates the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..io import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

#: Bumped when the meaning of a cached result changes; part of every hash.
CACHE_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def settings_hash(settings: dict) -> str:
    """A short stable hash of a JSON-serialisable settings dict (key order does not matter)."""
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

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def _path(self, kind: str, method: str, key: str, image_id: str, suffix: str) -> Path | None:
        if self.root is None:
            return None
        return self.root / kind / method / key / f"{safe_name(image_id)}{suffix}"

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
