"""The two kinds of file of a teacher store, read and checked (no Lightning, never running code).

* ``manifest.json`` (:func:`read_manifest`): a JSON object whose known keys (:data:`MANIFEST_TYPES`) have their
  types, of a format this version reads (:data:`OLDEST_FORMAT` to :data:`FORMAT_VERSION`), with a consistent
  mask layout (``band_shapes`` hold ``mask_length`` values).
* ``shard-<tag>.safetensors``: :func:`read_shard_info` reads and checks the header only (a safetensors file with
  the tensors of :data:`SHARD_TENSORS`, their dtypes and shapes ``(n, K)`` / ``(n,)``, ``n`` unique ids in its
  metadata and, optionally, ``n`` image SHA-256 digests; K as expected); :func:`read_shard` also reads the
  tensors and checks their values (masks finite and in [0, 1], finite losses and mask means, non-negative
  targets) and, when the shard records one, its checksum (:func:`shard_checksum`: safetensors files have none,
  so changed bytes inside a mask would otherwise read as another mask).

Every problem is an :class:`~amortized_cartoonx.errors.InputError` of one line naming the file. Only the
safetensors API and ``json`` read these files: a pickle renamed to a shard is refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..errors import InputError, one_line
from ..optimizer import result_settings

MANIFEST_KIND = "cartoonx-teacher-masks"

#: The manifest format this version writes. 2: each image is seeded ``item_seed(file name, seed)``;
#: 1: seeded ``seed + its position in the folder``. Format-1 stores are read (their masks are valid), but a run
#: never adds to one: its masks would mix the two seeding rules.
FORMAT_VERSION = 2
OLDEST_FORMAT = 1

_INT, _NUMBER, _STR = (int,), (int, float), (str,)
#: How a manifest recognises its classifier beyond the spec's text (``classifiers.classifier_identity``): a model
#: file's content and the weights' digest; compared when both manifests record them (earlier ones did not).
IDENTITY_KEYS = ("classifier_sha256", "classifier_weights_sha256")

#: The manifest's known keys and their JSON types (``None`` allowed where listed); other keys are kept as is.
MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": _INT,
    "kind": _STR,
    "created": _STR,
    "method": _STR,
    "target": _STR,
    "classifier": _STR,
    "classifier_sha256": (*_STR, type(None)),
    "classifier_weights_sha256": (*_STR, type(None)),
    "normalize": _STR,
    "representation": _STR,
    "wave": _STR,
    "mode": _STR,
    "seeding": _STR,
    "obfuscation": _STR,
    "distortion": _STR,
    "link": _STR,
    "size": _INT,
    "levels": _INT,
    "levels_requested": _INT,
    "mask_length": _INT,
    "band_shapes": (list,),
    "steps": _INT,
    "num_samples": _INT,
    "seed": _INT,
    "stop_patience": (*_INT, type(None)),
    "measure_samples": (*_INT, type(None)),
    "lr": _NUMBER,
    "l1_lambda": (*_NUMBER, type(None)),
    "stop_tolerance": _NUMBER,
}

#: A shard's tensors: name -> (safetensors dtypes accepted, number of dimensions); ``seeds`` is optional.
SHARD_TENSORS: dict[str, tuple[frozenset[str], int]] = {
    "masks": (frozenset({"F16", "BF16", "F32"}), 2),
    "targets": (frozenset({"I64"}), 1),
    "loss": (frozenset({"F32"}), 1),
    "distortion": (frozenset({"F32"}), 1),
    "mask_mean": (frozenset({"F32"}), 1),
}
OPTIONAL_TENSORS: dict[str, tuple[frozenset[str], int]] = {"seeds": (frozenset({"I64"}), 1)}
_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's header says: its ``ids`` (one per row) and its mask length K."""

    path: Path
    ids: tuple[str, ...]
    mask_length: int
    #: the SHA-256 of each image's file when the masks were made (shards written before 2026-12-02 have none)
    contents: tuple[str, ...] | None = None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- the manifest ----------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict:
    """The manifest at ``path``, checked: a JSON object whose known keys (:data:`MANIFEST_TYPES`) have their
    types, ``format_version`` between :data:`OLDEST_FORMAT` and :data:`FORMAT_VERSION`, consistent mask layout."""
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or one_line(exc)}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{path} is not valid JSON ({one_line(exc)}); delete the folder or use another") from None
    if not isinstance(manifest, dict):
        raise InputError(
            f"{path} is not a teacher-mask manifest (a JSON object expected, got {type(manifest).__name__})"
        )
    problem = manifest_problem(manifest)
    if problem:
        raise InputError(f"{path} is not a valid teacher-mask manifest: {problem}")
    return manifest


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest (a dict), in a few words; None when nothing is."""
    if "format_version" not in manifest:
        return "no format_version"
    for key, types in MANIFEST_TYPES.items():
        value = manifest.get(key)
        if key in manifest and (isinstance(value, bool) or not isinstance(value, types)):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return f"{key} is {_short(value)}, expected {expected}"
    version = manifest["format_version"]
    if not OLDEST_FORMAT <= version <= FORMAT_VERSION:
        return (
            f"format_version {version} (this version reads {OLDEST_FORMAT} to {FORMAT_VERSION}; a newer one wrote it?)"
        )
    if manifest.get("kind", MANIFEST_KIND) != MANIFEST_KIND:
        return f"kind is {_short(manifest['kind'])}, expected {MANIFEST_KIND!r}"
    for key in ("mask_length", "size"):
        if key in manifest and manifest[key] < 1:
            return f"{key} is {manifest[key]}, expected at least 1"
    shapes = manifest.get("band_shapes")
    if shapes is not None:
        if not shapes or not all(
            isinstance(s, list) and s and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)
            for s in shapes
        ):
            return "band_shapes must be a non-empty list of shapes (lists of positive integers)"
        total = sum(math.prod(s) for s in shapes)
        if "mask_length" in manifest and total != manifest["mask_length"]:
            return f"band_shapes hold {total} values but mask_length is {manifest['mask_length']}"
    return None


def _comparable(manifest: dict) -> dict:
    """A manifest without the settings that earlier manifests lack at the value they implied: those of
    :data:`~amortized_cartoonx.optimizer.LATER_DEFAULTS`, and the parametrisation when it is the projected mask
    (``clamp``, the only one before the logit form), together with the logit form's stretch, unused then."""
    manifest = result_settings(manifest)
    if manifest.get("parametrisation") == "clamp":
        del manifest["parametrisation"]
    return manifest


