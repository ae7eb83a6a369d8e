"""The explainers the evaluation compares, behind one verb: ``explain(images, target, seeds=) -> Attribution``.

Every method ranks the channel-shared positions of its own representation: wavelet methods (``cartoonx``,
``amortized``, ``warm``, ``random-wavelet``) the DWT coefficient positions (the entries of a mask's
:meth:`~amortized_cartoonx.wavelets.Coefficients.flatten`), pixel methods (``pixel-rde``, the gradient
baselines, ``random-pixel``) the ``(H, W)`` pixel positions. The ranking score is the mask value for mask
methods and ``|attribution|`` summed over the colour channels for gradient methods (Grad-CAM: its upsampled
non-negative map).

:data:`METHODS` maps each name to a factory ``factory(context) -> EvaluationMethod``. A factory raises
:class:`MethodUnavailable` when a method cannot run on this classifier (e.g. Grad-CAM on a TorchScript
file): the evaluation skips it with a logged message. Bad user input (``amortized`` without a checkpoint,
a checkpoint for another classifier) raises a :class:`~amortized_cartoonx.errors.ConfigError` instead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError
from ..optimizer import CartoonX, OptimizerConfig, PixelRDE
from ..registry import Registry
from ..runtime import synchronize
from ..wavelets import Representation, WaveletRepresentation

#: ``mask``: the relevance is a mask in [0, 1] over the representation; ``attribution``: a pixel heat map.
MASK = "mask"
ATTRIBUTION = "attribution"


class MethodUnavailable(Exception):
    """A method that cannot run on this classifier; the evaluation skips it with this message."""


@dataclass
class BaselineConfig:
    """Settings of the gradient baselines. Defaults are the paper's (Section 5.2).

    Attributes:
        ig_steps: Integrated Gradients steps. Default 100.
        ig_internal_batch: interpolated inputs per forward pass of Integrated Gradients (bounds memory).
            Default 32.
        smoothgrad_samples: noisy copies per image for SmoothGrad. Default 10.
        smoothgrad_std: the noise's standard deviation in [0, 1] pixel units. Default 0.1.
    """

    ig_steps: int = 100
    ig_internal_batch: int = 32
    smoothgrad_samples: int = 10
    smoothgrad_std: float = 0.1

    def validate(self) -> BaselineConfig:
        for name in ("ig_steps", "ig_internal_batch", "smoothgrad_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.smoothgrad_std < 0:
            raise ConfigError(f"smoothgrad_std must be at least 0, got {self.smoothgrad_std}")
        return self


@dataclass
class MethodContext:
    """Everything a method factory may need.

    Attributes:
        classifier: maps ``(N, C, H, W)`` in [0, 1] to logits (a :class:`~amortized_cartoonx.classifiers.Classifier`
            for the gradient baselines' hooks).
        classifier_spec: the spec it was loaded from (checked against an amortized checkpoint).
        image_size: side of the square images.
        optimizer: the exact optimizer's settings (``l1_lambda`` None takes each method's default).
        wave, levels, mode: the DWT of the wavelet methods.
        checkpoint: the amortized explainer's checkpoint (``amortized``, ``warm``).
        refine_steps: optimizer steps after the amortized mask (``warm``).
        baselines: settings of the gradient baselines.
    """

    classifier: Callable[[Tensor], Tensor]
    classifier_spec: str = "<module>"
    image_size: int = 256
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    wave: str = "db3"
    levels: int = 5
    mode: str = "zero"
    checkpoint: str | None = None
    refine_steps: int = 100
    baselines: BaselineConfig = field(default_factory=BaselineConfig)

    def wavelet(self) -> WaveletRepresentation:
        return WaveletRepresentation(self.wave, self.levels, self.mode)


@dataclass
class Attribution:
    """What a method says about a batch of N images.

    Attributes:
        method: the method's name.
        relevance: ``(N, K)`` a score per channel-shared position of the method's representation (higher =
            more relevant); for mask methods the mask itself, in [0, 1].
        target: ``(N,)`` the explained class.
        seconds: wall-clock seconds for the whole batch.
        scalars: per-image extras ``(N,)`` (mask methods: ``mask_mean``, ``distortion``, ``loss``, ...).
    """

    method: str
    relevance: Tensor
    target: Tensor
    seconds: float
    scalars: dict[str, Tensor] = field(default_factory=dict)


class EvaluationMethod:
    """Base class: a named explainer with a representation, a kind and a settings dict.

    Attributes:
        name: registry name.
        kind: :data:`MASK` or :data:`ATTRIBUTION` (decides the pixel map used for ground truth and display).
        representation: where the ranked positions live.
    """

    name: str = ""
    kind: str = MASK
    representation: Representation
    #: show the explainer's own progress bar (optimizer steps), where it has one
    progress: bool = False

    def settings(self) -> dict:
        """Every setting that changes this method's result (hashed into the cache key)."""
        return {"method": self.name, **self.representation.describe()}

    def explain(self, images: Tensor, target: Tensor | None = None, *, seeds: Sequence[int]) -> Attribution:
        """``images: (N, C, H, W)`` in [0, 1] -> :class:`Attribution`. ``seeds``: one per image."""
        raise NotImplementedError


