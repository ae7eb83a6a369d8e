"""The Trainer of a training run: where checkpoints and logs go, and the callbacks that put them there.

``cartoonx fit`` (:mod:`.cli`) and the demo (:mod:`amortized_cartoonx.demo`) build their Trainer with
:func:`build_trainer` / :func:`trainer_arguments`, so a run writes the same files either way:

* checkpoints ``<checkpoint_dir>/<run_name>/best.ckpt`` (lowest ``val/rde_loss``) and ``last.ckpt``, unless the
  settings say ``enable_checkpointing=False``;
* unless the settings name a logger: CSV in ``<log_dir>/<run_name>/`` (``metrics.csv``, ``hparams.yaml``; also
  ``trainer.log_dir``) and wandb below ``<log_dir>``, offline unless ``WANDB_MODE`` says otherwise
  (``disabled``: no wandb). Nothing reaches the network, and no API key is needed, unless the user sets
  ``WANDB_MODE=online``;
* the learning rate, logged every step whenever anything logs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

#: The metric that selects ``best.ckpt`` (the RDE loss with the full lambda on the validation images).
MONITOR = "val/rde_loss"


@dataclass(frozen=True)
class RunOutputs:
    """Where a run writes: the ``cartoonx fit`` options of the same names.

    Attributes:
        run_name: names the run's folders and its wandb run.
        checkpoint_dir: checkpoints go to ``<checkpoint_dir>/<run_name>/``. Default ``checkpoints``.
        log_dir: CSV logs to ``<log_dir>/<run_name>/``, wandb files below ``<log_dir>``. Default ``logs``.
        wandb_project: the wandb project. Default ``amortized-cartoonx``.
    """

    run_name: str
    checkpoint_dir: str = "checkpoints"
    log_dir: str = "logs"
    wandb_project: str = "amortized-cartoonx"

    @property
    def checkpoint_folder(self) -> Path:
        return Path(self.checkpoint_dir) / self.run_name

    @property
    def log_folder(self) -> Path:
        return Path(self.log_dir) / self.run_name


def default_run_stamp() -> str:
    """One timestamp per launch, shared with DDP child processes through the environment."""
    return os.environ.setdefault("CARTOONX_RUN_STAMP", time.strftime("%Y%m%d-%H%M%S"))


def default_run_name(config_files: Sequence[str | os.PathLike] | None) -> str:
    """``<stem of the last config file>-<timestamp>`` (``fit-<timestamp>`` without a config file)."""
    stem = Path(str(config_files[-1])).stem if config_files else "fit"
    return f"{stem}-{default_run_stamp()}"


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: the run's state after every validation and at the end of training.

    Lightning's own ``save_last`` (2.6) writes ``last.ckpt`` only when the monitored checkpoint improves, so after
    the best validation it stops following the run, and a resume from it would go back to the best step.
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # also when the run did not end on a validation; a full checkpoint (optimizer states too) to resume from.
        # Saying so keeps Lightning from logging "`weights_only` was not set, defaulting to `False`", which is about
        # what is saved, and reads like the loading that README's safety section promises is weights_only=True
        trainer.save_checkpoint(self.format_checkpoint_name({}), weights_only=False)


def run_checkpoints(outputs: RunOutputs) -> list[ModelCheckpoint]:
    """``best.ckpt`` (lowest :data:`MONITOR`) and ``last.ckpt`` (:class:`LastCheckpoint`) in the run's checkpoint
    folder."""
    folder = str(outputs.checkpoint_folder)
    best = ModelCheckpoint(
        dirpath=folder,
        filename="best",
        monitor=MONITOR,
        mode="min",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,  # a second run under the same name replaces best.ckpt (not best-v1.ckpt)
    )
    return [best, LastCheckpoint(folder)]


def default_loggers(outputs: RunOutputs) -> list[Logger]:
    """CSV first (``trainer.log_dir`` is its folder), then wandb unless ``WANDB_MODE=disabled``; offline
    unless ``WANDB_MODE`` asks for more."""
    Path(outputs.log_dir).mkdir(parents=True, exist_ok=True)
    loggers: list[Logger] = [CSVLogger(outputs.log_dir, name=outputs.run_name, version="")]
    wandb_mode = os.environ.get("WANDB_MODE", "offline")
    if wandb_mode != "disabled":
        loggers.append(
            WandbLogger(
                name=outputs.run_name,
                project=outputs.wandb_project,
                save_dir=outputs.log_dir,
                offline=wandb_mode == "offline",
            )
        )
    return loggers


def trainer_arguments(outputs: RunOutputs, settings: dict) -> dict:
    """The Trainer's keyword arguments: ``settings`` with the run's checkpoints, loggers and callbacks added.

    ``settings`` are any ``pl.Trainer`` arguments; they are not changed. The result adds :func:`run_checkpoints`
    (unless ``enable_checkpointing`` is False) to the given ``callbacks``, :func:`default_loggers` when
    ``logger`` is unset (None or True), a :class:`LearningRateMonitor` when anything logs, and
    ``default_root_dir=<log_dir>/<run_name>`` when unset.
    """
    arguments = dict(settings)
    callbacks = arguments.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
    if arguments.get("enable_checkpointing", True) is not False:
        callbacks.extend(run_checkpoints(outputs))
    if arguments.get("logger") in (None, True):
        arguments["logger"] = default_loggers(outputs)
    if arguments["logger"] is not False:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    arguments["callbacks"] = callbacks
    if arguments.get("default_root_dir") is None:  # where LightningCLI's config.yaml goes when nothing logs
        arguments["default_root_dir"] = str(outputs.log_folder)
    return arguments


def build_trainer(outputs: RunOutputs, **settings) -> pl.Trainer:
    """A ``pl.Trainer`` with ``settings`` and the run's checkpoints, loggers and callbacks.

    See :func:`trainer_arguments`.
    """
    return pl.Trainer(**trainer_arguments(outputs, settings))
