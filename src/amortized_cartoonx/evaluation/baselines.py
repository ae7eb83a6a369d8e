"""Baselines of the evaluation: gradient attributions (through captum, Grad-CAM our own), and random orderings.

Importing this module registers their factories in :data:`~.attribution.METHODS`.

Gradient methods explain the same class as every other method (the predicted one by default), on the
:class:`~amortized_cartoonx.classifiers.Classifier` wrapper (which normalises inside), so the gradient is taken
with respect to the [0, 1] image. Their ranking score, per pixel, is ``|attribution|`` summed over the colour
channels (Grad-CAM: its bilinearly upsampled, ReLU'd map). Settings follow the paper (Section 5.2):

- ``integrated-gradients``: captum ``IntegratedGradients``, 100 steps, black (all-zero) baseline.
- ``smoothgrad``: the mean over 10 noisy copies ``x + N(0, 0.1^2)`` of captum's ``Saliency`` (the signed
  gradient); the noise comes from per-image seeded generators (captum's ``NoiseTunnel`` draws from the
  global random state, which would make a batch's result depend on its other images).
- ``guided-backprop``: the gradient with every rectifier's (``nn.ReLU``, ``nn.ReLU6``) backward pass keeping
  only positive gradients, as captum's ``GuidedBackprop`` does for ``nn.ReLU`` (identical there; ReLU6 covers
  MobileNets and EfficientNet-Lite). Temporary hooks on the rectifiers' outputs, removed after each call, so it
  needs a plain ``nn.Module`` with such modules; on a TorchScript model the hooks would be silently ignored, so
  the method is skipped there with a message.
- ``grad-cam``: Grad-CAM (Selvaraju et al.) on the model's last feature map, as Grad-CAM takes it (the
  rectified maps of the last convolutional block, not a convolution's raw output before its BatchNorm and
  activation): ``relu(sum_k w_k A_k)`` with ``w_k`` the spatial mean of the target logit's gradient w.r.t. map
  ``A_k``, upsampled bilinearly. The layer is found by running the classifier once on a mid-grey image of the
  evaluated size and channels, with forward hooks on every module (:func:`last_feature_layer`): the last output,
  in execution order (not registration order), that is a 4-D map larger than 1x1. A container and its last child
  output the same tensor, and the container finishes last, so it is the one chosen: ``layer4`` for a ResNet,
  ``features`` for a MobileNet or an ``nn.Sequential`` of conv blocks. A module run more than once per forward
  pass (EfficientNet-Lite's ``_swish``, applied to the stem and the head) is hooked at the call that made the map
  (captum's ``LayerGradCam`` cannot do that, so the method is written here; it equals captum's where captum
  runs). Skipped for a model without an ``nn.Conv2d`` or such a map, or one it cannot hook (TorchScript,
  torch.export). The layer's name and call are in the method's settings (so in the cache key).
- ``random-pixel``, ``random-wavelet``: a uniform random score per position, from the image's seed: the
  baseline ordering of each representation. They count as masks (the score is in [0, 1]).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..classifiers import frozen
from ..errors import ClassifierError
from ..feature_taps import flattened_graph, scripted_part
from ..rde import classify_or_explain, make_generators
from ..runtime import module_device, synchronize
from ..seeding import Stream, stream_seeds
from ..wavelets import PixelRepresentation, Representation
from .attribution import (
    ATTRIBUTION,
    MASK,
    METHODS,
    Attribution,
    EvaluationMethod,
    MethodContext,
    MethodUnavailable,
    explained_target,
)


def hook_problem(classifier, layer_type: type[nn.Module] | tuple[type[nn.Module], ...], method: str) -> str | None:
    """Why ``method`` cannot hook ``layer_type`` modules of ``classifier``, or None when it can."""
    if not isinstance(classifier, nn.Module):
        return f"{method} needs an nn.Module classifier to hook its layers; got {type(classifier).__name__}"
    if scripted_part(classifier) is not None:
        return f"{method} cannot hook the layers of a TorchScript classifier; skipped (use an nn.Module spec)"
    if flattened_graph(classifier) is not None:
        return (
            f"{method} cannot hook the layers of an exported program (a '.pt2' file: every layer inlined into one "
            "graph); skipped (use an nn.Module spec: torchvision:NAME or package.module:callable)"
        )
    if not any(isinstance(m, layer_type) for m in classifier.modules()):
        names = " or ".join(t.__name__ for t in (layer_type if isinstance(layer_type, tuple) else (layer_type,)))
        return f"{method} found no {names} module to hook in the classifier; skipped"
    return None


class GradientMethod(EvaluationMethod):
    """A pixel attribution ``(N, C, H, W)`` whose ranking score is ``|attribution|`` summed over channels."""

    kind = ATTRIBUTION

    def __init__(self, name: str, classifier, settings: dict) -> None:
        self.name = name
        self.classifier = classifier
        self.representation = PixelRepresentation()
        self._settings = settings

    def settings(self) -> dict:
        return {"method": self.name, **self.representation.describe(), **self._settings}

    def _attribute(self, inputs: Tensor, target: Tensor, seeds: Sequence[int]) -> Tensor:
        """``(N, C, H, W)`` or ``(N, 1, H, W)`` attributions of ``inputs`` (which require grad)."""
        raise NotImplementedError

    def _compute(self, images: Tensor, target: Tensor | None, seeds: list[int]) -> Attribution:
        start = time.perf_counter()
        with frozen(self.classifier), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # captum's notes on hooks and input gradients
            target = explained_target(self.classifier, images, target, self.link)
            inputs = images.detach().clone().requires_grad_(True)
            attr = self._attribute(inputs, target, seeds).detach()
        relevance = attr.abs().sum(1).flatten(1)  # (N, H * W)
        synchronize(images.device)
        return Attribution(self.name, relevance, target, time.perf_counter() - start)


class IntegratedGradientsMethod(GradientMethod):
    seeded = False  # deterministic: its explanations serve every --seed

    def __init__(self, classifier, steps: int, internal_batch: int) -> None:
        super().__init__("integrated-gradients", classifier, {"steps": steps, "baseline": "zeros"})
        self.steps = steps
        self.internal_batch = internal_batch

    def _attribute(self, inputs: Tensor, target: Tensor, seeds: Sequence[int]) -> Tensor:
        from captum.attr import IntegratedGradients

        return IntegratedGradients(self.classifier).attribute(
            inputs,
            baselines=torch.zeros_like(inputs),
            target=target,
            n_steps=self.steps,
            internal_batch_size=self.internal_batch,
        )


class SmoothGradMethod(GradientMethod):
    def __init__(self, classifier, samples: int, std: float) -> None:
        super().__init__("smoothgrad", classifier, {"samples": samples, "std": std})
        self.samples = samples
        self.std = std

    def _attribute(self, inputs: Tensor, target: Tensor, seeds: Sequence[int]) -> Tensor:
        from captum.attr import Saliency

        num_images = inputs.shape[0]
        gens = make_generators(stream_seeds(seeds, Stream.SMOOTHGRAD), inputs.device)
        noise = torch.stack(
            [
                torch.randn(self.samples, *inputs.shape[1:], generator=g, device=inputs.device, dtype=inputs.dtype)
                for g in gens
            ]
        )  # (N, S, C, H, W)
        noisy = (inputs.detach().unsqueeze(1) + self.std * noise).flatten(0, 1).requires_grad_(True)
        grads = Saliency(self.classifier).attribute(noisy, target=target.repeat_interleave(self.samples), abs=False)
        return grads.reshape(num_images, self.samples, *inputs.shape[1:]).mean(1)


#: The modules whose backward pass guided backpropagation rectifies.
RECTIFIERS = (nn.ReLU, nn.ReLU6)


class GuidedBackpropMethod(GradientMethod):
    seeded = False  # deterministic: its explanations serve every --seed

    def __init__(self, classifier) -> None:
        super().__init__("guided-backprop", classifier, {"rectifiers": [r.__name__ for r in RECTIFIERS]})

    def _attribute(self, inputs: Tensor, target: Tensor, seeds: Sequence[int]) -> Tensor:
        def rectify(_module, _inputs, output):  # the gradient reaching the rectifier's output: only its positive part
            if isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(lambda grad: grad.clamp(min=0.0))

        handles = [m.register_forward_hook(rectify) for m in self.classifier.modules() if isinstance(m, RECTIFIERS)]
        try:
            with torch.enable_grad():
                x = inputs.detach().requires_grad_(True)
                chosen = self.classifier(x).gather(1, target.reshape(-1, 1).to(x.device)).sum()
                (grad,) = torch.autograd.grad(chosen, x)
        finally:
            for handle in handles:
                handle.remove()
        return grad


class GradCamMethod(GradientMethod):
    """Grad-CAM on the output of ``layer``'s ``call``-th run in a forward pass (1: the first)."""

    seeded = False  # deterministic: its explanations serve every --seed

    def __init__(self, classifier, layer_name: str, layer: nn.Module, call: int = 1) -> None:
        super().__init__("grad-cam", classifier, {"layer": layer_name, "call": call, "upsample": "bilinear"})
        self.layer = layer
        self.call = call

    def _attribute(self, inputs: Tensor, target: Tensor, seeds: Sequence[int]) -> Tensor:
        outputs: list[Tensor] = []
        handle = self.layer.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            with torch.enable_grad():
                logits = self.classifier(inputs)
        finally:
            handle.remove()
        if len(outputs) < self.call:
            raise MethodUnavailable(
                f"grad-cam's layer ran {len(outputs)} time(s) in this forward pass, not {self.call} as in the probe"
            )
        maps = outputs[self.call - 1]  # (N, C, h, w)
        chosen = logits.gather(1, target.reshape(-1, 1).to(logits.device)).sum()
        (grads,) = torch.autograd.grad(chosen, maps)
        cam = (grads.mean(dim=(2, 3), keepdim=True) * maps).sum(1, keepdim=True).clamp_min(0.0)
        cam = F.interpolate(cam, size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)
        return cam.clamp_min(0.0)  # (N, 1, H, W); bilinear interpolation of non-negative values stays >= 0


