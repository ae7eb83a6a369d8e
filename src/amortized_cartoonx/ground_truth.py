"""Ground-truth localisation metrics for benchmarks whose decisive object is known (pure torch).

A benchmark folder written by :func:`amortized_cartoonx.synthetic.export.write_synthetic_folder` holds
``ground_truth.safetensors``: per image file name two uint8 masks ``(H, W)`` under the keys
``object/<file name>`` (the decisive object) and ``distractors/<file name>`` (the union of the distractor
objects). :func:`read_ground_truth` reads them; :func:`masks_for` resizes them to an evaluation's image size.

The metrics take a **non-negative pixel relevance map** ``R: (N, H, W)``. How an explainer's output becomes
R is the evaluation's choice, not this module's (``evaluation.maps`` decides: e.g. the absolute CartoonX
explanation ``|IDWT(mask * DWT(grey(x)))|``, a Pixel RDE mask, or a gradient method's absolute attribution
summed over channels); here R is only taken.

* :func:`energy_share`: the share of ``sum(R)`` on the object, on the distractors and on the background
  (the rest); the three shares sum to 1. An all-zero map carries no information and is scored as a uniform
  map (each share = the region's area fraction: the chance level).
* :func:`pointing_game`: whether the maximum of R, after a light smoothing (a ``smoothing x smoothing`` box
  filter, default 3), falls on the object dilated by ``tolerance`` pixels (a disc; default
  :data:`DEFAULT_TOLERANCE` = 2 px, about 3% of a 64-px image). An all-zero map is a miss. Ties go to the
  first maximum in row-major order.
* :func:`outline_band`: the band around the object's boundary, the object dilated by a disc of ``radius``
  pixels minus the object eroded by it (default :data:`DEFAULT_OUTLINE_RADIUS` = 4 px: the synthetic scenes'
  dark outline, 2 px wide at 64 px, plus the 2 to 3 px on either side of its edges that the energy of a
  finest-level db3 wavelet on an edge reaches). :func:`region_share` is the share of R on any region (e.g. this
  band), with the same all-zero rule as :func:`energy_share`; :func:`area_share` is a region's share of the
  image, the chance level of both.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

GROUND_TRUTH_FILE = "ground_truth.safetensors"
OBJECT_PREFIX = "object/"
DISTRACTOR_PREFIX = "distractors/"
#: Pointing-game tolerance in pixels (the object mask is dilated by a disc of this radius).
DEFAULT_TOLERANCE = 2
#: Side of the box filter applied to R before its maximum is taken (1 = none).
DEFAULT_SMOOTHING = 3
#: Half-width in pixels of the outline band (:func:`outline_band`): a disc dilation minus a disc erosion.
DEFAULT_OUTLINE_RADIUS = 4


def read_ground_truth(folder: str | Path) -> dict[str, tuple[Tensor, Tensor]] | None:
    """``{file name: (object mask, distractor mask)}`` (bool ``(H, W)`` each) from ``folder``, or None.

    Returns None when the folder has no ``ground_truth.safetensors``.

    Raises:
        InputError: an unreadable file, or an image with only one of its two masks.
    """
    from safetensors.torch import load_file

    path = Path(folder) / GROUND_TRUTH_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the user's
        raise InputError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    objects = {k[len(OBJECT_PREFIX) :]: v for k, v in tensors.items() if k.startswith(OBJECT_PREFIX)}
    distractors = {k[len(DISTRACTOR_PREFIX) :]: v for k, v in tensors.items() if k.startswith(DISTRACTOR_PREFIX)}
    if set(objects) != set(distractors):
        odd = sorted(set(objects) ^ set(distractors))
        raise InputError(f"{path}: {len(odd)} images have only one of their two masks, e.g. {odd[0]}")
    out = {}
    for name, obj in objects.items():
        dis = distractors[name]
        if obj.dim() != 2 or obj.shape != dis.shape:
            raise InputError(f"{path}: the masks of {name} must be two (H, W) tensors of one shape")
        out[name] = (obj.bool(), dis.bool())
    return out


def resize_mask(mask: Tensor, size: int) -> Tensor:
    """``(H, W)`` bool -> ``(size, size)`` bool, the geometry :func:`~amortized_cartoonx.images.load_image` uses.

    The shorter side goes to ``size`` (antialiased bilinear on the 0/1 mask, then >= 0.5), then a centre crop.
    """
    from .images import resize_center_crop

    if tuple(mask.shape) == (size, size):
        return mask.bool()
    return resize_center_crop(mask.float()[None], size)[0] >= 0.5


def masks_for(
    ground_truth: dict[str, tuple[Tensor, Tensor]], ids: list[str], size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Stack the masks of ``ids`` (file names) into ``(N, S, S)`` bool object and distractor masks.

    Args:
        ground_truth: from :func:`read_ground_truth`.
        ids: the image file names, in the evaluation's order.
        size: resize to ``size x size`` (the evaluation's ``--size``); None keeps the stored size.
    """
    missing = [i for i in ids if i not in ground_truth]
    if missing:
        raise InputError(f"{len(missing)} images have no ground-truth masks, e.g. {missing[0]}")
    objects, distractors = [], []
    for i in ids:
        obj, dis = ground_truth[i]
        objects.append(obj if size is None else resize_mask(obj, size))
        distractors.append(dis if size is None else resize_mask(dis, size))
    return torch.stack(objects), torch.stack(distractors)


