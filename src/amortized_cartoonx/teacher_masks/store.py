"""On-disk store of teacher masks (the exact optimizer's masks), no Lightning: shards plus a manifest.

Layout of a store folder::

    manifest.json               the classifier spec and every setting that determines the masks
    shard-<tag>.safetensors     a batch of masks; written atomically (temp file + rename)

Each shard holds the tensors ``masks (n, K) float16`` (flat masks in
:meth:`~amortized_cartoonx.wavelets.Coefficients.flatten` order), ``targets (n,) int64``, ``loss``,
``distortion``, ``mask_mean`` ``(n,) float32``, optionally ``seeds (n,) int64`` (the per-image seed the
optimizer used; absent in shards written without it), and in its metadata ``ids``: a JSON list of the n
image ids.

**Reading never runs code and never uses bad data** (safetensors + JSON only, checked by :mod:`.files`); every
problem is an :class:`~amortized_cartoonx.errors.InputError` of one line naming the file. The checks run where
they cost least:

* opening the store reads and checks ``manifest.json``;
* the index (built on first use from the shards' headers only, no tensor data) checks each shard's structure --
  tensors, dtypes, shapes, unique ids, masks of the manifest's length K (or, without one, of the same length in
  every shard) -- and that no id is in two shards (a later shard never silently replaces earlier masks);
* loading a shard (:meth:`TeacherMaskStore.get`, cached per shard) checks its values: masks finite and in
  [0, 1], finite losses, non-negative targets. :meth:`TeacherMaskStore.verify` does so for every shard.

A healthy store thus costs one header read per shard to open and a few comparisons per mask on load.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import ConfigError, InputError, one_line
from ..io import atomic_write, atomic_write_text, file_sha256
from .files import (
    CHECKSUM_KEY,
    FORMAT_VERSION,
    manifest_differences,
    manifest_problem,
    read_manifest,
    read_shard,
    read_shard_info,
    shard_checksum,
)

MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.safetensors"
TEMP_GLOB = ".shard-*.safetensors.tmp"  # what io.atomic_path leaves behind when a writer is killed


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


@lru_cache(maxsize=8)
def _load_shard(path: str, mtime_ns: int, mask_length: int | None) -> tuple[tuple[str, ...], dict[str, Tensor]]:
    """:func:`read_shard`, cached (the mtime in the key drops stale entries)."""
    return read_shard(Path(path), mask_length)


# ---- the store -------------------------------------------------------------------------------------------
#: The lock file a writing run holds in a store (``cartoonx targets``, :func:`writer_lock`).
LOCK_NAME = ".writer.lock"


#: Environment variables a launcher sets in every process of a job; a process whose value is not 0 is not the
#: job's first (Lightning's DDP children, torchrun, SLURM's srun): it writes under the first process's lock.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def _first_process() -> bool:
    """This is a job's first process (:data:`RANK_VARIABLES` all absent or 0)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


