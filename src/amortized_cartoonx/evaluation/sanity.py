"""Sanity checks by model randomisation (Adebayo et al., 2018, "Sanity checks for saliency maps").

An explanation that barely changes when the classifier's weights are replaced by random ones does not explain
the classifier. For an ``nn.Module`` classifier (``cartoonx evaluate --sanity``), every method explains the
first images again with the classifier's weights **randomised in cascade from the top**: the top layer (the
logits), then more and more layers, down to all of them at once (the last column). Each explanation explains
the class the *trained* classifier predicts, so only the weights change.

**Layers** are the modules that hold parameters themselves (``named_parameters(recurse=False)``: convolutions,
linear layers, normalisation layers, ...), in ``named_modules`` order, taken as input-to-output order (true for
``nn.Sequential`` and torchvision's models, which register layers in the order they run); the top layer is the
last one. Depth ``d`` randomises the top ``d`` layers. By default the depths are the top layer, about a quarter,
half and three quarters of the layers, and all of them (:func:`cascade_depths`).

**Randomising a layer** re-initialises it as a freshly built one: its ``reset_parameters()`` (PyTorch's default
initialisation: e.g. Kaiming-uniform weights for convolutions and linear layers, weight 1, bias 0 and reset
running statistics for batch norm), run on a CPU copy of the layer under a seeded random state (stream
``SANITY`` of :mod:`~amortized_cartoonx.seeding`, with the global seed and the layer's index), so the draws are the
same on every device and the global random state is left as it was. A layer without ``reset_parameters`` gets
Gaussian parameters with each tensor's own mean and standard deviation. Everything happens on a **deep copy**
(:func:`randomised_copy`): the caller's classifier is never touched. The random orderings (``random-pixel``,
``random-wavelet``) do not look at the classifier and are not checked.

**Comparisons**, per method, image and depth, between the trained classifier's explanation and the randomised
one's:

- ``spearman``: Spearman's rank correlation of the two relevance vectors in the method's own representation (the
  scores the curves rank: a mask's entries, or |attribution| per pixel), ties sharing their average rank. A
  constant vector (e.g. an all-zero mask: the optimizer found nothing worth keeping) ranks nothing, and the curves
  would order it at random: against a non-constant one it scores 0 (what a random ordering scores in
  expectation); two constant vectors are left out (NaN);
- ``constant``: 1 when the randomised explanation is constant (it ranks nothing), else 0; its mean is the share
  of such images, stated beside the correlations;
- ``ssim``: the structural similarity (Gaussian window 11, sigma 1.5, data range 1) of the two pictures of the
  example grid (:func:`.maps.display_image`: the CartoonX explanation image for wavelet masks, the mask for pixel
  masks, the heat map scaled to its 99th percentile for attributions).

High values after randomisation mean the explanation does not depend on the weights; the trained explanation
compared with itself would score 1.

Phase 6 of the run (:func:`sanity_checks`); the explanations of the randomised classifiers are cached like the
others (``explanations/<method>/<hash>/``, the hash covering the depth and the seed).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..classifiers import frozen
from ..errors import ConfigError
from ..seeding import Stream, derive_seed
from .cache import settings_hash
from .config import SanityConfig
from .context import RunContext
from .explanations import ExplainedImage, explain_images, explanation_key
from .maps import display_image

#: The comparisons of a randomised explanation with the trained one (the module docstring defines them).
COMPARISONS = ("spearman", "ssim", "constant")
#: SSIM's Gaussian window (side, sigma) and constants (Wang et al., 2004).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ---- randomising a classifier ---------------------------------------------------------------------------------------
def sanity_problem(classifier) -> str | None:
    """Why the weights of ``classifier`` cannot be randomised layer by layer, or None when they can."""
    hint = "use an nn.Module spec: torchvision:NAME, package.module:callable, synthetic or efficientnet-lite0"
    if not isinstance(classifier, nn.Module):
        return f"sanity checks need an nn.Module classifier, got {type(classifier).__name__}; {hint}"
    for module in classifier.modules():
        if isinstance(module, torch.jit.ScriptModule):
            return (
                f"sanity checks need an nn.Module classifier, not a TorchScript file (no layers to randomise); {hint}"
            )
        if isinstance(module, torch.fx.GraphModule):
            return f"sanity checks need an nn.Module classifier, not an exported program (no layer order); {hint}"
    if not weight_layers(classifier):
        return "sanity checks need a classifier with weights; this one has no parameters"
    return None


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module holding trained state itself that :func:`reinitialise` re-draws:
    parameters, or floating-point buffers that its ``reset_parameters`` resets (the running statistics of a
    ``BatchNorm(affine=False)``), bottom (input) to top (output) in the order of ``named_modules``: parameters of
    the model itself, if any, count as its bottom layer. A module holding buffers only and no ``reset_parameters``
    (torchvision's ``FrozenBatchNorm2d``, an input normalisation's mean and std) is not a layer: nothing would
    re-draw it, and counting it would report it randomised."""

    def trained(m: nn.Module) -> bool:
        if next(m.parameters(recurse=False), None) is not None:
            return True
        return hasattr(m, "reset_parameters") and any(b.is_floating_point() for b in m.buffers(recurse=False))

    return [(name, m) for name, m in model.named_modules() if trained(m)]