def _check(relevance: Tensor, *masks: Tensor) -> tuple[Tensor, ...]:
    if relevance.dim() == 2:
        relevance = relevance[None]
    if relevance.dim() != 3:
        raise InputError(f"the relevance map must be (N, H, W), got shape {tuple(relevance.shape)}")
    if not torch.isfinite(relevance).all():
        raise InputError("the relevance map has NaN or infinite values")
    if (relevance < 0).any():
        raise InputError("the relevance map must be non-negative (take |R| or clamp it first)")
    out = []
    for mask in masks:
        mask = mask.bool().to(relevance.device)
        if mask.dim() == 2:
            mask = mask[None]
        if mask.shape[-2:] != relevance.shape[-2:] or mask.shape[0] not in (1, relevance.shape[0]):
            raise InputError(
                f"mask of shape {tuple(mask.shape)} does not match the relevance map {tuple(relevance.shape)}"
            )
        out.append(mask.expand_as(relevance))
    return (relevance.float(), *out)


def energy_share(relevance: Tensor, object_mask: Tensor, distractor_mask: Tensor) -> dict[str, Tensor]:
    """Shares of the relevance on the object, the distractors and the background (the rest).

    Pixels in both masks count as object. An all-zero map is scored as a uniform one (area fractions).

    Args:
        relevance: ``(N, H, W)`` non-negative.
        object_mask, distractor_mask: ``(N, H, W)`` or ``(H, W)``, bool or 0/1.

    Returns:
        ``{"object": (N,), "distractors": (N,), "background": (N,)}``, each in [0, 1], summing to 1 per image.
    """
    r, obj, dis = _check(relevance, object_mask, distractor_mask)
    dis = dis & ~obj
    total = r.sum(dim=(1, 2))  # (N,)
    r = torch.where((total > 0).view(-1, 1, 1), r, torch.ones_like(r))  # all-zero -> uniform
    total = r.sum(dim=(1, 2))
    on_object = (r * obj).sum(dim=(1, 2)) / total
    on_distractors = (r * dis).sum(dim=(1, 2)) / total
    return {
        "object": on_object,
        "distractors": on_distractors,
        "background": (1.0 - on_object - on_distractors).clamp_min(0.0),
    }


def _disc_dilate(mask: Tensor, radius: int) -> Tensor:
    """``(N, H, W)`` bool dilated by a disc of ``radius`` pixels."""
    if radius <= 0:
        return mask
    r = torch.arange(-radius, radius + 1, device=mask.device, dtype=torch.float32)
    disc = ((r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) <= radius**2 + 1e-6).float()[None, None]
    hits = F.conv2d(mask.float()[:, None], disc, padding=radius)
    return hits[:, 0] > 0.5


