"""The amortized explainer's training data: images joined with teacher masks, split train / val / test.

:class:`MaskPredictorDataModule` reads an image folder (optional ``labels.csv``), joins the exact optimizer's
teacher masks (``cartoonx targets``) by image id and splits the folder deterministically into train, validation
and test (held out: never trained on, never used to pick the checkpoint) with
:func:`~amortized_cartoonx.data.split_train_val_test`. :func:`check_teachers` refuses teacher masks made for
another training problem. Training images can be augmented (``augment``) and mixed with an endless stream of
fresh synthetic images (``stream``); validation and test images never change (:mod:`.streams`).

Shapes: S the image side, K mask entries per image.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..classifiers import same_classifier
from ..data import ImageFolder, split_train_val_test
from ..errors import ConfigError, InputError
from ..images import load_image
from ..synthetic.dataset import CartoonConfig, SyntheticStream
from ..teacher_masks.store import TeacherMaskStore
from .streams import (
    AugmentConfig,
    FolderViews,
    StreamConfig,
    StreamLoader,
    TrainingStream,
    augment_config,
    augment_image,
    stream_config,
    view_generator,
)

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
        ConfigError: another classifier, input normalisation, image size, wavelet, padding, J, mask length or
            link (a manifest without one: softmax).
    """
    problems = []
    recorded, ours = manifest.get("classifier_weights_sha256"), settings.get("classifier_weights_sha256")
    if recorded and ours:  # the weights decide when both are known (a spec written another way is the same)
        if recorded != ours:
            problems.append(f"classifier {manifest['classifier']!r} with other weights than the training run's")
    elif "classifier" in manifest and not same_classifier(manifest["classifier"], settings):
        problems.append(f"classifier {manifest['classifier']!r} (training: {settings['classifier']!r})")
    for key, ours in (
        ("normalize", settings["normalize"]),  # the same weights behind another input normalisation: another problem
        ("size", settings["image_size"]),
        ("wave", settings["wave"]),
        ("mode", settings["mode"]),
        ("levels", settings["levels_used"]),
        ("mask_length", mask_length),
    ):
        if key in manifest and manifest[key] != ours:
            problems.append(f"{key} {manifest[key]!r} (training: {ours!r})")
    recorded, ours = manifest.get("link", "softmax"), settings.get("link", "softmax")
    if recorded != ours:  # another link is another problem: its masks explain other probabilities
        problems.append(f"link {recorded!r} (training: {ours!r})")
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

    A key is an index, or ``(index, epoch)``: that epoch's view of the image, augmented with ``augment`` unless
    the image has a teacher mask (the teacher mask explains the unaugmented image).

    Args:
        folder: the images.
        teachers: a teacher store, or None.
        target_source: ``auto`` (the teacher's target when there is one, else the prediction), ``predicted``
            or ``label`` (from ``labels.csv``; an image without a label is an error).
        augment: how views are augmented (:class:`~.streams.AugmentConfig`), or None: never.
        seed: the augmentation's seed.
    """

    def __init__(
        self,
        folder: ImageFolder,
        teachers: TeacherMaskStore | None,
        target_source: str = "auto",
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        if target_source not in TARGET_SOURCES:
            raise ConfigError(f"unknown target_source {target_source!r}; choose from: {', '.join(TARGET_SOURCES)}")
        self.folder = folder
        self.teachers = teachers if teachers is not None and len(teachers) else None
        self.target_source = target_source
        self.augment = augment
        self.seed = seed
        self.mask_length = 0
        if self.teachers is not None:
            self.mask_length = int(self.teachers.get(self.teachers.ids()[0]).mask.numel())
        if target_source == "label":
            missing = [i for i in folder.ids if i not in folder.labels]
            if missing:
                raise InputError(f"target_source=label, but {len(missing)} images have no label, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        return self.view(index, epoch)

    def has_teacher(self, image_id: str) -> bool:
        return self.teachers is not None and image_id in self.teachers

    def view(self, index: int, epoch: int | None = None) -> dict:
        """Item ``index``; with ``epoch``, its view in that epoch (augmented unless it has a teacher mask)."""
        image_id = self.folder.ids[index]
        if epoch is not None and self.augment is not None and not self.has_teacher(image_id):
            whole = load_image(self.folder.files[index], None)  # (3, H, W): the crop is taken from the whole image
            image = augment_image(whole, self.folder.size, self.augment, view_generator(self.seed, epoch, image_id))
        else:
            image = load_image(self.folder.files[index], self.folder.size)
        return self.training_item(image, image_id, self.folder.labels.get(image_id, -1))

    def training_item(self, image: Tensor, image_id: str, label: int) -> dict:
        """The training item of ``image (3, S, S)``: its target and teacher entries (by ``image_id``).

        Images from elsewhere (the synthetic stream) use it too, so every item of a batch has the same keys.
        """
        target = int(label) if self.target_source == "label" else -1
        out = {"image": image, "id": image_id, "label": label}
        if self.teachers is not None:
            record = self.teachers.get(image_id) if image_id in self.teachers else None
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

    Training batches come in one of three ways (validation and test are always the fixed folder split, unaugmented):

    * ``stream`` None: epochs of the training images in a seeded order (:class:`~.streams.FolderViews`), as
      augmented views when ``augment`` is set; a run resumed inside an epoch trains on the rest of that epoch;
    * ``stream`` set: an endless stream (:class:`~.streams.TrainingStream`); every batch mixes folder images
      (augmented unless they have a teacher mask) with fresh synthetic images. The epoch never ends: set
      ``trainer.max_steps``, and ``trainer.val_check_interval`` as a number of steps.

    Args:
        images: the image folder.
        image_size: side of the square images (resize + centre crop). Linked to the module's ``image_size``.
        labels: ``auto`` (``images/labels.csv`` when present), a CSV path, or None.
        teachers: a teacher-mask folder (``cartoonx targets --out``), or None.
        target_source: see :class:`TrainingImages`; for stream images ``label`` is the scene's class, otherwise
            the prediction. Default ``auto``.
        val_fraction: share of the images for validation (checkpoint selection). Default 0.1.
        test_fraction: share held out entirely (never trained on, never used for selection). Default 0.
        split_seed: seed of the hash split (an image's side does not depend on the other images).
        batch_size: training batch size (per device). Default 16.
        val_batch_size: validation batch size (default: ``batch_size``).
        num_workers: data-loading workers. Default 2.
        augment: training views of the folder images without a teacher mask (:class:`~.streams.AugmentConfig`:
            random resized crop with area share in ``scale`` (0.5, 1) and aspect ratio in ``ratio`` (3/4, 4/3),
            horizontal flip; ``augment: {}`` in a config takes these defaults); None (default): no augmentation.
            Turn it on for photos; a synthetic classifier knows one scale (its accuracy on the default views
            drops from 99.7% to 83%).
        stream: fresh synthetic training images mixed into every batch (:class:`~.streams.StreamConfig`:
            ``fraction``, ``seed``, ``scenes``); None (default): the folder only.
        train_seed: seed of the training order, and of the augmentation (with ``augment`` or ``stream``). Default 0.
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
        augment: AugmentConfig | None = None,
        stream: StreamConfig | None = None,
        train_seed: int = 0,
    ) -> None:
        super().__init__()
        if target_source not in TARGET_SOURCES:
            raise ConfigError(f"unknown target_source {target_source!r}; choose from: {', '.join(TARGET_SOURCES)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ConfigError(f"val_batch_size must be at least 1 (or null: batch_size), got {val_batch_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be at least 0, got {num_workers}")
        if not isinstance(train_seed, int) or isinstance(train_seed, bool) or train_seed < 0:
            raise ConfigError(f"train_seed must be a non-negative integer, got {train_seed!r}")
        self.augment = augment_config(augment)
        self.stream = stream_config(stream)
        if self.stream is not None:
            self.stream.count(batch_size)  # refuses a fraction that rounds to no image
            size = self.stream.scenes.size
            if size not in (CartoonConfig().size, image_size):
                raise ConfigError(
                    f"stream.scenes.size {size} is not data.image_size {image_size}: stream images are drawn at "
                    "data.image_size; leave stream.scenes.size out"
                )
            scenes = dataclasses.replace(self.stream.scenes, size=image_size)
            self.stream = dataclasses.replace(self.stream, scenes=scenes.validate())
        # save_hyperparameters reads the arguments from this frame: the settings as plain values (checkpoints stay
        # readable with torch.load(weights_only=True), fit_config writes them as YAML)
        augment = self.augment.to_dict() if self.augment is not None else None
        stream = self.stream.to_dict() if self.stream is not None else None
        self.save_hyperparameters()
        self.teacher_store = TeacherMaskStore(teachers) if teachers else None
        self.splits: dict[str, list[str]] | None = None
        self.datasets: dict[str, TrainingImages] = {}
        self._resumed_batches = 0  # training batches done in the checkpoint this run resumes from
        self._resumed_steps: int | None = None  # and its optimizer steps (None: a checkpoint that predates them)

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
        # with fraction 1 every training image comes from the stream: the folder may have no training split
        stream_only = self.stream is not None and self.stream.count(hp.batch_size) == hp.batch_size
        for name in ("train", "val"):
            if not self.splits[name] and not (name == "train" and stream_only):
                raise InputError(
                    f"the {name} split of {hp.images} is empty ({len(everything)} images, val_fraction "
                    f"{hp.val_fraction}, test_fraction {hp.test_fraction}); use more images or other fractions"
                )
        for name, ids in self.splits.items():
            if ids or name == "train":
                folder = ImageFolder(hp.images, size=hp.image_size, labels=hp.labels, ids=ids)
                augment = self.augment if name == "train" else None  # validation and test images never change
                self.datasets[name] = TrainingImages(
                    folder, self.teacher_store, hp.target_source, augment=augment, seed=hp.train_seed
                )
        if self.teacher_store is not None:
            changed = self.teacher_store.changed_images(everything.files)
            if changed:
                raise ConfigError(
                    f"{len(changed)} image(s) of {hp.images} changed since their teacher masks were made "
                    f"({', '.join(changed[:3])}): compute the teachers again (cartoonx targets, another --out)"
                )
            have = sum(i in self.teacher_store for i in self.splits["train"])
            logger.info("teacher masks for %d of %d training images", have, len(self.splits["train"]))
        logger.info("split: %s", ", ".join(f"{k} {len(v)}" for k, v in self.splits.items()))

    def _evaluation_loader(self, name: str, batch_size: int) -> DataLoader:
        """An evaluation loader, whose images each rank reads once: ``rank::world_size``, without the repeated
        images a DistributedSampler pads the ranks with (they would count twice in the metrics that pick
        ``best.ckpt``)."""
        dataset, workers = self.datasets[name], self.hparams.num_workers
        rank, world_size = self._rank()
        sampler = None
        if 1 < world_size <= len(dataset):  # fewer images than ranks: Lightning's padding
            from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def _full_batches(self, count: int, batch_size: int) -> bool:
        """Whether a rank's share of ``count`` training images makes more than one batch, so that its short last
        batch can be dropped (the share, not the whole: each of 2 ranks dropping its only batch trained nothing)."""
        return math.ceil(count / self._rank()[1]) > batch_size

    def _rank(self) -> tuple[int, int]:
        """This process's rank and the number of ranks (0 and 1 without a trainer)."""
        trainer = self.trainer
        return (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)

    def _batches_trained(self) -> int:
        """Training batches done so far: where the stream goes on (its epochs are ``trainer.limit_train_batches``
        batches when that is a number, else one endless epoch; see :meth:`_position`)."""
        if self.trainer is None:
            return self._resumed_batches
        per_epoch = self._epoch_batches(None)
        epoch, batch = self._position(per_epoch)
        return epoch * (per_epoch or 0) + batch

    def _epoch_batches(self, length: int | None) -> int | None:
        """The batches Lightning runs per epoch of a training loader of ``length`` batches (None: endless) under
        ``trainer.limit_train_batches`` (a number caps it, a fraction scales a finite loader); None: endless, or
        no batch at all."""
        limit = self.trainer.limit_train_batches
        if isinstance(limit, int):
            batches = limit if length is None else min(length, limit)
        elif length is None or limit is None:
            batches = length
        else:
            batches = int(length * float(limit))
        return batches if batches is not None and batches >= 1 else None

    def _steps_done(self) -> int:
        """Optimizer steps done so far: Lightning's global step, or the checkpoint's while Lightning has not yet
        restored it. A resumed run knows them from the checkpoint's data-module state before Lightning restores
        its global step: Lightning may start the training loader earlier (to count the steps of the schedule when
        ``trainer.max_epochs`` is set)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        resumed = self._resumed_steps
        if resumed is None:  # a checkpoint that predates the recorded steps: its batches were steps x accumulation
            resumed = self._resumed_batches // max(int(trainer.accumulate_grad_batches), 1)
        return max(int(trainer.global_step), resumed)

    def _position(self, per_epoch: int | None) -> tuple[int, int]:
        """``(epoch, batch)`` where training goes on after the optimizer steps done, for epochs of ``per_epoch``
        batches (None: one endless epoch). Lightning steps every ``accumulate_grad_batches`` batches and on an
        epoch's last one, so an epoch takes ``ceil(per_epoch / accumulate_grad_batches)`` steps; exact at
        optimizer steps (a checkpoint written between two goes on after the last step, as its weights do)."""
        accumulate = max(int(self.trainer.accumulate_grad_batches), 1)
        steps = self._steps_done()
        if per_epoch is None:
            return 0, steps * accumulate
        epoch, step = divmod(steps, math.ceil(per_epoch / accumulate))
        return epoch, step * accumulate

    def _folder_position(self, sampler: FolderViews, drop_last: bool) -> tuple[int, int] | None:
        """Where the next pass over the training folder starts: ``(epoch, batch)`` of this rank's order
        (:meth:`_position` for the batches Lightning runs per epoch: the rank's share in batches, less under
        ``trainer.limit_train_batches``). At an epoch's start this is ``(epoch, 0)``; a run resumed from a
        checkpoint written inside an epoch (a validation's ``last.ckpt``, or the end of a shorter ``max_steps``)
        goes on at the batch after the last one trained. None without a trainer.
        """
        if self.trainer is None:
            return None
        keys, size = sampler.num_samples, sampler.batch_size
        batches = self._epoch_batches(keys // size if drop_last else math.ceil(keys / size))
        return self._position(batches) if batches is not None else None

    def state_dict(self) -> dict:
        """The data module's part of a checkpoint: the training batches and optimizer steps done (where a resumed
        stream or folder epoch goes on)."""
        return {"batches_trained": self._batches_trained(), "global_step": self._steps_done()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resumed_batches = int(state_dict.get("batches_trained", 0))
        steps = state_dict.get("global_step")
        self._resumed_steps = int(steps) if steps is not None else None

    def _check_endless(self) -> None:
        """Refuse Trainer settings under which an endless stream would never stop or never validate."""
        trainer = self.trainer
        if trainer is None or isinstance(trainer.limit_train_batches, int):  # epochs of that many batches
            return
        if trainer.max_steps == -1:
            raise ConfigError("data.stream never runs out: set trainer.max_steps (the number of training steps)")
        interval = trainer.val_check_interval
        if isinstance(interval, float) and interval == 1.0 and trainer.limit_val_batches != 0:
            raise ConfigError(
                "with data.stream the training epoch never ends, so validation (and best.ckpt) needs "
                "trainer.val_check_interval as a number of steps (or trainer.limit_val_batches: 0)"
            )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        train = self.datasets["train"]
        rank, world_size = self._rank()
        if self.stream is not None:
            self._check_endless()
            scenes = SyntheticStream(self.stream.seed, config=self.stream.scenes)
            count = self.stream.count(hp.batch_size)
            stream = TrainingStream(train, scenes, hp.batch_size, count, hp.train_seed, rank, world_size)
            return StreamLoader(stream, self._batches_trained, num_workers=hp.num_workers)
        drop_last = self._full_batches(len(train), hp.batch_size)
        sampler = FolderViews(train, hp.train_seed, rank, world_size, hp.batch_size)
        sampler.position = lambda: self._folder_position(sampler, drop_last)
        return DataLoader(
            train,
            batch_size=hp.batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            drop_last=drop_last,
        )

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("val", self.hparams.val_batch_size or self.hparams.batch_size)
