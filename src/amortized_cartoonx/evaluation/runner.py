"""The evaluation run: explain, measure the curves, sweep lambda, score against ground truth, report.

:class:`Evaluation` runs the phases in order, each a function of the :class:`~.context.RunContext`; the cached
ones go through :func:`~.cache.cached_map` (load what ``DIR/cache`` holds, compute the rest in batches with a
progress bar, save each batch), so an interrupted run resumes and a new method reuses the others' results.

1. **explain** (:func:`.explanations.explain_images`): every method explains every image, explaining the class
   the classifier predicts.
2. **curves** (:func:`.curves.measure_curves`): curves (a) keep and (b) randomise of every method and image.
3. **lambda** (:func:`.lambdas.lambda_panel`): panel (c) for CartoonX and Pixel RDE over the lambda grid; optional.
4. **ground truth** (:func:`.localisation.localise`): with ``ground_truth.safetensors`` in the images folder, the
   share of each method's pixel relevance on the decisive object vs the distractors and on its outline, the
   pointing game, and the same on the explanation's detail part (wavelet-aware, :mod:`.details`).
5. **examples** (:func:`.maps.example_pictures`): the pictures of the first images.
6. **sanity** (:func:`.sanity.sanity_checks`, with ``config.sanity.enabled``): the first images explained again
   under the classifier with its weights randomised in cascade from the top layer, compared with the trained
   classifier's explanations.

:func:`.report.write_report` then writes ``curves.csv``, ``summary.json``, ``rate_distortion.png``,
``examples.png`` and ``report.md``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..classifiers import frozen
from ..errors import ConfigError
from ..io import remove_stale_temporaries
from .attribution import MethodContext
from .cache import ResultCache
from .config import EvaluationConfig
from .context import ImageSet, RunContext, cache_identity, check_targets
from .curves import curve_key, measure_curves, rate_grid
from .explanations import ExplainedImage, explain_images, explanation_key
from .lambdas import LambdaPanel, lambda_panel
from .localisation import localise
from .maps import example_pictures
from .methods import build_methods
from .results import EvaluationResults, MethodResults
from .sanity import cascade_depths, sanity_checks, sanity_problem, weight_layers

logger = logging.getLogger(__name__)

__all__ = ["Evaluation", "EvaluationConfig", "EvaluationResults"]


class Evaluation:
    """One evaluation run over an images folder.

    Args:
        classifier: the frozen classifier (on ``device``).
        images_dir: the folder of images (and optionally ``ground_truth.safetensors``).
        out_dir: where the outputs and the cache go.
        config: the run's settings.
        context: the explainers' settings (optimizer, DWT, baselines, checkpoint).
        device: where to compute.
        class_names: optional class names (line i = class i) for the example grid.
        command: the command line, for the report.
    """

    def __init__(
        self,
        classifier,
        images_dir: str | Path,
        out_dir: str | Path,
        config: EvaluationConfig,
        context: MethodContext,
        device: torch.device | str = "cpu",
        class_names: list[str] | None = None,
        command: str | None = None,
    ) -> None:
        self.classifier = classifier
        self.images_dir = Path(images_dir)
        self.out_dir = Path(out_dir)
        self.config = config.for_link(context.optimizer.link).validate()
        self.context = context
        self.device = torch.device(device)
        self.class_names = class_names
        self.command = command
        self.cache = ResultCache(self.out_dir / "cache" if config.cache else None)
        if self.config.sanity.enabled:  # checked before any work: the classifier, then the depths
            problem = sanity_problem(classifier)
            if problem:
                raise ConfigError(problem)
            cascade_depths(len(weight_layers(classifier)), self.config.sanity.depths)
        #: phase -> method -> images computed by the last :meth:`run` (the rest came from the cache)
        self.computed: dict[str, dict[str, int]] = {"explanations": {}, "curves": {}, "lambda": {}}

    def _prepare(self) -> tuple[RunContext, dict, dict[str, str]]:
        """The run's context, its methods and the ones skipped (with why); the output folder made."""
        images = ImageSet.from_folder(
            self.images_dir, self.context.image_size, self.device, self.config.limit, self.context.channels
        )
        check_targets(self.config.target, images.ids)
        methods, skipped = build_methods(self.config.methods, self.context)
        for name, reason in skipped.items():
            logger.warning("skipping %s: %s", name, reason)
        if not methods:
            raise ConfigError("none of the chosen methods can run on this classifier: " + "; ".join(skipped.values()))
        for method in methods.values():
            method.progress = self.config.progress
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.cache.root is not None and remove_stale_temporaries(self.cache.root, recursive=True):
            logger.info("removed unfinished cache files of a killed run in %s", self.cache.root)
        link = self.context.optimizer.link
        identity = cache_identity(self.context.classifier_spec, self.classifier, self.context.channels, link)
        cache = self.cache.with_contents(images.contents()) if self.cache.root is not None else self.cache
        return RunContext(self.classifier, images, self.config, cache, identity, link), methods, skipped

    def _measure(self, run: RunContext, methods: dict) -> tuple[dict, dict, LambdaPanel]:
        """The cached phases: every method's explanations and curves, then panel (c) (of the shard's images only
        under ``config.shard``). Returns (explained, curves, panel)."""
        explained: dict[str, dict[str, ExplainedImage]] = {}
        curves: dict[str, dict[str, dict]] = {}
        for name, method in methods.items():
            key = explanation_key(run, method)
            found = explain_images(run, method, key)
            explained[name] = found.records
            self.computed["explanations"][name] = found.computed
            measured = measure_curves(run, method, explained[name], curve_key(run, key))
            curves[name] = measured.records
            self.computed["curves"][name] = measured.computed
        panel = lambda_panel(run, methods, explained, self.context)
        self.computed["lambda"] = panel.computed
        return explained, curves, panel

    def run_shard(self) -> dict[str, dict[str, int]]:
        """Explain and measure this shard's images (``config.shard``) into the cache, and stop: the explanations,
        curves and panel (c), the costly phases. A run without ``shard`` on the same folder and settings then
        computes only what no shard did (ground truth, examples, the sanity checks, whose images are the first
        ones) and writes the report. Returns :attr:`computed` (phase -> method -> images computed here).

        Raises:
            ConfigError: ``config.shard`` is not set, or the cache is off.
        """
        if self.config.shard is None:
            raise ConfigError("run_shard needs config.shard (k, n); run() evaluates the whole folder")
        run, methods, _ = self._prepare()
        if self.config.sanity.enabled:
            logger.info("the sanity checks run in the report's run (without --shard), not in a shard")
        with frozen(self.classifier):
            self._measure(run, methods)
        return self.computed

    def run(self) -> EvaluationResults:
        """Run every phase (reusing the cache) and return the results; :func:`.report.write_report` writes them."""
        if self.config.shard is not None:
            raise ConfigError(f"config.shard {self.config.shard} is set: run_shard() computes a shard's share")
        run, methods, skipped = self._prepare()

        with frozen(self.classifier):
            explained, curves, panel = self._measure(run, methods)
            ground_truth = localise(run, methods, explained, self.context.wavelet())
            examples = example_pictures(run, methods, explained)
            sanity = None
            if self.config.sanity.enabled:
                sanity = sanity_checks(run, methods, explained, self.context)
                self.computed["sanity"] = sanity.computed

        ids = run.ids
        results = {}
        for name, method in methods.items():
            records = [explained[name][i] for i in ids]
            scalar_names = sorted({k for r in records for k in r.scalars})
            results[name] = MethodResults(
                name=name,
                representation=method.representation.name,
                kind=method.kind,
                keep=np.array([curves[name][i]["keep"] for i in ids]),
                randomise=np.array([curves[name][i]["randomise"] for i in ids]),
                seconds=np.array([r.seconds for r in records]),
                targets=np.array([r.target for r in records]),
                ground_truth=ground_truth.metrics.get(name, {}),
                scalars={k: np.array([r.scalars.get(k, np.nan) for r in records]) for k in scalar_names},
            )
        return EvaluationResults(
            ids=ids,
            rates=rate_grid(self.config.rates),
            methods=results,
            skipped=skipped,
            lambda_points=panel.points,
            examples=examples.pictures,
            example_images=examples.images,
            example_targets=examples.targets,
            settings=self.settings(run),
            computed=self.computed,
            has_ground_truth=bool(ground_truth.metrics),
            ground_truth_chance=ground_truth.chance,
            ground_truth_examples=(ground_truth.example_regions, ground_truth.example_detail),
            sanity=sanity,
        )

    def settings(self, run: RunContext) -> dict:
        """The settings of ``run`` as plain values (for summary.json and report.md)."""
        ctx = self.context
        return {
            "images_dir": str(self.images_dir),
            "classifier": ctx.classifier_spec,
            "image_size": ctx.image_size,
            "channels": ctx.channels,
            "device": str(self.device),
            "evaluation": {
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
                "target": run.target_identity(run_images_only=True),
            },
            "optimizer": asdict(ctx.optimizer),
            "dwt": {"wave": ctx.wave, "levels": ctx.levels, "mode": ctx.mode},
            "baselines": asdict(ctx.baselines),
            "checkpoint": ctx.checkpoint,
            "refine_steps": ctx.warm_steps(),
            "command": self.command,
        }
