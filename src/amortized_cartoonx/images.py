"""Reading images from disk into ``(3, S, S)`` tensors in [0, 1], robustly.

Any mode PIL opens is accepted: greyscale and palette images are expanded to RGB, transparent images are
composited on white, 16-bit and 32-bit greyscale images are scaled by their bit depth (PIL's own
``convert("RGB")`` would clip them). Images are resized (shorter side to ``size``, antialiased) and
centre-cropped to ``size x size`` (or, with ``crop=False``, keep their aspect ratio). :func:`to_channels` turns
them into the ``(1, S, S)`` greyscale images a single-channel classifier takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import InputError, is_integer, one_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: Largest image read, in pixels (width x height), checked on the header before decoding: a small file can
#: declare a huge image (a "decompression bomb"). 64 MP covers any camera photo; raise it if you must.
MAX_PIXELS = 64_000_000
#: Smallest side read: below this an image holds too little to explain.
MIN_SIDE = 8
#: Largest output side of :func:`load_image` (a 100000 px request would allocate over 100 GB).
MAX_SIZE = 8192


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
#: The channel counts an image can be given in: greyscale or RGB.
CHANNELS = (1, 3)
#: ITU-R BT.601 luma weights (PIL's ``convert("L")``): greyscale from RGB. They sum to 1, so a greyscale file
#: (read as three equal channels) comes back exactly.
LUMA = (0.299, 0.587, 0.114)


def check_size(size: int | None) -> None:
    """Refuse an output size no image should be resized to (not an integer, non-positive, or above :data:`MAX_SIZE`)."""
    if size is not None and not (is_integer(size) and 1 <= size <= MAX_SIZE):
        raise InputError(f"image size must be an integer in 1..{MAX_SIZE}, got {size!r}")


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` float32 in [0, 1] from any PIL mode."""
    if img.mode in _HIGH_DEPTH:
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            scale = 65535.0
        elif img.mode == "I":  # 16-bit PGM/PNG (PIL scales other maxvals to 16 bits); 32-bit integers beyond
            scale = 65535.0 if arr.max(initial=0) <= 65535 else 4294967295.0
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


def load_image(path: str | Path, size: int | None = 256, crop: bool = True) -> Tensor:
    """Read an image file as ``(3, size, size)`` float32 in [0, 1] (or its own size when ``size`` is None).

    With ``crop=False`` the image keeps its aspect ratio: ``(3, size, W)`` or ``(3, H, size)``, its shorter side
    resized to ``size`` and the longer side in proportion (:func:`resize_shorter_side`).

    Raises:
        InputError: missing, unreadable or corrupt file, or a size below 1.
    """
    path = Path(path)
    check_size(size)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise InputError(
                    f"image {path} declares {width}x{height}: more pixels than the limit of {MAX_PIXELS:,} "
                    "(amortized_cartoonx.images.MAX_PIXELS)"
                )
            if min(width, height) < MIN_SIDE:
                raise InputError(f"image {path} is {width}x{height}; images need at least {MIN_SIDE} px per side")
            if size is not None and img.format == "JPEG":
                img.draft("RGB", (size, size))  # decode at a reduced scale (never below size): less memory and time
            img.load()
            img = ImageOps.exif_transpose(img)  # a phone photo's orientation tag: upright, as viewers show it
            if img.mode in ("P", "PA", "1"):  # reduce() cannot filter palette or 1-bit images
                img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
            if size is not None and min(img.size) >= 4 * size and img.mode not in _HIGH_DEPTH:
                img = img.reduce(min(img.size) // (2 * size))  # box-filter down to >= 2x size before float
            arr = _to_rgb_array(img)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(
            f"image {path} declares more pixels than the limit of {MAX_PIXELS:,} (amortized_cartoonx.images.MAX_PIXELS)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read image {path}: {one_line(exc)}") from None
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (3, H, W)
    if size is None:
        return x
    return (resize_center_crop if crop else resize_shorter_side)(x, size, str(path))


def resize_center_crop(x: Tensor, size: int, name: str = "the image") -> Tensor:
    """``(C, H, W) -> (C, size, size)``: shorter side to ``size`` (antialiased bilinear), centre crop.

    An image whose longer side would exceed :data:`MAX_SIZE` once resized (a strip of 8 x 8 million pixels at
    256 px would need 200 GB) has its centre square cut out first, then resized.
    """
    _, height, width = x.shape
    if max(_shorter_side_to(height, width, size)) > MAX_SIZE:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        x = x[:, top : top + side, left : left + side]
    x = resize_shorter_side(x, size, name)
    height, width = x.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return x[:, top : top + size, left : left + size].contiguous()


def _shorter_side_to(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)``: ``height x width`` scaled so that its shorter side is ``size`` (the longer rounded)."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def resize_shorter_side(x: Tensor, size: int, name: str = "the image") -> Tensor:
    """``(C, H, W) -> (C, h, w)``: the shorter side to ``size``, the longer in proportion (rounded; antialiased
    bilinear), no crop.

    Raises:
        InputError: a longer side above :data:`MAX_SIZE` (a panorama at a large ``size``).
    """
    _, height, width = x.shape
    new_h, new_w = _shorter_side_to(height, width, size)
    if max(new_h, new_w) > MAX_SIZE:
        raise InputError(
            f"{name} would be {new_w}x{new_h} with its shorter side at {size}: more than {MAX_SIZE} px on a side; "
            "give a smaller size or cut the image first"
        )
    if (new_h, new_w) != (height, width):
        x = torch.nn.functional.interpolate(
            x[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )[0]
    return x.clamp(0.0, 1.0).contiguous()


def load_images(paths: Sequence[str | Path], size: int | None = 256) -> Tensor:
    """``(N, 3, size, size)`` from ``paths``; fails on the first bad file, before any work is done."""
    return torch.stack([load_image(p, size) for p in paths])


def to_channels(images: Tensor, channels: int) -> Tensor:
    """Images ``(..., C, H, W)`` with C = 1 or 3 as ``channels`` (1 or 3) channels: RGB to greyscale by the
    BT.601 luma weights (:data:`LUMA`), greyscale to RGB by repeating it; unchanged when C already is
    ``channels``. Values in [0, 1] stay in [0, 1].

    Raises:
        InputError: ``channels`` not 1 or 3, or images whose channel dimension is neither.
    """
    if channels not in CHANNELS:
        raise InputError(f"images can be given in 1 (greyscale) or 3 (RGB) channels, not {channels!r}")
    have = images.shape[-3] if images.ndim >= 3 else None
    if have not in CHANNELS:
        raise InputError(f"expected images (..., 1 or 3, H, W), got shape {tuple(images.shape)}")
    if have == channels:
        return images
    if channels == 3:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:]).contiguous()
    # summed in float64: in float32 a grey level g came back 1 ulp off g for a quarter of the 8-bit levels
    weights = torch.tensor(LUMA, dtype=torch.float64, device=images.device).view(3, 1, 1)
    grey = (images.double() * weights).sum(dim=-3, keepdim=True).clamp(0.0, 1.0)
    return grey.to(images.dtype)


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; hidden files (``.name``, such as the ``._name``
    files macOS writes on some drives) are left out, subfolders are not searched."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) directly in {folder} (subfolders are not searched)")
    return files


def read_class_names(path: str | Path | None) -> list[str] | None:
    """Class names, one per line (line i = class i), or None."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels file not found: {path}")
    data = path.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first name
    except UnicodeDecodeError:
        raise InputError(f"labels file {path} is not UTF-8 text (one class name per line)") from None
    return [line.strip() for line in text.splitlines()]
