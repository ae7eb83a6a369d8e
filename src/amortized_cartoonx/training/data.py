"""The amortized explainer's training data: images joined with teacher masks, split train / val / test.

:class:`MaskPredictorDataModule` reads an image folder (optional ``labels.csv``), joins the exact optimizer's
teacher masks (``cartoonx targets``) by image id and splits the folder deterministically into train, validation
and test (held out: never trained on, never used to pick the checkpoint) with
:func:`~amortized_cartoonx.data.split_train_val_test`. :func:`check_teachers` refuses teacher masks made for
another training problem.

Shapes: S the image side, K mask entries per image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..classifiers import same_classifier
from ..data import ImageFolder, split_train_val_test
from ..errors import ConfigError, InputError
from ..teacher_masks.store import TeacherMaskStore

logger = logging.getLogger(__name__)

#: Where the class to explain comes from (see :class:`TrainingImages`).
TARGET_SOURCES = ("auto", "predicted", "label")


def check_teachers(manifest: dict, settings: dict, mask_length: int) -> None:
    """Refuse teacher masks that do not fit the training settings; warn when they optimised another loss.

    Args:
        manifest: the teacher store's manifest (what ``cartoonx targets`` recorded).
        settings: the training module's :meth:`~.module.AmortizedCartoonXModule.settings`.
        mask_length: K, the mask entries per training image.

    Raises:
        ConfigError: another classifier, image size, wavelet, padding, J or mask length.
    """
    problems = []
    if "classifier" in manifest and not same_classifier(manifest["classifier"], settings):
        problems.append(f"classifier {manifest['classifier']!r} (training: {settings['classifier']!r})")
    for key, ours in (
        ("size", settings["image_size"]),
        ("wave", settings["wave"]),
        ("mode", settings["mode"]),
        ("levels", settings["levels_used"]),
        ("mask_length", mask_length),
    ):
        if key in manifest and manifest[key] != ours:
            problems.append(f"{key} {manifest[key]!r} (training: {ours!r})")
    if problems:
        raise ConfigError("the teacher masks do not fit this training run: " + "; ".join(problems))
    for key in ("l1_lambda", "distortion", "obfuscation"):
        if key in manifest and manifest[key] != settings[key]:
            logger.warning(
                "teacher masks were optimised with %s=%r, training uses %r", key, manifest[key], settings[key]
            )


class TrainingImages(Dataset):
    """An :class:`ImageFolder` joined with teacher masks by image id.

    Items: ``image (3, S, S)``, ``id``, ``label``, ``target`` (the class to explain, -1: the classifier's
    prediction, decided in the module) and, with a teacher store, ``teacher_mask (K,)`` (zeros when the image has
    none), ``has_teacher`` and ``teacher_target`` (-1 when none).

    Args:
        folder: the images.
        teachers: a teacher store, or None.
        target_source: ``auto`` (the teacher's target when there is one, else the prediction), ``predicted``
            or ``label`` (from ``labels.csv``; an image without a label is an error).
    """

    def __init__(self, folder: ImageFolder, teachers: TeacherMaskStore | None, target_source: str = "auto") -> None:
        if target_source not in TARGET_SOURCES:
            raise ConfigError(f"unknown target_source {target_source!r}; choose from: {', '.join(TARGET_SOURCES)}")
        self.folder = folder
        self.teachers = teachers if teachers is not None and len(teachers) else None
        self.target_source = target_source
        self.mask_length = 0
        if self.teachers is not None:
            self.mask_length = int(self.teachers.get(self.teachers.ids()[0]).mask.numel())
        if target_source == "label":
            missing = [i for i in folder.ids if i not in folder.labels]
            if missing:
                raise InputError(f"target_source=label, but {len(missing)} images have no label, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict:
        item = self.folder[index]
        target = int(item["label"]) if self.target_source == "label" else -1
        out = {"image": item["image"], "id": item["id"], "label": item["label"]}
        if self.teachers is not None:
            record = self.teachers.get(item["id"]) if item["id"] in self.teachers else None
            out["has_teacher"] = record is not None
            out["teacher_target"] = record.target if record is not None else -1
            out["teacher_mask"] = record.mask if record is not None else torch.zeros(self.mask_length)
            if record is not None and self.target_source == "auto":
                target = record.target
        out["target"] = target
        return out


class MaskPredictorDataModule(pl.LightningDataModule):
    """The mask predictor's training data: an image folder (optional ``labels.csv``) with optional teacher
    masks, split train / val / test. Batches are :class:`TrainingImages` items.

    Formerly ``ExplainerDataModule`` (a deprecated alias remains in :mod:`amortized_cartoonx.training`).

    Args:
        images: the image folder.
        image_size: side of the square images (resize + centre crop). Linked to the module's ``image_size``.
        labels: ``auto`` (``images/labels.csv`` when present), a CSV path, or None.
        teachers: a teacher-mask folder (``cartoonx targets --out``), or None.
        target_source: see :class:`TrainingImages`. Default ``auto``.
        val_fraction: share of the images for validation (checkpoint selection). Default 0.1.
        test_fraction: share held out entirely (never trained on, never used for selection). Default 0.
        split_seed: seed of the hash split (an image's side does not depend on the other images).
        batch_size: training batch size. Default 16.
        val_batch_size: validation batch size (default: ``batch_size``).
        num_workers: data-loading workers. Default 2.
    """

    def __init__(
        self,
        images: str,
        image_size: int = 256,
        labels: str | None = "auto",
        teachers: str | None = None,
        target_source: str = "auto",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if target_source not in TARGET_SOURCES:
            raise ConfigError(f"unknown target_source {target_source!r}; choose from: {', '.join(TARGET_SOURCES)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.teacher_store = TeacherMaskStore(teachers) if teachers else None
        self.splits: dict[str, list[str]] | None = None
        self.datasets: dict[str, TrainingImages] = {}

    def split_settings(self) -> dict:
        """What decides the split (stored in checkpoints, so held-out images can be found again)."""
        hp = self.hparams
        return {
            "images": str(Path(hp.images).expanduser().resolve()),
            "val_fraction": float(hp.val_fraction),
            "test_fraction": float(hp.test_fraction),
            "split_seed": int(hp.split_seed),
            "teachers": str(Path(hp.teachers).resolve()) if hp.teachers else None,
            "target_source": hp.target_source,
        }

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        hp = self.hparams
        everything = ImageFolder(hp.images, size=hp.image_size, labels=hp.labels)
        self.splits = split_train_val_test(everything.ids, hp.val_fraction, hp.test_fraction, hp.split_seed)
        for name in ("train", "val"):
            if not self.splits[name]:
                raise InputError(
                    f"the {name} split of {hp.images} is empty ({len(everything)} images, val_fraction "
                    f"{hp.val_fraction}, test_fraction {hp.test_fraction}); use more images or other fractions"
                )
        for name, ids in self.splits.items():
            if ids:
                folder = ImageFolder(hp.images, size=hp.image_size, labels=hp.labels, ids=ids)
                self.datasets[name] = TrainingImages(folder, self.teacher_store, hp.target_source)
        if self.teacher_store is not None:
            have = sum(i in self.teacher_store for i in self.splits["train"])
            logger.info("teacher masks for %d of %d training images", have, len(self.splits["train"]))
        logger.info("split: %s", ", ".join(f"{k} {len(v)}" for k, v in self.splits.items()))

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self.datasets[name],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=shuffle and len(self.datasets[name]) > batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.hparams.val_batch_size or self.hparams.batch_size)