def manifest_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two manifests (ignoring bookkeeping keys; a setting added later and missing
    from a manifest counts as its earlier value, see :func:`_comparable`)."""
    old, new = _comparable(old), _comparable(new)
    keys = (set(old) | set(new)) - {"created", "format_version"}
    keys -= {k for k in IDENTITY_KEYS if old.get(k) is None or new.get(k) is None}  # not recorded before
    return sorted(k for k in keys if old.get(k) != new.get(k))


# ---- shards ----------------------------------------------------------------------------------------------
def shard_error(path: Path, problem: str) -> InputError:
    return InputError(
        f"{path} is not a valid teacher-mask shard: {problem}; delete it and run cartoonx targets again to recompute it"
    )


def _check_ids(path: Path, metadata: dict | None, n: int | None) -> tuple[str, ...]:
    try:
        ids = json.loads((metadata or {})["ids"])
    except KeyError:
        raise shard_error(path, "no ids in its metadata") from None
    except (ValueError, RecursionError) as exc:
        raise shard_error(path, f"its ids are not JSON ({one_line(exc)})") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise shard_error(path, "its ids are not a list of non-empty strings")
    if len(set(ids)) != len(ids):
        raise shard_error(path, "an id appears twice in it")
    if n is not None and len(ids) != n:
        raise shard_error(path, f"{len(ids)} ids for {n} masks")
    return tuple(ids)


def _check_contents(path: Path, metadata: dict | None, n: int) -> tuple[str, ...] | None:
    """The shard's optional ``sha256`` metadata: one hex digest per id, or None when absent."""
    text = (metadata or {}).get("sha256")
    if text is None:
        return None
    try:
        contents = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise shard_error(path, f"its sha256 list is not JSON ({one_line(exc)})") from None
    if not isinstance(contents, list) or len(contents) != n or not all(isinstance(c, str) for c in contents):
        raise shard_error(path, f"its sha256 metadata is not a list of {n} strings")
    return tuple(contents)