def last_feature_layer(classifier: nn.Module, image_size: int, channels: int = 3) -> tuple[str, nn.Module, int]:
    """Grad-CAM's layer: the name and module of ``classifier`` whose output, in execution order, is the last 4-D
    feature map larger than 1x1, and which of its runs in a forward pass made it (1: the first).

    Found by one forward pass, without gradients and in eval mode (:func:`frozen`), of a mid-grey
    ``(1, channels, image_size, image_size)`` image, with a forward hook on every module (removed afterwards).
    Hooks fire when a module finishes, so of a container and its last child, which output the same tensor, the
    container (``layer4`` rather than ``layer4.1`` or its final ReLU) comes last. The classifier itself is never
    chosen.

    Raises:
        MethodUnavailable: the classifier fails on the probe image, or no module outputs such a map.
    """
    names = {module: name for name, module in classifier.named_modules() if module is not classifier}
    calls: dict[nn.Module, int] = {}
    maps: list[tuple[nn.Module, int]] = []  # (module, its run) of each feature map, in the order they finish

    def record(module: nn.Module, _inputs, output) -> None:
        calls[module] = calls.get(module, 0) + 1
        if (
            isinstance(output, Tensor)
            and output.ndim == 4
            and output.is_floating_point()
            and output.shape[-2] * output.shape[-1] > 1
        ):
            maps.append((module, calls[module]))

    probe = torch.full((1, channels, image_size, image_size), 0.5, device=module_device(classifier))
    handles = [module.register_forward_hook(record) for module in names]
    try:
        with torch.no_grad(), frozen(classifier):
            classify_or_explain(classifier, probe)
    except ClassifierError as exc:
        raise MethodUnavailable(f"grad-cam could not run the classifier to find its last feature map: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()
    if not maps:
        raise MethodUnavailable(
            f"grad-cam found no layer that outputs a feature map larger than 1x1 (N, C, H, W) on {channels}-channel "
            f"{image_size}x{image_size} images; skipped"
        )
    module, call = maps[-1]
    return names[module], module, call


@METHODS.register("integrated-gradients")
def _integrated_gradients(ctx: MethodContext) -> EvaluationMethod:
    settings = ctx.baselines.validate()
    return IntegratedGradientsMethod(ctx.classifier, settings.ig_steps, settings.ig_internal_batch)


@METHODS.register("smoothgrad")
def _smoothgrad(ctx: MethodContext) -> EvaluationMethod:
    settings = ctx.baselines.validate()
    return SmoothGradMethod(ctx.classifier, settings.smoothgrad_samples, settings.smoothgrad_std)


@METHODS.register("guided-backprop")
def _guided_backprop(ctx: MethodContext) -> EvaluationMethod:
    problem = hook_problem(ctx.classifier, RECTIFIERS, "guided-backprop")
    if problem:
        raise MethodUnavailable(problem)
    return GuidedBackpropMethod(ctx.classifier)


@METHODS.register("grad-cam")
def _grad_cam(ctx: MethodContext) -> EvaluationMethod:
    problem = hook_problem(ctx.classifier, nn.Conv2d, "grad-cam")
    if problem:
        raise MethodUnavailable(problem)
    name, layer, call = last_feature_layer(ctx.classifier, ctx.image_size, ctx.channels)
    return GradCamMethod(ctx.classifier, name, layer, call)


# ---------------------------------------------------------------------------------------------------------
# Random orderings
# ---------------------------------------------------------------------------------------------------------


class RandomOrdering(EvaluationMethod):
    """A uniform random score in [0, 1] per position of ``representation``, drawn from the image's seed."""

    kind = MASK

    def __init__(self, name: str, representation: Representation, classifier) -> None:
        self.name = name
        self.representation = representation
        self.classifier = classifier

    def _compute(self, images: Tensor, target: Tensor | None, seeds: list[int]) -> Attribution:
        start = time.perf_counter()
        target = explained_target(self.classifier, images, target, self.link)
        num_positions = self.representation.encode(images[:1]).numel_per_channel()
        scores = []
        for seed in stream_seeds(seeds, Stream.RANDOM_ORDER):  # on the CPU: the same on every device
            gen = torch.Generator().manual_seed(int(seed))
            scores.append(torch.rand(num_positions, generator=gen))
        relevance = torch.stack(scores).to(images.device)
        return Attribution(self.name, relevance, target, time.perf_counter() - start)


@METHODS.register("random-pixel")
def _random_pixel(ctx: MethodContext) -> EvaluationMethod:
    return RandomOrdering("random-pixel", PixelRepresentation(), ctx.classifier)


@METHODS.register("random-wavelet")
def _random_wavelet(ctx: MethodContext) -> EvaluationMethod:
    return RandomOrdering("random-wavelet", ctx.wavelet(), ctx.classifier)


__all__ = ["GradientMethod", "RandomOrdering", "hook_problem", "last_feature_layer"]
