"""The offline end-to-end demo on the synthetic cartoon benchmark (``cartoonx demo``).

Stages, each reused when its output already exists (so a second run only redoes what is missing):

1. **classifier**: train the synthetic benchmark's CNN (``checkpoints/synthetic/``) unless it exists.
2. **data**: write the explainer's training images and the held-out test images, with ground truth
   (``outputs/demo/data/{train,test}``).
3. **teachers**: exact CartoonX masks of the first ``teacher_images`` training images
   (``checkpoints/demo/teachers``), through the same Lightning predict path as ``cartoonx targets``.
4. **fit**: the amortized explainer, RDE loss + distillation to the teachers, with the module, data module
   and Trainer (checkpoints, loggers) of ``cartoonx fit`` (``checkpoints/demo/explainer/best.ckpt``; the
   ``cartoonx fit`` config that repeats the run in ``outputs/demo/logs/explainer/config.yaml``).
5. **evaluate**: exact CartoonX, the amortized explainer, warm start, Pixel RDE and baselines on the held-out
   images: rate-distortion curves and ground-truth localisation (``outputs/demo/evaluation``), as ``cartoonx evaluate``.
6. **report**: ``outputs/demo/report.md`` with the loss ratio amortized / exact, the warm start, the
   localisation of every method and the figures.

The defaults take about 9 minutes on 2 idle CPU cores (budget: 15; docs/demo.md has the measurements);
:meth:`DemoConfig.tiny` runs in seconds (tests).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .demo_fit import stage_fit
from .demo_report import amortized_figures, report_markdown
from .errors import ConfigError
from .io import atomic_write_text
from .methods import METHOD_TABLE

logger = logging.getLogger(__name__)

#: The baselines and references the demo compares with, one of each family (gradients, CAM, random); the
#: others (SmoothGrad, Guided Backprop, random pixels) would add time without a new kind of comparison.
DEMO_COMPARISONS = ("integrated-gradients", "grad-cam", "random-wavelet")
#: Every RDE explainer of the method table (exact and amortized) and :data:`DEMO_COMPARISONS`, in display order.
DEMO_METHODS = tuple(m.name for m in METHOD_TABLE if m.explains or m.name in DEMO_COMPARISONS)


@dataclass
class DemoConfig:
    """Settings of ``cartoonx demo``. The defaults take about 9 minutes on 2 idle CPU cores.

    Attributes:
        out: outputs (data, evaluation, report).
        checkpoints: what the demo trains (teacher masks, explainer); the classifier goes to
            ``classifier_dir``.
        classifier_dir: the synthetic classifier (``cartoonx train-classifier``'s default place).
        size: image side (the synthetic classifier is trained at this size).
        train_images: images the amortized explainer learns from.
        teacher_images: how many of them (the first, by name) get an exact CartoonX teacher mask; the others
            train with the RDE loss alone. Teachers are the demo's most expensive stage.
        test_images: held-out images of the evaluation (the classifier's held-out ``test`` stream).
        schedule, steps, samples, lr: the exact optimizer of the teachers and of the evaluation's reference: the
            ``fast`` schedule (lr 0.1 with cosine decay; docs/benchmarks.md) for 200 steps, a tenth of the
            paper's, at ``lr`` None: the schedule's.
        l1_lambda: the sparsity weight shared by the teachers, the explainer and the evaluation.
        levels: DWT scales (J = 5 fits 64 px with db3).
        fit_steps, fit_batch, fit_samples, fit_lr, distill_weight, val_fraction, width: the amortized
            explainer's training (``val_fraction`` of the training images select the checkpoint; the network
            has ``width``, a decoder of ``2 * width`` and a class embedding of ``4 * width``).
        encoder: the mask predictor's encoder (``scratch`` or ``classifier``: + the classifier's feature maps).
        stream_fraction: the share of every training batch drawn from the endless synthetic stream (fresh
            images, RDE loss only; the rest from the training folder, teachers included); 0: the folder only.
        l1_warmup_fraction, stretch: the explainer's sparsity ramp (over this fraction of ``fit_steps``) and
            stretched sigmoid (see
            :class:`~amortized_cartoonx.training.AmortizedCartoonXModule`); without the ramp, training on many
            images without teachers collapses to the empty mask on this benchmark.
        refine_steps: warm-start refinement steps in the evaluation; None (default): the ``refine`` schedule's
            (60 steps, :data:`~amortized_cartoonx.optimizer.SCHEDULES`).
        eval_rates, noise_draws: the evaluation's rate grid (None, the default: the evaluation's, 21 rates dense
            below 0.1) and noise draws per rate.
        methods: the evaluated methods.
        classifier_train_size, classifier_epochs, classifier_batch_size, classifier_val_size,
            classifier_held_out: the synthetic classifier's training (the defaults are ``cartoonx
            train-classifier``'s, so both share ``checkpoints/synthetic``).
        seed: seeds everything.
        progress: progress bars.
    """

    out: str = "outputs/demo"
    checkpoints: str = "checkpoints/demo"
    classifier_dir: str = "checkpoints/synthetic"
    size: int = 64
    train_images: int = 1024
    teacher_images: int = 256
    test_images: int = 16
    schedule: str = "fast"
    steps: int = 200
    samples: int = 8
    lr: float | None = None
    l1_lambda: float = 20.0
    levels: int = 5
    fit_steps: int = 1000
    fit_batch: int = 16
    fit_samples: int = 4
    fit_lr: float = 0.003
    distill_weight: float = 1.0
    val_fraction: float = 0.0625
    width: int = 16
    l1_warmup_fraction: float = 0.6
    stretch: float = 0.05
    encoder: str = "classifier"
    stream_fraction: float = 0.5
    refine_steps: int | None = None
    eval_rates: int | tuple[float, ...] | None = None
    noise_draws: int = 4
    methods: tuple[str, ...] = DEMO_METHODS
    classifier_train_size: int = 6000
    classifier_epochs: int = 5
    classifier_batch_size: int = 64
    classifier_val_size: int = 500
    classifier_held_out: int = 2000
    seed: int = 0
    progress: bool = True

    @classmethod
    def tiny(cls, root: str | Path) -> DemoConfig:
        """A configuration that runs end to end in seconds (for tests), everything below ``root``."""
        root = Path(root)
        return cls(
            out=str(root / "outputs"),
            checkpoints=str(root / "checkpoints"),
            classifier_dir=str(root / "classifier"),
            size=32,
            train_images=8,
            teacher_images=6,
            test_images=3,
            steps=3,
            samples=2,
            levels=3,
            fit_steps=2,
            fit_batch=4,
            fit_samples=2,
            val_fraction=0.4,
            width=8,
            refine_steps=2,
            eval_rates=3,
            noise_draws=1,
            methods=("cartoonx", "amortized", "warm", "pixel-rde"),
            classifier_train_size=64,
            classifier_epochs=1,
            classifier_batch_size=16,
            classifier_val_size=16,
            classifier_held_out=32,
            progress=False,
        )

    def validate(self) -> DemoConfig:
        for name in ("size", "train_images", "test_images", "steps", "samples", "fit_steps", "fit_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.train_images < 4:
            raise ConfigError("the explainer needs at least 4 training images (one for validation)")
        self._check_validation_split()
        if not 0.0 <= self.l1_warmup_fraction <= 1.0:
            raise ConfigError(f"l1_warmup_fraction must be in [0, 1], got {self.l1_warmup_fraction}")
        if not 0 <= self.teacher_images <= self.train_images:
            raise ConfigError(f"teacher_images must be in [0, train_images], got {self.teacher_images}")
        return self

    def _check_validation_split(self) -> None:
        """Refuse, before any work, training images whose hashed split (the fit's) leaves validation empty:
        small ``train_images`` with the default ``val_fraction`` did so only at the fit, minutes later."""
        from .data import split_train_val_test

        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        names = [f"train-{self.seed + 1}-{i:05d}.png" for i in range(self.train_images)]  # as stage_data writes
        splits = split_train_val_test(names, self.val_fraction, 0.0, self.seed)
        needed = ("train", "val") if self.stream_fraction < 1 else ("val",)  # a stream of 1 feeds all training
        for name in needed:
            if not splits[name]:
                raise ConfigError(
                    f"val_fraction {self.val_fraction} of {self.train_images} training images leaves the {name} "
                    "split empty (the split hashes the file names): change train_images or val_fraction"
                )

    # ---- paths ------------------------------------------------------------------------------------------
    @property
    def train_dir(self) -> Path:
        return Path(self.out) / "data" / "train"

    @property
    def test_dir(self) -> Path:
        return Path(self.out) / "data" / "test"

    @property
    def teachers_dir(self) -> Path:
        return Path(self.checkpoints) / "teachers"

    @property
    def explainer_checkpoint(self) -> Path:
        return Path(self.checkpoints) / "explainer" / "best.ckpt"

    @property
    def evaluation_dir(self) -> Path:
        return Path(self.out) / "evaluation"

    @property
    def classifier_spec(self) -> str:
        return f"synthetic:{Path(self.classifier_dir) / 'classifier.safetensors'}"


@dataclass
class StageTimes:
    """Seconds per stage, and whether the stage reused earlier outputs."""

    seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)

    def record(self, stage: str, start: float, reused: bool) -> None:
        self.seconds[stage] = time.perf_counter() - start
        self.reused[stage] = reused


def _folder_complete(folder: Path, count: int, size: int, seed: int, split: str) -> bool:
    """Whether ``folder`` holds exactly the ``count`` images of this (split, seed, size) stream and nothing else
    that the training or the evaluation would read (they read every image of a folder)."""
    from safetensors import safe_open

    from .data import read_labels_csv
    from .errors import InputError
    from .synthetic.export import GROUND_TRUTH_FILE, LABELS_FILE

    labels, truth = folder / LABELS_FILE, folder / GROUND_TRUTH_FILE
    if not (labels.is_file() and truth.is_file()):
        return False
    try:
        names = list(read_labels_csv(labels))
    except InputError:  # unreadable: write the folder again
        return False
    if len(names) != count or sorted(names) != sorted(p.name for p in folder.glob("*.png")):
        return False
    try:
        with safe_open(str(truth), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception:  # unreadable: write the folder again
        return False
    return (meta.get("split"), meta.get("seed"), meta.get("size")) == (split, str(seed), str(size))


def _write_folder(folder: Path, count: int, size: int, seed: int, split: str, progress: bool) -> None:
    """Write the stream's images; images of an earlier, other stream in the folder are removed first."""
    from .synthetic.export import write_synthetic_folder

    for stale in folder.glob("*.png") if folder.is_dir() else ():
        stale.unlink()
    write_synthetic_folder(folder, count, size, seed=seed, split=split, progress=progress)


def classifier_config(cfg: DemoConfig):
    """The synthetic classifier's :class:`~amortized_cartoonx.synthetic.classifier_training.TrainConfig`."""
    from .synthetic.classifier_training import TrainConfig

    return TrainConfig(
        size=cfg.size,
        train_size=cfg.classifier_train_size,
        epochs=cfg.classifier_epochs,
        batch_size=cfg.classifier_batch_size,
        val_size=cfg.classifier_val_size,
        held_out=cfg.classifier_held_out,
        seed=cfg.seed,
    )


def stage_classifier(cfg: DemoConfig) -> dict:
    from .synthetic.classifier_training import ClassifierExistsError, ensure_synthetic_classifier

    try:
        result = ensure_synthetic_classifier(cfg.classifier_dir, classifier_config(cfg), progress=cfg.progress)
    except ClassifierExistsError as exc:  # the demo has no force: another folder, or retrain there on purpose
        raise ClassifierExistsError(
            exc.weights, exc.changed, "use another --classifier-dir, or delete this one"
        ) from None
    return {"accuracy": result.accuracy, "reused": result.reused, "weights": str(result.weights)}


def stage_data(cfg: DemoConfig) -> bool:
    """Write the train and test folders; returns True when both already existed."""
    from .synthetic.dataset import HELD_OUT_SEED

    reused = True
    # the training images: a stream of their own, neither the classifier's training images nor the held-out ones
    for folder, count, seed, split in (
        (cfg.train_dir, cfg.train_images, cfg.seed + 1, "train"),
        (cfg.test_dir, cfg.test_images, HELD_OUT_SEED, "test"),
    ):
        if not _folder_complete(folder, count, cfg.size, seed, split):
            _write_folder(folder, count, cfg.size, seed, split, cfg.progress)
            reused = False
    return reused


def _optimizer_config(cfg: DemoConfig):
    from .optimizer import OptimizerConfig

    return OptimizerConfig(
        schedule=cfg.schedule,
        steps=cfg.steps,
        num_samples=cfg.samples,
        lr=cfg.lr,
        l1_lambda=cfg.l1_lambda,
        seed=cfg.seed,
    ).validate()


def stage_teachers(cfg: DemoConfig) -> dict:
    if cfg.teacher_images == 0:
        return {"done": 0, "skipped": 0, "mean_loss": None}
    from .teacher_masks.generate import generate_teacher_masks

    summary = generate_teacher_masks(
        cfg.train_dir,
        cfg.teachers_dir,
        cfg.classifier_spec,
        size=cfg.size,
        levels=cfg.levels,
        config=_optimizer_config(cfg),
        batch_size=32,
        accelerator="cpu",
        devices=1,
        progress=cfg.progress,
        limit=cfg.teacher_images,
    )
    return {"done": summary.done, "skipped": summary.skipped, "mean_loss": summary.mean_loss}


def stage_evaluate(cfg: DemoConfig):
    """Evaluate the methods on the held-out images; returns the :class:`EvaluationResults` and the summary."""
    from .classifiers import load_classifier
    from .evaluation.methods import MethodContext
    from .evaluation.report import write_report
    from .evaluation.runner import Evaluation, EvaluationConfig
    from .images import read_class_names

    classifier = load_classifier(cfg.classifier_spec)
    grid = {} if cfg.eval_rates is None else {"rates": cfg.eval_rates}
    config = EvaluationConfig(
        methods=tuple(cfg.methods),
        batch_size=8,
        **grid,
        noise_draws=cfg.noise_draws,
        seed=cfg.seed,
        lambdas={},
        examples=min(4, cfg.test_images),
        progress=cfg.progress,
    ).validate()
    context = MethodContext(
        classifier=classifier,
        classifier_spec=cfg.classifier_spec,
        image_size=cfg.size,
        optimizer=_optimizer_config(cfg),
        levels=cfg.levels,
        checkpoint=str(cfg.explainer_checkpoint),
        refine_steps=cfg.refine_steps,
    )
    labels = read_class_names(cfg.test_dir / "class_names.txt")
    evaluation = Evaluation(
        classifier, cfg.test_dir, cfg.evaluation_dir, config, context, class_names=labels, command="cartoonx demo"
    )
    results = evaluation.run()
    return results, write_report(results, cfg.evaluation_dir, labels)


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage (reusing what exists) and write ``<out>/report.md``; returns the figures."""
    cfg.validate()
    times = StageTimes()
    start = time.perf_counter()
    logger.info("demo 1/5: synthetic classifier")
    classifier = stage_classifier(cfg)
    times.record("classifier", start, classifier["reused"])

    start = time.perf_counter()
    logger.info("demo 2/5: synthetic images (train %d, test %d)", cfg.train_images, cfg.test_images)
    times.record("data", start, stage_data(cfg))

    start = time.perf_counter()
    logger.info("demo 3/5: teacher masks (exact CartoonX, %d steps)", cfg.steps)
    teachers = stage_teachers(cfg)
    times.record("teachers", start, teachers["done"] == 0)

    start = time.perf_counter()
    logger.info("demo 4/5: amortized explainer (%d training steps)", cfg.fit_steps)
    times.record("fit", start, stage_fit(cfg))

    start = time.perf_counter()
    logger.info("demo 5/5: evaluation on %d held-out images", cfg.test_images)
    results, summary = stage_evaluate(cfg)
    times.record("evaluate", start, sum(sum(v.values()) for v in results.computed.values()) == 0)

    fast = amortized_figures(results)
    report = report_markdown(cfg, classifier, teachers, fast, summary, times)
    atomic_write_text(Path(cfg.out) / "report.md", report)
    figures = demo_figures(classifier, fast, summary, times)
    atomic_write_text(Path(cfg.out) / "demo.json", json.dumps(figures, indent=2) + "\n")
    return figures


#: The keys of a fast path's figures (:func:`~amortized_cartoonx.demo_report.amortized_figures`) that measure time;
#: ``demo.json`` keeps them under ``run``, apart from the results.
TIMING_KEYS = ("seconds_median", "exact_seconds_median", "speedup_median")


def environment() -> dict:
    """What the numbers depend on besides the code and the settings: torch's CPU threads (the order of float
    sums in convolutions and matrix products), torch's version and the CPU kernels it picked."""
    import os
    import platform

    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def method_figures(summary: dict) -> dict:
    """Every method's means over the images from the evaluation's ``summary``: the rate-distortion areas, the
    mask's loss and size, the ground-truth localisation (no timings)."""
    out = {}
    for name, entry in summary["methods"].items():
        keys = ("area_keep", "area_randomise", "area_keep_early", "area_randomise_early")
        figures = {k: entry[k]["mean"] for k in keys if k in entry}
        figures.update({k: v["mean"] for k, v in entry.get("mask_scalars", {}).items() if k in ("loss", "mask_mean")})
        figures.update({k: v["mean"] for k, v in entry.get("ground_truth", {}).items()})
        out[name] = figures
    return out


def demo_figures(classifier: dict, fast: dict, summary: dict, times: StageTimes) -> dict:
    """``demo.json``: ``results``, every number the run computes (two runs with the same code, settings, machine
    and thread count give the same bits), and ``run``, what differs between runs by nature (seconds, speed-ups,
    what was reused) and the :func:`environment`."""
    results = {
        "classifier_accuracy": classifier["accuracy"],
        "fast_paths": {name: {k: v for k, v in f.items() if k not in TIMING_KEYS} for name, f in fast.items()},
        "methods": method_figures(summary),
    }
    run = {
        "fast_paths": {name: {k: f[k] for k in TIMING_KEYS if k in f} for name, f in fast.items()},
        "seconds_per_explanation": {
            name: entry["seconds_per_explanation"]["mean"] for name, entry in summary["methods"].items()
        },
        "stages": asdict(times),
        "environment": environment(),
    }
    return {"results": results, "run": run}
