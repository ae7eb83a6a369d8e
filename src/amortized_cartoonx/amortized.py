"""Single-pass CartoonX from a trained mask predictor, and exact CartoonX warm-started from its prediction.

No Lightning here: a checkpoint written by ``cartoonx fit`` is read with ``torch.load(..., weights_only=True)``
(it holds only tensors and plain values) and the network is rebuilt from the settings it records::

    from amortized_cartoonx.amortized import AmortizedExplainer, WarmStartExplainer
    amortized = AmortizedExplainer.from_checkpoint("checkpoints/run/best.ckpt", "torchvision:mobilenet_v3_small")
    explanation = amortized.explain(images)                  # one forward pass; Explanation, steps = 0
    refined = WarmStartExplainer(amortized, refine_steps=100).explain(images)     # + 100 exact steps

Both answer the same ``explain(images, target=None, *, seeds=None)`` as the exact optimizer and fill the
:class:`~amortized_cartoonx.explanation.Explanation` with :func:`~amortized_cartoonx.explanation.measure_mask`
on noise from the same per-image seeds, so their losses compare directly with the optimizer's.

A checkpoint records the classifier, the image size, the wavelet (wave, J, padding), lambda, distortion and
obfuscation it was trained for; :meth:`AmortizedExplainer.check_compatible` refuses anything else.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import NETWORK_KEY, build_mask_predictor, read_checkpoint
from .classifiers import (
    Classifier,
    frozen,
    load_classifier,
    normalization_name,
    same_classifier,
    weights_digest,
    wrap_classifier,
)
from .data import split_train_val_test
from .errors import ClassifierError, ConfigError, is_integer, is_real
from .explanation import Explanation, measure_mask
from .io import file_sha256
from .mask_predictor import MaskPredictor
from .optimizer import SCHEDULE_FIELDS, OptimizerConfig, RDEOptimizer
from .rde import (
    DEFAULT_LINK,
    RDEObjective,
    RDEProblem,
    as_input_of,
    check_images,
    make_generators,
    original_logits,
    resolve_target,
    warn_outside_unit_range,
)
from .runtime import resolve_device, synchronize
from .seeding import Stream, image_seeds, stream_seeds
from .wavelets import Coefficients, WaveletRepresentation, max_levels

logger = logging.getLogger(__name__)

#: Measurement noise samples of :meth:`AmortizedExplainer.explain` (the optimizer's default L).
DEFAULT_MEASURE_SAMPLES = OptimizerConfig().num_samples
#: The logit shifts that ``shift`` calibration tries (added to every logit of an image; negative: a sparser mask).
DEFAULT_CALIBRATION_SHIFTS = (-6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0)
#: The sizes that ``top-k`` calibration tries, as multiples of the predicted mask's mass ``sum(mask)``.
DEFAULT_CALIBRATION_FRACTIONS = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0)
#: How calibration changes a predicted mask: ``shift`` adds a constant to its logits, ``top-k`` keeps its k
#: largest entries at 1 and deletes the rest.
CALIBRATIONS = ("shift", "top-k")


def top_k_masks(mask: Tensor, fractions: Sequence[float]) -> Tensor:
    """``(F, N, D)`` binary masks from ``mask: (N, D)``: for fraction ``r``, image n keeps its
    ``k = round(r * sum(mask[n]))`` largest entries (at least 1, at most D) at 1, the others at 0.

    Ties are broken by position (the earlier entry first), so exactly k entries are kept.
    """
    n, d = mask.shape
    order = torch.sort(mask, dim=1, descending=True, stable=True).indices  # (N, D)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(d, device=mask.device).expand(n, d))
    mass = mask.sum(1)  # (N,)
    masks = []
    for r in fractions:
        k = torch.round(float(r) * mass).clamp(1, d)  # (N,)
        masks.append((rank < k[:, None]).to(mask.dtype))
    return torch.stack(masks)


# ---------------------------------------------------------------------------------------------------------
# The explainers
# ---------------------------------------------------------------------------------------------------------


def _warn_other_weights(classifier: Classifier, meta: dict, path: Path) -> None:
    """Warn when a classifier given as a module has other weights than the checkpoint's recorded digest: the
    network learned to explain that classifier (and, with the ``classifier`` encoder, to read its features), so
    its masks for another one, even a fine-tuned or cast copy, are a start, not its benchmarked quality."""
    recorded = meta.get("classifier_weights_sha256")
    digest = weights_digest(classifier) if recorded else None
    if digest and digest != recorded:
        warnings.warn(
            f"the classifier given has other weights than the one {path.name} was trained for "
            f"({meta.get('classifier')!r}): its masks were learned for that one (encoder "
            f"{meta.get(NETWORK_KEY, {}).get('encoder', 'scratch')!r}); measure them (explain) before trusting them",
            UserWarning,
            stacklevel=3,
        )


class AmortizedExplainer:
    """CartoonX masks in one forward pass of a trained :class:`~amortized_cartoonx.mask_predictor.MaskPredictor`.

    Build it with :meth:`from_checkpoint`. Attributes: ``mask_predictor`` (the network), ``classifier``,
    ``representation``, ``objective`` (the RDE objective the network was trained for), ``meta`` (the
    checkpoint's settings) and the options below.

    Args:
        mask_predictor: the trained network.
        classifier: the classifier it explains (wrapped: frozen, normalisation inside).
        meta: the checkpoint's settings (see :mod:`~amortized_cartoonx.checkpoint`).
        path: the checkpoint file, for messages and ``settings()``.
        measure_samples: noise samples of the final measurement. Default 64, the exact optimizer's L, so
            losses compare directly.
        seed: image ``n`` of a call is seeded ``seed + n`` unless ``seeds`` are given. Default 0.
        strict_size: refuse images of another size than the training size. Default True.
        calibration_samples: 0 (default): the single forward pass. Above 0: calibrate each image's mask: of a
            few candidate masks derived from the prediction, keep the one with the lowest RDE loss on this many
            noise samples (one draw, shared by the candidates; its own seed stream, not the measurement's). It
            costs (number of candidates) x ``calibration_samples`` classifier passes per image; the
            explanation's method is then ``amortized-calibrated``.
        calibration: how the candidates are made (:data:`CALIBRATIONS`). ``shift`` (default): the logits plus
            each of ``calibration_shifts``. ``top-k``: binary masks keeping the k largest predicted entries,
            ``k = r * sum(mask)`` for each r of ``calibration_fractions``.
        calibration_shifts: the shifts tried. Default :data:`DEFAULT_CALIBRATION_SHIFTS`.
        calibration_fractions: the sizes tried. Default :data:`DEFAULT_CALIBRATION_FRACTIONS`.
    """

    def __init__(
        self,
        mask_predictor: MaskPredictor,
        classifier: Classifier,
        meta: dict,
        *,
        path: str | Path | None = None,
        measure_samples: int = DEFAULT_MEASURE_SAMPLES,
        seed: int = 0,
        strict_size: bool = True,
        calibration_samples: int = 0,
        calibration: str = "shift",
        calibration_shifts: Sequence[float] = DEFAULT_CALIBRATION_SHIFTS,
        calibration_fractions: Sequence[float] = DEFAULT_CALIBRATION_FRACTIONS,
    ) -> None:
        for name, value, least in (
            ("measure_samples", measure_samples, 1),
            ("calibration_samples", calibration_samples, 0),
            ("seed", seed, 0),
        ):
            if not is_integer(value) or value < least:
                raise ConfigError(f"{name} must be an integer of at least {least}, got {value!r}")
        if not isinstance(strict_size, bool):
            raise ConfigError(f"strict_size must be True or False, got {strict_size!r}")
        if calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
        shifts = _numbers("calibration_shifts", calibration_shifts)
        if calibration_samples and (not shifts or not all(math.isfinite(b) for b in shifts)):
            raise ConfigError(f"calibration_shifts must be finite numbers, got {calibration_shifts}")
        fractions = _numbers("calibration_fractions", calibration_fractions)
        if calibration_samples and (not fractions or not all(math.isfinite(r) and r > 0 for r in fractions)):
            raise ConfigError(f"calibration_fractions must be positive numbers, got {calibration_fractions}")
        self.calibration_samples = int(calibration_samples)
        self.calibration = calibration
        self.calibration_shifts = shifts
        self.calibration_fractions = fractions
        self.method = "amortized-calibrated" if calibration_samples else "amortized"
        self.mask_predictor = mask_predictor.eval()
        self.classifier = classifier
        self.meta = dict(meta)
        self.path = None if path is None else str(path)
        # the file's content when it was read: a later fit writing best.ckpt again leaves the same path
        self.checkpoint_sha256 = file_sha256(Path(path)) if path is not None and Path(path).is_file() else None
        self.measure_samples = int(measure_samples)
        self.seed = int(seed)
        self.strict_size = bool(strict_size)
        # the J the network has heads for (the training size may have capped the requested levels)
        levels = int(meta.get("levels_used") or meta["levels"])
        self.representation = WaveletRepresentation(meta["wave"], levels, meta["mode"])
        self.objective = RDEObjective(
            classifier,
            self.representation,
            meta["l1_lambda"],
            meta["obfuscation"],
            meta["distortion"],
            meta.get("link", DEFAULT_LINK),
        )

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        classifier: str | Classifier | torch.nn.Module,
        *,
        device: str | torch.device = "cpu",
        normalize: str | None = None,
        backbone: torch.nn.Module | str | None = None,
        **options,
    ) -> AmortizedExplainer:
        """Load a ``cartoonx fit`` checkpoint (``best.ckpt`` / ``last.ckpt``) without Lightning.

        A checkpoint never decides what code runs: the caller names the classifier, and it must be the one the
        checkpoint was trained for (a file spec is matched by content, SHA-256).

        Args:
            path: the checkpoint.
            classifier: the classifier, as a spec (``torchvision:NAME``, a model file, ``package.module:callable``;
                loaded here), a loaded :class:`Classifier` (its spec must match the checkpoint's), or any other
                ``nn.Module`` (wrapped with the checkpoint's input normalisation; the caller vouches for it: a
                module or ``<module>`` Classifier whose weights differ from the recorded ones is warned about).
            device: where to run: ``cpu``, ``cuda[:N]``, ``mps`` or ``auto`` (CUDA when available).
            normalize: the input normalisation for a spec or a bare module (default: the checkpoint's; another one
                is refused, as is a loaded :class:`Classifier` whose normalisation differs from the checkpoint's).
            backbone: with the ``backbone`` encoder, its network (a module or a spec); None loads the recorded
                spec when it is built in (``torchvision:NAME``, ``efficientnet-lite0``), else it must be named.
            options: ``measure_samples``, ``seed``, ``strict_size`` (see the class).
        """
        device = resolve_device(device)
        loaded = read_checkpoint(path)
        meta, path = loaded.meta, loaded.path
        if classifier is None:
            raise ConfigError(
                f"name the classifier that {path.name} explains (it was trained for {meta['classifier']!r}): "
                "a checkpoint never decides what code is loaded"
            )
        trained = meta["normalize"]  # the input normalisation the network was trained behind
        vouched = False  # a module the caller vouches for (a spec is matched against the checkpoint below)
        if isinstance(classifier, str):
            spec = classifier
            if not same_classifier(spec, meta) and not meta.get("classifier_weights_sha256"):
                raise ConfigError(
                    f"checkpoint {path.name} was trained for classifier {meta['classifier']!r}, not {spec!r}"
                )
            classifier = load_classifier(spec, normalize=normalize or trained, device=device)
            if not same_classifier(spec, meta, classifier):  # another spec text: the same weights?
                raise ConfigError(
                    f"checkpoint {path.name} was trained for classifier {meta['classifier']!r}, and {spec!r} "
                    "loads other weights"
                )
        elif isinstance(classifier, Classifier):
            if normalize is not None:
                raise ConfigError(
                    "normalize= is for a classifier spec or a bare nn.Module; a loaded Classifier keeps its own"
                )
            vouched = classifier.spec == "<module>"
            if not vouched and not same_classifier(classifier.spec, meta, classifier):
                raise ConfigError(
                    f"checkpoint {path.name} was trained for classifier {meta['classifier']!r}, not {classifier.spec!r}"
                )
        else:
            if trained == "custom" and normalize is None:
                raise ConfigError(
                    f"checkpoint {path.name} was trained behind a custom input normalisation: pass the model wrapped "
                    "with it, Classifier(model, mean=..., std=...)"
                )
            classifier = wrap_classifier(classifier, normalize or trained)  # the checkpoint's by default
            vouched = True
        used = normalization_name(classifier)
        if used != trained:  # the network's inputs were normalised otherwise in training
            raise ConfigError(
                f"checkpoint {path.name} was trained with input normalisation {trained}, the classifier uses "
                f"{used}: use normalize={trained!r} (--normalize {trained})"
            )
        network = build_mask_predictor(loaded, classifier, backbone)
        if vouched:  # a spec's weights were compared above; a module's are only warned about
            _warn_other_weights(classifier, meta, path)
        return cls(network.to(device), classifier, meta, path=path, **options)

    # ---- settings and checks ----------------------------------------------------------------------------------
    def settings(self) -> dict:
        """The settings that determine the masks (plain values): classifier, image size, DWT, loss."""
        meta = self.meta
        keys = ("classifier", "image_size", "wave", "levels", "mode", "l1_lambda", "distortion", "obfuscation")
        return {
            "method": self.method,
            "checkpoint": self.path,
            "checkpoint_sha256": self.checkpoint_sha256,
            "representation": "wavelet",
            **{k: meta[k] for k in keys},
            "link": self.objective.link,  # keys leave it out at softmax (LATER_DEFAULTS): earlier caches stay valid
            "normalize": meta["normalize"],
            "measure_samples": self.measure_samples,
            "seed": self.seed,
            "calibration_samples": self.calibration_samples,
            **self._calibration_settings(),
        }

    def _calibration_settings(self) -> dict:
        if not self.calibration_samples:
            return {"calibration_shifts": None}  # as before top-k existed: the single pass's settings unchanged
        if self.calibration == "shift":
            return {"calibration_shifts": list(self.calibration_shifts)}
        return {"calibration": self.calibration, "calibration_fractions": list(self.calibration_fractions)}

    def check_compatible(
        self,
        classifier_spec: str | None = None,
        image_size: int | Sequence[int] | None = None,
        wave: str | None = None,
        levels: int | None = None,
        mode: str | None = None,
        *,
        l1_lambda: float | None = None,
        distortion: str | None = None,
        obfuscation: str | None = None,
        channels: int | None = None,
        link: str | None = None,
    ) -> None:
        """Raise :class:`ConfigError` (one line, naming every mismatch) when a setting differs from training
        (``channels``: the colour channels the classifier takes now)."""
        meta = self.meta
        size = int(meta["image_size"])
        problems = []
        # the classifier held was checked by weights when loaded: a spec naming it needs no new look
        held = self.classifier if classifier_spec == getattr(self.classifier, "spec", None) else None
        if classifier_spec is not None and not same_classifier(classifier_spec, meta, held):
            problems.append(f"classifier {classifier_spec!r} (trained for {meta['classifier']!r})")
        if image_size is not None:
            h, w = (int(image_size), int(image_size)) if isinstance(image_size, int) else map(int, image_size)
            if (h, w) != (size, size):
                problems.append(f"image size {h}x{w} (trained on {size}x{size}: use --size {size})")
        if wave is not None and wave != meta["wave"]:
            problems.append(f"wavelet {wave} (trained with {meta['wave']}: use --wavelet {meta['wave']})")
        if levels is not None and levels not in (meta["levels"], meta.get("levels_used")):
            used = self._levels_used(levels, image_size, wave, mode)
            capped = f"--levels {levels} capped for this image size; " if used != levels else ""
            problems.append(f"J={used} levels ({capped}trained with J={meta['levels']}: use --levels {meta['levels']})")
        if mode is not None and mode != meta["mode"]:
            problems.append(f"padding {mode} (trained with {meta['mode']}: use --mode {meta['mode']})")
        if l1_lambda is not None and float(l1_lambda) != float(meta["l1_lambda"]):
            problems.append(f"lambda {l1_lambda} (trained with {meta['l1_lambda']})")
        if distortion is not None and distortion != meta["distortion"]:
            problems.append(f"distortion {distortion} (trained with {meta['distortion']})")
        if obfuscation is not None and obfuscation != meta["obfuscation"]:
            problems.append(f"obfuscation {obfuscation} (trained with {meta['obfuscation']})")
        if link is not None and link != self.objective.link:
            problems.append(
                f"the {link} link (trained with the {self.objective.link} link: --link {self.objective.link}; "
                f"Python: link={self.objective.link!r})"
            )
        if channels is not None and channels != self.channels:
            problems.append(
                f"{channels}-channel images (trained on {self.channels}-channel ones: a classifier on "
                f"{'greyscale' if self.channels == 1 else 'RGB'} images, --channels {self.channels})"
            )
        if problems:
            name = Path(self.path).name if self.path else "the checkpoint"
            raise ConfigError(f"{name} does not fit: " + "; ".join(problems))

    def _levels_used(
        self, levels: int, image_size: int | Sequence[int] | None, wave: str | None, mode: str | None
    ) -> int:
        """The J that ``levels`` gives at ``image_size`` (default: the training size), for messages."""
        size = self.meta["image_size"] if image_size is None else image_size
        h, w = (int(size), int(size)) if isinstance(size, int) else map(int, size)
        try:
            cap = max_levels(h, w, wave or self.meta["wave"], mode or self.meta["mode"])
        except ValueError:  # an unknown wavelet (reported on its own)
            return levels
        return min(levels, cap) if cap >= 1 else levels

    def split(self, ids: Sequence[str]) -> dict[str, list[str]]:
        """The training run's train / val / test split of ``ids`` (``test``: never trained on nor selected by).

        Raises :class:`ConfigError` when the checkpoint does not record its split.
        """
        data = self.meta.get("data")
        if not data:
            raise ConfigError("the checkpoint does not record its data split")
        return split_train_val_test(ids, data["val_fraction"], data["test_fraction"], data["split_seed"])

    @property
    def channels(self) -> int:
        """The colour channels of the images it explains: 3 (RGB) or 1 (trained for a greyscale classifier)."""
        return self.mask_predictor.config.in_channels

    def _check_inputs(self, images: Tensor) -> None:
        check_images(images)
        self.mask_predictor.check_channels(images)  # before the classifier runs on them
        if self.strict_size:
            self.check_compatible(image_size=tuple(images.shape[-2:]))

    def _check_logits(self, logits: Tensor) -> None:
        expected = self.mask_predictor.config.num_classes
        if logits.shape[-1] != expected:
            raise ClassifierError(
                f"the classifier has {logits.shape[-1]} classes; the explainer was trained for {expected}"
            )

    # ---- explaining ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_mask(self, images: Tensor, target: Tensor | Sequence[int] | int | None = None) -> Coefficients:
        """The predicted mask, bands ``(N, 1, ...)`` in [0, 1], for ``images: (N, C, H, W)`` in [0, 1].

        ``target``: None explains the classifier's predicted class; else one class for all or one per image.
        """
        self._check_inputs(images)
        warn_outside_unit_range(images)
        with frozen(self.classifier):
            if target is None:
                logits = original_logits(self.classifier, images, self.objective.link)
                self._check_logits(logits)
                target = logits.argmax(1)
            else:
                target = resolve_target(
                    target, images.new_zeros(images.shape[0], self.mask_predictor.config.num_classes)
                )
            return self.mask_predictor.mask(as_input_of(self.mask_predictor, images), target.to(images.device))

    @torch.no_grad()
    def predict_logits(
        self, images: Tensor, target: Tensor | Sequence[int] | int | None = None
    ) -> tuple[RDEProblem, Coefficients]:
        """The RDE problem of ``images: (N, C, H, W)`` and the network's mask logits, bands ``(N, 1, ...)``
        (never calibrated)."""
        self._check_inputs(images)
        with frozen(self.classifier):
            with self.mask_predictor.tapping(self.classifier) as taps:  # the classifier encoder: one pass, not two
                problem = self.objective.prepare(images, target)
            self._check_logits(problem.logits)
            logits = self.mask_predictor(as_input_of(self.mask_predictor, images), problem.target, taps=taps())
        return problem, logits

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        target: Tensor | Sequence[int] | int | None = None,
        *,
        seeds: Sequence[int] | None = None,
    ) -> tuple[RDEProblem, Coefficients]:
        """The RDE problem of ``images: (N, C, H, W)`` and the mask, bands ``(N, 1, ...)`` in [0, 1]: the single
        pass's, or the calibrated one when calibrating (``seeds``, default ``seed + n``, drive its noise)."""
        problem, logits = self.predict_logits(images, target)
        if not self.calibration_samples:
            return problem, self.mask_predictor.mask_from_logits(logits)
        seeds = image_seeds(images.shape[0], self.seed, seeds)
        with frozen(self.classifier):
            return problem, self.calibrate(problem, logits, seeds)

    def calibration_candidates(self, logits: Coefficients) -> list[Coefficients]:
        """The candidate masks calibration chooses from (see ``calibration``)."""
        net = self.mask_predictor
        if self.calibration == "shift":
            return [net.mask_from_logits(logits.map(lambda z, b=b: z + b)) for b in self.calibration_shifts]
        mask = net.mask_from_logits(logits)
        return [mask.unflatten(m) for m in top_k_masks(mask.flatten(), self.calibration_fractions)]

    def calibrate(self, problem: RDEProblem, logits: Coefficients, seeds: Sequence[int]) -> Coefficients:
        """Per image, the candidate mask (:meth:`calibration_candidates`) with the lowest RDE loss on
        ``calibration_samples`` noise samples (the same draw for every candidate)."""
        generators = make_generators(stream_seeds(seeds, Stream.CALIBRATE), problem.images.device)
        noise = self.objective.sample_noise(problem, self.calibration_samples, generators)
        candidates = self.calibration_candidates(logits)
        losses = torch.stack([self.objective.loss(problem, m, noise).total for m in candidates])  # (F, N)
        best = losses.argmin(0)  # (N,)
        flat = torch.stack([m.flatten() for m in candidates])  # (F, N, D)
        chosen = flat[best, torch.arange(flat.shape[1], device=best.device)]  # (N, D)
        return candidates[0].unflatten(chosen)

    def explain(
        self,
        images: Tensor,
        target: Tensor | Sequence[int] | int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        progress: bool = False,
    ) -> Explanation:
        """Explain ``images: (N, C, H, W)`` in one forward pass (plus the calibration, when on); measured like
        the exact optimizer.

        ``seeds`` (default ``seed + n``) drive only the final measurement's noise, the same stream the exact
        optimizer measures with, so ``loss`` compares directly. ``progress`` is accepted for the common
        signature (there are no steps to show).
        """
        start = time.perf_counter()
        check_images(images)
        seeds = image_seeds(images.shape[0], self.seed, seeds)
        problem, mask = self.predict(images, target, seeds=seeds)
        with frozen(self.classifier), torch.no_grad():
            measured = measure_mask(self.objective, problem, mask, seeds, self.measure_samples)
        synchronize(images.device)
        return Explanation(
            method=self.method,
            mask=mask,
            image=measured.pop("image"),
            target=problem.target,
            steps=torch.zeros(images.shape[0], dtype=torch.long, device=images.device),
            seconds=time.perf_counter() - start,
            history=None,
            settings=self.settings(),
            seeds=list(seeds),
            **measured,
        )


def _numbers(name: str, values: object) -> tuple[float, ...]:
    """``values`` (a sequence of real numbers) as floats; a :class:`ConfigError` naming ``name`` otherwise."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{name} must be a sequence of numbers, got {values!r}")
    values = list(values)
    if not all(map(is_real, values)):
        raise ConfigError(f"{name} must be a sequence of numbers, got {values!r}")
    return tuple(float(v) for v in values)


def refine_config(config: OptimizerConfig) -> OptimizerConfig:
    """``config`` (an exact optimizer's) with the ``refine`` schedule's steps, lr, decay and parametrisation:
    the warm start's settings, keeping the noise samples, loss, seed and measurement."""
    return dataclasses.replace(config, schedule="refine", lr_final=0.0, **dict.fromkeys(SCHEDULE_FIELDS))


class WarmStartExplainer:
    """Exact CartoonX started from the amortized explainer's mask: ``refine_steps`` optimizer steps.

    The refinement starts from the predicted mask (calibrated when the amortized explainer calibrates); with
    ``config.parametrisation == "logit"`` it optimises the mask's logits instead of the projected mask.

    Args:
        amortized: the single-pass explainer (its classifier, DWT and loss are used).
        refine_steps: K, the optimizer steps after the prediction; None: the config's ``steps``. 0 returns the
            predicted mask unchanged.
        config: the optimizer's settings. Its ``l1_lambda`` (when set), ``distortion``, ``obfuscation`` and
            ``link`` must be the checkpoint's; its ``seed`` seeds the calibration too when ``explain`` gets no
            seeds. Default: the ``refine`` schedule (:data:`~amortized_cartoonx.optimizer.SCHEDULES`, chosen by
            ``scripts/bench_amortized.py``) with the amortized explainer's ``seed`` and ``measure_samples``, so that
            0 steps measure as the single pass does. A config that is given is used as it is (``OptimizerConfig()``
            is the paper's 2000 steps at lr 1e-3): :func:`refine_config` turns an exact optimizer's config into
            the ``refine`` schedule.
    """

    method = "warm"

    def __init__(
        self, amortized: AmortizedExplainer, refine_steps: int | None = None, config: OptimizerConfig | None = None
    ) -> None:
        meta = amortized.meta
        if config is None:  # measured as the single pass is (its seed and noise samples)
            config = OptimizerConfig(
                schedule="refine",
                distortion=meta["distortion"],
                obfuscation=meta["obfuscation"],
                link=amortized.objective.link,
                seed=amortized.seed,
                measure_samples=amortized.measure_samples,
            )
        refine_steps = config.steps if refine_steps is None else refine_steps
        if not is_integer(refine_steps) or refine_steps < 0:
            raise ConfigError(f"refine_steps must be an integer of at least 0, got {refine_steps!r}")
        amortized.check_compatible(
            l1_lambda=config.l1_lambda, distortion=config.distortion, obfuscation=config.obfuscation, link=config.link
        )
        config = dataclasses.replace(config, l1_lambda=float(amortized.meta["l1_lambda"]), steps=refine_steps)
        self.amortized = amortized
        self.refine_steps = refine_steps
        self.optimizer = RDEOptimizer(amortized.classifier, amortized.representation, config, method="cartoonx")
        self.representation = amortized.representation
        self.classifier = amortized.classifier

    def settings(self) -> dict:
        """The refinement's optimizer settings, the checkpoint and how the start was made (calibration)."""
        return {
            **self.optimizer.settings(),
            "method": self.method,
            "checkpoint": self.amortized.path,
            "checkpoint_sha256": self.amortized.checkpoint_sha256,
            "refine_steps": self.refine_steps,
            "image_size": self.amortized.meta["image_size"],
            "classifier": self.amortized.meta["classifier"],
            "normalize": self.amortized.meta["normalize"],
            "calibration_samples": self.amortized.calibration_samples,
            **self.amortized._calibration_settings(),
        }

    def explain(
        self,
        images: Tensor,
        target: Tensor | Sequence[int] | int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        progress: bool = False,
    ) -> Explanation:
        """The predicted mask refined by ``refine_steps`` exact steps (same seeds, same measurement)."""
        start = time.perf_counter()
        check_images(images)
        seeds = image_seeds(images.shape[0], self.optimizer.config.seed, seeds)  # one set for calibration and steps
        problem, init = self.amortized.predict(images, target, seeds=seeds)
        target = problem.target  # the class the prediction explains
        explanation = self.optimizer.explain(
            images, target, init_mask=init, seeds=seeds, steps=self.refine_steps, progress=progress
        )
        synchronize(images.device)
        return dataclasses.replace(
            explanation, method=self.method, seconds=time.perf_counter() - start, settings=self.settings()
        )
