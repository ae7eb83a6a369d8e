"""The one verb every explainer answers: ``explain(images, target=None, *, seeds=None) -> Explanation``.

The exact optimizers (:class:`~amortized_cartoonx.optimizer.CartoonX`, :class:`~amortized_cartoonx.optimizer.PixelRDE`),
the single-pass :class:`~amortized_cartoonx.amortized.AmortizedExplainer` and the
:class:`~amortized_cartoonx.amortized.WarmStartExplainer` all satisfy :class:`Explainer`, so code that explains
(the CLI, the benchmarks, your own) never asks which one it holds; :func:`check_explainer` checks an
implementation's signature (the tests run it on each). The evaluation's methods, which also cover
pixel-attribution baselines, answer a different verb, ``attribute``, and return an ``Attribution``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from .explanation import Explanation


@runtime_checkable
class Explainer(Protocol):
    """An RDE explainer.

    ``explain(images, target=None, *, seeds=None, progress=False) -> Explanation``:
        images: ``(N, C, H, W)`` in [0, 1], on the device to compute on.
        target: the class to explain: None (the classifier's predicted class), one int for all, or one per image.
        seeds: one seed per image (default ``seed + n``); an image's noise depends on its seed alone.
        progress: show a progress bar where there are steps to show.
    Returns an :class:`~amortized_cartoonx.explanation.Explanation` (mask, explanation image, loss, ...), measured
    on the same noise stream by every implementation, so losses compare directly.

    ``method`` names the explainer (a row of :data:`~amortized_cartoonx.methods.METHOD_TABLE`); ``settings()``
    returns the plain settings that determine its masks.
    """

    method: str

    def explain(
        self,
        images: Tensor,
        target: Tensor | Sequence[int] | int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        progress: bool = False,
    ) -> Explanation: ...

    def settings(self) -> dict: ...


def check_explainer(explainer: object) -> None:
    """Raise ``TypeError`` unless ``explainer`` answers the protocol with its exact signature.

    ``isinstance(x, Explainer)`` only checks that the attributes exist; this also checks ``explain``'s
    parameters: ``(images, target=None, *, seeds=None, progress=False, ...)``, where an implementation may add
    keyword-only options with defaults after them. Use it in the tests of your own explainer.
    """
    name = type(explainer).__name__
    if not isinstance(explainer, Explainer):
        raise TypeError(f"{name} lacks method, explain or settings")
    params = list(inspect.signature(explainer.explain).parameters.values())
    if [p.name for p in params[:2]] != ["images", "target"] or params[1].default is not None:
        raise TypeError(f"{name}.explain must start with (images, target=None)")
    keyword = {p.name: p for p in params[2:]}
    for option, default in (("seeds", None), ("progress", False)):
        p = keyword.get(option)
        if p is None or p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is not default:
            raise TypeError(f"{name}.explain needs the keyword-only option {option}={default}")
    for p in params[2:]:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
            raise TypeError(f"{name}.explain: extra parameter {p.name!r} must be keyword-only with a default")
