"""Write synthetic cartoon images as a benchmark folder that every image-folder command reads.

Layout (``cartoonx explain DIR/*.png`` and ``cartoonx evaluate --images DIR`` work on it)::

    DIR/<id>.png                 the images (RGB, 8 bit), ``<id>`` = ``<split>-<seed>-<index:05d>``
    DIR/labels.csv               file,class_index,name  (like the ImageNet samples' labels.csv)
    DIR/class_names.txt          one class name per line (line i = class i): ``--labels DIR/class_names.txt``
    DIR/ground_truth.safetensors per image two uint8 (H, W) masks: ``object/<file>`` and ``distractors/<file>``
                                 (read them with :func:`amortized_cartoonx.ground_truth.read_ground_truth`)

The default (``split="test"``, ``seed=HELD_OUT_SEED``) exports exactly the classifier's held-out images.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..ground_truth import DISTRACTOR_PREFIX, GROUND_TRUTH_FILE, OBJECT_PREFIX
from ..io import atomic_write, atomic_write_text
from ..runtime import single_thread
from .dataset import HELD_OUT_SEED, CartoonConfig, SyntheticCartoons

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
CLASS_NAMES_FILE = "class_names.txt"


def _write_png(path: Path, image: torch.Tensor) -> None:
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="PNG")
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def write_synthetic_folder(
    folder: str | Path,
    num_images: int,
    size: int = 64,
    seed: int = HELD_OUT_SEED,
    split: str = "test",
    *,
    config: CartoonConfig | None = None,
    progress: bool = True,
) -> list[str]:
    """Write ``num_images`` synthetic items (indices ``0 .. num_images - 1``) to ``folder``.

    Existing files of the same names are replaced; other files are left alone. The metadata files are
    written last, so an interrupted export leaves no ``labels.csv`` pointing at missing images.

    Args:
        folder: the output folder (created).
        num_images: how many items.
        size: image side in pixels.
        seed, split: the item stream (default: the held-out ``test`` images of the classifier).
        config: drawing settings (default :class:`CartoonConfig`; ``size`` overrides its size).
        progress: show a progress bar.

    Returns:
        The image file names, in index order.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if num_images < 1:
        raise ConfigError(f"the number of images must be at least 1, got {num_images}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dataset = SyntheticCartoons(num_images, size=size, seed=seed, split=split, config=config)
    names = dataset.class_names
    files: list[str] = []
    rows: list[tuple[str, int, str]] = []
    masks: dict[str, torch.Tensor] = {}
    with single_thread():
        for index in tqdm(range(num_images), desc="export synthetic images", unit="img", disable=not progress):
            item = dataset[index]
            name = f"{item['id']}.png"
            _write_png(folder / name, item["image"])
            files.append(name)
            rows.append((name, item["label"], names[item["label"]]))
            masks[OBJECT_PREFIX + name] = item["object_mask"].to(torch.uint8).contiguous()
            masks[DISTRACTOR_PREFIX + name] = item["distractor_mask"].to(torch.uint8).contiguous()

    metadata = {"split": split, "seed": str(seed), "size": str(size), "classes": ",".join(names)}
    atomic_write(folder / GROUND_TRUTH_FILE, lambda tmp: save_file(masks, str(tmp), metadata=metadata))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("file", "class_index", "name"))
    writer.writerows(rows)
    atomic_write_text(folder / LABELS_FILE, text.getvalue())
    atomic_write_text(folder / CLASS_NAMES_FILE, "\n".join(names) + "\n")
    log.info("wrote %d synthetic images (%s split, seed %d, %d px) to %s", num_images, split, seed, size, folder)
    return files
