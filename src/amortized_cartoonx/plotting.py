"""Figures. Uses matplotlib's object API with the Agg canvas: no global backend change, no display needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from .explanation import Explanation
from .io import atomic_write
from .methods import title


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` atomically; the format follows ``path``'s suffix."""
    FigureCanvasAgg(fig)
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=fmt))


def image_array(img: Tensor) -> np.ndarray:
    """``(C, H, W)`` with C = 1 (greyscale) or 3 (RGB) -> ``(H, W, 3)`` in [0, 1] for ``imshow``."""
    img = img.detach().float().cpu().clamp(0, 1)
    return img.expand(3, -1, -1).permute(1, 2, 0).numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def target_word(link: str) -> str:
    """What one output of the classifier is called: a "class" (softmax) or a "label" (sigmoid, multi-label)."""
    return "label" if link == "sigmoid" else "class"


def _show(ax, img: Tensor, title: str, cmap: str | None = None, vmin: float = 0.0, vmax: float = 1.0) -> None:
    """Show ``(C, H, W)`` (C = 1 or 3) on ``ax``."""
    img = img.detach().float().cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap=cmap or "gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def explanation_figure(
    image: Tensor, explanation: Explanation, index: int, class_name: str | None = None, link: str = "softmax"
) -> Figure:
    """The input (with the explained class and its probability), the explanation in grey, and the mask.

    Args:
        image: ``(3, H, W)`` the input in [0, 1].
        explanation: a batch of explanations; ``index`` picks the image.
        class_name: the explained class's name, if known.
        link: the classifier's link; with ``sigmoid`` an unnamed target is a "label", not a "class".
    """
    target = int(explanation.target[index])
    label = f"{class_name} ({target})" if class_name else f"{target_word(link)} {target}"
    mask = explanation.mask.select(index)
    # mask panels: low-pass, then the detail levels from coarse to fine (mean over the 3 orientations)
    panels = [("mask: low-pass" if mask.levels else "mask", mask.lowpass[0])]
    for j in range(mask.levels, 0, -1):
        panels.append((f"mask: level {j}", mask.details[j - 1][0].mean(1)))
    cols = 2 + len(panels)
    fig = Figure(figsize=(2.2 * cols, 2.6))
    axes = fig.subplots(1, cols)
    _show(axes[0], image, f"{label}\np = {float(explanation.prob_original[index]):.3f}")
    method = title(explanation.method)
    _show(
        axes[1],
        explanation.image[index],
        f"{method}\np(masked) = {float(explanation.prob_masked[index]):.3f}, "
        f"p(noisy) = {float(explanation.prob_obfuscated[index]):.3f}",
    )
    for ax, (panel, band) in zip(axes[2:], panels):
        _show(ax, band, f"{panel}\nmean {float(band.mean()):.3f}", cmap="magma")
    fig.suptitle(
        f"mask mean {float(explanation.mask_mean[index]):.4f}, distortion {float(explanation.distortion[index]):.4f}",
        fontsize=8,
        y=0.02,
    )
    return fig