def explained_target(classifier: Callable[[Tensor], Tensor], images: Tensor, target: Tensor | None) -> Tensor:
    """``(N,)``: ``target`` or, by default, the class the classifier predicts."""
    if target is not None:
        return torch.as_tensor(target, device=images.device).long().reshape(-1)
    with torch.no_grad():
        return classifier(images).argmax(1)


# ---------------------------------------------------------------------------------------------------------
# Mask methods: anything whose explain() returns an Explanation
# ---------------------------------------------------------------------------------------------------------

_EXPLANATION_SCALARS = ("mask_mean", "distortion", "loss", "prob_original", "prob_masked", "prob_obfuscated")


class MaskMethod(EvaluationMethod):
    """Wraps an explainer answering ``explain(images, target, seeds=) -> Explanation`` (exact or amortized).

    The relevance is the explanation's mask, flattened (channel-shared positions).
    """

    kind = MASK

    def __init__(self, name: str, explainer, representation: Representation, settings: dict) -> None:
        self.name = name
        self.explainer = explainer
        self.representation = representation
        self._settings = settings

    def settings(self) -> dict:
        return {"method": self.name, **self.representation.describe(), **self._settings}

    def explain(self, images: Tensor, target: Tensor | None = None, *, seeds: Sequence[int]) -> Attribution:
        start = time.perf_counter()
        exp = self.explainer.explain(images, target, seeds=list(seeds), progress=self.progress)
        seconds = time.perf_counter() - start
        scalars = {k: getattr(exp, k).detach().float() for k in _EXPLANATION_SCALARS}
        return Attribution(self.name, exp.mask.flatten().detach(), exp.target, seconds, scalars)


def _optimizer_settings(explainer) -> dict:
    settings = dict(explainer.settings())
    settings.pop("seed", None)  # per-image seeds are passed explicitly
    return settings


METHODS: Registry[Callable[[MethodContext], EvaluationMethod]] = Registry("evaluation method")


@METHODS.register("cartoonx")
def _cartoonx(ctx: MethodContext) -> EvaluationMethod:
    explainer = CartoonX(ctx.classifier, wave=ctx.wave, levels=ctx.levels, mode=ctx.mode, config=ctx.optimizer)
    return MaskMethod("cartoonx", explainer, explainer.representation, _optimizer_settings(explainer))


@METHODS.register("pixel-rde")
def _pixel_rde(ctx: MethodContext) -> EvaluationMethod:
    explainer = PixelRDE(ctx.classifier, config=ctx.optimizer)
    return MaskMethod("pixel-rde", explainer, explainer.representation, _optimizer_settings(explainer))


