"""The evaluation run: explain, measure the curves, sweep lambda, score against ground truth, report.

Phases, each resumable from the cache (``DIR/cache``, see :mod:`.cache`) and each with a progress bar:

1. **explain**: every method explains every image (batched), explaining the class the classifier predicts;
   the relevance of each image is cached.
2. **curves**: curves (a) keep and (b) randomise (:mod:`.curves`) of every method and image, on the image's
   own seeded noise draws (the same for every method of a representation).
3. **lambda**: panel (c) for CartoonX and Pixel RDE over the lambda grid (:mod:`.lambdas`); optional.
4. **ground truth**: when the images folder holds ``ground_truth.safetensors``, the share of each method's
   pixel relevance on the decisive object vs the distractors and the pointing game (:mod:`.localisation`).
5. **report**: ``curves.csv``, ``summary.json``, ``rate_distortion.png``, ``examples.png``, ``report.md``.

Every image's randomness derives from its own seed, a hash of the global seed and the image's file name
(:func:`image_seed`), so results do not depend on the batch, the order or ``--limit``, and the cache is per image.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..classifiers import frozen, is_file_spec
from ..errors import ConfigError, InputError
from ..images import list_images, load_images
from ..io import file_sha256
from ..methods import DEFAULT_METHODS
from ..rde import DISTORTIONS, OBFUSCATIONS, RDEObjective, make_generators
from ..seeding import Stream, item_seed, stream_seeds
from .cache import ResultCache, as_scalar_tensors, settings_hash
from .curves import CURVES, area, rate_distortion_curves, rate_grid
from .lambdas import DEFAULT_LAMBDAS, LAMBDA_METHODS, lambda_optimizer, lambda_points
from .maps import display_image, pixel_relevance
from .methods import EvaluationMethod, MethodContext, build_methods

logger = logging.getLogger(__name__)

#: Seed streams of the evaluation (the core uses 0 and 1, the baselines 20 and 21).


@dataclass
class EvaluationConfig:
    """Settings of an evaluation run (the explainers' own settings live in :class:`MethodContext`).

    Attributes:
        methods: the methods to compare (names of :data:`~.methods.METHODS`).
        limit: evaluate only the first ``limit`` images of the folder (sorted by name); None: all.
        batch_size: images explained and measured together.
        rates: points of the rate grid on [0, 1]. Default 21 (steps of 0.05).
        noise_draws: noise draws per rate (averaged). Default 8.
        early_rate: the "early" areas integrate over [0, early_rate]. Default 0.2.
        seed: the global seed; image seeds are derived from it and the file names.
        distortion: the evaluation's distortion. Default ``l2`` (Fig. 7's ``||p(x) - p(y)||_2``).
        obfuscation: the evaluation's noise. Default ``gaussian-adaptive`` (Fig. 7's).
        lambdas: panel (c) grid per method (``cartoonx``, ``pixel-rde``); empty to skip the panel.
        lambda_steps: optimizer steps of panel (c); None: the main optimizer's.
        lambda_limit: images of panel (c) (the first ones); None: all.
        examples: images shown in the example grid.
        max_batch: classifier inputs per forward pass when measuring curves.
        cache: keep per-image results in ``DIR/cache`` and reuse them.
        progress: show progress bars.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    limit: int | None = None
    batch_size: int = 4
    rates: int = 21
    noise_draws: int = 8
    early_rate: float = 0.2
    seed: int = 0
    distortion: str = "l2"
    obfuscation: str = "gaussian-adaptive"
    lambdas: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_LAMBDAS))
    lambda_steps: int | None = None
    lambda_limit: int | None = None
    examples: int = 4
    max_batch: int = 128
    cache: bool = True
    progress: bool = True

    def validate(self) -> EvaluationConfig:
        if not self.methods:
            raise ConfigError("no methods to evaluate")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"a method is listed twice: {', '.join(self.methods)}")
        for name in ("batch_size", "noise_draws", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.rates < 2:
            raise ConfigError(f"rates must be at least 2 (0 and 1), got {self.rates}")
        for name in ("limit", "lambda_limit", "lambda_steps"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "lambda_steps" else 1):
                raise ConfigError(f"{name} must be positive, got {value}")
        if not 0 < self.early_rate <= 1:
            raise ConfigError(f"early_rate must be in (0, 1], got {self.early_rate}")
        if self.examples < 0:
            raise ConfigError(f"examples must be at least 0, got {self.examples}")
        DISTORTIONS.get(self.distortion)
        OBFUSCATIONS.get(self.obfuscation)
        for method, grid in self.lambdas.items():
            if method not in LAMBDA_METHODS:
                raise ConfigError(f"panel (c) is for {' and '.join(LAMBDA_METHODS)}, not {method!r}")
            if any(v < 0 for v in grid):
                raise ConfigError(f"lambdas must be at least 0, got {list(grid)} for {method}")
        return self


def mean_se(values: Sequence[float]) -> dict[str, float | int]:
    """``{"mean", "se", "n"}``: the mean and its standard error (sample std / sqrt(n); 0 for one value)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "se": se, "n": int(arr.size)}


@dataclass
class MethodResults:
    """One method's per-image results (images in the run's order).

    Attributes:
        keep, randomise: ``(n, R)`` curves (a) and (b).
        seconds: ``(n,)`` seconds per explanation.
        targets: ``(n,)`` explained classes.
        ground_truth: metric name -> ``(n,)`` (empty without ground truth).
        scalars: extra per-image values of mask methods (mask_mean, ...).
    """

    name: str
    representation: str
    kind: str
    keep: np.ndarray
    randomise: np.ndarray
    seconds: np.ndarray
    targets: np.ndarray
    ground_truth: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, np.ndarray] = field(default_factory=dict)

    def areas(self, rates: Sequence[float], early_rate: float) -> dict[str, np.ndarray]:
        """Per image: ``area_keep``, ``area_randomise`` over [0, 1] and ``*_early`` over [0, early_rate]."""
        out = {}
        for curve in CURVES:
            values = getattr(self, curve)
            out[f"area_{curve}"] = np.array([area(rates, v) for v in values])
            out[f"area_{curve}_early"] = np.array([area(rates, v, upto=early_rate) for v in values])
        return out


@dataclass
class EvaluationResults:
    """Everything the report needs."""

    ids: list[str]
    rates: list[float]
    methods: dict[str, MethodResults]
    skipped: dict[str, str]
    lambda_points: dict[str, list[dict]]
    examples: dict[str, Tensor]
    example_images: Tensor | None
    example_targets: dict[str, list[int]]
    settings: dict
    computed: dict[str, dict[str, int]]
    has_ground_truth: bool


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
        self.config = config.validate()
        self.context = context
        self.device = torch.device(device)
        self.class_names = class_names
        self.command = command
        self.cache = ResultCache(self.out_dir / "cache" if config.cache else None)
        self.computed: dict[str, dict[str, int]] = {"explanations": {}, "curves": {}, "lambda": {}}

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        files = list_images(self.images_dir)  # InputError when missing or empty
        return files[: self.config.limit] if self.config.limit else files

    def _classifier_identity(self) -> dict:
        spec = self.context.classifier_spec
        identity = {"classifier": spec}
        path = Path(spec).expanduser()
        if is_file_spec(spec) and path.is_file():
            identity["classifier_sha256"] = file_sha256(path)
        normalization = getattr(self.classifier, "normalization", None)
        identity["normalization"] = list(normalization) if normalization else None
        return identity

    def _explanation_key(self, method: EvaluationMethod) -> str:
        return settings_hash(
            {
                "kind": "explanation",
                **method.settings(),
                **self._classifier_identity(),
                "image_size": self.context.image_size,
                "seed": self.config.seed,
                "target": "predicted",
                "device": self.device.type,
            }
        )

    def _curve_key(self, explanation_key: str) -> str:
        cfg = self.config
        return settings_hash(
            {
                "kind": "curves",
                "explanation": explanation_key,
                "rates": cfg.rates,
                "noise_draws": cfg.noise_draws,
                "distortion": cfg.distortion,
                "obfuscation": cfg.obfuscation,
                "seed": cfg.seed,
                "device": self.device.type,
            }
        )

    def _batches(self, indices: Sequence[int]) -> list[list[int]]:
        size = self.config.batch_size
        return [list(indices[lo : lo + size]) for lo in range(0, len(indices), size)]

    def _load(self, files: Sequence[Path], indices: Sequence[int]) -> Tensor:
        return load_images([files[i] for i in indices], self.context.image_size).to(self.device)

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="img", disable=not self.config.progress, leave=False)

    # ---- phase 1: explanations ----------------------------------------------------------------------------
    def _explain(self, method: EvaluationMethod, key: str, files: list[Path], ids: list[str]) -> dict[str, dict]:
        records: dict[str, dict] = {}
        for image_id in ids:
            hit = self.cache.load_tensors("explanations", method.name, key, image_id)
            if hit is not None:
                records[image_id] = self._record(*hit)
        missing = [i for i, image_id in enumerate(ids) if image_id not in records]
        self.computed["explanations"][method.name] = len(missing)
        bar = self._bar(len(missing), f"explain {method.name}")
        for batch in self._batches(missing):
            images = self._load(files, batch)
            seeds = [item_seed(ids[i], self.config.seed) for i in batch]
            att = method.attribute(images, None, seeds=seeds)
            for j, i in enumerate(batch):
                tensors = {
                    "relevance": att.relevance[j].float(),
                    "target": att.target[j].long(),
                    **as_scalar_tensors({f"scalar.{k}": float(v[j]) for k, v in att.scalars.items()}),
                }
                meta = {"method": method.name, "image": ids[i], "seconds": att.seconds / len(batch)}
                self.cache.save_tensors("explanations", method.name, key, ids[i], tensors, meta)
                records[ids[i]] = self._record({k: v.cpu() for k, v in tensors.items()}, meta)
            bar.update(len(batch))
        bar.close()
        return records

    @staticmethod
    def _record(tensors: dict[str, Tensor], meta: dict) -> dict:
        return {
            "relevance": tensors["relevance"],
            "target": int(tensors["target"]),
            "seconds": float(meta["seconds"]),
            "scalars": {k.split(".", 1)[1]: float(v) for k, v in tensors.items() if k.startswith("scalar.")},
        }

    # ---- phase 2: curves ------------------------------------------------------------------------------------
    def _objective(self, method: EvaluationMethod) -> RDEObjective:
        return RDEObjective(
            self.classifier, method.representation, 0.0, self.config.obfuscation, self.config.distortion
        )

    def _noise(self, objective: RDEObjective, problem, seeds: Sequence[int]):
        generators = make_generators(stream_seeds(seeds, Stream.EVAL_NOISE), self.device)
        return objective.sample_noise(problem, self.config.noise_draws, generators)

    def _curves(
        self, method: EvaluationMethod, key: str, records: dict[str, dict], files: list[Path], ids: list[str]
    ) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for image_id in ids:
            hit = self.cache.load_json("curves", method.name, key, image_id)
            if hit is not None:
                out[image_id] = hit
        missing = [i for i, image_id in enumerate(ids) if image_id not in out]
        self.computed["curves"][method.name] = len(missing)
        rates = rate_grid(self.config.rates)
        objective = self._objective(method)
        bar = self._bar(len(missing), f"curves {method.name}")
        for batch in self._batches(missing):
            images = self._load(files, batch)
            batch_ids = [ids[i] for i in batch]
            seeds = [item_seed(i, self.config.seed) for i in batch_ids]
            target = torch.tensor([records[i]["target"] for i in batch_ids], device=self.device)
            problem = objective.prepare(images, target)
            noise = self._noise(objective, problem, seeds)
            relevance = torch.stack([records[i]["relevance"] for i in batch_ids]).to(self.device)
            tie_generators = [torch.Generator().manual_seed(s) for s in stream_seeds(seeds, Stream.EVAL_TIES)]
            result = rate_distortion_curves(
                objective, problem, relevance, noise, rates, tie_generators, self.config.max_batch
            )
            for j, image_id in enumerate(batch_ids):
                record = {
                    "rates": rates,
                    "keep": result.keep[j].tolist(),
                    "randomise": result.randomise[j].tolist(),
                }
                self.cache.save_json("curves", method.name, key, image_id, record)
                out[image_id] = record
            bar.update(len(batch))
        bar.close()
        return out

    # ---- phase 3: lambda sweep (panel c) ------------------------------------------------------------------
    def _lambda_panel(
        self, methods: dict[str, EvaluationMethod], records: dict, files: list[Path], ids: list[str]
    ) -> dict[str, list[dict]]:
        cfg = self.config
        ctx = self.context
        panel: dict[str, list[dict]] = {}
        chosen = ids[: cfg.lambda_limit] if cfg.lambda_limit else ids
        dwt = {"wave": ctx.wave, "levels": ctx.levels, "mode": ctx.mode}
        for name in LAMBDA_METHODS:
            grid = cfg.lambdas.get(name, ())
            if name not in methods or not grid:
                continue
            method = methods[name]
            objective = self._objective(method)
            points: list[dict] = []
            computed = 0
            for lam in grid:
                optimizer = lambda_optimizer(name, self.classifier, ctx.optimizer, lam, cfg.lambda_steps, dwt)
                settings = dict(optimizer.settings())
                settings.pop("seed", None)
                key = settings_hash(
                    {
                        "kind": "lambda",
                        **settings,
                        **self._classifier_identity(),
                        "image_size": ctx.image_size,
                        "seed": cfg.seed,
                        "noise_draws": cfg.noise_draws,
                        "eval_distortion": cfg.distortion,
                        "eval_obfuscation": cfg.obfuscation,
                        "device": self.device.type,
                    }
                )
                found = {}
                for image_id in chosen:
                    hit = self.cache.load_json("lambda", name, key, image_id)
                    if hit is not None:
                        found[image_id] = hit
                missing = [i for i, image_id in enumerate(chosen) if image_id not in found]
                computed += len(missing)
                bar = self._bar(len(missing), f"lambda {name} {lam:g}")
                for batch in self._batches(missing):
                    images = self._load(files, batch)
                    batch_ids = [chosen[i] for i in batch]
                    seeds = [item_seed(i, cfg.seed) for i in batch_ids]
                    target = torch.tensor([records[name][i]["target"] for i in batch_ids], device=self.device)
                    problem = objective.prepare(images, target)
                    noise = self._noise(objective, problem, seeds)
                    values = lambda_points(optimizer, objective, images, target, seeds, noise, cfg.progress)
                    for j, image_id in enumerate(batch_ids):
                        record = {
                            "lambda": float(lam),
                            "mask_mean": float(values["mask_mean"][j]),
                            "distortion": float(values["distortion"][j]),
                            "optimizer_distortion": float(values["optimizer_distortion"][j]),
                            "seconds": float(values["seconds"]) / len(batch),
                        }
                        self.cache.save_json("lambda", name, key, image_id, record)
                        found[image_id] = record
                    bar.update(len(batch))
                bar.close()
                points.extend({"image": i, **found[i]} for i in chosen)
            panel[name] = points
            self.computed["lambda"][name] = computed
        return panel

    # ---- phase 4: ground truth ------------------------------------------------------------------------------
    def _ground_truth(
        self, methods: dict[str, EvaluationMethod], records: dict, files: list[Path], ids: list[str]
    ) -> dict[str, dict[str, np.ndarray]]:
        from .localisation import find_ground_truth, load_ground_truth_masks, localisation_metrics

        path = find_ground_truth(self.images_dir)
        if path is None:
            return {}
        object_mask, distractor_mask = load_ground_truth_masks(path, ids, self.context.image_size)
        values: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
        bar = self._bar(len(ids), "ground truth")
        for batch in self._batches(list(range(len(ids)))):
            images = self._load(files, batch)
            obj = object_mask[batch].to(self.device)
            dis = distractor_mask[batch].to(self.device)
            for name, method in methods.items():
                relevance = torch.stack([records[name][ids[i]]["relevance"] for i in batch]).to(self.device)
                maps = pixel_relevance(method, images, relevance)
                for metric, v in localisation_metrics(maps, obj, dis).items():
                    values[name].setdefault(metric, []).extend(v.detach().cpu().double().tolist())
            bar.update(len(batch))
        bar.close()
        return {m: {k: np.asarray(v) for k, v in metrics.items()} for m, metrics in values.items()}

    # ---- phase 5: examples ------------------------------------------------------------------------------------
    def _examples(self, methods, records, files, ids) -> tuple[Tensor | None, dict[str, Tensor]]:
        count = min(self.config.examples, len(ids))
        if count == 0:
            return None, {}
        indices = list(range(count))
        images = self._load(files, indices)
        shown = {}
        for name, method in methods.items():
            relevance = torch.stack([records[name][ids[i]]["relevance"] for i in indices]).to(self.device)
            shown[name] = display_image(method, images, relevance).cpu()
        return images.cpu(), shown

    # ---- the run ------------------------------------------------------------------------------------------------
    def run(self) -> EvaluationResults:
        """Run every phase (reusing the cache) and return the results; :func:`.report.write_report` writes them."""
        files = self._files()
        ids = [p.name for p in files]
        if len(set(ids)) != len(ids):
            raise InputError(f"two images in {self.images_dir} share a file name")
        methods, skipped = build_methods(self.config.methods, self.context)
        for name, reason in skipped.items():
            logger.warning("skipping %s: %s", name, reason)
        for method in methods.values():
            method.progress = self.config.progress
        if not methods:
            raise ConfigError("none of the chosen methods can run on this classifier: " + "; ".join(skipped.values()))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rates = rate_grid(self.config.rates)

        with frozen(self.classifier):
            records: dict[str, dict[str, dict]] = {}
            curves: dict[str, dict[str, dict]] = {}
            for name, method in methods.items():
                key = self._explanation_key(method)
                records[name] = self._explain(method, key, files, ids)
                curves[name] = self._curves(method, self._curve_key(key), records[name], files, ids)
            lambda_panel = self._lambda_panel(methods, records, files, ids)
            ground_truth = self._ground_truth(methods, records, files, ids)
            example_images, examples = self._examples(methods, records, files, ids)

        results = {}
        for name, method in methods.items():
            rec = records[name]
            scalar_names = sorted({k for r in rec.values() for k in r["scalars"]})
            results[name] = MethodResults(
                name=name,
                representation=method.representation.name,
                kind=method.kind,
                keep=np.array([curves[name][i]["keep"] for i in ids]),
                randomise=np.array([curves[name][i]["randomise"] for i in ids]),
                seconds=np.array([rec[i]["seconds"] for i in ids]),
                targets=np.array([rec[i]["target"] for i in ids]),
                ground_truth=ground_truth.get(name, {}),
                scalars={k: np.array([rec[i]["scalars"].get(k, np.nan) for i in ids]) for k in scalar_names},
            )
        count = min(self.config.examples, len(ids))
        return EvaluationResults(
            ids=ids,
            rates=rates,
            methods=results,
            skipped=skipped,
            lambda_points=lambda_panel,
            examples=examples,
            example_images=example_images,
            example_targets={n: [int(records[n][ids[i]]["target"]) for i in range(count)] for n in methods},
            settings=self.settings(),
            computed=self.computed,
            has_ground_truth=bool(ground_truth),
        )

    def settings(self) -> dict:
        """The run's settings as plain values (for summary.json and report.md)."""
        ctx = self.context
        return {
            "images_dir": str(self.images_dir),
            "classifier": ctx.classifier_spec,
            "image_size": ctx.image_size,
            "device": str(self.device),
            "evaluation": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
            "optimizer": asdict(ctx.optimizer),
            "dwt": {"wave": ctx.wave, "levels": ctx.levels, "mode": ctx.mode},
            "baselines": asdict(ctx.baselines),
            "checkpoint": ctx.checkpoint,
            "refine_steps": ctx.refine_steps,
            "command": self.command,
        }


def settings_json(settings: dict) -> str:
    return json.dumps(settings, indent=2, sort_keys=True, default=str)