def _check_layout(path: Path, layout: dict[str, tuple[str, list[int]]], mask_length: int | None) -> int:
    """Check ``name -> (dtype, shape)`` against :data:`SHARD_TENSORS`; returns n (rows)."""
    missing = sorted(set(SHARD_TENSORS) - set(layout))
    if missing:
        raise shard_error(path, f"no {', '.join(missing)} tensor")
    n = layout["masks"][1][0] if len(layout["masks"][1]) == 2 else -1
    for name, (dtypes, ndim) in {**SHARD_TENSORS, **OPTIONAL_TENSORS}.items():
        if name not in layout:
            continue
        dtype, shape = layout[name]
        if dtype not in dtypes:
            raise shard_error(path, f"{name} has dtype {dtype}, expected {' or '.join(sorted(dtypes))}")
        if len(shape) != ndim or shape[0] != n:
            rows = n if n >= 0 else "n"  # n is -1 when the masks themselves are not (n, K)
            expected = f"[{rows}, K]" if ndim == 2 else f"[{rows}]"
            raise shard_error(path, f"{name} has shape {list(shape)}, expected {expected}")
    k = layout["masks"][1][1]
    if mask_length is not None and k != mask_length:
        raise shard_error(path, f"masks of length {k}, expected {mask_length}")
    if k < 1:
        raise shard_error(path, "masks of length 0")
    return n


def read_shard_info(path: Path, mask_length: int | None = None) -> ShardInfo:
    """A shard's header, checked (tensors, dtypes, shapes, ids; K = ``mask_length`` when given). Reads no data."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
            layout = {}
            for name in fh.keys():
                part = fh.get_slice(name)
                layout[name] = (part.get_dtype(), list(part.get_shape()))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:
        raise shard_error(path, f"not a readable safetensors file ({one_line(exc)})") from None
    n = _check_layout(path, layout, mask_length)
    ids = _check_ids(path, metadata, n)
    return ShardInfo(path, ids, layout["masks"][1][1], _check_contents(path, metadata, len(ids)))


#: The shard metadata key of :func:`shard_checksum` (shards written before it have none, and are not checked).
CHECKSUM_KEY = "checksum_sha256"


def shard_checksum(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of a shard's content: its ids and image digests (metadata) and every tensor's name, dtype, shape
    and bytes, in name order. ``write_shard`` records it; :func:`read_shard` compares it."""
    digest = hashlib.sha256()
    for key in ("ids", "sha256"):
        digest.update(f"{key}={metadata.get(key)};".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_shard(path: Path, mask_length: int | None = None) -> tuple[tuple[str, ...], dict[str, Tensor]]:
    """A shard's ids and tensors, with its structure and values checked (see the module docstring)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
            data = {
                name: fh.get_tensor(name) for name in fh.keys() if name in SHARD_TENSORS or name in OPTIONAL_TENSORS
            }
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:
        raise shard_error(path, f"not a readable safetensors file ({one_line(exc)})") from None
    layout = {name: (_DTYPE_NAMES.get(t.dtype, str(t.dtype)), list(t.shape)) for name, t in data.items()}
    n = _check_layout(path, layout, mask_length)
    ids = _check_ids(path, metadata, n)
    recorded = (metadata or {}).get(CHECKSUM_KEY)
    if recorded is not None and recorded != shard_checksum(data, metadata):
        raise shard_error(path, "its content does not match its checksum (the file was changed or damaged)")
    masks = data["masks"]  # (n, K)
    if masks.numel():
        low, high = torch.aminmax(masks)  # one pass; NaN propagates to both
        if not (bool(low >= 0) and bool(high <= 1)):
            bad = ~((masks >= 0) & (masks <= 1))  # (n, K); NaN fails both comparisons
            row = int(bad.any(dim=1).nonzero()[0, 0])
            value = float(masks[row][bad[row]][0])
            raise shard_error(path, f"the mask of {_short(ids[row])} has a value outside [0, 1] ({value})")
    for name in ("loss", "distortion", "mask_mean"):
        if not bool(torch.isfinite(data[name]).all()):
            raise shard_error(path, f"a {name} that is not finite")
    if bool((data["targets"] < 0).any()):
        raise shard_error(path, "a negative target")
    return ids, data
