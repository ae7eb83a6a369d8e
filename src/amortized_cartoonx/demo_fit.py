"""The demo's explainer training (stage 4 of ``cartoonx demo``): the module, data module and Trainer of
``cartoonx fit``, built in Python from a :class:`~amortized_cartoonx.demo.DemoConfig`.

The Trainer comes from :func:`~amortized_cartoonx.training.build_trainer`, as ``cartoonx fit``'s does, so the
demo writes the same checkpoints and logs; ``config.yaml`` in its log folder is the ``cartoonx fit`` config that
repeats the run, and ``demo-fit.json`` next to the checkpoint the settings a later demo checks before reusing it.
Lightning is imported inside the functions only (``cartoonx --help`` imports the demo).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError
from .io import atomic_write_text

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .demo import DemoConfig


def explainer_outputs(cfg: DemoConfig):
    """The explainer's run: ``<checkpoints>/explainer/`` and ``<out>/logs/explainer/``."""
    from .training import RunOutputs

    return RunOutputs(run_name="explainer", checkpoint_dir=cfg.checkpoints, log_dir=str(Path(cfg.out) / "logs"))


def explainer_trainer_settings(cfg: DemoConfig) -> dict:
    """The Trainer's settings (``cartoonx fit``'s ``trainer`` section): CPU, ``fit_steps`` steps, validation
    every ``min(50, fit_steps)`` steps, gradient clipping at 1."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": cfg.fit_steps,
        "val_check_interval": max(1, min(cfg.fit_steps, 50)),
        "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 5,
        "gradient_clip_val": 1.0,
        "enable_progress_bar": cfg.progress,
        "enable_model_summary": False,
    }


def explainer_training(cfg: DemoConfig):
    """The explainer's LightningModule and data module; build them after seeding (the initial weights).

    The learning rate warms up over 5 % of the steps, the sparsity weight over ``l1_warmup_fraction``;
    validation uses at least 8 noise samples.
    """
    from .mask_predictor import MaskPredictorConfig
    from .training import AmortizedCartoonXModule, MaskPredictorDataModule

    network = MaskPredictorConfig(
        width=cfg.width, decoder_width=2 * cfg.width, embed_dim=4 * cfg.width, stretch=cfg.stretch, encoder=cfg.encoder
    )
    module = AmortizedCartoonXModule(
        classifier=cfg.classifier_spec,
        image_size=cfg.size,
        levels=cfg.levels,
        l1_lambda=cfg.l1_lambda,
        num_samples=cfg.fit_samples,
        val_samples=max(cfg.fit_samples, 8),
        distill_weight=cfg.distill_weight,
        mask_predictor=network,
        lr=cfg.fit_lr,
        warmup_steps=max(1, cfg.fit_steps // 20),
        l1_warmup_steps=round(cfg.l1_warmup_fraction * cfg.fit_steps),
        noise_seed=cfg.seed,
        log_images=0,
    )
    data = MaskPredictorDataModule(
        images=str(cfg.train_dir),
        image_size=cfg.size,
        teachers=str(cfg.teachers_dir) if cfg.teacher_images else None,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.seed,
        batch_size=cfg.fit_batch,
        num_workers=0,
        stream={"fraction": cfg.stream_fraction, "seed": cfg.seed + 1} if cfg.stream_fraction else None,
    )
    return module, data


def stage_fit(cfg: DemoConfig) -> bool:
    """Train the explainer unless a checkpoint trained with the same settings exists; returns True when reused.

    Raises:
        ConfigError: the checkpoint folder holds an explainer trained with other settings, or the training stopped
            before ``fit_steps`` (interrupted): nothing is recorded, so the next run trains it again.
    """
    import pytorch_lightning as pl
    import torch

    from .training import build_trainer, fit_config

    pl.seed_everything(cfg.seed, workers=True)  # as cartoonx fit's seed_everything, before the module is built
    module, data = explainer_training(cfg)
    trainer_settings = explainer_trainer_settings(cfg)
    config = fit_config(module, data, trainer_settings, explainer_outputs(cfg), seed=cfg.seed)
    record = cfg.explainer_checkpoint.with_name("demo-fit.json")  # the settings the checkpoint was trained with
    settings = {  # the fit config, and what it reads without naming it: images, teachers, classifier, threads
        "fit": {**config, "trainer": {k: v for k, v in trainer_settings.items() if k != "enable_progress_bar"}},
        "train_images": cfg.train_images,
        "teacher_images": cfg.teacher_images,
        "teachers": _folder_digest(cfg.teachers_dir) if cfg.teacher_images else None,
        "classifier_weights_sha256": module.classifier_identity.get("classifier_weights_sha256"),
        "torch_threads": torch.get_num_threads(),  # another thread count trains another explainer
    }
    if cfg.explainer_checkpoint.is_file() and record.is_file():
        if json.loads(record.read_text()) == settings:
            return True
        raise ConfigError(
            f"{cfg.explainer_checkpoint.parent} holds an explainer trained with other settings; delete that folder "
            "to train a new one (or give --checkpoints another folder)"
        )
    for stale in (cfg.explainer_checkpoint, cfg.explainer_checkpoint.with_name("last.ckpt")):
        if stale.is_file():  # a training that never finished (killed): its record is written only at the end
            logger.info("%s is from an unfinished training (no %s): training again", stale, record.name)
            stale.unlink()
    trainer = build_trainer(explainer_outputs(cfg), **trainer_settings)
    atomic_write_text(Path(trainer.log_dir) / "config.yaml", _yaml(config))  # as cartoonx fit saves it
    from .runtime import ignore_lightning_noise, lightning_interrupts  # torch: not at import (cartoonx --help)

    with warnings.catch_warnings(), lightning_interrupts(lambda: trainer):
        ignore_lightning_noise()
        trainer.fit(module, datamodule=data)
    if trainer.interrupted or trainer.global_step < cfg.fit_steps:  # Ctrl+C, SIGTERM, a callback's stop
        # never record a half-trained explainer as done: the next run would reuse it
        raise ConfigError(
            f"the explainer's training stopped at step {trainer.global_step} of {cfg.fit_steps} "
            f"({'interrupted' if trainer.interrupted else 'stopped early'}); run the demo again to train it"
        )
    if not cfg.explainer_checkpoint.is_file():
        last = cfg.explainer_checkpoint.with_name("last.ckpt")
        if not last.is_file():
            raise ConfigError(f"training wrote no checkpoint in {cfg.explainer_checkpoint.parent}")
        cfg.explainer_checkpoint.write_bytes(last.read_bytes())  # no validation ran: keep the last state
    atomic_write_text(record, json.dumps(settings, indent=1) + "\n")
    return False


def _folder_digest(folder: Path) -> str | None:
    """SHA-256 of a teacher store's files (names and bytes): new teacher masks make another digest."""
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
