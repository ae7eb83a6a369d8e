"""Feature maps of a frozen network at the strides of the DWT levels, read with temporary forward hooks.

The mask predictor's ``classifier`` encoder reads the explained classifier's own feature maps: the layer whose
output lives at stride ``2^j`` describes the image at the scale of the level-j detail coefficients. Which layers
those are is found automatically by one probe pass (:func:`find_taps`): every submodule whose output is a
4-D ``(N, C, h, w)`` tensor is a candidate (the probe is square, so ``h == w``: a channels-last ``(N, h, w, C)``
activation, as ConvNeXt and Swin keep inside their blocks, is not one), and level j takes the last one (in
execution order, so the most processed) whose stride is closest to ``2^j``. A level finer than the finest map or
coarser than the coarsest reads that map; a level inside that range whose closest map is an octave or more away is
logged. The chosen layer names and channel counts are stored in the network's config, so
a checkpoint can check that a classifier offers the same layers (:func:`check_taps`).

Hooks are registered for one forward pass and removed at once (:func:`read_taps`, :func:`recording`): the
caller's model keeps no hook, no flag and no gradient setting from us. When the classifier runs anyway (its
logits on the clean image), the taps are recorded during that pass instead of a second one
(:meth:`~amortized_cartoonx.mask_predictor.MaskPredictor.tapping`). TorchScript modules have no Python hooks, and
an exported program's ``module()`` (how ``.pt2`` files load) has no layers left as submodules: both are refused
with a message that says what to use instead (:func:`check_hookable`).

Shapes: N images, H x W pixels, C_j channels of the map read for level j.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .classifiers import frozen
from .errors import ConfigError
from .rde import classify_or_explain, input_dtype
from .runtime import module_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tap:
    """One feature map read for one DWT level: the submodule's name, its channels and its stride."""

    name: str
    channels: int
    stride: float


