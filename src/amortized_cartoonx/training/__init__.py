"""Training the amortized explainer with PyTorch Lightning (``cartoonx fit``).

* :mod:`.module`: :class:`AmortizedCartoonXModule`, the LightningModule (the RDE loss, distillation to teacher
  masks, the schedules, the checkpoint settings);
* :mod:`.data`: :class:`MaskPredictorDataModule` (an image folder joined with teacher masks, split
  train / val / test) and :func:`check_teachers`;
* :mod:`.trainer`: the Trainer of a run (checkpoints, loggers, callbacks), shared by ``cartoonx fit`` and the demo;
* :mod:`.cli`: ``cartoonx fit`` (LightningCLI) and :func:`run_fit`.

Importing this package imports PyTorch Lightning (seconds): the commands import it only when they train.
"""

from __future__ import annotations

import warnings

from .cli import fit_config, run_fit
from .data import TARGET_SOURCES, MaskPredictorDataModule, TrainingImages, check_teachers
from .module import DISTILL_LOSSES, AmortizedCartoonXModule, noise_seeds, warmup_cosine
from .sparsity import SparsityGate, l1_ramp
from .trainer import MONITOR, RunOutputs, build_trainer, default_run_stamp, trainer_arguments

#: Old name -> the current one (the old names still work, with a DeprecationWarning).
_RENAMED = {"ExplainerDataModule": "MaskPredictorDataModule"}


def __getattr__(name: str):
    if name in _RENAMED:
        warnings.warn(
            f"amortized_cartoonx.training.{name} is deprecated; use {_RENAMED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DISTILL_LOSSES",
    "MONITOR",
    "TARGET_SOURCES",
    "AmortizedCartoonXModule",
    "MaskPredictorDataModule",
    "RunOutputs",
    "SparsityGate",
    "TrainingImages",
    "build_trainer",
    "check_teachers",
    "default_run_stamp",
    "fit_config",
    "l1_ramp",
    "noise_seeds",
    "run_fit",
    "trainer_arguments",
    "warmup_cosine",
]
