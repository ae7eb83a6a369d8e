"""The settings of an evaluation run (the explainers' own settings live in :class:`~.attribution.MethodContext`),
and of its sanity checks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import ConfigError, is_integer
from ..ground_truth import DEFAULT_OUTLINE_RADIUS
from ..methods import DEFAULT_METHODS
from ..rde import DISTORTIONS, OBFUSCATIONS
from .curves import DEFAULT_RATES, rate_grid
from .lambdas import DEFAULT_LAMBDAS, LAMBDA_METHODS


@dataclass
class SanityConfig:
    """Settings of the sanity checks by model randomisation (:mod:`.sanity`).

    Attributes:
        enabled: run them (``cartoonx evaluate --sanity``). Default False.
        depths: the cascade depths, numbers of top layers randomised (each at least 1); all layers are always
            added as the last depth. None: :func:`~.sanity.cascade_depths`' default (the top layer, a quarter, half and
            three quarters of the layers).
        limit: check only the first ``limit`` images of the run; None: all of them.
    """

    enabled: bool = False
    depths: tuple[int, ...] | None = None
    limit: int | None = None

    def validate(self) -> SanityConfig:
        if self.depths is not None and (not self.depths or any(d < 1 for d in self.depths)):
            raise ConfigError(f"sanity depths must be at least 1 layer each, got {list(self.depths)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"the sanity checks' image limit must be positive, got {self.limit}")
        return self


@dataclass
class EvaluationConfig:
    """Settings of an evaluation run.

    Attributes:
        methods: the methods to compare (names of :data:`~.methods.METHODS`).
        limit: evaluate only the first ``limit`` images of the folder (sorted by name); None: all.
        batch_size: images explained and measured together.
        rates: the rate grid on [0, 1]: a tuple of rates rising strictly from 0 to 1, or a number K of evenly
            spaced points. Default :data:`~.curves.DEFAULT_RATES` (21 rates, dense below 0.1).
        noise_draws: noise draws per rate (averaged). Default 8.
        early_rate: the "early" areas integrate over [0, early_rate]. Default 0.2.
        seed: the global seed; image seeds are derived from it and the file names.
        target: the class every method explains. None (default): the class the classifier predicts for the image
            (with the sigmoid link, the label of the largest logit); an int: that class for every image; a dict:
            image file name -> class, with an entry for every image of the run (entries for other files are
            ignored), e.g. the true labels or, for a multi-label classifier, the label to explain in each image.
        distortion: the evaluation's distortion. None (default): ``l2`` (Fig. 7's ``||p(x) - p(y)||_2``) for a
            softmax classifier, ``label-l2`` (``|p_c(x) - p_c(y)|``, the explained label's) for the sigmoid link
            (:meth:`for_link`; ``l2`` over all labels would mostly measure the labels not explained).
        obfuscation: the evaluation's noise. Default ``gaussian-adaptive`` (Fig. 7's).
        lambdas: panel (c) grid per method (``cartoonx``, ``pixel-rde``); empty to skip the panel.
        lambda_steps: optimizer steps of panel (c); None: the main optimizer's.
        lambda_limit: images of panel (c) (the first ones); None: all.
        outline_radius: half-width in pixels of the decisive object's outline band (ground truth). Default 4.
        examples: images shown in the example grid.
        max_batch: classifier inputs per forward pass when measuring curves.
        cache: keep per-image results in ``DIR/cache`` and reuse them.
        progress: show progress bars.
        sanity: the sanity checks by model randomisation (:mod:`.sanity`); off by default.
        shard: ``(k, n)``: only the images at positions k, k + n, k + 2n, ... of the run (after ``limit``) are
            explained and measured, into the cache, by :meth:`~.runner.Evaluation.run_shard`: n processes (say
            one per GPU) share the work and the folder, and a run without ``shard`` then writes the report from
            the cache. None (default): the whole run.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    limit: int | None = None
    batch_size: int = 4
    rates: int | tuple[float, ...] = DEFAULT_RATES
    noise_draws: int = 8
    early_rate: float = 0.2
    seed: int = 0
    target: int | dict[str, int] | None = None
    distortion: str | None = None
    obfuscation: str = "gaussian-adaptive"
    lambdas: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_LAMBDAS))
    lambda_steps: int | None = None
    lambda_limit: int | None = None
    outline_radius: int = DEFAULT_OUTLINE_RADIUS
    examples: int = 4
    max_batch: int = 128
    cache: bool = True
    progress: bool = True
    sanity: SanityConfig = field(default_factory=SanityConfig)
    shard: tuple[int, int] | None = None

    def for_link(self, link: str) -> EvaluationConfig:
        """This config with its distortion resolved for the classifier's ``link`` (see ``distortion``)."""
        if self.distortion is not None:
            return self
        return replace(self, distortion="l2" if link == "softmax" else "label-l2")

    def validate(self) -> EvaluationConfig:
        if not self.methods:
            raise ConfigError("no methods to evaluate")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"a method is listed twice: {', '.join(self.methods)}")
        for name in ("batch_size", "noise_draws", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        rate_grid(self.rates)  # raises ConfigError for a bad grid
        for name in ("limit", "lambda_limit", "lambda_steps"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "lambda_steps" else 1):
                raise ConfigError(f"{name} must be positive, got {value}")
        if not 0 < self.early_rate <= 1:
            raise ConfigError(f"early_rate must be in (0, 1], got {self.early_rate}")
        if self.outline_radius < 1:
            raise ConfigError(f"outline_radius must be at least 1 pixel, got {self.outline_radius}")
        if self.examples < 0:
            raise ConfigError(f"examples must be at least 0, got {self.examples}")
        self.sanity.validate()
        check_target(self.target)
        if self.shard is not None:
            if len(self.shard) != 2 or not all(is_integer(v) for v in self.shard):
                raise ConfigError(f"shard is (k, n), two integers, got {self.shard!r}")
            k, n = self.shard
            if not 0 <= k < n:
                raise ConfigError(f"shard {k}/{n}: k must be 0 to n - 1 (shards count from 0)")
            if not self.cache:
                raise ConfigError(
                    "a shard's results go to the cache, where the report's run reads them: keep the cache on"
                )
        if self.distortion is not None:
            DISTORTIONS.get(self.distortion)
            if self.distortion == "maximize-target":
                raise ConfigError(
                    "the curves' distortion must be 0 when nothing is randomised, which 'maximize-target' "
                    "((1 - p_c(y))^2) is not; measure with l2, label-l2, kl or label"
                )
        OBFUSCATIONS.get(self.obfuscation)
        for method, grid in self.lambdas.items():
            if method not in LAMBDA_METHODS:
                raise ConfigError(f"panel (c) is for {' and '.join(LAMBDA_METHODS)}, not {method!r}")
            if any(v < 0 for v in grid):
                raise ConfigError(f"lambdas must be at least 0, got {list(grid)} for {method}")
        return self


def check_target(target: object) -> None:
    """Raise a :class:`ConfigError` unless ``target`` is None, a class index or a dict of file names to class
    indices (:attr:`EvaluationConfig.target`)."""
    if target is None:
        return
    if isinstance(target, dict):
        bad = [(k, v) for k, v in target.items() if not isinstance(k, str) or not is_integer(v) or v < 0]
        if bad:
            key, value = bad[0]
            raise ConfigError(f"target maps image file names to class indices (>= 0), got {key!r}: {value!r}")
        return
    if not is_integer(target) or target < 0:
        raise ConfigError(f"target is a class index (>= 0), a dict of file names to classes, or None; got {target!r}")