def check_hookable(module: object, role: str = "the classifier") -> nn.Module:
    """``module`` if its layers take Python forward hooks; a :class:`ConfigError` that says what to use instead."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{role} is a plain callable, not an nn.Module: its feature maps cannot be read")
    scripted = scripted_part(module)
    if scripted is not None:
        where = "it" if scripted == "" else f"its layer {scripted!r}"
        raise ConfigError(
            f"{role} is TorchScript ({where}): its layers take no forward hooks, so its feature maps cannot be "
            "read. Use the mask predictor's encoder 'scratch', or 'backbone' with an nn.Module backbone spec "
            "(e.g. torchvision:resnet18)"
        )
    flat = flattened_graph(module)
    if flat is not None:
        where = "it" if flat == "" else f"its part {flat!r}"
        raise ConfigError(
            f"{role} is a flattened torch.fx graph ({where}), as a '.pt2' file (torch.export) loads: its layers are "
            "graph nodes, not submodules, so forward hooks cannot read them. Load the program with "
            "torch.export.unflatten(torch.export.load(path)) in a 'package.module:callable' spec (layers kept as "
            "submodules, slower), or use the mask predictor's encoder 'scratch' or 'backbone'"
        )
    return module


def scripted_part(module: nn.Module) -> str | None:
    """The name of the first submodule of ``module`` (``""``: itself) that is TorchScript, or None."""
    return next((name for name, sub in module.named_modules() if isinstance(sub, torch.jit.ScriptModule)), None)


def flattened_graph(module: nn.Module) -> str | None:
    """The name of a submodule of ``module`` that is a torch.fx graph with weights but calling no submodule that
    holds any (an exported program's ``module()``: every layer inlined, only helpers such as its guards left as
    calls), or None."""
    for name, sub in module.named_modules():
        if not isinstance(sub, torch.fx.GraphModule) or next(sub.parameters(), None) is None:
            continue
        called = [sub.get_submodule(node.target) for node in sub.graph.nodes if node.op == "call_module"]
        if not any(next(m.parameters(), None) is not None for m in called):
            return name
    return None


@contextmanager
def recording(module: nn.Module, names: set[str] | None) -> Iterator[dict[str, Tensor]]:
    """Record the 4-D outputs of ``module``'s submodules (``names``; None: all but the module itself) by name,
    in the order they finish, during whatever passes run inside the block; the hooks are removed on exit."""
    outputs: dict[str, Tensor] = {}
    handles = []

    def hook(name):
        def save(_module, _inputs, output):
            if isinstance(output, Tensor) and output.ndim == 4:
                outputs.pop(name, None)  # a layer run twice: its last output counts
                outputs[name] = output

        return save

    try:
        for name, sub in module.named_modules():
            if name and (names is None or name in names):
                handles.append(sub.register_forward_hook(hook(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _record(
    module: nn.Module, images: Tensor, names: set[str] | None, role: str | None = None, hint: str = ""
) -> dict[str, Tensor]:
    """One frozen forward pass of ``module`` on a copy of ``images`` (a module that edits its input in place
    leaves the caller's images as they were), cast to the module's own floating dtype; the 4-D outputs of its
    submodules by name. A failure of the module is a one-line :class:`ClassifierError` naming ``role`` (default:
    the module's spec), the input and ``hint`` (:func:`~amortized_cartoonx.rde.classify_or_explain`)."""
    with recording(module, names) as outputs, frozen(module), torch.no_grad():
        classify_or_explain(module, images.clone(), hint, role)
    return outputs


def _probe(
    module: nn.Module, image_size: int, names: set[str] | None, role: str, channels: int = 3
) -> dict[str, Tensor]:
    """:func:`_record` on one zero image ``(1, channels, image_size, image_size)`` in the module's dtype."""
    dtype = input_dtype(module) or torch.float32
    probe = torch.zeros(1, channels, image_size, image_size, device=module_device(module), dtype=dtype)
    return _record(
        module, probe, names, role, f" (a probe image: does the network take {channels}-channel images of this size?)"
    )


def collect(outputs: dict[str, Tensor], names: list[str]) -> list[Tensor]:
    """The recorded outputs of the named layers, in ``names``' order, detached and float32."""
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ConfigError(f"the classifier has no layer {missing[0]!r} with a 4-D output (its layers changed?)")
    return [outputs[n].detach().float() for n in names]


def find_taps(
    module: nn.Module, image_size: int, levels: int, role: str = "the classifier", channels: int = 3
) -> list[Tap]:
    """The layer read for each DWT level 1..J of an ``image_size`` image with ``channels`` colour channels (one
    probe pass on zeros).

    Raises:
        ConfigError: TorchScript or a module without any square 4-D ``(N, C, h, w)`` feature map.
        ClassifierError: the module fails on the probe image.
    """
    check_hookable(module, role)
    outputs = _probe(module, image_size, None, role, channels)
    candidates = [  # square maps only: a channels-last (N, h, w, C) activation has w != h (its C)
        Tap(name, int(out.shape[1]), image_size / int(out.shape[-1]))
        for name, out in outputs.items()
        if out.shape[-1] == out.shape[-2] and out.shape[-1] > 0
    ]
    if not candidates:
        raise ConfigError(f"{role} has no layer with a 4-D (N, C, h, w) output to read features from")
    taps = []
    finest, coarsest = min(t.stride for t in candidates), max(t.stride for t in candidates)
    for level in range(1, levels + 1):
        # closest stride in log2; among equals the last (deepest) one
        best = min(
            reversed(candidates), key=lambda t: abs(math.log2(t.stride) - level)
        )  # min keeps the first of equals: reversed -> the last in execution order
        # a level beyond the network's finest or coarsest map reads that map (expected); a gap inside is said
        if finest < 2**level < coarsest and abs(math.log2(best.stride) - level) >= 1:
            logger.warning(
                "%s has no feature map near stride %d for DWT level %d: reading %r (stride %.3g)",
                role,
                2**level,
                level,
                best.name,
                best.stride,
            )
        taps.append(best)
    return taps


def read_taps(module: nn.Module, images: Tensor, names: list[str]) -> list[Tensor]:
    """The outputs of the named layers for ``images: (N, C, H, W)`` in [0, 1] (detached; one pass, no grad)."""
    return collect(_record(check_hookable(module), images, set(names)), names)


def check_taps(
    module: nn.Module,
    names: list[str],
    channels: list[int],
    image_size: int,
    role: str = "the classifier",
    input_channels: int = 3,
) -> None:
    """Refuse a module that lacks the named layers or whose channels differ (a checkpoint for another network);
    ``role`` names the module in the message (``the classifier``, ``the backbone``); it is probed on images of
    ``input_channels`` colour channels."""
    try:
        probed = _probe(check_hookable(module, role), image_size, set(names), role, input_channels)
        found = [int(t.shape[1]) for t in collect(probed, names)]
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("the classifier", role, 1)) from None
    if found != list(channels):
        raise ConfigError(
            f"{role}'s layers {names} have {found} channels, the mask predictor was trained on {channels}"
        )


__all__ = ["Tap", "check_hookable", "check_taps", "find_taps", "flattened_graph", "read_taps", "scripted_part"]
