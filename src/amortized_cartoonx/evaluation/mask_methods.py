"""The mask methods of the evaluation: the RDE explainers (``cartoonx``, ``pixel-rde``, ``amortized``, ``warm``).

Each wraps an :class:`~amortized_cartoonx.explainers.Explainer` (``explain(images, target, seeds=) ->
Explanation``); its relevance is the explanation's mask, flattened (channel-shared positions), and the
explanation's measurements become the per-image scalars. Importing this module registers the four factories in
:data:`~.attribution.METHODS`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from torch import Tensor

from ..amortized import AmortizedExplainer, WarmStartExplainer, refine_config
from ..errors import ConfigError
from ..explanation import Explanation
from ..optimizer import CartoonX, PixelRDE
from ..runtime import module_device, synchronize
from ..wavelets import Representation
from .attribution import (
    MASK,
    METHODS,
    Attribution,
    EvaluationMethod,
    MethodContext,
    explained_target,
)

#: The measurements of an :class:`Explanation` kept per image (summary.json's ``mask_scalars``).
EXPLANATION_SCALARS = ("mask_mean", "distortion", "loss", "prob_original", "prob_masked", "prob_obfuscated")


def _attribution(name: str, explanation: Explanation, seconds: float) -> Attribution:
    scalars = {k: getattr(explanation, k).detach().float() for k in EXPLANATION_SCALARS}
    return Attribution(name, explanation.mask.flatten().detach(), explanation.target, seconds, scalars)


class MaskMethod(EvaluationMethod):
    """Wraps an explainer answering ``explain(images, target, seeds=) -> Explanation`` (exact or amortized).

    Seconds per explanation time the explainer's whole ``explain`` call.
    """

    kind = MASK

    def __init__(self, name: str, explainer, representation: Representation, settings: dict) -> None:
        self.name = name
        self.explainer = explainer
        self.representation = representation
        self._settings = settings

    def settings(self) -> dict:
        return {"method": self.name, **self.representation.describe(), **self._settings}

    def _compute(self, images: Tensor, target: Tensor | None, seeds: list[int]) -> Attribution:
        start = time.perf_counter()
        explanation = self.explainer.explain(images, target, seeds=seeds, progress=self.progress)
        return _attribution(self.name, explanation, time.perf_counter() - start)


class AmortizedMethod(MaskMethod):
    """The amortized explainer's mask from one forward pass (:meth:`AmortizedExplainer.predict_mask`).

    Seconds per explanation time the prediction alone (the real single-pass cost). The mask is then measured
    like every explainer's (:meth:`AmortizedExplainer.explain`: the RDE loss on the measurement noise of the
    same per-image seeds, with the optimizer's number of samples), outside the timed part, so its loss compares
    directly with the exact optimizer's.
    """

    def _compute(self, images: Tensor, target: Tensor | None, seeds: list[int]) -> Attribution:
        start = time.perf_counter()
        target = explained_target(self.explainer.classifier, images, target, self.explainer.objective.link)
        self.explainer.predict_mask(images, target)
        synchronize(images.device)
        seconds = time.perf_counter() - start
        return _attribution(self.name, self.explainer.explain(images, target, seeds=seeds), seconds)


def _optimizer_settings(explainer) -> dict:
    settings = dict(explainer.settings())
    settings.pop("seed", None)  # per-image seeds are passed explicitly
    return settings


@METHODS.register("cartoonx")
def _cartoonx(ctx: MethodContext) -> EvaluationMethod:
    explainer = CartoonX(ctx.classifier, wave=ctx.wave, levels=ctx.levels, mode=ctx.mode, config=ctx.optimizer)
    return MaskMethod("cartoonx", explainer, explainer.representation, _optimizer_settings(explainer))


@METHODS.register("pixel-rde")
def _pixel_rde(ctx: MethodContext) -> EvaluationMethod:
    explainer = PixelRDE(ctx.classifier, config=ctx.optimizer)
    return MaskMethod("pixel-rde", explainer, explainer.representation, _optimizer_settings(explainer))


def _measure_samples(ctx: MethodContext) -> int:
    """The final measurement's noise samples: the exact optimizer's (``measure_samples`` or ``num_samples``)."""
    return ctx.optimizer.measure_samples or ctx.optimizer.num_samples


def load_amortized(ctx: MethodContext) -> AmortizedExplainer:
    """The amortized explainer of ``ctx.checkpoint``, checked against the classifier and the DWT settings.

    It measures its masks like the exact optimizer of ``ctx.optimizer`` (same number of samples, same seed).
    """
    if not ctx.checkpoint:
        raise ConfigError("the methods amortized and warm need --checkpoint (an amortized explainer checkpoint)")
    amortized = AmortizedExplainer.from_checkpoint(
        Path(ctx.checkpoint).expanduser(),
        ctx.classifier,
        device=module_device(ctx.classifier),
        measure_samples=_measure_samples(ctx),
        seed=ctx.optimizer.seed,
    )
    amortized.check_compatible(
        classifier_spec=ctx.classifier_spec,
        image_size=ctx.image_size,
        wave=ctx.wave,
        levels=ctx.levels,
        mode=ctx.mode,
        channels=ctx.channels,
        link=ctx.optimizer.link,
    )
    return amortized


@METHODS.register("amortized")
def _amortized(ctx: MethodContext) -> EvaluationMethod:
    explainer = load_amortized(ctx)
    settings = {"checkpoint_sha256": explainer.checkpoint_sha256, "measure_samples": explainer.measure_samples}
    return AmortizedMethod("amortized", explainer, ctx.wavelet(), settings)


@METHODS.register("warm")
def _warm(ctx: MethodContext) -> EvaluationMethod:
    amortized = load_amortized(ctx)
    explainer = WarmStartExplainer(amortized, refine_steps=ctx.refine_steps, config=refine_config(ctx.optimizer))
    settings = {
        "checkpoint_sha256": amortized.checkpoint_sha256,  # hashed once, when the explainer read the file
        "refine_steps": explainer.refine_steps,
        **{k: v for k, v in dataclasses.asdict(explainer.optimizer.config).items() if k not in ("steps", "seed")},
    }
    return MaskMethod("warm", explainer, ctx.wavelet(), settings)
