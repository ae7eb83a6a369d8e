"""Reading images from disk into ``(3, S, S)`` tensors in [0, 1], robustly.

Any mode PIL opens is accepted: greyscale and palette images are expanded to RGB, transparent images are
composited on white, 16-bit and 32-bit greyscale images are scaled by their bit depth (PIL's own
``convert("RGB")`` would clip them). Images are resized (shorter side to ``size``, antialiased) and
centre-cropped to ``size x size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` float32 in [0, 1] from any PIL mode."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            scale = 65535.0
        elif img.mode == "I":
            scale = 65535.0 if arr.max(initial=0) > 255 else 255.0
        else:  # float images: assume [0, 1] unless they clearly are not
            scale = max(1.0, float(arr.max(initial=0)))
        grey = np.clip(arr / scale, 0.0, 1.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str | Path, size: int | None = 256) -> Tensor:
    """Read an image file as ``(3, size, size)`` float32 in [0, 1] (or its own size when ``size`` is None).

    Raises:
        InputError: missing, unreadable or corrupt file, or a size below 1.
    """
    path = Path(path)
    if size is not None and size < 1:
        raise InputError(f"image size must be positive, got {size}")
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            arr = _to_rgb_array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (3, H, W)
    return x if size is None else resize_center_crop(x, size)


def resize_center_crop(x: Tensor, size: int) -> Tensor:
    """``(C, H, W) -> (C, size, size)``: shorter side to ``size`` (antialiased bilinear), centre crop."""
    _, height, width = x.shape
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        x = torch.nn.functional.interpolate(
            x[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )[0]
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[:, top : top + size, left : left + size]
    return x.clamp(0.0, 1.0).contiguous()


def load_images(paths: Sequence[str | Path], size: int | None = 256) -> Tensor:
    """``(N, 3, size, size)`` from ``paths``; fails on the first bad file, before any work is done."""
    return torch.stack([load_image(p, size) for p in paths])


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def read_class_names(path: str | Path | None) -> list[str] | None:
    """Class names, one per line (line i = class i), or None."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