def load_amortized(ctx: MethodContext):
    """The amortized explainer of ``ctx.checkpoint``, checked against the classifier and the DWT settings."""
    if not ctx.checkpoint:
        raise ConfigError("the methods amortized and warm need --checkpoint (an amortized explainer checkpoint)")
    from ..amortized import AmortizedExplainer

    path = Path(ctx.checkpoint).expanduser()
    device = _device_of(ctx.classifier)
    amortized = AmortizedExplainer.from_checkpoint(path, ctx.classifier, device=device)
    amortized.check_compatible(
        classifier_spec=ctx.classifier_spec, image_size=ctx.image_size, wave=ctx.wave, levels=ctx.levels, mode=ctx.mode
    )
    return amortized


def _checkpoint_settings(ctx: MethodContext) -> dict:
    from ..io import file_sha256

    return {"checkpoint_sha256": file_sha256(Path(ctx.checkpoint).expanduser())}


class AmortizedMethod(MaskMethod):
    """The amortized explainer's mask from one forward pass (:meth:`AmortizedExplainer.predict_mask`).

    Seconds per explanation time the prediction alone (the real single-pass cost). The mask is then measured
    like every explainer's (:meth:`AmortizedExplainer.explain`: the RDE loss on the measurement noise of the
    same per-image seeds), outside the timed part, so its loss compares directly with the exact optimizer's.
    """

    def explain(self, images: Tensor, target: Tensor | None = None, *, seeds: Sequence[int]) -> Attribution:
        start = time.perf_counter()
        target = explained_target(self.explainer.classifier, images, target)
        self.explainer.predict_mask(images, target)
        synchronize(images.device)
        seconds = time.perf_counter() - start
        exp = self.explainer.explain(images, target, seeds=list(seeds))  # the same mask, measured
        scalars = {k: getattr(exp, k).detach().float() for k in _EXPLANATION_SCALARS}
        return Attribution(self.name, exp.mask.flatten().detach(), exp.target, seconds, scalars)


@METHODS.register("amortized")
def _amortized(ctx: MethodContext) -> EvaluationMethod:
    explainer = load_amortized(ctx)
    return AmortizedMethod("amortized", explainer, ctx.wavelet(), _checkpoint_settings(ctx))


@METHODS.register("warm")
def _warm(ctx: MethodContext) -> EvaluationMethod:
    from ..amortized import WarmStartExplainer

    amortized = load_amortized(ctx)
    explainer = WarmStartExplainer(amortized, refine_steps=ctx.refine_steps, config=ctx.optimizer)
    settings = {
        **_checkpoint_settings(ctx),
        "refine_steps": ctx.refine_steps,
        **{k: v for k, v in dataclasses.asdict(ctx.optimizer).items() if k not in ("steps", "seed")},
    }
    return MaskMethod("warm", explainer, ctx.wavelet(), settings)


def _device_of(classifier) -> torch.device:
    if isinstance(classifier, torch.nn.Module):
        for tensor in (*classifier.parameters(), *classifier.buffers()):
            return tensor.device
    return torch.device("cpu")


def build_methods(names: Sequence[str], ctx: MethodContext) -> tuple[dict[str, EvaluationMethod], dict[str, str]]:
    """``(methods, skipped)``: the methods that can run, and ``name -> reason`` for those that cannot.

    Raises:
        ConfigError: an unknown name, or a method that needs input the user did not give.
    """
    from . import baselines  # noqa: F401 - registers the baselines

    for name in names:
        METHODS.get(name)  # unknown names fail before any work
    methods: dict[str, EvaluationMethod] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            methods[name] = METHODS.get(name)(ctx)
        except MethodUnavailable as exc:
            skipped[name] = str(exc)
    return methods, skipped


def method_names() -> list[str]:
    """Every registered method name."""
    from . import baselines  # noqa: F401

    return METHODS.names()


__all__ = [
    "ATTRIBUTION",
    "MASK",
    "METHODS",
    "AmortizedMethod",
    "Attribution",
    "BaselineConfig",
    "EvaluationMethod",
    "MaskMethod",
    "MethodContext",
    "MethodUnavailable",
    "build_methods",
    "explained_target",
    "method_names",
]