def cascade_depths(num_layers: int, depths: Sequence[int] | None = None) -> list[int]:
    """The depths of the cascade, rising, ending with ``num_layers`` (all layers at once).

    Raises:
        ConfigError: a depth larger than ``num_layers``.
    """
    if depths is None:
        depths = [1, *(math.ceil(num_layers * q) for q in (0.25, 0.5, 0.75))]
    too_deep = [d for d in depths if d > num_layers]
    if too_deep:
        raise ConfigError(f"sanity depth {too_deep[0]} exceeds the classifier's {num_layers} layers with weights")
    return sorted({*(int(d) for d in depths), num_layers})


@torch.no_grad()
def reinitialise(module: nn.Module, seed: int) -> None:
    """Re-initialise the parameters (and normalisation statistics) ``module`` holds itself, in place, from ``seed``.

    ``reset_parameters()`` runs on a CPU copy under a forked, seeded CPU random state (the global state is
    restored); a module without it gets Gaussian draws with each tensor's mean and standard deviation.
    """
    own = dict(module.named_parameters(recurse=False))
    if hasattr(module, "reset_parameters"):
        fresh = copy.deepcopy(module).cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh.reset_parameters()
        new_params = dict(fresh.named_parameters(recurse=False))
        for name, p in own.items():
            p.copy_(new_params[name])
        new_buffers = dict(fresh.named_buffers(recurse=False))
        for name, b in module.named_buffers(recurse=False):
            b.copy_(new_buffers[name])
        return
    gen = torch.Generator().manual_seed(seed)
    for p in own.values():
        values = p.detach().float().cpu()
        std = float(values.std()) if values.numel() > 1 else 1.0
        draw = torch.randn(p.shape, generator=gen) * (std if std > 0 else 1.0) + float(values.mean())
        p.copy_(draw)


def randomised_copy(model: nn.Module, depth: int, seed: int) -> nn.Module:
    """A deep copy of ``model`` with its top ``depth`` weight layers re-initialised (layer ``i`` of
    :func:`weight_layers` from ``derive_seed(seed, Stream.SANITY, i)``); ``model`` itself is left untouched."""
    twin = copy.deepcopy(model)
    if isinstance(getattr(twin, "spec", None), str):  # no longer what its spec loads: an amortized checkpoint's
        twin.spec = "<module>"  # classifier check would refuse it (a module passed in, as the caller's own)
    layers = weight_layers(twin)
    if not 1 <= depth <= len(layers):
        raise ConfigError(f"sanity depth {depth} is not between 1 and the classifier's {len(layers)} weight layers")
    for index in range(len(layers) - depth, len(layers)):
        reinitialise(layers[index][1], derive_seed(seed, int(Stream.SANITY), index))
    return twin


# ---- comparing two explanations ---------------------------------------------------------------------------------
def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0, counts)
    return ranks


