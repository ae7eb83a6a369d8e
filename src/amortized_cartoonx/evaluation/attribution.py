"""The verb of the evaluated methods, ``attribute(images, target=None, *, seeds) -> Attribution``, and their registry.

Every method ranks the channel-shared positions of its own representation: wavelet methods (``cartoonx``,
``amortized``, ``warm``, ``random-wavelet``) the DWT coefficient positions (the entries of a mask's
:meth:`~amortized_cartoonx.wavelets.Coefficients.flatten`), pixel methods (``pixel-rde``, the gradient
baselines, ``random-pixel``) the ``(H, W)`` pixel positions. The ranking score is the mask value for mask
methods and ``|attribution|`` summed over the colour channels for gradient methods (Grad-CAM: its upsampled
non-negative map).

The verb is ``attribute``, not ``explain``: ``explain`` is the RDE explainers' verb
(:class:`~amortized_cartoonx.explainers.Explainer`, returning an ``Explanation``); the mask methods wrap such an
explainer. As in captum, the public :meth:`EvaluationMethod.attribute` validates and hands off to the private
``_compute`` of each family.

:data:`METHODS` maps each name of the method table (:data:`~amortized_cartoonx.methods.METHOD_TABLE`) to a factory
``factory(context) -> EvaluationMethod``; :mod:`.mask_methods` and :mod:`.baselines` register theirs, and
:mod:`.methods` imports both (use :func:`.methods.build_methods`). A factory raises :class:`MethodUnavailable` when
a method cannot run on this classifier (e.g. Grad-CAM on a TorchScript file): the evaluation skips it with a logged
message. Bad user input (``amortized`` without a checkpoint, a checkpoint for another classifier) raises a
:class:`~amortized_cartoonx.errors.ConfigError` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..classifiers import frozen
from ..errors import ConfigError, is_integer, is_real
from ..optimizer import SCHEDULES, OptimizerConfig
from ..rde import DEFAULT_LINK, as_input_of, check_images, original_logits, resolve_target
from ..registry import Registry
from ..seeding import check_seeds
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
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ConfigError(f"{name} must be an integer of at least 1, got {value!r}")
        std = self.smoothgrad_std
        if not is_real(std) or not 0 <= std < math.inf:
            raise ConfigError(f"smoothgrad_std must be a finite number of at least 0, got {std!r}")
        return self


@dataclass
class MethodContext:
    """Everything a method factory may need.

    Attributes:
        classifier: maps ``(N, C, H, W)`` in [0, 1] to logits (a :class:`~amortized_cartoonx.classifiers.Classifier`
            for the gradient baselines' hooks).
        classifier_spec: the spec it was loaded from (checked against an amortized checkpoint).
        image_size: side of the square images.
        optimizer: the exact optimizer's settings (``l1_lambda`` None takes each method's default). Its ``link``
            is the whole run's: every method and the measure read the classifier's outputs through it.
        wave, levels, mode: the DWT of the wavelet methods.
        checkpoint: the amortized explainer's checkpoint (``amortized``, ``warm``).
        refine_steps: optimizer steps after the amortized mask (``warm``); None: the ``refine`` schedule's.
            The warm start refines with the ``refine`` schedule (:func:`~amortized_cartoonx.amortized.refine_config`
            of ``optimizer``).
        baselines: settings of the gradient baselines.
        channels: the colour channels the classifier takes: 3 (RGB; default) or 1 (greyscale: the images are
            converted by their luma, :func:`~amortized_cartoonx.images.to_channels`).
    """

    classifier: Callable[[Tensor], Tensor]
    classifier_spec: str = "<module>"
    image_size: int = 256
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    wave: str = "db3"
    levels: int = 5
    mode: str = "zero"
    checkpoint: str | None = None
    refine_steps: int | None = None
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    channels: int = 3

    def warm_steps(self) -> int:
        """The warm start's refinement steps: ``refine_steps``, or the ``refine`` schedule's."""
        return SCHEDULES["refine"]["steps"] if self.refine_steps is None else self.refine_steps

    def wavelet(self) -> WaveletRepresentation:
        return WaveletRepresentation(self.wave, self.levels, self.mode)


@dataclass
class Attribution:
    """What a method says about a batch of N images.

    Attributes:
        method: the method's name.
        relevance: ``(N, K)`` float32, a score per channel-shared position of the method's representation
            (higher = more relevant); for mask methods the mask itself, in [0, 1].
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
    """Base class: a named method with a representation, a kind and a settings dict.

    Subclasses implement ``_compute(images, target, seeds) -> Attribution`` on validated inputs.

    Attributes:
        name: registry name (a row of the method table).
        kind: :data:`MASK` or :data:`ATTRIBUTION` (decides the pixel map used for ground truth and display).
        representation: where the ranked positions live.
        progress: show the method's own progress bar (optimizer steps), where it has one.
        link: how the classifier's outputs become probabilities (the run's, set by
            :func:`~.methods.build_methods`); a method without an explainer of its own reads its default target
            through it.
        seeded: whether the result depends on the seeds. False for a method deterministic given the image and
            the target (Integrated Gradients, Guided Backprop, Grad-CAM): its cached explanations then serve
            runs with any ``seed`` (the curves, whose noise draws are seeded, are measured per seed).
    """

    name: str = ""
    kind: str = MASK
    representation: Representation
    progress: bool = False
    link: str = DEFAULT_LINK
    seeded: bool = True

    def settings(self) -> dict:
        """Every setting that changes this method's result (hashed into the cache key)."""
        return {"method": self.name, **self.representation.describe()}

    def attribute(self, images: Tensor, target: Tensor | None = None, *, seeds: Sequence[int]) -> Attribution:
        """Rank the positions of ``images: (N, C, H, W)`` in [0, 1].

        Args:
            images: the batch, on the device to compute on.
            target: ``(N,)`` the classes to explain; None: the class the classifier predicts.
            seeds: one seed per image; an image's randomness (if any) depends on its seed alone.

        Returns:
            The :class:`Attribution`, its relevance in float32 whatever the classifier's dtype.

        Raises:
            InputError: images that are not ``(N, C, H, W)`` finite values, or not one seed per image.
        """
        check_images(images)
        images = as_input_of(getattr(self, "classifier", None), images, torch.float32)  # e.g. numpy's float64
        result = self._compute(images, target, check_seeds(seeds, images.shape[0]))
        result.relevance = result.relevance.float()  # the gradient baselines answer in a half classifier's dtype
        return result

    def _compute(self, images: Tensor, target: Tensor | None, seeds: list[int]) -> Attribution:
        raise NotImplementedError


def explained_target(
    classifier: Callable[[Tensor], Tensor], images: Tensor, target: Tensor | None, link: str = DEFAULT_LINK
) -> Tensor:
    """``(N,)``: ``target`` (one class for all or one per image, checked against the classifier's classes, as
    the explainers check it: :func:`~amortized_cartoonx.rde.resolve_target`) or, by default, the class the
    classifier predicts (the label with the largest logit, with the sigmoid ``link``), in eval mode
    (:func:`~amortized_cartoonx.classifiers.frozen`: a model left in train mode would predict with batch
    statistics and update them)."""
    with torch.no_grad(), frozen(classifier):
        return resolve_target(target, original_logits(classifier, images, link))


#: name -> ``factory(context) -> EvaluationMethod``; filled by :mod:`.mask_methods` and :mod:`.baselines`.
METHODS: Registry[Callable[[MethodContext], EvaluationMethod]] = Registry("evaluation method")
