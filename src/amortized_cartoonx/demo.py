"""The offline end-to-end demo on the synthetic cartoon benchmark (``cartoonx demo``).

Stages, each reused when its output already exists (so a second run only redoes what is missing):

1. **classifier**: train the synthetic benchmark's CNN (``checkpoints/synthetic/``) unless it exists.
2. **data**: write the explainer's training images and the held-out test images, with ground truth
   (``outputs/demo/data/{train,test}``).
3. **teachers**: exact CartoonX masks of the first ``teacher_images`` training images
   (``checkpoints/demo/teachers``), through the same Lightning predict path as ``cartoonx targets``.
4. **fit**: the amortized explainer, RDE loss + distillation to the teachers, through the same LightningCLI
   as ``cartoonx fit`` (``checkpoints/demo/explainer/best.ckpt``).
5. **evaluate**: exact CartoonX, the amortized explainer, warm start, Pixel RDE and baselines on the held-out
   images: rate-distortion curves and ground-truth localisation (``outputs/demo/evaluation``), as ``cartoonx evaluate``.
6. **report**: ``outputs/demo/report.md`` with the loss ratio amortized / exact, the warm start, the
   localisation of every method and the figures.

The defaults take 11-13 minutes on 2 CPU cores (budget: 15); :meth:`DemoConfig.tiny` runs in seconds (tests).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .io import atomic_write_text

logger = logging.getLogger(__name__)

DEMO_METHODS = ("cartoonx", "amortized", "warm", "pixel-rde", "integrated-gradients", "grad-cam", "random-wavelet")


@dataclass
class DemoConfig:
    """Settings of ``cartoonx demo``. The defaults take 11-13 minutes on 2 CPU cores.

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
        steps, samples, lr: the exact optimizer of the teachers and of the evaluation's reference. Fewer
            steps than the paper's 2000 with a larger learning rate, so masks can reach 0 in time.
        l1_lambda: the sparsity weight shared by the teachers, the explainer and the evaluation.
        levels: DWT scales (J = 5 fits 64 px with db3).
        fit_steps, fit_batch, fit_samples, distill_weight, val_fraction, width: the amortized explainer's
            training (``val_fraction`` of the training images select the checkpoint).
        l1_warmup_fraction, stretch: the explainer's sparsity ramp (over this fraction of ``fit_steps``) and
            stretched sigmoid (see
            :class:`~amortized_cartoonx.training.AmortizedCartoonXModule`); without the ramp, training on many
            images without teachers collapses to the empty mask on this benchmark.
        refine_steps: warm-start refinement steps in the evaluation.
        eval_rates, noise_draws: the evaluation's rate grid and noise draws per rate.
        methods: the evaluated methods.
        classifier_train_size, classifier_epochs: the synthetic classifier's training.
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
    steps: int = 200
    samples: int = 8
    lr: float = 0.02
    l1_lambda: float = 20.0
    levels: int = 5
    fit_steps: int = 1000
    fit_batch: int = 16
    fit_samples: int = 4
    distill_weight: float = 1.0
    val_fraction: float = 0.0625
    width: int = 16
    l1_warmup_fraction: float = 0.6
    stretch: float = 0.05
    refine_steps: int = 50
    eval_rates: int = 11
    noise_draws: int = 4
    methods: tuple[str, ...] = DEMO_METHODS
    classifier_train_size: int = 6000
    classifier_epochs: int = 5
    seed: int = 0
    progress: bool = True
    extra_fit_args: list[str] = field(default_factory=list)

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
            progress=False,
        )

    def validate(self) -> DemoConfig:
        for name in ("size", "train_images", "test_images", "steps", "samples", "fit_steps", "fit_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.train_images < 4:
            raise ConfigError("the explainer needs at least 4 training images (one for validation)")
        if not 0.0 <= self.l1_warmup_fraction <= 1.0:
            raise ConfigError(f"l1_warmup_fraction must be in [0, 1], got {self.l1_warmup_fraction}")
        if not 0 <= self.teacher_images <= self.train_images:
            raise ConfigError(f"teacher_images must be in [0, train_images], got {self.teacher_images}")
        return self

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


def _folder_complete(folder: Path, count: int) -> bool:
    labels = folder / "labels.csv"
    return labels.is_file() and len(labels.read_text().splitlines()) == count + 1


def stage_classifier(cfg: DemoConfig) -> dict:
    from .synthetic.classifier_training import TrainConfig, ensure_synthetic_classifier

    config = TrainConfig(
        size=cfg.size, train_size=cfg.classifier_train_size, epochs=cfg.classifier_epochs, seed=cfg.seed
    )
    if cfg.classifier_train_size < 1000:  # the tiny test configuration: a quick, small held-out check
        config = replace(config, val_size=16, held_out=32, batch_size=16)
    result = ensure_synthetic_classifier(cfg.classifier_dir, config, progress=cfg.progress)
    return {"accuracy": result.accuracy, "reused": result.reused, "weights": str(result.weights)}


def stage_data(cfg: DemoConfig) -> bool:
    """Write the train and test folders; returns True when both already existed."""
    from .synthetic.dataset import HELD_OUT_SEED
    from .synthetic.export import write_synthetic_folder

    reused = True
    if not _folder_complete(cfg.train_dir, cfg.train_images):
        # a stream of its own: not the classifier's training images, not the held-out ones
        write_synthetic_folder(
            cfg.train_dir, cfg.train_images, cfg.size, seed=cfg.seed + 1, split="train", progress=cfg.progress
        )
        reused = False
    if not _folder_complete(cfg.test_dir, cfg.test_images):
        write_synthetic_folder(
            cfg.test_dir, cfg.test_images, cfg.size, seed=HELD_OUT_SEED, split="test", progress=cfg.progress
        )
        reused = False
    return reused


def _optimizer_config(cfg: DemoConfig):
    from .optimizer import OptimizerConfig

    return OptimizerConfig(
        steps=cfg.steps, num_samples=cfg.samples, lr=cfg.lr, l1_lambda=cfg.l1_lambda, seed=cfg.seed
    ).validate()


def stage_teachers(cfg: DemoConfig) -> dict:
    if cfg.teacher_images == 0:
        return {"done": 0, "skipped": 0, "mean_loss": None}
    from .teacher_masks.generate import generate_targets

    summary = generate_targets(
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


def stage_fit(cfg: DemoConfig) -> bool:
    """Train the explainer unless a checkpoint trained with the same settings exists; returns True when reused.

    Raises:
        ConfigError: the checkpoint folder holds an explainer trained with other settings.
    """
    args = fit_arguments(cfg)
    record = cfg.explainer_checkpoint.with_name("demo-fit.json")  # the settings the checkpoint was trained with
    settings = {  # the command line, and what it reads without naming it: how many images, how many teachers
        "fit": [a for a in args if not a.startswith("--trainer.enable_progress_bar")],
        "train_images": cfg.train_images,
        "teacher_images": cfg.teacher_images,
    }
    if cfg.explainer_checkpoint.is_file():
        if record.is_file() and json.loads(record.read_text()) == settings:
            return True
        raise ConfigError(
            f"{cfg.explainer_checkpoint.parent} holds an explainer trained with other settings; delete that folder "
            "to train a new one (or give --checkpoints another folder)"
        )
    from .training import run_fit

    run_fit(args)
    if not cfg.explainer_checkpoint.is_file():
        last = cfg.explainer_checkpoint.with_name("last.ckpt")
        if not last.is_file():
            raise ConfigError(f"training wrote no checkpoint in {cfg.explainer_checkpoint.parent}")
        cfg.explainer_checkpoint.write_bytes(last.read_bytes())  # no validation ran: keep the last state
    atomic_write_text(record, json.dumps(settings, indent=1) + "\n")
    return False


def fit_arguments(cfg: DemoConfig) -> list[str]:
    """The ``cartoonx fit`` command line of the demo's explainer (LightningCLI arguments)."""
    checkpoint_dir = Path(cfg.checkpoints)
    return [
        "fit",
        f"--seed_everything={cfg.seed}",
        "--run_name=explainer",
        f"--checkpoint_dir={checkpoint_dir}",
        f"--log_dir={Path(cfg.out) / 'logs'}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.max_steps={cfg.fit_steps}",
        f"--trainer.val_check_interval={max(1, min(cfg.fit_steps, 50))}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=5",
        "--trainer.gradient_clip_val=1.0",
        f"--trainer.enable_progress_bar={str(cfg.progress).lower()}",
        "--trainer.enable_model_summary=false",
        f"--model.classifier={cfg.classifier_spec}",
        f"--model.levels={cfg.levels}",
        f"--model.l1_lambda={cfg.l1_lambda}",
        f"--model.num_samples={cfg.fit_samples}",
        f"--model.val_samples={max(cfg.fit_samples, 8)}",
        f"--model.distill_weight={cfg.distill_weight}",
        f"--model.mask_predictor.width={cfg.width}",
        f"--model.mask_predictor.decoder_width={2 * cfg.width}",
        f"--model.mask_predictor.embed_dim={4 * cfg.width}",
        "--model.lr=0.003",
        f"--model.warmup_steps={max(1, cfg.fit_steps // 20)}",
        f"--model.l1_warmup_steps={round(cfg.l1_warmup_fraction * cfg.fit_steps)}",
        f"--model.mask_predictor.stretch={cfg.stretch}",
        f"--model.noise_seed={cfg.seed}",
        "--model.log_images=0",
        f"--data.images={cfg.train_dir}",
        f"--data.image_size={cfg.size}",
        f"--data.val_fraction={cfg.val_fraction}",
        f"--data.split_seed={cfg.seed}",
        f"--data.batch_size={cfg.fit_batch}",
        "--data.num_workers=0",
        *([f"--data.teachers={cfg.teachers_dir}"] if cfg.teacher_images else []),
        *cfg.extra_fit_args,
    ]


def stage_evaluate(cfg: DemoConfig):
    """Evaluate the methods on the held-out images; returns the :class:`EvaluationResults` and the summary."""
    from .classifiers import load_classifier
    from .evaluation.methods import MethodContext
    from .evaluation.report import write_report
    from .evaluation.runner import Evaluation, EvaluationConfig
    from .images import read_class_names

    classifier = load_classifier(cfg.classifier_spec)
    config = EvaluationConfig(
        methods=tuple(cfg.methods),
        batch_size=8,
        rates=cfg.eval_rates,
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


def _median(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")


def amortized_figures(results) -> dict:
    """Loss and time of the fast paths against the exact optimizer, per image medians (same noise seeds)."""
    methods = results.methods
    out = {}
    if "cartoonx" not in methods:
        return out
    exact = methods["cartoonx"]
    for name in ("amortized", "warm"):
        if name in methods and "loss" in methods[name].scalars:
            ratio = methods[name].scalars["loss"] / exact.scalars["loss"]
            out[name] = {
                "loss_median": _median(methods[name].scalars["loss"]),
                "exact_loss_median": _median(exact.scalars["loss"]),
                "loss_ratio_median": _median(ratio),
                "seconds_median": _median(methods[name].seconds),
                "exact_seconds_median": _median(exact.seconds),
                "speedup_median": _median(exact.seconds / methods[name].seconds),
            }
    return out


def report_markdown(
    cfg: DemoConfig, classifier: dict, teachers: dict, fast: dict, summary: dict, times: StageTimes
) -> str:
    lines = [
        "# cartoonx demo: the synthetic cartoon benchmark",
        "",
        f"Images {cfg.size} px; explainer trained for {cfg.fit_steps} steps on {cfg.train_images} images, "
        f"{cfg.teacher_images} of them with exact CartoonX teacher masks ({cfg.steps} steps, {cfg.samples} noise "
        f"samples, lr {cfg.lr}, lambda {cfg.l1_lambda}); evaluated on "
        f"{cfg.test_images} held-out images. Classifier held-out accuracy: {classifier['accuracy']:.2%}.",
        "",
        "## Fast paths against the exact optimizer (RDE loss, same lambda, same noise seeds; medians per image)",
        "",
        "| method | RDE loss | exact loss | loss ratio to exact | seconds | exact seconds | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in fast.items():
        lines.append(
            f"| {name} | {f['loss_median']:.4f} | {f['exact_loss_median']:.4f} | {f['loss_ratio_median']:.3f} | "
            f"{f['seconds_median']:.4f} | {f['exact_seconds_median']:.3f} | {f['speedup_median']:.0f}x |"
        )
    lines += [
        "",
        f"Warm start = the amortized mask refined by {cfg.refine_steps} optimizer steps "
        f"(the exact optimizer runs {cfg.steps}).",
        "",
        "## Localisation on the ground truth and rate-distortion areas",
        "",
        "Energy share: the share of a method's pixel relevance on the decisive object / on the distractors. "
        "Pointing game: the strongest point of the relevance falls on the decisive object. Areas under curves "
        "(a) keep the top r (lower is better) and (b) randomise the top r (higher is better); see "
        "`evaluation/report.md`.",
        "",
        "| method | energy on object | energy on distractors | pointing game | area (a) | area (b) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary["methods"].items():
        gt = entry.get("ground_truth", {})

        def cell(key, gt=gt):
            return f"{gt[key]['mean']:.3f}" if key in gt else "-"

        lines.append(
            f"| {name} | {cell('energy_object')} | {cell('energy_distractors')} | {cell('pointing_game')} | "
            f"{entry['area_keep']['mean']:.4f} | {entry['area_randomise']['mean']:.4f} | "
            f"{entry['seconds_per_explanation']['mean']:.4f} |"
        )
    for name, reason in summary.get("skipped", {}).items():
        lines.append(f"\nSkipped {name}: {reason}")
    lines += [
        "",
        "![rate-distortion](evaluation/rate_distortion.png)",
        "",
        "![examples](evaluation/examples.png)",
        "",
        "## Stages",
        "",
        "| stage | seconds | reused |",
        "|---|---|---|",
        *[f"| {k} | {v:.1f} | {'yes' if times.reused.get(k) else 'no'} |" for k, v in times.seconds.items()],
        "",
        f"Teacher masks: {teachers['done']} computed now, {teachers['skipped']} reused.",
        "",
        "Settings: `" + json.dumps({k: v for k, v in asdict(cfg).items() if k != "extra_fit_args"}) + "`",
        "",
    ]
    return "\n".join(lines)


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
    figures = {"classifier_accuracy": classifier["accuracy"], "fast_paths": fast, "stages": asdict(times)}
    atomic_write_text(Path(cfg.out) / "demo.json", json.dumps(figures, indent=2) + "\n")
    return figures
