"""Image folders as datasets (no Lightning here): ids, optional ``labels.csv``, deterministic splits."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from .errors import InputError, one_line
from .images import list_images, load_image
from .seeding import item_unit

#: Class indices stop below this (a larger one overflowed the batch's int64 tensor with a raw ValueError).
MAX_CLASS_INDEX = 2**31


def read_labels_csv(path: str | Path) -> dict[str, int]:
    """``file -> class_index`` from a CSV with at least the columns ``file`` and ``class_index`` (UTF-8, with or
    without the byte-order mark spreadsheets write). A file listed twice must have one class."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise InputError(f"cannot read labels file {path}: {exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"labels file {path} is not UTF-8 CSV text ({one_line(exc)})") from None
    if rows and not {"file", "class_index"} <= set(rows[0]):
        raise InputError(f"{path} needs the columns file and class_index, has {', '.join(rows[0])}")
    labels = {}
    for line, row in enumerate(rows, start=2):
        value = row["class_index"]  # None on a short row
        try:
            index = int(value)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < MAX_CLASS_INDEX:  # -1 would read as "no label" and silently explain the prediction
            raise InputError(
                f"{path}, row {line}: class_index must be a non-negative integer below 2^31, got {value!r:.40}"
            )
        if labels.get(row["file"], index) != index:
            raise InputError(
                f"{path}, row {line}: {row['file']!r} is listed again with class {index}, "
                f"after class {labels[row['file']]}"
            )
        labels[row["file"]] = index
    return labels


#: The folders whose labels file names files they lack, warned about already (a fit builds three splits).
_WARNED_UNKNOWN: set[tuple[Path, int]] = set()


class ImageFolder(Dataset):
    """The images directly in ``root`` (sorted by name), resized and centre-cropped to ``size``.

    Each item is a dict: ``image`` ``(3, size, size)`` float in [0, 1], ``id`` (the file name, the key
    that joins teacher masks and caches), ``index`` (position in the folder) and ``label`` (from
    ``labels.csv``, -1 when unknown).

    Args:
        root: the folder.
        size: side of the square images. Default 256 (the paper's).
        labels: ``"auto"`` reads ``root/labels.csv`` when it exists; a path reads that file; None reads none.
        ids: restrict to these file names (in this order).
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 256,
        labels: str | Path | None = "auto",
        ids: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.size = size
        files = list_images(self.root)
        by_name = {p.name: p for p in files}
        if ids is not None:
            missing = [i for i in ids if i not in by_name]
            if missing:
                raise InputError(f"{len(missing)} images not found in {self.root}, e.g. {missing[0]}")
            files = [by_name[i] for i in ids]
        self.files = files
        self.ids = [p.name for p in files]
        if labels == "auto":
            labels = self.root / "labels.csv" if (self.root / "labels.csv").is_file() else None
        self.labels = read_labels_csv(labels) if labels is not None else {}
        unknown = sorted(set(self.labels) - set(by_name))  # every image of the folder, not only ``ids``
        if unknown and (self.root, len(unknown)) not in _WARNED_UNKNOWN:  # once per folder (not per split)
            _WARNED_UNKNOWN.add((self.root, len(unknown)))  # a typo, A.png for a.png, another folder's file
            warnings.warn(
                f"{len(unknown)} file(s) of the labels file are not images of {self.root}, e.g. {unknown[0]!r}: "
                "their labels are not used (file names are matched exactly, case included)",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": load_image(self.files[index], self.size),
            "id": self.ids[index],
            "index": index,
            "label": self.labels.get(self.ids[index], -1),
        }


def split_ids(ids: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """A deterministic train/validation split that does not depend on the order or number of ``ids``.

    An id goes to validation when the hash of ``(seed, id)`` falls below ``val_fraction``, so adding
    images to a folder never moves an existing image to the other side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for image_id in ids:
        (val if item_unit(image_id, seed) < val_fraction else train).append(image_id)
    return train, val


def split_train_val_test(
    ids: Sequence[str], val_fraction: float, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, list[str]]:
    """A deterministic three-way split by hashing each id (adding images never moves an existing one).

    ``test`` is held out first (hash with ``seed + 1``), then the rest is split into ``train`` and ``val``
    (hash with ``seed``), both with :func:`~amortized_cartoonx.data.split_ids`. With ``test_fraction = 0`` the
    train/val split is exactly ``split_ids(ids, val_fraction, seed)``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(f"the test fraction must be in [0, 1), got {test_fraction}")
    rest, test = split_ids(ids, test_fraction, seed + 1) if test_fraction > 0 else (list(ids), [])
    train, val = split_ids(rest, val_fraction, seed)
    return {"train": train, "val": val, "test": test}