def _disc_erode(mask: Tensor, radius: int) -> Tensor:
    """``(N, H, W)`` bool eroded by a disc of ``radius`` pixels; outside the image counts as inside the mask (an
    object cut by the image border has no boundary there)."""
    return ~_disc_dilate(~mask, radius)


def outline_band(object_mask: Tensor, radius: int = DEFAULT_OUTLINE_RADIUS) -> Tensor:
    """The pixels within ``radius`` of the object's boundary: dilation minus erosion by a disc.

    Args:
        object_mask: ``(N, H, W)`` or ``(H, W)``, bool or 0/1.
        radius: the band's half-width in pixels (default 4); the band is about ``2 * radius`` pixels wide.

    Returns:
        bool of the mask's shape. Empty for an empty object; the image border is not a boundary.
    """
    if radius < 1:
        raise InputError(f"the outline band's radius must be at least 1 pixel, got {radius}")
    mask = object_mask.bool()
    squeeze = mask.dim() == 2
    mask = mask[None] if squeeze else mask
    band = _disc_dilate(mask, radius) & ~_disc_erode(mask, radius)
    return band[0] if squeeze else band


def region_share(relevance: Tensor, region: Tensor) -> Tensor:
    """``(N,)``: the share of ``sum(R)`` on ``region`` (``(N, H, W)`` or ``(H, W)``); an all-zero map is scored
    as a uniform one (the region's area fraction, :func:`area_share`), as in :func:`energy_share`."""
    r, reg = _check(relevance, region)
    total = r.sum(dim=(1, 2))
    r = torch.where((total > 0).view(-1, 1, 1), r, torch.ones_like(r))
    return (r * reg).sum(dim=(1, 2)) / r.sum(dim=(1, 2))


def area_share(region: Tensor) -> Tensor:
    """``(N,)``: the fraction of the image a region ``(N, H, W)`` or ``(H, W)`` covers (the chance level of a
    share)."""
    region = region.bool()
    region = region[None] if region.dim() == 2 else region
    return region.float().mean(dim=(1, 2))


def pointing_game(
    relevance: Tensor,
    object_mask: Tensor,
    tolerance: int = DEFAULT_TOLERANCE,
    smoothing: int = DEFAULT_SMOOTHING,
) -> Tensor:
    """Does the strongest point of each relevance map hit the object?

    Args:
        relevance: ``(N, H, W)`` non-negative.
        object_mask: ``(N, H, W)`` or ``(H, W)``.
        tolerance: the object is dilated by a disc of this radius in pixels (default 2).
        smoothing: side of the box filter applied to R first (odd; 1 = none; default 3; zeros outside the image,
            so a lone peak weighs the same at the border as inside).

    Returns:
        ``(N,)`` bool: True when the maximum of the smoothed map lies on the dilated object; when several
        pixels tie for it (a lone peak is a plateau of ``smoothing`` x ``smoothing`` pixels after the box
        filter), when at least half of them do. (The first maximum in row-major order was taken: a peak just
        left of or above the object missed where the same peak right of or below it hit.)
    """
    if tolerance < 0 or smoothing < 1 or smoothing % 2 == 0:
        raise InputError(f"tolerance must be >= 0 and smoothing a positive odd number, got {tolerance}, {smoothing}")
    r, obj = _check(relevance, object_mask)
    if smoothing > 1:
        r = F.avg_pool2d(r[:, None], smoothing, stride=1, padding=smoothing // 2, count_include_pad=True)[:, 0]
    n = r.shape[0]
    flat = r.reshape(n, -1)
    top = flat.amax(dim=1, keepdim=True)
    maxima = flat == top  # (N, HW): every pixel at the maximum
    target = _disc_dilate(obj, tolerance).reshape(n, -1)
    hit = 2 * (maxima & target).sum(dim=1) >= maxima.sum(dim=1)
    return hit & (top[:, 0] > 0)