@contextmanager
def writer_lock(folder: str | Path) -> Iterator[None]:
    """Hold the store's writer lock for the block: a second run into the same folder is refused at once.

    An OS lock (``flock``) on ``folder/.writer.lock``: the system releases it when the process ends, so a killed
    run leaves no stale lock. Only a job's first process takes it (:data:`RANK_VARIABLES` all absent or 0). A
    filesystem without working locks (some network filesystems) gets a warning and no lock, as does Windows.

    Raises:
        ConfigError: another run holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    if not _first_process():
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)  # NFS emulates flock with a write lock
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: another process holds it
            raise ConfigError(
                f"another run is writing teacher masks into {folder} now (it holds {folder / LOCK_NAME}): wait for "
                "it to end, or use another folder"
            ) from None
        except OSError as exc:  # no lock support here (ENOLCK, EOPNOTSUPP, ...): go on unguarded, and say so
            warnings.warn(
                f"cannot lock {folder / LOCK_NAME} ({exc.strerror or exc}): a second run into {folder} at the same "
                "time would not be refused",
                stacklevel=3,
            )
        yield
    finally:
        os.close(handle)  # releases the lock


#: The way out of a store made otherwise, for each command that writes one.
ANOTHER_FOLDER = "use another folder (cartoonx targets: --out; cartoonx demo: --checkpoints), or delete it"


class TeacherMaskStore:
    """A folder of teacher-mask shards.

    Args:
        folder: the store's folder (must hold a manifest unless created with :meth:`create`).

    Raises:
        InputError: no manifest, or a manifest that is not valid (:func:`read_manifest`).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise InputError(f"{self.folder} is not a teacher-mask folder (no {MANIFEST}); run cartoonx targets")
        self.manifest: dict = read_manifest(path)
        self._index: dict[str, tuple[Path, int]] | None = None
        self._shard_ids: dict[Path, tuple[str, ...]] = {}
        self._contents: dict[str, str] = {}
        self._mask_length: int | None = self.manifest.get("mask_length")

    @classmethod
    def create(cls, folder: str | Path, manifest: dict) -> TeacherMaskStore:
        """Open ``folder`` for writing with ``manifest``; refuse a folder made with other settings or written
        in another format (format 1 seeded images by their position in the folder). A folder with a manifest
        but no masks (a first run that failed before its first shard) takes the new manifest: nothing in it
        was made with the old settings."""
        folder = Path(folder)
        path = folder / MANIFEST
        manifest = {"format_version": FORMAT_VERSION, **manifest}
        if path.is_file() and _first_process() and not any(folder.glob(SHARD_GLOB)):
            path.unlink()  # no masks yet: nothing there was made with the old settings
        if path.is_file():
            old = read_manifest(path)
            if old["format_version"] != FORMAT_VERSION:
                raise ConfigError(
                    f"{path} is of format {old['format_version']} (seeds: {old.get('seeding', 'unknown')}); this "
                    f"version writes format {FORMAT_VERSION} and never mixes the two: {ANOTHER_FOLDER}"
                )
            diff = manifest_differences(old, manifest)
            if diff:
                details = "; ".join(f"{k}: {old.get(k)!r} there, {manifest.get(k)!r} now" for k in diff)
                raise ConfigError(
                    f"{folder} holds teacher masks made with other settings ({details}); {ANOTHER_FOLDER}"
                )
        else:
            problem = manifest_problem(manifest)
            if problem:
                raise ValueError(f"not a valid teacher-mask manifest: {problem}")
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
        contents: Sequence[str] | None = None,
        device_type: str | None = None,
    ) -> Path:
        """Write one shard atomically; ``masks: (n, K)`` in [0, 1], the others ``(n,)``; ``contents``: each
        image file's SHA-256 (a resume refuses an image that changed since); ``device_type``: where the masks
        were computed (``cpu``, ``cuda``: the same seed draws other noise on each). Returns its path.

        The caller makes sure no id is already in another shard (the writer callback does).
        """
        n = len(ids)
        if masks.ndim != 2 or masks.shape[0] != n:
            raise ValueError(f"masks must be (n, K) with n = {n} ids, got {tuple(masks.shape)}")
        if self.mask_length is not None and masks.shape[1] != self.mask_length:
            raise ValueError(f"masks must have length {self.mask_length} (the store's), got {masks.shape[1]}")
        if not bool(((masks >= 0) & (masks <= 1)).all()):
            raise ValueError("masks must be finite and in [0, 1]")
        if len(set(ids)) != n:
            raise ValueError("the ids of a shard must be unique")
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
        metadata = {"ids": json.dumps(list(ids))}
        if contents is not None:
            if len(contents) != n:
                raise ValueError(f"contents must hold one digest per id ({n}), got {len(contents)}")
            metadata["sha256"] = json.dumps(list(contents))
        if device_type is not None:
            metadata["device_type"] = str(device_type)
        metadata[CHECKSUM_KEY] = shard_checksum(tensors, metadata)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
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

    @property
    def mask_length(self) -> int | None:
        """K: the manifest's ``mask_length``, else the shards' (None while neither says)."""
        if self._mask_length is None:
            _ = self.index  # building the index learns K from the first shard
        return self._mask_length

    def _build_index(self) -> dict[str, tuple[Path, int]]:
        index: dict[str, tuple[Path, int]] = {}
        shard_ids: dict[Path, tuple[str, ...]] = {}
        contents: dict[str, str] = {}
        for shard in self.shards():
            info = read_shard_info(shard, self._mask_length)
            if self._mask_length is None:
                self._mask_length = info.mask_length  # every other shard must agree
            for row, image_id in enumerate(info.ids):
                if info.contents is not None:
                    contents[image_id] = info.contents[row]
                if image_id in index:
                    raise InputError(
                        f"image {image_id!r} is in two shards of {self.folder}: {index[image_id][0].name} and "
                        f"{shard.name}; delete one of them (cartoonx targets recomputes what is missing)"
                    )
                index[image_id] = (shard, row)
            shard_ids[shard] = info.ids
        self._shard_ids = shard_ids
        self._contents = contents
        return index

    @property
    def index(self) -> dict[str, tuple[Path, int]]:
        """``id -> (shard, row)`` over every shard (rebuilt after writes); building it checks the shards' headers."""
        if self._index is None:
            self._index = self._build_index()
        return self._index

    def ids(self) -> list[str]:
        return list(self.index)

    def contents(self) -> dict[str, str]:
        """``id -> SHA-256`` of the image file each stored mask was made from (ids of older shards are absent)."""
        _ = self.index
        return dict(self._contents)

    def changed_images(self, files: Sequence[Path]) -> list[str]:
        """The names of ``files`` whose content differs from the image their stored mask was made from (each
        file with a recorded digest is read once)."""
        recorded = self.contents()
        return [p.name for p in files if p.name in recorded and file_sha256(p) != recorded[p.name]]

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, shard: Path) -> dict[str, Tensor]:
        try:
            mtime = shard.stat().st_mtime_ns
        except OSError as exc:
            raise InputError(f"cannot read {shard}: {exc.strerror or one_line(exc)}") from None
        ids, data = _load_shard(str(shard), mtime, self._mask_length)
        if ids != self._shard_ids.get(shard):
            raise InputError(f"{shard} changed since {self.folder} was opened; open the store again")
        return data

    def get(self, image_id: str) -> TeacherRecord:
        """The record of ``image_id``; ``KeyError`` when the store has none, ``InputError`` for a bad shard."""
        shard, row = self.index[image_id]
        data = self._load(shard)
        return TeacherRecord(
            id=image_id,
            mask=data["masks"][row].float(),
            target=int(data["targets"][row]),
            loss=float(data["loss"][row]),
            distortion=float(data["distortion"][row]),
            mask_mean=float(data["mask_mean"][row]),
            seed=int(data["seeds"][row]) if "seeds" in data else None,
        )

    def verify(self) -> int:
        """Read every shard once and check its values (what :meth:`get` checks as it loads); returns the number
        of masks. Costs one read of the whole store; ``InputError`` names the first bad shard."""
        index = self.index
        for shard, ids in self._shard_ids.items():
            if read_shard(shard, self._mask_length)[0] != ids:
                raise InputError(f"{shard} changed since {self.folder} was opened; open the store again")
        return len(index)
