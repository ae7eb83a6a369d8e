"""On-disk store of teacher masks (the exact optimizer's masks), no Lightning: shards plus a manifest.

Layout of a store folder::

    manifest.json               the classifier spec and every setting that determines the masks
    shard-<tag>.safetensors     a batch of masks; written atomically (temp file + rename)

Each shard holds the tensors ``masks (n, K) float16`` (flat masks in
:meth:`~amortized_cartoonx.wavelets.Coefficients.flatten` order), ``targets (n,) int64``, ``loss``,
``distortion``, ``mask_mean`` ``(n,) float32``, optionally ``seeds (n,) int64`` (the per-image seed the
optimizer used; absent in shards written without it), and in its metadata ``ids``: a JSON list of the n
image ids. Reading never runs code (safetensors + JSON).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import ConfigError, InputError
from ..io import atomic_write, atomic_write_text

MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.safetensors"
TEMP_GLOB = ".shard-*.safetensors.tmp"  # what io.atomic_path leaves behind when a writer is killed
MANIFEST_KIND = "cartoonx-teacher-masks"

#: The manifest format this version writes. 2: each image is seeded ``item_seed(file name, seed)``;
#: 1: seeded ``seed + its position in the folder``. Format-1 stores are read (their masks are valid), but a run
#: never adds to one: its masks would mix the two seeding rules.
FORMAT_VERSION = 2


@dataclass
class TeacherRecord:
    """One image's teacher mask: ``mask (K,)`` float32 in [0, 1] and the optimizer's final numbers.

    ``seed`` is the per-image seed of the optimizer's noise (None for shards written without seeds).
    """

    id: str
    mask: Tensor
    target: int
    loss: float
    distortion: float
    mask_mean: float
    seed: int | None = None


def manifest_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two manifests (ignoring bookkeeping keys)."""
    ignore = {"created", "format_version"}
    keys = (set(old) | set(new)) - ignore
    return sorted(k for k in keys if old.get(k) != new.get(k))


class TeacherMaskStore:
    """A folder of teacher-mask shards.

    Args:
        folder: the store's folder (must hold a manifest unless created with :meth:`create`).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise InputError(f"{self.folder} is not a teacher-mask folder (no {MANIFEST}); run cartoonx targets")
        self.manifest: dict = json.loads(path.read_text(encoding="utf-8"))
        self._index: dict[str, tuple[Path, int]] | None = None

    @classmethod
    def create(cls, folder: str | Path, manifest: dict) -> TeacherMaskStore:
        """Open ``folder`` for writing with ``manifest``; refuse a folder made with other settings or written
        in another format (format 1 seeded images by their position in the folder)."""
        folder = Path(folder)
        path = folder / MANIFEST
        manifest = {"format_version": FORMAT_VERSION, **manifest}
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("format_version") != FORMAT_VERSION:
                raise ConfigError(
                    f"{path} is of format {old.get('format_version')} (seeds: {old.get('seeding', 'unknown')}); this "
                    f"version writes format {FORMAT_VERSION} and never mixes the two: use another --out"
                )
            diff = manifest_differences(old, manifest)
            if diff:
                details = "; ".join(f"{k}: {old.get(k)!r} there, {manifest.get(k)!r} now" for k in diff)
                raise ConfigError(
                    f"{folder} holds teacher masks made with other settings ({details}); use another --out"
                )
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return cls(folder)

    # ---- writing -----------------------------------------------------------------------------------------
    def write_shard(
        self,
        tag: str,
        ids: Sequence[str],
        masks: Tensor,
        targets: Tensor,
        loss: Tensor,
        distortion: Tensor,
        mask_mean: Tensor,
        seeds: Sequence[int] | Tensor | None = None,
    ) -> Path:
        """Write one shard atomically; ``masks: (n, K)``, the others ``(n,)``. Returns its path."""
        n = len(ids)
        if masks.ndim != 2 or masks.shape[0] != n:
            raise ValueError(f"masks must be (n, K) with n = {n} ids, got {tuple(masks.shape)}")
        tensors = {
            "masks": masks.detach().to("cpu", torch.float16).contiguous(),
            "targets": targets.detach().to("cpu", torch.int64).contiguous(),
            "loss": loss.detach().to("cpu", torch.float32).contiguous(),
            "distortion": distortion.detach().to("cpu", torch.float32).contiguous(),
            "mask_mean": mask_mean.detach().to("cpu", torch.float32).contiguous(),
        }
        if seeds is not None:
            tensors["seeds"] = torch.as_tensor(seeds, dtype=torch.int64).detach().cpu().reshape(n).contiguous()
        path = self.folder / f"shard-{tag}.safetensors"
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"ids": json.dumps(list(ids))}))
        self._index = None
        return path

    def remove_temporary(self) -> int:
        """Delete the temporary files of shard writes that never finished (a killed run); returns how many.

        Call it only while no writer is running on this folder.
        """
        stale = list(self.folder.glob(TEMP_GLOB))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    # ---- reading -----------------------------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(self.folder.glob(SHARD_GLOB))

    def _build_index(self) -> dict[str, tuple[Path, int]]:
        index: dict[str, tuple[Path, int]] = {}
        for shard in self.shards():
            with safe_open(str(shard), framework="pt") as fh:
                ids = json.loads((fh.metadata() or {}).get("ids", "[]"))
            for row, image_id in enumerate(ids):
                index.setdefault(image_id, (shard, row))  # a duplicate (shouldn't happen) keeps the first
        return index

    @property
    def index(self) -> dict[str, tuple[Path, int]]:
        """``id -> (shard, row)`` over every shard (rebuilt after writes)."""
        if self._index is None:
            self._index = self._build_index()
        return self._index

    def ids(self) -> list[str]:
        return list(self.index)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, image_id: str) -> TeacherRecord:
        """The record of ``image_id``; ``KeyError`` when the store has none."""
        shard, row = self.index[image_id]
        data = _load_shard(str(shard), shard.stat().st_mtime_ns)
        return TeacherRecord(
            id=image_id,
            mask=data["masks"][row].float(),
            target=int(data["targets"][row]),
            loss=float(data["loss"][row]),
            distortion=float(data["distortion"][row]),
            mask_mean=float(data["mask_mean"][row]),
            seed=int(data["seeds"][row]) if "seeds" in data else None,
        )


@lru_cache(maxsize=8)
def _load_shard(path: str, mtime_ns: int) -> dict[str, Tensor]:
    """A shard's tensors (cached; the mtime in the key drops stale entries)."""
    return load_file(path)
