"""Teacher masks: the exact CartoonX optimizer over an image folder, through Lightning's ``Trainer.predict``.

The same call runs on the CPU, one GPU or many (DDP)::

    from amortized_cartoonx.teacher_masks.generate import generate_teacher_masks
    summary = generate_teacher_masks("photos/", "teachers/", "torchvision:mobilenet_v3_small", steps=300)
    print(summary.line())

How the work is split and made safe to kill:

- **Seeds.** Each image is optimised with seed ``item_seed(file name, seed)``
  (:func:`~amortized_cartoonx.seeding.file_seeds`), whatever its position in the folder, ``limit``, the batch
  size, the number of devices or which run computed it; ``cartoonx explain --seed S`` on the same file gives the
  same mask. Stores written before this rule (manifest ``format_version`` 1: seed + position in the folder) are
  never resumed (the run is refused) rather than mixed.
- **Plan** (:mod:`.plan`). Before starting, ids already in the store are skipped; the launching process makes the
  plan (the remaining ids, their seeds and a run id), and rank 0's plan is broadcast to every rank.
- **Sharding across ranks** (:mod:`.lightning`). Rank r of W takes ``plan[r::W]``; the writer also drops any id
  it has already written or that was stored before the run.
- **Shards** (:mod:`.store`). One per batch, written atomically (temp file + rename), named
  ``shard-<run-id>-r<rank>-<batch>.safetensors`` with ``<run-id>`` = ``YYYYmmddTHHMMSS-<6 hex>`` (UTC) and
  ``<batch>`` the rank's batch index on 6 digits. A killed run loses at most the batches in flight.
- **Checks.** A resume first verifies the shards already there (:meth:`TeacherMaskStore.verify`): a corrupt
  shard or manifest stops the run with one line naming the file.

The manifest records everything that determines the masks (see :func:`~.plan.build_manifest`); a run with other
settings into the same folder is refused.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from ..errors import ConfigError, one_line
from ..optimizer import OptimizerConfig
from ..runtime import ignore_lightning_noise, lightning_interrupts
from ..wavelets import DEFAULT_LEVELS, DEFAULT_MODE, DEFAULT_WAVE
from .lightning import TeacherMaskDataModule, TeacherMaskModule, TeacherWriter
from .plan import TeacherMaskSettings, build_manifest, plan_teacher_masks
from .store import TeacherMaskStore, writer_lock

logger = logging.getLogger(__name__)


@dataclass
class TeacherMaskSummary:
    """What a run did: ``done`` images computed now, ``skipped`` already stored, of ``total`` images of the image
    folder (the first ``limit`` ones with a limit); ``folder`` is the teacher-mask folder.

    ``mean_loss`` is the mean final RDE loss of the images computed now (None if none). ``rank`` is the
    process's global rank (only rank 0's summary covers every rank's work).
    """

    folder: Path
    total: int
    done: int
    skipped: int
    seconds: float
    mean_loss: float | None
    rank: int = 0

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        loss = "n/a" if self.mean_loss is None else f"{self.mean_loss:.4f}"
        return (
            f"teacher masks: {self.done} done, {self.skipped} already stored, of {self.total} images from the image "
            f"folder; {self.seconds:.1f} s, {self.images_per_second:.3f} images/s; mean loss {loss}; "
            f"masks in {self.folder}/"
        )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")


def generate_teacher_masks(
    images: str | Path,
    out: str | Path,
    classifier: str,
    *,
    normalize: str = "auto",
    size: int = 256,
    wave: str = DEFAULT_WAVE,
    levels: int = DEFAULT_LEVELS,
    mode: str = DEFAULT_MODE,
    config: OptimizerConfig | None = None,
    batch_size: int = 4,
    num_workers: int = 0,
    accelerator: str = "auto",
    devices: int | str | list[int] = "auto",
    strategy: str = "auto",
    num_nodes: int = 1,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    limit: int | None = None,
    **overrides,
) -> TeacherMaskSummary:
    """Compute the exact CartoonX mask of every image of folder ``images`` not yet stored in ``out``.

    Args:
        images: a folder of images (its files directly inside, sorted by name; ids are the file names).
        out: the teacher store's folder (created; a folder made with other settings is refused).
        classifier, normalize, size, wave, levels, mode: see :class:`TeacherMaskSettings`.
        config: the optimizer's hyper-parameters; keyword ``overrides`` (e.g. ``steps=300``) apply on top.
        batch_size: images optimised together per device (one shard per batch).
        num_workers: DataLoader workers (image decoding is cheap next to the optimizer; 0 is fine).
        accelerator, devices, strategy, num_nodes: passed to :class:`pytorch_lightning.Trainer`.
        progress: progress bars (images with images/s, and the optimizer's steps) on rank 0.
        callbacks: extra Lightning callbacks (run after the writer).
        limit: only the first ``limit`` images of the folder (sorted by name); None (default): all. Training can
            use the whole folder: images without a teacher are trained with the RDE loss alone.

    Returns:
        a :class:`TeacherMaskSummary`; on ranks other than 0 it covers nothing (``done`` 0).

    Raises:
        InputError: no images, an unreadable image, a size too small for the wavelet, a corrupt manifest or shard
            in ``out``.
        ClassifierError: a classifier that cannot be loaded. ConfigError: bad settings, ``out`` made with other
            settings or in an older format, or another run writing into ``out`` now.
    """
    _check_positive(size=size, batch_size=batch_size, num_nodes=num_nodes)
    if limit is not None:
        _check_positive(limit=limit)
    if num_workers < 0:
        raise ConfigError(f"num_workers must be at least 0, got {num_workers}")
    config = (config or OptimizerConfig()).replace(**overrides).validate()
    settings = TeacherMaskSettings(classifier, normalize, size, wave, levels, mode, config)
    loaded = settings.load_classifier()  # fails early and in one line on a bad spec
    optimizer = settings.build_optimizer(loaded)
    with writer_lock(out):  # one writer at a time: two runs computed the same images into two shards
        settings.config = optimizer.config  # l1_lambda resolved to the method's default
        manifest = build_manifest(settings, optimizer, loaded)
        store = TeacherMaskStore.create(out, manifest)
        settings.levels = manifest["levels"]  # the J used at this size (the cap was already reported)
        del optimizer, loaded
        if store.shards():  # a resume: check what is there before adding to it (one line naming a bad file)
            start = time.perf_counter()
            checked = store.verify()
            logger.info("checked the %d masks already in %s (%.1f s)", checked, out, time.perf_counter() - start)
        plan = plan_teacher_masks(images, store, config.seed, limit)
        if not plan.ids:
            logger.info("all %d images of %s are already in %s; nothing to do", plan.total, images, out)
            return TeacherMaskSummary(Path(out), plan.total, 0, plan.skipped, 0.0, None)
        removed = store.remove_temporary()  # no writer runs yet: any temp file is from a killed run
        if removed:
            logger.info("removed %d unfinished shard file(s) of an earlier run", removed)
        if plan.skipped:
            logger.info(
                "resuming: %d of %d images are already stored, %d to go", plan.skipped, plan.total, len(plan.ids)
            )

        try:
            trainer = pl.Trainer(
                accelerator=accelerator,
                devices=devices,
                strategy=strategy,
                num_nodes=num_nodes,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,  # the writer's bar counts images
                enable_model_summary=False,
                inference_mode=False,  # the optimizer needs autograd; predict_step enables it
                use_distributed_sampler=False,  # TeacherMaskDataModule splits the plan itself, without padding
                default_root_dir=str(out),
                callbacks=[TeacherWriter(out, plan.run_id, progress=progress), *callbacks],
            )
        except (ValueError, TypeError, MisconfigurationException) as exc:  # Lightning's words for a bad setting
            raise ConfigError(
                f"the Lightning Trainer refuses accelerator={accelerator!r}, devices={devices!r}, "
                f"strategy={strategy!r}: {one_line(exc)}"
            ) from None
        module = TeacherMaskModule(settings, step_progress=progress)
        data = TeacherMaskDataModule(images, size, plan, batch_size, num_workers)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            ignore_lightning_noise()
            with lightning_interrupts(lambda: trainer):
                trainer.predict(module, datamodule=data, return_predictions=False)
        trainer.strategy.barrier("cartoonx-teacher-masks-end")  # every rank's shards are written before the summary
        seconds = time.perf_counter() - start
        if trainer.global_rank != 0:
            return TeacherMaskSummary(Path(out), plan.total, 0, plan.skipped, seconds, None, rank=trainer.global_rank)

        store = TeacherMaskStore(out)
        losses = [store.get(i).loss for i in plan.ids if i in store]
        missing = len(plan.ids) - len(losses)
        if missing:
            logger.warning("%d planned images are not in %s after the run; run the command again", missing, out)
        mean_loss = math.fsum(losses) / len(losses) if losses else None
        return TeacherMaskSummary(Path(out), plan.total, len(losses), plan.skipped, seconds, mean_loss)