def spearman(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Spearman's rank correlation of two vectors (ties share their average rank); 0 when exactly one of them is
    constant (it ranks nothing), NaN when both are."""
    x = _average_ranks(np.asarray(a, dtype=np.float64).ravel())
    y = _average_ranks(np.asarray(b, dtype=np.float64).ravel())
    if x.size != y.size:
        raise ValueError(f"cannot correlate vectors of {x.size} and {y.size} entries")
    x, y = x - x.mean(), y - y.mean()
    var_x, var_y = float((x * x).sum()), float((y * y).sum())
    if var_x == 0 or var_y == 0:
        return float("nan") if var_x == var_y else 0.0
    return float((x * y).sum() / math.sqrt(var_x * var_y))


def ssim(a: Tensor, b: Tensor) -> float:
    """The mean structural similarity of two pictures ``(C, H, W)`` or ``(H, W)`` in [0, 1] (channels averaged).

    A Gaussian window of :data:`SSIM_WINDOW` pixels (smaller for smaller pictures), sigma :data:`SSIM_SIGMA`,
    valid positions only; 1 for identical pictures.
    """
    x = a.detach().double().cpu().reshape(-1, 1, *a.shape[-2:])
    y = b.detach().double().cpu().reshape(-1, 1, *b.shape[-2:])
    side = min(SSIM_WINDOW, x.shape[-2], x.shape[-1])
    side -= 1 - side % 2  # odd
    grid = torch.arange(side, dtype=torch.float64) - side // 2
    g = torch.exp(-(grid**2) / (2 * SSIM_SIGMA**2))
    window = (torch.outer(g, g) / g.sum() ** 2)[None, None]
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x**2
    var_y = F.conv2d(y * y, window) - mu_y**2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


# ---- phase 6 of the run -------------------------------------------------------------------------------------------
@dataclass
class SanityResults:
    """The sanity checks of a run.

    Attributes:
        ids: the images checked (the run's first ones).
        layers: the classifier's weight layers, bottom to top.
        depths: the cascade depths (top layers randomised), rising; the last is all layers.
        seed: the randomisation's seed (the run's).
        scores: method -> comparison (``spearman``, ``ssim``, ``constant``) -> ``(len(depths), len(ids))``.
        pictures: method -> ``(1 + len(depths), 1, H, W)``: the first image's picture under the trained
            classifier, then under each depth.
        image: ``(3, H, W)`` the first image (None without images).
        computed: method -> images explained by this run (the rest came from the cache), over all depths.
    """

    ids: list[str]
    layers: list[str]
    depths: list[int]
    seed: int
    scores: dict[str, dict[str, np.ndarray]]
    pictures: dict[str, Tensor]
    image: Tensor | None
    computed: dict[str, int]


def sanity_key(run: RunContext, method, depth: int, num_layers: int) -> str:
    """The cache key of ``method``'s explanations under the classifier randomised to ``depth``."""
    return settings_hash(
        {
            "kind": "sanity",
            "explanation": explanation_key(run, method),
            "depth": depth,
            "layers": num_layers,
            "seed": run.config.seed,
            "randomisation": "reset_parameters, cascade from the top",
            "target": "trained classifier's prediction",
        }
    )


def sanity_checks(run: RunContext, methods: dict, explained: dict[str, dict[str, ExplainedImage]], context):
    """Explain the first images again under the randomised classifiers and compare (see the module docstring).

    Args:
        run: the run (its classifier is the trained one).
        methods: the run's methods (name -> :class:`~.attribution.EvaluationMethod`).
        explained: the trained classifier's explanations (method -> image id -> record).
        context: the run's :class:`~.attribution.MethodContext`; the methods are rebuilt from a copy of it whose
            classifier is the randomised one.

    Returns:
        :class:`SanityResults`.

    Raises:
        ConfigError: a classifier whose weights cannot be randomised (TorchScript, an exported program), or a depth
            larger than its number of weight layers.
    """
    from .baselines import RandomOrdering
    from .methods import build_methods

    settings: SanityConfig = run.config.sanity
    problem = sanity_problem(run.classifier)
    if problem:
        raise ConfigError(problem)
    layers = [name or "(model)" for name, _ in weight_layers(run.classifier)]
    depths = cascade_depths(len(layers), settings.depths)
    count = min(settings.limit or len(run.ids), len(run.ids))
    ids = run.ids[:count]
    names = [n for n, m in methods.items() if not isinstance(m, RandomOrdering)]
    targets = {n: {i: explained[n][i].target for i in ids} for n in names}
    first = run.images.load([0]) if ids else None
    scores = {n: {c: np.full((len(depths), count), np.nan) for c in COMPARISONS} for n in names}
    pictures: dict[str, list[Tensor]] = {}
    computed = {n: 0 for n in names}
    for name in names:
        if first is not None:
            relevance = explained[name][ids[0]].relevance[None].to(run.device)
            pictures[name] = [display_image(methods[name], first, relevance).cpu()[0]]
    for d, depth in enumerate(depths):
        model = randomised_copy(run.classifier, depth, run.config.seed)
        twin_run = dataclasses.replace(run, classifier=model)
        twin_methods, _ = build_methods(names, dataclasses.replace(context, classifier=model))
        with frozen(model):
            for name in names:
                method = twin_methods[name]
                method.progress = run.config.progress
                key = sanity_key(run, methods[name], depth, len(layers))
                found = explain_images(twin_run, method, key, targets[name], count)
                computed[name] += found.computed
                for j, image_id in enumerate(ids):
                    randomised = found.records[image_id].relevance
                    scores[name]["spearman"][d, j] = spearman(explained[name][image_id].relevance, randomised)
                    scores[name]["constant"][d, j] = float(bool((randomised == randomised[0]).all()))
                for lo in range(0, count, run.config.batch_size):
                    batch = list(range(lo, min(count, lo + run.config.batch_size)))
                    images = run.images.load(batch)
                    trained = torch.stack([explained[name][ids[i]].relevance for i in batch]).to(run.device)
                    random = torch.stack([found.records[ids[i]].relevance for i in batch]).to(run.device)
                    a = display_image(methods[name], images, trained).cpu()
                    b = display_image(method, images, random).cpu()
                    for k, i in enumerate(batch):
                        scores[name]["ssim"][d, i] = ssim(a[k], b[k])
                    if lo == 0:
                        pictures[name].append(b[0])
    return SanityResults(
        ids=list(ids),
        layers=layers,
        depths=depths,
        seed=run.config.seed,
        scores=scores,
        pictures={n: torch.stack(p) for n, p in pictures.items()},
        image=None if first is None else first[0].cpu(),
        computed=computed,
    )


__all__ = [
    "COMPARISONS",
    "SanityConfig",
    "SanityResults",
    "cascade_depths",
    "randomised_copy",
    "reinitialise",
    "sanity_checks",
    "sanity_problem",
    "spearman",
    "ssim",
    "weight_layers",
]
