"""The exact per-image RDE optimizer (Algorithm 1): CartoonX in the wavelet domain, Pixel RDE in pixels.

Both share one code path, :class:`RDEOptimizer`; they differ only in the representation and in the
default sparsity weight. A batch of N images is optimised at once with L noise samples each (N * L
classifier inputs per step); every image keeps its own target, noise statistics, noise generator, loss
and mask, and the summed loss gives each mask exactly the gradient of its own run. So a batch gives the
same masks as running the images one by one with the same seeds (up to float rounding).

Example::

    from amortized_cartoonx import CartoonX, load_classifier
    classifier = load_classifier("torchvision:mobilenet_v3_small")
    explanation = CartoonX(classifier).explain(images)   # images: (N, 3, H, W) in [0, 1]
    explanation.image                                    # (N, 1, H, W) the piece-wise smooth explanation
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .classifiers import frozen
from .errors import ConfigError, NonFiniteError, is_integer, is_real
from .explanation import Explanation, LossHistory, as_mask, measure_mask
from .mask_logits import logits_to_mask, mask_to_logits
from .rde import (
    DEFAULT_LAMBDA,
    DISTORTIONS,
    OBFUSCATIONS,
    RDEObjective,
    RDEProblem,
    check_link,
    first_non_finite,
    make_generators,
)
from .runtime import synchronize
from .seeding import Stream, image_seeds, stream_seeds
from .wavelets import (
    DEFAULT_LEVELS,
    DEFAULT_MODE,
    DEFAULT_WAVE,
    Coefficients,
    PixelRepresentation,
    Representation,
    WaveletRepresentation,
)

#: Settings added to :class:`OptimizerConfig` after results were first stored (teacher manifests, evaluation and
#: benchmark caches), with the value every earlier result was computed with. Comparisons and cache keys leave a
#: setting out at this value (:func:`without_later_defaults`), so older stores and caches stay valid.
LATER_DEFAULTS: dict[str, object] = {"precision": "fp32", "final_samples": None, "link": "softmax"}


def without_later_defaults(settings: object) -> object:
    """``settings`` (a dict, nested in dicts and lists) without the :data:`LATER_DEFAULTS` keys at their value."""
    if isinstance(settings, dict):
        return {
            k: without_later_defaults(v)
            for k, v in settings.items()
            if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])
        }
    if isinstance(settings, (list, tuple)):
        return [without_later_defaults(v) for v in settings]
    return settings


def result_settings(settings: dict) -> dict:
    """An optimizer's :meth:`~CartoonX.settings` (or a record of them) as results are compared and keyed: without
    the :data:`LATER_DEFAULTS` at their earlier value, and without the logit form's stretch when the mask is the
    projected one (``parametrisation`` ``clamp``, or absent: the only form before the logit one), which never
    reads it."""
    settings = without_later_defaults(settings)
    if settings.get("parametrisation", "clamp") == "clamp":
        settings.pop("logit_stretch", None)
    return settings


#: Named step schedules: the number of Adam steps, the learning rate and its decay over the steps.
#: ``paper``: the paper's Algorithm 1 (constant lr 1e-3, 2000 steps). ``fast``: a tenth of the steps, lr 0.1
#: with cosine decay to 0 (chosen by ``scripts/bench_schedule.py``; measurements in docs/benchmarks.md).
#: ``refine``: the warm start's default: ``fast``'s lr and decay over 60 steps from the amortized mask (lr and decay
#: chosen by ``scripts/bench_amortized.py`` at the default L = 64; the steps: the fewest of 40, 60 and 80 that reach
#: the exact loss on at least 80% of held-out images; measurements in docs/amortized.md); not a cold start.
SCHEDULES: dict[str, dict] = {
    "paper": {"steps": 2000, "lr": 1e-3, "lr_decay": "constant", "parametrisation": "clamp"},
    "fast": {"steps": 200, "lr": 0.1, "lr_decay": "cosine", "parametrisation": "clamp"},
    "refine": {"steps": 60, "lr": 0.1, "lr_decay": "cosine", "parametrisation": "clamp"},
}
#: The fields a schedule fills when they are not given (every schedule names all of them).
SCHEDULE_FIELDS = ("steps", "lr", "lr_decay", "parametrisation")
#: How the learning rate moves over a run of S steps (step s = 0 .. S-1), as a factor of ``lr``.
LR_DECAYS: dict[str, Callable[[int, int, float], float]] = {
    "constant": lambda s, total, final: 1.0,
    "linear": lambda s, total, final: final + (1 - final) * (1 - s / max(1, total)),
    "cosine": lambda s, total, final: final + (1 - final) * 0.5 * (1 + math.cos(math.pi * s / max(1, total))),
}


#: How the optimised variable maps to the mask. ``clamp``: the mask itself, projected onto [0, 1] after every
#: step (the paper's Algorithm 1). ``logit``: the mask is the stretched sigmoid
#: :func:`~amortized_cartoonx.mask_logits.logits_to_mask` of free logits z (``logit_stretch``; exact 0 and 1
#: at finite z, so no sigmoid tail is paid for); a start mask (all ones for a cold start) begins at its
#: logits (:func:`~amortized_cartoonx.mask_logits.mask_to_logits`). In the logit form a step moves an entry
#: by up to about lr / 4 near 0.5 and less towards the edges, where a clamped entry moves by up to lr anywhere.
PARAMETRISATIONS = ("clamp", "logit")

#: The classifier's precision inside the optimisation steps. ``fp32``: full precision (the default).
#: ``bf16``: the classifier's forward and backward run under bfloat16 autocast (on a GPU with bf16 tensor
#: cores about twice as fast for convolutional classifiers); the DWT, the noise, the decoding and the loss
#: stay float32 (:mod:`~amortized_cartoonx.rde` turns autocast off around them), and the start (the
#: target class) and the final measurement always run in float32, so results of both precisions are
#: measured alike. Measured loss change: docs/benchmarks.md.
PRECISIONS = ("fp32", "bf16")


#: On a CPU, with ``chunk_size=None``, the noise samples of a step go through the obfuscation and the classifier in
#: chunks of at most this many pixel values (16 RGB images of 256 x 256): batches that fit the caches, so a step
#: at L = 64 is faster than in one pass (docs/benchmarks.md); the same result up to the order of the sums. A GPU
#: takes all samples at once.
CPU_CHUNK_VALUES = 16 * 3 * 256 * 256


def default_chunk(num_samples: int, images: Tensor) -> int:
    """Noise samples per pass when ``chunk_size`` is None: all of them on a GPU; on a CPU as many as keep the
    ``(N * chunk, C, H, W)`` obfuscations within :data:`CPU_CHUNK_VALUES` values (at least one)."""
    if images.device.type != "cpu":
        return num_samples
    return max(1, min(num_samples, CPU_CHUNK_VALUES // max(1, images.numel())))


@dataclass
class OptimizerConfig:
    """Hyper-parameters of the exact optimizer. Defaults are the paper's (Algorithm 1, Section 5.2).

    Attributes:
        schedule: a named step schedule (:data:`SCHEDULES`) that fills ``steps``, ``lr``, ``lr_decay`` and
            ``parametrisation`` when they are not given. Default ``paper``.
        steps: Adam steps N. Default: the schedule's (paper: 2000).
        num_samples: noise samples L per step. Default 64.
        final_samples: when given, L ramps linearly from ``num_samples`` at the first step to this at the last
            (few samples while the mask moves fast, more when the gradient noise limits the end). Default None
            (constant L).
        lr: Adam learning rate at the first step. Default: the schedule's (paper: 1e-3).
        lr_decay: ``constant``, ``linear`` or ``cosine`` decay of the learning rate over the steps of a run,
            down to ``lr * lr_final``. Default: the schedule's (paper: constant).
        lr_final: the decay's last learning rate as a fraction of ``lr``. Default 0.
        parametrisation: ``clamp`` (the paper's projected mask) or ``logit`` (:data:`PARAMETRISATIONS`).
            Default: the schedule's (paper: clamp).
        logit_stretch: the stretch of the ``logit`` form's sigmoid. Default 0.1.
        precision: ``fp32`` (default) or ``bf16``: the classifier's precision during the steps
            (:data:`PRECISIONS`); the measurement is float32 either way.
        l1_lambda: weight of the mean of the mask; None takes the method's default
            (20 for CartoonX, 4 for Pixel RDE).
        obfuscation: noise for the deleted coefficients. Default ``gaussian-adaptive``.
        distortion: distortion measure. Default ``label``.
        link: how the classifier's outputs become probabilities: ``softmax`` (the paper's; one class per image)
            or ``sigmoid`` (multi-label: each output its own label's logit; a binary classifier with a single
            logit); :data:`~amortized_cartoonx.rde.LINKS`. Default ``softmax``.
        chunk_size: noise samples per forward/backward pass. Chunking bounds memory without changing the result
            (the gradients are accumulated). None (default): all L at once on a GPU, cache-sized chunks on a CPU
            (:func:`default_chunk`).
        stop_patience: stop an image once its loss has not improved by more than ``stop_tolerance``
            (relative) for this many steps. None (default) always runs ``steps`` steps.
        stop_tolerance: relative improvement that counts for ``stop_patience``. Default 1e-3.
        measure_samples: noise samples for the final measurement; None uses ``num_samples``.
        seed: image n of a call is seeded ``seed + n`` unless ``explain(seeds=...)`` is given. Default 0.
    """

    schedule: str = "paper"
    steps: int | None = None
    num_samples: int = 64
    final_samples: int | None = None
    lr: float | None = None
    lr_decay: str | None = None
    lr_final: float = 0.0
    parametrisation: str | None = None
    logit_stretch: float = 0.1
    precision: str = "fp32"
    l1_lambda: float | None = None
    obfuscation: str = "gaussian-adaptive"
    distortion: str = "label"
    link: str = "softmax"
    chunk_size: int | None = None
    stop_patience: int | None = None
    stop_tolerance: float = 1e-3
    measure_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose from: {', '.join(SCHEDULES)}")
        for name, value in SCHEDULES[self.schedule].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        # The schedule's values are filled in when the config is made; a new name alone would not refill them.
        if name == "schedule" and "schedule" in self.__dict__ and value != self.__dict__["schedule"]:
            raise ConfigError(
                f"the schedule of a config is set when it is made (its steps and lr come from it): use "
                f"config.replace(schedule={value!r}) instead of assigning it"
            )
        super().__setattr__(name, value)

    def replace(self, **changes) -> OptimizerConfig:
        """A copy with ``changes`` (field names as keywords).

        A new ``schedule`` brings its own ``steps``, ``lr``, ``lr_decay`` and ``parametrisation``, except those also
        named in ``changes``: ``dataclasses.replace`` alone would keep the values the old schedule filled in, so
        ``replace(schedule="fast")`` would still run the paper's 2000 steps at lr 1e-3.
        """
        if changes.get("schedule", self.schedule) != self.schedule:
            changes = {**dict.fromkeys(SCHEDULE_FIELDS), **changes}
        return dataclasses.replace(self, **changes)

    def validate(self) -> OptimizerConfig:
        self._check_types()
        OBFUSCATIONS.get(self.obfuscation)
        DISTORTIONS.get(self.distortion)
        check_link(self.link)
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"unknown lr_decay {self.lr_decay!r}; choose from: {', '.join(LR_DECAYS)}")
        if self.parametrisation not in PARAMETRISATIONS:
            raise ConfigError(
                f"unknown parametrisation {self.parametrisation!r}; choose from: {', '.join(PARAMETRISATIONS)}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose from: {', '.join(PRECISIONS)}")
        if not 0.0 <= self.logit_stretch < 0.5:
            raise ConfigError(f"logit_stretch must be in [0, 0.5), got {self.logit_stretch}")
        if not 0.0 <= self.lr_final <= 1.0:
            raise ConfigError(f"lr_final must be in [0, 1], got {self.lr_final}")
        for name in ("lr", "lr_final", "stop_tolerance", "l1_lambda"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        for name in ("num_samples", "lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("chunk_size", "stop_patience", "measure_samples", "final_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.steps < 0:
            raise ConfigError(f"steps must be at least 0, got {self.steps}")
        if self.l1_lambda is not None and self.l1_lambda < 0:
            raise ConfigError(f"l1_lambda must be at least 0, got {self.l1_lambda}")
        if not 0.0 <= self.stop_tolerance < 1.0:
            raise ConfigError(f"stop_tolerance must be in [0, 1), got {self.stop_tolerance}")
        return self

    def _check_types(self) -> None:
        """Counts are integers and rates real numbers (a bool is neither; None where the field allows it)."""
        for name in ("steps", "num_samples", "final_samples", "chunk_size", "stop_patience", "measure_samples", "seed"):
            value = getattr(self, name)
            if value is not None and not is_integer(value):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        for name in ("lr", "lr_final", "logit_stretch", "stop_tolerance", "l1_lambda"):
            value = getattr(self, name)
            if value is not None and not is_real(value):
                raise ConfigError(f"{name} must be a number, got {value!r}")


def samples_at(step: int, num_steps: int, first: int, final: int | None) -> int:
    """Noise samples L at ``step`` (0 .. num_steps - 1): ``first``, or the linear ramp from ``first`` to ``final``."""
    if final is None or num_steps <= 1:
        return first
    return round(first + (final - first) * step / (num_steps - 1))


class RDEOptimizer:
    """Projected Adam on a mask over the coefficients of a representation, batched over images.

    Args:
        classifier: maps ``(N, C, H, W)`` in [0, 1] to logits ``(N, K)``. An ``nn.Module`` is run in eval
            mode without parameter gradients during :meth:`explain` and its flags are restored afterwards.
        representation: where the mask lives.
        config: the hyper-parameters (:class:`OptimizerConfig`); keyword overrides are applied on top
            (:meth:`OptimizerConfig.replace`: a ``schedule`` override brings that schedule's steps and lr).
        method: the name recorded in results (``cartoonx`` or ``pixel-rde``); picks the default lambda.
    """

    def __init__(
        self,
        classifier: Callable[[Tensor], Tensor],
        representation: Representation,
        config: OptimizerConfig | None = None,
        *,
        method: str = "cartoonx",
        **overrides,
    ) -> None:
        config = (config or OptimizerConfig()).replace(**overrides)
        if config.l1_lambda is None:
            config.l1_lambda = DEFAULT_LAMBDA[method]
        self.config = config.validate()
        self.method = method
        self.classifier = classifier
        self.representation = representation
        self.objective = RDEObjective(
            classifier, representation, config.l1_lambda, config.obfuscation, config.distortion, config.link
        )

    def settings(self) -> dict:
        """Every setting that determines the result (for outputs and manifests)."""
        return {"method": self.method, **self.objective.describe(), **dataclasses.asdict(self.config)}

    def explain(
        self,
        images: Tensor,
        target: Tensor | Sequence[int] | int | None = None,
        *,
        init_mask: Coefficients | Tensor | None = None,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
        progress: bool = False,
    ) -> Explanation:
        """Optimise one mask per image.

        Args:
            images: ``(N, C, H, W)`` in [0, 1], on the device to compute on.
            target: the class to explain: None (the predicted class), one int for all, or one per image.
            init_mask: start from this mask (warm start) instead of all ones: :class:`Coefficients`
                ``(N, 1, ...)`` or a flat ``(N, K)`` tensor; clamped into [0, 1] (``logit``: then
                mapped to its logits, :func:`~amortized_cartoonx.mask_logits.mask_to_logits`).
            seeds: one seed per image (default ``config.seed + n``); the noise of image n depends on its
                seed alone.
            steps: overrides ``config.steps`` for this call (e.g. the refinement steps of a warm start).
            progress: show a progress bar over the steps.
        """
        cfg = self.config
        num_steps = cfg.steps if steps is None else steps
        if not is_integer(num_steps):
            raise ConfigError(f"steps must be an integer, got {num_steps!r}")
        if num_steps < 0:
            raise ConfigError(f"steps must be at least 0, got {num_steps}")
        if num_steps and torch.is_inference_mode_enabled():
            raise ConfigError(
                "explain runs Adam steps, which need autograd: call it outside torch.inference_mode() (torch.no_grad() "
                "is fine: the steps turn gradients back on)"
            )
        start = time.perf_counter()
        with frozen(self.classifier):
            problem = self.objective.prepare(images, target)
            seeds = image_seeds(problem.images.shape[0], cfg.seed, seeds)
            variable = self._start(problem, init_mask)
            with torch.enable_grad():  # the steps differentiate, whatever the caller's grad mode
                mask, history, steps_run = self._optimize(problem, variable, seeds, num_steps, progress)
            measured = measure_mask(self.objective, problem, mask, seeds, cfg.measure_samples or cfg.num_samples)
        synchronize(images.device)
        return Explanation(
            method=self.method,
            mask=mask,
            image=measured.pop("image"),
            target=problem.target,
            steps=steps_run,
            seconds=time.perf_counter() - start,
            history=history,
            # what this call ran: its step count (the lr decay spans it) and where it started
            settings={**self.settings(), "steps": num_steps, "init_mask": "ones" if init_mask is None else "given"},
            seeds=list(seeds),
            **measured,
        )

    def _start(self, problem: RDEProblem, init_mask: Coefficients | Tensor | None) -> Coefficients:
        """The optimised variable's start: the mask (``clamp``) or its logits (``logit``), bands ``(N, 1, ...)``."""
        if init_mask is None:
            mask = problem.coeffs.mask_like(1.0)
        else:
            mask = as_mask(init_mask, problem.coeffs).detach().clone().clamp(0.0, 1.0)
        if self.config.parametrisation == "logit":
            return mask.map(lambda m: mask_to_logits(m, self.config.logit_stretch))
        return mask

    def _optimize(
        self, problem: RDEProblem, variable: Coefficients, seeds: Sequence[int], num_steps: int, progress: bool
    ) -> tuple[Coefficients, LossHistory, Tensor]:
        """Run the Adam loop on ``variable`` (the mask, or its logits); returns the mask, the history and the
        steps run per image."""
        cfg = self.config
        device = problem.images.device
        num_images = problem.images.shape[0]
        generators = make_generators(stream_seeds(seeds, Stream.OPTIMIZE), device)
        params = [b.requires_grad_(True) for b in variable.bands]  # (N, 1, ...) leaves
        variable = variable.with_bands(params)
        logit = cfg.parametrisation == "logit"

        def as_mask_of(v: Coefficients) -> Coefficients:
            return v.map(lambda z: logits_to_mask(z, cfg.logit_stretch)) if logit else v

        adam = torch.optim.Adam(params, lr=cfg.lr)
        low_precision = cfg.precision == "bf16"
        history = torch.zeros(3, num_steps, num_images, device=device)  # distortion, sparsity, total
        active = torch.ones(num_images, dtype=torch.bool, device=device)
        steps_run = torch.zeros(num_images, dtype=torch.long, device=device)
        best = torch.full((num_images,), float("inf"), device=device)
        since_best = torch.zeros(num_images, dtype=torch.long, device=device)

        decay = LR_DECAYS[cfg.lr_decay]
        bar = tqdm(range(num_steps), desc=f"{self.method} steps", unit="step", leave=False, disable=not progress)
        for step in bar:
            adam.param_groups[0]["lr"] = cfg.lr * decay(step, num_steps, cfg.lr_final)
            num_samples = samples_at(step, num_steps, cfg.num_samples, cfg.final_samples)
            chunk = cfg.chunk_size or default_chunk(num_samples, problem.images)
            noise = self.objective.sample_noise(problem, num_samples, generators)  # (N, L, C, ...)
            adam.zero_grad(set_to_none=True)
            distortion = torch.zeros(num_images, device=device)
            for lo in range(0, num_samples, chunk):  # gradient accumulation over sample chunks
                part = noise.map(lambda b, lo=lo, hi=lo + chunk: b[:, lo:hi])
                mask = as_mask_of(variable)  # logit: a fresh graph for each backward pass
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low_precision):
                    d = self.objective.distortions(problem, mask, part)  # (N, l), float32
                (d.sum() / num_samples).backward()
                distortion += d.detach().sum(1)
            distortion /= num_samples
            sparsity = as_mask_of(variable).mean_per_image()  # (N,)
            (self.objective.l1_lambda * sparsity.sum()).backward()
            total = distortion + self.objective.l1_lambda * sparsity.detach()
            bad = first_non_finite(total) if step % 10 == 9 or step == num_steps - 1 else None  # a sync: not always
            if bad is not None:
                raise NonFiniteError(
                    f"the RDE loss of image {bad} became {float(total[bad])} by step {step + 1} (lr {cfg.lr}): "
                    "the classifier's outputs under noise are not finite, or the learning rate is too large"
                )
            history[:, step] = torch.stack([distortion, sparsity.detach(), total])

            before = [p.detach().clone() for p in params] if cfg.stop_patience else None
            adam.step()
            with torch.no_grad():
                for i, p in enumerate(params):
                    if not logit:
                        p.clamp_(0.0, 1.0)  # projection onto [0, 1]
                    if before is not None:  # images that stopped keep their mask
                        keep = (~active).reshape(-1, *([1] * (p.ndim - 1)))
                        p.copy_(torch.where(keep, before[i], p))
            steps_run += active.long()

            if cfg.stop_patience:
                improved = total < best * (1 - cfg.stop_tolerance)
                best = torch.where(improved, total, best)
                since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
                active &= since_best < cfg.stop_patience
                if step % 10 == 9 and not bool(active.any()):
                    history = history[:, : step + 1]
                    break
            if progress and step % 25 == 0:
                bar.set_postfix(loss=f"{float(total.mean()):.4f}", mask=f"{float(sparsity.detach().mean()):.3f}")
        bar.close()

        history = history.cpu()
        if cfg.stop_patience:  # after an image stopped, its history repeats its last value
            for n in range(num_images):
                last = int(steps_run[n])
                if 0 < last < history.shape[1]:
                    history[:, last:, n] = history[:, last - 1 : last, n]
        final = as_mask_of(variable.detach()).map(lambda b: b.clone())
        return final, LossHistory(*history), steps_run


class CartoonX(RDEOptimizer):
    """Exact CartoonX: RDE on the DWT coefficients (db3, J=5, zero padding, lambda 20 by default).

    Args:
        classifier: see :class:`RDEOptimizer`.
        wave, levels, mode: the DWT (see :class:`~amortized_cartoonx.wavelets.WaveletRepresentation`).
        config, **overrides: :class:`OptimizerConfig` and field overrides, e.g. ``steps=300``.
    """

    def __init__(
        self,
        classifier: Callable[[Tensor], Tensor],
        *,
        wave: str = DEFAULT_WAVE,
        levels: int = DEFAULT_LEVELS,
        mode: str = DEFAULT_MODE,
        config: OptimizerConfig | None = None,
        **overrides,
    ) -> None:
        super().__init__(classifier, WaveletRepresentation(wave, levels, mode), config, method="cartoonx", **overrides)


class PixelRDE(RDEOptimizer):
    """Pixel RDE: the same optimizer on a pixel mask (lambda 4 by default)."""

    def __init__(
        self, classifier: Callable[[Tensor], Tensor], *, config: OptimizerConfig | None = None, **overrides
    ) -> None:
        super().__init__(classifier, PixelRepresentation(), config, method="pixel-rde", **overrides)
