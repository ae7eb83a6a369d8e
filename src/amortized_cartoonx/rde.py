"""The rate-distortion explanation (RDE) objective, pure torch: noise, obfuscation, distortion, loss.

One objective serves the exact optimizer, the amortized explainer's training and the evaluation::

    y_l = clamp(f(s * h + (1 - s) * v_l), 0, 1),  v_l ~ V(h),  l = 1..L
    loss(s) = mean_l d(p(x), p(y_l)) + lambda * mean(s)

per image, with ``h`` the coefficients of ``x`` in a :class:`~amortized_cartoonx.wavelets.Representation`
``f`` and ``p = softmax(classifier(.))`` (the paper's; ``link="sigmoid"``: ``p_k = sigmoid(z_k)``, one independent
probability per label, for multi-label and single-logit binary classifiers). The formulas and defaults follow
``docs/algorithm.md`` in the repository.

Shapes: N images, L noise samples, K classes; coefficients as in :mod:`amortized_cartoonx.wavelets`.

Precision: the representation, the noise, the mixing ``s * h + (1 - s) * v`` and the decoding always run in
float32 (or float64 when given float64; the wavelet filters are pytorch_wavelets' float32 values, so a float64
round trip is exact to about 1e-7, not 1e-15), with autocast turned off around them, so a mixed-precision run
(``precision: bf16-mixed``) optimises the same objective as a float32 run; only the classifier's forward runs
under the caller's autocast, and its logits, the distortions and the loss are float32.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import CartoonXError, ClassifierError, ConfigError, InputError, is_real, one_line
from .fused_ops import clamp_unit  # noqa: F401  (kept importable as rde.clamp_unit)
from .registry import Registry
from .wavelets import Coefficients, Representation

#: Default sparsity weights (the coefficient of the mean of the mask), the reference code's.
DEFAULT_LAMBDA = {"cartoonx": 20.0, "pixel-rde": 4.0}

# ---------------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Turn autocast off on ``device``'s type for the block (where that device type has autocast)."""
    device_type = torch.device(device).type
    available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    if not available(device_type):
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is in a lower floating precision (bf16, fp16); float32 and float64 unchanged."""
    return x.float() if x.is_floating_point() and torch.finfo(x.dtype).bits < 32 else x


def _full(coeffs: Coefficients) -> Coefficients:
    return coeffs.map(at_least_float32)


# ---------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseStatistics:
    """Per image and per group (band): ``mean, std: (N, G)``, G = 1 + J groups (low-pass first)."""

    mean: Tensor
    std: Tensor


def band_statistics(coeffs: Coefficients) -> NoiseStatistics:
    """Mean and unbiased std of every band of every image, pooling orientations and colour channels.

    For Pixel RDE (one band, the image) this is the global mean and std of the image's pixels.
    """
    means, stds = [], []
    for band in coeffs.bands:
        flat = band.detach().flatten(1)  # (N, C * 3 * H_j * W_j)
        means.append(flat.mean(1))
        stds.append(flat.std(1) if flat.shape[1] > 1 else torch.zeros_like(flat[:, 0]))
    return NoiseStatistics(mean=torch.stack(means, 1), std=torch.stack(stds, 1))


#: ``sampler(coeffs, stats, num_samples, generators) -> noise`` with every band ``(N, L, C, ...)``.
NoiseSampler = Callable[[Coefficients, NoiseStatistics, int, Sequence[torch.Generator]], Coefficients]
OBFUSCATIONS: Registry[NoiseSampler] = Registry("obfuscation")


#: A CPU draw of at least this many numbers per image is split into :data:`NOISE_LANES` parts, each from its own
#: generator, so that the parts can be drawn on several threads (``normal_`` on a CPU runs on one core).
LANE_MIN_NUMEL = 1 << 16
NOISE_LANES = 2
_POOL_WORKERS = 4
_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked process makes its own


def _thread_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=_POOL_WORKERS, thread_name_prefix="cartoonx-noise"))
    return _POOL[1]


def _lanes(row: Tensor, gen: torch.Generator) -> list[tuple[Tensor, torch.Generator]]:
    """``row`` (one image's draws, flat) in parts with their generators: the whole row on ``gen``, or, for a large
    CPU row, :data:`NOISE_LANES` contiguous parts, the first on ``gen`` and the others on generators seeded from
    ``gen``. The parts depend on the row's length only, never on the thread count, so the draws are reproducible."""
    if row.device.type != "cpu" or row.numel() < LANE_MIN_NUMEL:
        return [(row, gen)]
    seeds = torch.randint(0, 2**62, (NOISE_LANES - 1,), generator=gen).tolist()
    parts = torch.tensor_split(row, NOISE_LANES)
    return [(parts[0], gen)] + [(p, torch.Generator().manual_seed(int(s))) for p, s in zip(parts[1:], seeds)]


def _standard_draws(
    coeffs: Coefficients, num_samples: int, generators: Sequence[torch.Generator], draw: str
) -> list[Tensor]:
    """Per band, ``(N, L, C, ...)`` standard draws; image n's come from ``generators[n]`` alone.

    Drawn per image, so image n's noise does not depend on the other images of the batch. On a CPU, a large
    draw is split into parts with their own generators (:func:`_lanes`) that run on up to
    ``torch.get_num_threads()`` threads; the numbers do not depend on the thread count.
    """
    if len(generators) != coeffs.num_images:
        raise ValueError(f"need one generator per image: {coeffs.num_images} images, {len(generators)} generators")
    channels = coeffs.num_channels
    sizes = [channels * b[0, 0].numel() for b in coeffs.bands]
    flat = torch.empty(len(generators), num_samples, sum(sizes), device=coeffs.device, dtype=coeffs.dtype)
    tasks = [lane for row, gen in zip(flat, generators) for lane in _lanes(row.view(-1), gen)]

    def fill(task: tuple[Tensor, torch.Generator]) -> None:  # drawn in place: no per-image tensors to stack
        part, gen = task
        if draw == "normal":
            part.normal_(generator=gen)
        else:
            part.uniform_(generator=gen)

    threads = min(torch.get_num_threads(), len(tasks), _POOL_WORKERS)
    if threads > 1:  # one job per thread, so no more than torch's thread count draw at once
        groups = [tasks[i::threads] for i in range(threads)]
        list(_thread_pool().map(lambda group: [fill(task) for task in group], groups))  # normal_ releases the GIL
    else:
        for task in tasks:
            fill(task)
    parts = torch.split(flat, sizes, dim=2)
    return [p.reshape(coeffs.num_images, num_samples, *band.shape[1:]) for p, band in zip(parts, coeffs.bands)]


def _broadcast(stat: Tensor, band: Tensor) -> Tensor:
    """``(N,) -> (N, 1, 1, ...)`` against a band ``(N, L, C, ...)``."""
    return stat.reshape(-1, *([1] * (band.ndim - 1)))


@OBFUSCATIONS.register("gaussian-adaptive")
def gaussian_adaptive_noise(coeffs, stats, num_samples, generators) -> Coefficients:
    """``v ~ N(mean_g, std_g^2)`` per coefficient and channel, with the band g's statistics (the paper's)."""
    draws = _standard_draws(coeffs, num_samples, generators, "normal")
    bands = [z.mul_(_broadcast(stats.std[:, g], z)).add_(_broadcast(stats.mean[:, g], z)) for g, z in enumerate(draws)]
    return coeffs.with_bands(bands)


@OBFUSCATIONS.register("uniform")
def uniform_noise(coeffs, stats, num_samples, generators) -> Coefficients:
    """``v ~ U[mean_g - std_g, mean_g + std_g]`` (the ShearletX code's variant)."""
    draws = _standard_draws(coeffs, num_samples, generators, "uniform")
    bands = [
        _broadcast(stats.mean[:, g], u) + _broadcast(stats.std[:, g], u) * (2 * u - 1) for g, u in enumerate(draws)
    ]
    return coeffs.with_bands(bands)


@OBFUSCATIONS.register("zero")
def zero_noise(coeffs, stats, num_samples, generators) -> Coefficients:
    """``v = 0``: deleted coefficients are set to zero (deterministic)."""
    return coeffs.map(lambda b: torch.zeros(b.shape[0], num_samples, *b.shape[1:], device=b.device, dtype=b.dtype))


def make_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One seeded generator per image on ``device``."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


# ---------------------------------------------------------------------------------------------------------
# Obfuscation
# ---------------------------------------------------------------------------------------------------------


def obfuscate(representation: Representation, coeffs: Coefficients, mask: Coefficients, noise: Coefficients) -> Tensor:
    """``(N*L, C, H, W)``: ``clamp(f(s * h + (1 - s) * v), 0, 1)`` for every image and noise sample.

    Args:
        coeffs: ``h``, bands ``(N, C, ...)``.
        mask: ``s``, bands ``(N, 1, ...)`` (shared by the channels).
        noise: ``v``, bands ``(N, L, C, ...)``.

    Rows are image-major: row ``n * L + l`` is image n, sample l. Mixing and decoding run in float32 (at least)
    with autocast off, whatever the precision of the inputs and the caller's autocast.
    """
    coeffs, mask, noise = _full(coeffs), _full(mask), _full(noise)
    with full_precision(coeffs.device):  # on a CPU in fewer passes over memory (fused_ops)
        return representation.decode_mixed(coeffs, mask, noise, unit_clamp=True)


# ---------------------------------------------------------------------------------------------------------
# Distortion
# ---------------------------------------------------------------------------------------------------------

#: How logits become probabilities. ``softmax`` (the paper's): one class per image, ``p = softmax(z)``.
#: ``sigmoid``: multi-label, each output its own label's logit, ``p_k = sigmoid(z_k)`` independently (a
#: multi-label model, or a binary classifier with a single logit); ``l2`` then compares the vectors of label
#: probabilities and ``kl`` sums the labels' Bernoulli divergences.
LINKS = ("softmax", "sigmoid")
DEFAULT_LINK = "softmax"

#: ``distortion(logits_x (N, K), logits_y (N, L, K), target (N,), link) -> (N, L)``.
Distortion = Callable[[Tensor, Tensor, Tensor, str], Tensor]
DISTORTIONS: Registry[Distortion] = Registry("distortion")


def check_link(link: object) -> str:
    """``link`` if it is a name in :data:`LINKS`; else a :class:`ConfigError` naming the choices."""
    if link not in LINKS:
        raise ConfigError(f"unknown link {link!r}; choose from: {', '.join(LINKS)}")
    return link


def probabilities(logits: Tensor, link: str = DEFAULT_LINK) -> Tensor:
    """``p`` of the same shape as ``logits (..., K)``: the softmax over the last dimension, or each entry's sigmoid."""
    return logits.softmax(-1) if link == "softmax" else logits.sigmoid()


def target_prob(logits: Tensor, target: Tensor, link: str = DEFAULT_LINK) -> Tensor:
    """``p_c`` for logits ``(N, K)`` or ``(N, L, K)`` and ``target (N,)``: ``(N,)`` or ``(N, L)``."""
    index = target.reshape(-1, *([1] * (logits.ndim - 1)))
    index = index.expand(*logits.shape[:-1], 1)
    if link == "sigmoid":  # only the target's logit matters: no sigmoid of the other labels
        return logits.gather(-1, index).squeeze(-1).sigmoid()
    return logits.softmax(-1).gather(-1, index).squeeze(-1)


@DISTORTIONS.register("label")
def label_distortion(logits_x: Tensor, logits_y: Tensor, target: Tensor, link: str = DEFAULT_LINK) -> Tensor:
    """``(p_c(x) - p_c(y))^2`` (the default)."""
    return (target_prob(logits_x, target, link).unsqueeze(1) - target_prob(logits_y, target, link)) ** 2


@DISTORTIONS.register("maximize-target")
def maximize_target_distortion(logits_x: Tensor, logits_y: Tensor, target: Tensor, link: str = DEFAULT_LINK) -> Tensor:
    """``(1 - p_c(y))^2``."""
    return (1.0 - target_prob(logits_y, target, link)) ** 2


@DISTORTIONS.register("l2")
def l2_distortion(logits_x: Tensor, logits_y: Tensor, target: Tensor, link: str = DEFAULT_LINK) -> Tensor:
    """``||p(x) - p(y)||_2`` over all classes (labels, with the sigmoid link); not squared: the Fig. 7 measure."""
    return (probabilities(logits_x, link).unsqueeze(1) - probabilities(logits_y, link)).norm(dim=-1)


@DISTORTIONS.register("label-l2")
def label_l2_distortion(logits_x: Tensor, logits_y: Tensor, target: Tensor, link: str = DEFAULT_LINK) -> Tensor:
    """``|p_c(x) - p_c(y)|``: the ``l2`` measure restricted to the target; the evaluation's measure with the
    sigmoid link, where ``l2`` over all labels would mostly measure the labels not explained."""
    return (target_prob(logits_x, target, link).unsqueeze(1) - target_prob(logits_y, target, link)).abs()


@DISTORTIONS.register("kl")
def kl_distortion(logits_x: Tensor, logits_y: Tensor, target: Tensor, link: str = DEFAULT_LINK) -> Tensor:
    """``KL(p(y) || p(x))``: ``sum_k p_k(y) (log p_k(y) - log p_k(x))`` from log-softmax; with the sigmoid link the
    sum over labels of ``KL(Bernoulli(p_k(y)) || Bernoulli(p_k(x)))``, from log-sigmoids."""
    if link == "sigmoid":
        z_y, z_x = logits_y, logits_x.unsqueeze(1)
        log_py, log_qy = F.logsigmoid(z_y), F.logsigmoid(-z_y)  # log p_k(y), log (1 - p_k(y))
        kl = log_py.exp() * (log_py - F.logsigmoid(z_x)) + log_qy.exp() * (log_qy - F.logsigmoid(-z_x))
        return kl.sum(-1)
    log_py = logits_y.log_softmax(-1)
    log_px = logits_x.log_softmax(-1).unsqueeze(1)
    return (log_py.exp() * (log_py - log_px)).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RDELoss:
    """The RDE loss per image, all ``(N,)``: ``total = distortion + l1_lambda * sparsity``."""

    distortion: Tensor
    sparsity: Tensor
    total: Tensor


def rde_loss(distortion: Tensor, mask: Coefficients, l1_lambda: float) -> RDELoss:
    """Combine ``distortion: (N, L)`` (per noise sample) with the mean of ``mask`` per image (in float32 at
    least: a bf16 mean of the mask would err by about 0.4% of lambda times the mean)."""
    mean_distortion = at_least_float32(distortion).mean(1)
    sparsity = _full(mask).mean_per_image()
    return RDELoss(distortion=mean_distortion, sparsity=sparsity, total=mean_distortion + l1_lambda * sparsity)


@dataclass
class RDEProblem:
    """Everything about a batch of images that does not depend on the mask.

    Attributes:
        images: ``(N, C, H, W)`` in [0, 1].
        coeffs: their coefficients ``h``.
        stats: per-band noise statistics.
        logits: ``(N, K)`` the classifier's logits on the images (no gradient).
        target: ``(N,)`` the class (label) each image is explained for.
        link: how the logits become probabilities (:data:`LINKS`). Default ``softmax``.
    """

    images: Tensor
    coeffs: Coefficients
    stats: NoiseStatistics
    logits: Tensor
    target: Tensor
    link: str = DEFAULT_LINK

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    def prob_original(self) -> Tensor:
        """``(N,)``: the probability of the target on the original images."""
        return target_prob(self.logits, self.target, self.link)


class RDEObjective:
    """The RDE loss of a classifier in a representation: shared by optimizer, training and evaluation.

    Args:
        classifier: maps ``(N, C, H, W)`` in [0, 1] to logits ``(N, K)`` (see :mod:`.classifiers`).
        representation: where the mask lives (wavelet for CartoonX, pixel for Pixel RDE).
        l1_lambda: weight of the mean of the mask. Default 20 (CartoonX; 4 is Pixel RDE's).
        obfuscation: a name in :data:`OBFUSCATIONS`. Default ``gaussian-adaptive``.
        distortion: a name in :data:`DISTORTIONS`. Default ``label``.
        link: ``softmax`` (the paper's; one class per image) or ``sigmoid`` (multi-label: each output is its own
            label's logit, e.g. a binary classifier with one logit); :data:`LINKS`. Default ``softmax``.
    """

    def __init__(
        self,
        classifier: Callable[[Tensor], Tensor],
        representation: Representation,
        l1_lambda: float = DEFAULT_LAMBDA["cartoonx"],
        obfuscation: str = "gaussian-adaptive",
        distortion: str = "label",
        link: str = DEFAULT_LINK,
    ) -> None:
        if not is_real(l1_lambda) or not 0 <= l1_lambda < math.inf:
            raise ConfigError(f"l1_lambda must be a finite number of at least 0, got {l1_lambda!r}")
        self.classifier = classifier
        self.representation = representation
        self.l1_lambda = float(l1_lambda)
        self.obfuscation = obfuscation
        self.distortion = distortion
        self.sample_noise_fn = OBFUSCATIONS.get(obfuscation)
        self.distortion_fn = DISTORTIONS.get(distortion)
        self.link = check_link(link)

    def describe(self) -> dict:
        """The settings, for manifests and checkpoints."""
        return {
            **self.representation.describe(),
            "l1_lambda": self.l1_lambda,
            "obfuscation": self.obfuscation,
            "distortion": self.distortion,
            "link": self.link,
        }

    @torch.no_grad()
    def prepare(self, images: Tensor, target: Tensor | Sequence[int] | int | None = None) -> RDEProblem:
        """Coefficients, noise statistics, logits and target of ``images: (N, C, H, W)``.

        ``target`` is the predicted class by default, else one class for all or one per image. The classifier
        runs under the caller's autocast (if any); its logits, the coefficients and the statistics are float32.
        """
        check_images(images)
        warn_outside_unit_range(images)
        images = images.detach()  # the problem's own: no step's gradient reaches the caller's tensor
        logits = at_least_float32(original_logits(self.classifier, images, self.link))
        target = resolve_target(target, logits)
        with full_precision(images.device):
            coeffs = self.representation.encode(at_least_float32(images))
            stats = band_statistics(coeffs)
        return RDEProblem(images=images, coeffs=coeffs, stats=stats, logits=logits, target=target, link=self.link)

    def sample_noise(
        self, problem: RDEProblem, num_samples: int, generators: Sequence[torch.Generator]
    ) -> Coefficients:
        """Noise ``v`` with bands ``(N, L, C, ...)``, image n's drawn from ``generators[n]`` (autocast off)."""
        with full_precision(problem.coeffs.device):
            return self.sample_noise_fn(problem.coeffs, problem.stats, num_samples, generators)

    def obfuscated_logits(self, problem: RDEProblem, mask: Coefficients, noise: Coefficients) -> Tensor:
        """``(N, L, K)``: the classifier's logits on every obfuscation (with gradient w.r.t. ``mask``), float32.

        The obfuscations are made in float32 (:func:`obfuscate`); only the classifier runs under the caller's
        autocast.
        """
        num_images, num_samples = noise.lowpass.shape[:2]
        obfuscated = obfuscate(self.representation, problem.coeffs, mask, noise)  # (N*L, C, H, W)
        logits = classify_or_explain(
            self.classifier,
            obfuscated,
            " (the optimizer passes N x L noisy copies at once: a model traced or exported for one batch size needs "
            "a dynamic batch dimension, e.g. torch.export's dynamic_shapes)",
        )
        if obfuscated.requires_grad and not logits.requires_grad and torch.is_grad_enabled():
            raise ClassifierError(
                f"{_classifier_name(self.classifier)} returns logits without a gradient to its input (torch.no_grad, "
                ".detach() or a step outside torch in its forward?): the mask is optimised through that gradient"
            )
        return at_least_float32(logits).reshape(num_images, num_samples, -1)

    def distortions(self, problem: RDEProblem, mask: Coefficients, noise: Coefficients) -> Tensor:
        """``(N, L)``: the distortion of every obfuscation (with gradient w.r.t. ``mask``)."""
        return self.distortion_of(problem, self.obfuscated_logits(problem, mask, noise))

    def distortion_of(self, problem: RDEProblem, logits_y: Tensor) -> Tensor:
        """``(N, L)``: the distortion of obfuscations whose logits are ``logits_y: (N, L, K)``."""
        return self.distortion_fn(problem.logits, logits_y, problem.target, self.link)

    def target_prob(self, problem: RDEProblem, logits: Tensor) -> Tensor:
        """``(N,)`` or ``(N, L)``: the probability of each image's target under ``logits (N, [L,] K)``."""
        return target_prob(logits, problem.target, self.link)

    def loss(self, problem: RDEProblem, mask: Coefficients, noise: Coefficients) -> RDELoss:
        """The RDE loss per image for ``mask`` under the noise samples ``noise``."""
        return rde_loss(self.distortions(problem, mask, noise), mask, self.l1_lambda)

    @torch.no_grad()
    def masked_target_prob(self, problem: RDEProblem, mask: Coefficients) -> Tensor:
        """``(N,)``: the probability of the target on ``clamp(f(s * h))`` (no noise; decoded in float32)."""
        with full_precision(problem.coeffs.device):
            masked = self.representation.decode(_full(problem.coeffs) * _full(mask)).clamp(0.0, 1.0)
        return self.target_prob(problem, at_least_float32(classify(self.classifier, masked)))


# ---------------------------------------------------------------------------------------------------------
# Validation shared by every explainer
# ---------------------------------------------------------------------------------------------------------


def check_images(images: Tensor) -> None:
    """Reject what no explainer can use: wrong rank, empty, not floating point, on the meta device, non-finite."""
    if not isinstance(images, Tensor):
        raise InputError(f"images must be a tensor (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise InputError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.numel() == 0:
        raise InputError("images is empty")
    if not images.is_floating_point():
        hint = " (images.float() / 255 for 8-bit pixels)" if images.dtype == torch.uint8 else ""
        raise InputError(f"images must be floating point in [0, 1], got {images.dtype}{hint}")
    if images.is_meta:
        raise InputError("images are on the meta device (a shape without pixel values); load real images first")
    if not torch.isfinite(images).all():
        raise InputError("images contain NaN or infinite values")


#: How far outside [0, 1] pixel values may lie before :func:`warn_outside_unit_range` speaks (resampling slack).
UNIT_RANGE_SLACK = 1e-3


def warn_outside_unit_range(images: Tensor) -> None:
    """Warn when ``images`` are not in [0, 1], e.g. already normalised for the classifier.

    Every obfuscation is clamped to [0, 1] (the module's formula), so with such images the distortion compares
    the original with clamped images and is not zero even when the whole image is kept.
    """
    low, high = (float(v) for v in torch.aminmax(images.detach()))
    if low < -UNIT_RANGE_SLACK or high > 1.0 + UNIT_RANGE_SLACK:
        warnings.warn(
            f"images range over [{low:.3g}, {high:.3g}], not [0, 1]: every obfuscation is clamped to [0, 1], so "
            "this explanation compares the original with clamped images. Pass images in [0, 1] and let the "
            "classifier normalise them (load_classifier(..., normalize=...) or wrap_classifier(model, "
            "normalize='imagenet'))",
            stacklevel=2,
        )


def input_dtype(classifier: object) -> torch.dtype | None:
    """The floating dtype of a module's first floating parameter or buffer (the input it computes in), else None."""
    if not isinstance(classifier, torch.nn.Module):
        return None
    tensors = itertools.chain(classifier.parameters(), classifier.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def as_input_of(module: object, x: Tensor, default: torch.dtype | None = None) -> Tensor:
    """``x`` in ``module``'s own floating dtype (:func:`input_dtype`; float64 images for a float32 model), or in
    ``default`` when the module has none (None: unchanged)."""
    return x.to(input_dtype(module) or default or x.dtype)


def classify(classifier: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``classifier(x)``, with ``x`` cast to the classifier's own floating dtype first (:func:`as_input_of`)
    unless autocast runs on ``x``'s device (it chooses the dtypes then; float64 goes in as float32)."""
    if _autocast_on(x.device.type):  # autocast chooses the dtypes, but it leaves float64 as it is
        return classifier(x.float() if x.dtype == torch.float64 else x)
    return classifier(as_input_of(classifier, x))


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type: CUDA's flag, and CPU's own function
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def original_logits(classifier: Callable[[Tensor], Tensor], images: Tensor, link: str = DEFAULT_LINK) -> Tensor:
    """The classifier's logits ``(N, K)`` on the original ``images``, checked (:func:`check_logits`, for ``link``).

    The classifier gets a copy, so one that edits its input in place (``x.sub_(mean)``) leaves the caller's
    images, and the coefficients computed from them, as they were.

    Raises:
        ClassifierError: the classifier fails on the images (wrong channel count, device or size: the message
            names the images' shape, dtype and device) or returns something other than finite logits.
    """
    logits = classify_or_explain(classifier, images.clone())  # a copy: a classifier that edits its input in place
    check_logits(logits, images.shape[0], classifier, link)
    return logits


def classify_or_explain(
    classifier: Callable[[Tensor], Tensor], x: Tensor, hint: str = "", who: str | None = None
) -> Tensor:
    """:func:`classify`, with the classifier's own errors as a :class:`ClassifierError` that names the network
    (``who``; default: the classifier and its spec), the input's shape, dtype and device, and ``hint``; the
    package's errors and CUDA out-of-memory pass unchanged."""
    try:
        return classify(classifier, x)
    except (CartoonXError, torch.cuda.OutOfMemoryError):  # torch.OutOfMemoryError from torch 2.5
        raise
    except Exception as exc:  # the classifier's own error, given the context it lacks
        wanted = {3: 1, 1: 3}.get(x.shape[1]) if x.ndim == 4 else None  # the other channel count
        if wanted and f"to have {wanted} channels" in str(exc):  # torch's conv message
            kind = (
                "a single-channel classifier takes greyscale images"
                if wanted == 1
                else "an RGB classifier takes images"
            )
            hint += (
                f"; {kind} (N, {wanted}, H, W): amortized_cartoonx.images.to_channels(images, {wanted}), "
                f"or on the command line --channels auto or {wanted}"
            )
        raise ClassifierError(
            f"{who or _classifier_name(classifier)} failed on images of shape {tuple(x.shape)} ({x.dtype}, "
            f"{x.device}): {type(exc).__name__}: {one_line(exc)}{hint}"
        ) from exc


def _classifier_name(classifier: object) -> str:
    name = getattr(classifier, "spec", None) or (type(classifier).__name__ if classifier is not None else None)
    return f"the classifier {name}" if name else "the classifier"


def first_non_finite(values: Tensor) -> int | None:
    """The index of the first NaN or infinite entry of ``values: (N,)`` (one device sync), or None."""
    bad = (~torch.isfinite(values)).nonzero()
    return int(bad[0, 0]) if len(bad) else None


def check_logits(logits: Tensor, num_images: int, classifier: object = None, link: str = DEFAULT_LINK) -> None:
    """Reject classifier outputs that are not finite logits ``(N, K)`` (checked once, on the original images).

    ``classifier`` (optional) names the culprit in the message (its ``spec`` when it has one). With the softmax
    link ``K`` must be at least 2; with the sigmoid link one logit (a binary classifier) is enough.
    """
    who = _classifier_name(classifier)
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != num_images:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ClassifierError(f"{who} returned {shape}; expected logits of shape (N, classes) = ({num_images}, K)")
    if not logits.is_floating_point():
        raise ClassifierError(f"{who} returned {logits.dtype} outputs; expected floating-point logits")
    if logits.shape[1] < 1:
        raise ClassifierError(f"{who} returned no logits (shape {tuple(logits.shape)}); expected (N, classes)")
    if logits.shape[1] < 2 and link == "softmax":
        raise ClassifierError(
            f"{who} returned one logit per image; the softmax link compares softmax probabilities, which are "
            "always 1 for a single class: for a binary or multi-label classifier whose outputs are sigmoid "
            "logits, use the sigmoid link (--link sigmoid; Python: link='sigmoid'); for a sigmoid output p, "
            "return z = torch.logit(p)"
        )
    if not bool(torch.isfinite(logits).all()):
        raise ClassifierError(f"{who} returned NaN or infinite logits for the original images")
    if link == "softmax" and logits.shape[1] > 1 and _look_like_probabilities(logits):
        warnings.warn(
            f"{who} seems to return probabilities (every row in [0, 1], summing to 1); the RDE loss takes the "
            "softmax of what it returns, and the softmax of probabilities is nearly flat, so the explanation "
            "barely depends on the image: return logits (drop the final softmax)",
            stacklevel=2,
        )
    if link == "sigmoid" and _look_like_sigmoid_outputs(logits):
        warnings.warn(
            f"{who} seems to return probabilities (every output in [0, 1]); the sigmoid link takes the sigmoid of "
            "what it returns, which is nearly flat on [0, 1], so the explanation barely depends on the image: "
            "return logits (drop the final sigmoid, or torch.logit(p))",
            stacklevel=2,
        )


def _look_like_sigmoid_outputs(logits: Tensor) -> bool:
    """At least 8 outputs, all in [0, 1] and a quarter of them within 0.05 of 0 or 1: saturated probabilities.
    (Weak logits all in [0, 1] are possible; logits that many near 0 and 1 and none outside are not.)"""
    values = logits.detach().float()
    if values.numel() < 8 or not bool(((values >= 0) & (values <= 1)).all()):
        return False
    return float(((values < 0.05) | (values > 0.95)).float().mean()) >= 0.25


def _look_like_probabilities(logits: Tensor) -> bool:
    """Every row in [0, 1] and summing to 1 (within the rounding of the outputs' dtype: a bf16 softmax's rows
    miss 1 by up to about 2e-3)."""
    values = logits.detach().float()
    in_unit = bool(((values >= 0) & (values <= 1)).all())
    tolerance = 1e-3 if torch.finfo(logits.dtype).bits >= 32 else 2e-2
    return in_unit and bool(((values.sum(1) - 1).abs() < tolerance).all())


def resolve_target(target: Tensor | Sequence[int] | int | None, logits: Tensor) -> Tensor:
    """``(N,)`` long: the predicted class by default, one class for all, or one per image; range-checked."""
    num_images, num_classes = logits.shape
    if target is None:
        return logits.argmax(1)
    try:
        given = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):  # a string, a ragged list, None inside a list
        raise InputError(f"target must be class indices (integers), got {target!r:.60}") from None
    if given.dtype == torch.bool or given.is_complex() or (given.is_floating_point() and not _integral(given)):
        raise InputError(f"target must be class indices (integers), got {given.dtype} values")
    target = given.to(dtype=torch.long, device=logits.device).reshape(-1)
    if target.numel() == 1:
        target = target.expand(num_images).clone()
    if target.numel() != num_images:
        raise InputError(f"got {target.numel()} targets for {num_images} images")
    bad = (target < 0) | (target >= num_classes)
    if bad.any():
        raise InputError(
            f"target class {int(target[bad][0])} is out of range: the classifier has "
            + (f"{num_classes} classes" if num_classes > 1 else "one output (a single-logit classifier: target 0)")
        )
    return target


def _integral(values: Tensor) -> bool:
    return bool(torch.isfinite(values).all()) and bool((values == values.round()).all())
