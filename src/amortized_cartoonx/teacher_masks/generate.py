"""Teacher masks: the exact CartoonX optimizer over an image folder, through Lightning's ``Trainer.predict``.

The same call runs on the CPU, one GPU or many (DDP), because Lightning places the work and a
:class:`~pytorch_lightning.callbacks.BasePredictionWriter` writes each batch's masks as one shard of a
:class:`~amortized_cartoonx.teacher_masks.store.TeacherMaskStore` as soon as the batch is done::

    from amortized_cartoonx.teacher_masks.generate import generate_targets
    summary = generate_targets("photos/", "teachers/", "torchvision:mobilenet_v3_small", steps=300)
    print(summary.line())

How the work is split and made safe to kill:

- **Seeds.** The image at position k of the folder (files sorted by name, as :class:`~amortized_cartoonx.data.
  ImageFolder` lists them) is optimised with seed ``seed + k``, whatever the batch size, the number of devices
  or which run computed it; ``cartoonx explain --seed S`` on the folder's files in order gives the same masks.
- **Resume.** Before starting, ids already in the store are skipped. The launching process makes the plan
  (the remaining ids and their seeds, and a run id); inside the Trainer, rank 0 broadcasts its plan and run id
  to every rank before anything is written, so all ranks agree even when they start at different times.
- **Sharding across ranks.** Rank r of W takes ``plan[r::W]`` (no sampler padding, so no image is computed twice);
  the writer also drops any id it has already written or that was stored before the run.
- **Shards.** One per batch, written atomically (temp file + rename) by :meth:`TeacherMaskStore.write_shard`, named
  ``shard-<run-id>-r<rank>-<batch>.safetensors`` with ``<run-id>`` = ``YYYYmmddTHHMMSS-<6 hex>`` (UTC) and
  ``<batch>`` the rank's batch index on 6 digits. A killed run loses at most the batches in flight.

The manifest records everything that determines the masks (see :func:`build_manifest`); a run with other
settings into the same folder is refused.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, Callback
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..classifiers import Classifier, load_classifier
from ..data import ImageFolder
from ..errors import ConfigError, InputError
from ..images import list_images
from ..optimizer import CartoonX, OptimizerConfig
from ..wavelets import DEFAULT_LEVELS, DEFAULT_MODE, DEFAULT_WAVE
from .store import TeacherMaskStore

logger = logging.getLogger(__name__)

#: The :class:`OptimizerConfig` fields that determine the masks (recorded in the manifest). ``chunk_size`` is
#: left out on purpose: it only bounds memory, so a resumed run may change it.
RESULT_FIELDS = (
    "steps",
    "num_samples",
    "lr",
    "l1_lambda",
    "obfuscation",
    "distortion",
    "stop_patience",
    "stop_tolerance",
    "measure_samples",
    "seed",
)


# ---------------------------------------------------------------------------------------------------------
# Settings and plan (computed in the launching process)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TargetSettings:
    """Everything that determines the teacher masks of a folder.

    Attributes:
        classifier: the classifier spec (see :func:`~amortized_cartoonx.classifiers.load_classifier`).
        normalize: ``auto``, ``imagenet`` or ``none`` (the manifest records the resolved one).
        size: images are resized and centre-cropped to ``size x size``. Default 256 (the paper's).
        wave, levels, mode: the DWT (``levels`` is capped for small sizes; the manifest records the J used).
        config: the exact optimizer's hyper-parameters (the paper's by default).
    """

    classifier: str
    normalize: str = "auto"
    size: int = 256
    wave: str = DEFAULT_WAVE
    levels: int = DEFAULT_LEVELS
    mode: str = DEFAULT_MODE
    config: OptimizerConfig = field(default_factory=OptimizerConfig)

    def build_optimizer(self, classifier: Classifier) -> CartoonX:
        return CartoonX(classifier, wave=self.wave, levels=self.levels, mode=self.mode, config=self.config)


def build_manifest(settings: TargetSettings, optimizer: CartoonX, classifier: Classifier) -> dict:
    """The manifest of a teacher store: every setting that determines the masks, and the mask layout.

    Keys: ``kind``, ``method``, ``target`` (``predicted``: the classifier's predicted class), ``classifier``,
    ``normalize`` (resolved: ``imagenet`` or ``none``), ``size``, ``representation``, ``wave``, ``levels`` (the J
    used at this size), ``levels_requested``, ``mode``, ``mask_length`` (K), ``band_shapes`` (per band, low-pass
    first, its shape without N and C), ``seeding`` and the optimizer's :data:`RESULT_FIELDS` (``l1_lambda``
    resolved to the method's default when not given).
    """
    representation = optimizer.representation
    levels = representation.levels_for(settings.size, settings.size)  # InputError when the size is too small
    probe = torch.zeros(1, 3, settings.size, settings.size)
    mask = representation.encode(probe).mask_like()
    config = asdict(optimizer.config)
    return {
        "kind": "cartoonx-teacher-masks",
        "method": optimizer.method,
        "target": "predicted",
        "classifier": settings.classifier,
        "normalize": "none" if classifier.normalization is None else "imagenet",
        "size": settings.size,
        **representation.describe(),
        "levels": levels,
        "levels_requested": settings.levels,
        "mask_length": mask.numel_per_channel(),
        "band_shapes": [list(s) for s in mask.band_shapes()],
        "seeding": "seed + index of the image in the folder (files sorted by name)",
        **{name: config[name] for name in RESULT_FIELDS},
    }


@dataclass
class TargetPlan:
    """The images a run computes: ``ids`` (folder order) with their ``seeds``; ``total`` images in the folder,
    ``skipped`` already stored; ``run_id`` names this run's shards."""

    ids: list[str]
    seeds: list[int]
    total: int
    skipped: int
    run_id: str


def new_run_id() -> str:
    """``YYYYmmddTHHMMSS-<6 hex>`` (UTC): sorts by start time, unique across concurrent launches."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def plan_targets(images: str | Path, store: TeacherMaskStore, seed: int, limit: int | None = None) -> TargetPlan:
    """The images of folder ``images`` (the first ``limit`` by name, if given) not yet in ``store``; image k of
    the folder gets seed ``seed + k`` (so a limit does not change any image's mask)."""
    files = list_images(images)  # InputError when the folder is missing or has no images
    if limit is not None:
        files = files[:limit]
    done = set(store.ids())
    ids, seeds = [], []
    for k, path in enumerate(files):
        if path.name not in done:
            ids.append(path.name)
            seeds.append(seed + k)
    return TargetPlan(ids=ids, seeds=seeds, total=len(files), skipped=len(files) - len(ids), run_id=new_run_id())


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


class SeededImages(Dataset):
    """The images ``ids`` of folder ``root`` with their seeds: items ``{image (3, S, S), id, seed, error}``.

    A file that cannot be read gives a zero image and its one-line message in ``error``; the predict step
    raises it in the main process (so the message stays one line even with DataLoader workers).
    """

    def __init__(self, root: str | Path, size: int, ids: Sequence[str], seeds: Sequence[int]) -> None:
        self.folder = ImageFolder(root, size, labels=None, ids=list(ids))
        self.seeds = list(seeds)
        self.size = size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict:
        try:
            image, error = self.folder[index]["image"], ""
        except InputError as exc:
            image, error = torch.zeros(3, self.size, self.size), str(exc)
        return {"image": image, "id": self.folder.ids[index], "seed": self.seeds[index], "error": error}


class TargetDataModule(pl.LightningDataModule):
    """Serves the plan's images; rank r of W gets ``plan[r::W]`` (disjoint, no padding).

    In ``setup`` rank 0's plan is broadcast to every rank, so all ranks split the same list.
    """

    allow_zero_length_dataloader_with_multiple_devices = True

    def __init__(self, root: str | Path, size: int, plan: TargetPlan, batch_size: int, num_workers: int = 0):
        super().__init__()
        self.root, self.size, self.plan = Path(root), size, plan
        self.batch_size, self.num_workers = batch_size, num_workers

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            self.plan = self.trainer.strategy.broadcast(self.plan, src=0)

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        dataset = SeededImages(self.root, self.size, self.plan.ids[rank::world], self.plan.seeds[rank::world])
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


# ---------------------------------------------------------------------------------------------------------
# The predict module and the writer
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TeacherBatch:
    """One predict step's results: ``masks (n, K)`` flat, ``targets, loss, distortion, mask_mean (n,)``."""

    ids: list[str]
    seeds: list[int]
    masks: Tensor
    targets: Tensor
    loss: Tensor
    distortion: Tensor
    mask_mean: Tensor


class TeacherMaskModule(pl.LightningModule):
    """Runs the exact CartoonX optimizer on each predict batch. Holds no trainable parameter.

    The classifier is loaded from its spec in :meth:`setup`, in every process (TorchScript files cannot be
    pickled for ``ddp_spawn``), and is frozen by :func:`load_classifier`.

    Args:
        settings: the :class:`TargetSettings`.
        step_progress: show the optimizer's step bar on rank 0.
    """

    def __init__(self, settings: TargetSettings, step_progress: bool = True) -> None:
        super().__init__()
        self.settings = settings
        self.step_progress = step_progress
        self.classifier: Classifier | None = None
        self.explainer: CartoonX | None = None

    def setup(self, stage: str) -> None:
        if self.classifier is None:
            # load straight onto this process's device: TorchScript constants do not follow Module.to()
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            self.classifier = load_classifier(
                self.settings.classifier, normalize=self.settings.normalize, device=device
            )
            self.explainer = self.settings.build_optimizer(self.classifier)
        trainable = [name for name, p in self.named_parameters() if p.requires_grad]
        if trainable:  # load_classifier freezes; a trainable parameter would make DDP wrap the module
            raise ConfigError(f"the teacher module must hold no trainable parameter, found {trainable[:3]}")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> TeacherBatch:
        """``batch["image"]: (n, 3, S, S)`` -> the optimizer's masks and final numbers."""
        errors = [e for e in batch["error"] if e]
        if errors:
            raise InputError(errors[0])
        seeds = [int(s) for s in batch["seed"]]
        with torch.enable_grad():  # Trainer.predict runs under no_grad; the optimizer needs gradients
            explanation = self.explainer.explain(
                batch["image"], seeds=seeds, progress=self.step_progress and self.global_rank == 0
            )
        return TeacherBatch(
            ids=list(batch["id"]),
            seeds=seeds,
            masks=explanation.mask.flatten().detach(),  # (n, K)
            targets=explanation.target,
            loss=explanation.loss,
            distortion=explanation.distortion,
            mask_mean=explanation.mask_mean,
        )


class TeacherWriter(BasePredictionWriter):
    """Writes every predict batch as one shard ``shard-<run-id>-r<rank>-<batch:06d>`` of a teacher store.

    Drops ids that were stored before the run or that this rank already wrote in it, so an image is never
    stored twice. Rank 0 shows a progress bar in images (with images/s) over its share of the work.

    Args:
        folder: the store (its manifest must exist).
        run_id: this run's id; rank 0's is broadcast to every rank.
        progress: show the bar.
    """

    def __init__(self, folder: str | Path, run_id: str, progress: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.folder = Path(folder)
        self.run_id = run_id
        self.progress = progress
        self.written: set[str] = set()
        self.stored_before: set[str] = set()
        self.loss_sum = 0.0
        self.bar: tqdm | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            self.run_id = trainer.strategy.broadcast(self.run_id, src=0)
        self.store = TeacherMaskStore(self.folder)
        self.stored_before = set(self.store.ids())

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.progress and trainer.global_rank == 0:
            loaders = trainer.predict_dataloaders
            loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
            total = sum(len(dl.dataset) for dl in loaders)
            desc = "teacher masks" if trainer.world_size == 1 else f"teacher masks (rank 0 of {trainer.world_size})"
            self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: TeacherBatch,
        batch_indices: Sequence[int] | None,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        keep, seen = [], set()
        for i, image_id in enumerate(prediction.ids):
            if image_id not in self.written and image_id not in self.stored_before and image_id not in seen:
                keep.append(i)
                seen.add(image_id)
        if keep:
            rows = torch.tensor(keep, device=prediction.masks.device)
            self.store.write_shard(
                f"{self.run_id}-r{trainer.global_rank}-{batch_idx:06d}",
                [prediction.ids[i] for i in keep],
                prediction.masks.index_select(0, rows),
                prediction.targets.index_select(0, rows),
                prediction.loss.index_select(0, rows),
                prediction.distortion.index_select(0, rows),
                prediction.mask_mean.index_select(0, rows),
                seeds=[prediction.seeds[i] for i in keep],
            )
            self.written.update(prediction.ids[i] for i in keep)
            self.loss_sum += float(prediction.loss.index_select(0, rows).sum())
        if self.bar is not None:
            self.bar.update(len(prediction.ids))
            self.bar.set_postfix(loss=f"{self.loss_sum / max(1, len(self.written)):.4f}")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TargetsSummary:
    """What a run did: ``done`` images computed now, ``skipped`` already stored, of ``total`` in the folder.

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
            f"teacher masks: {self.done} done, {self.skipped} skipped, {self.total} in the folder; "
            f"{self.seconds:.1f} s, {self.images_per_second:.3f} images/s; mean loss {loss}; in {self.folder}/"
        )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")


def generate_targets(
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
) -> TargetsSummary:
    """Compute the exact CartoonX mask of every image of folder ``images`` not yet stored in ``out``.

    Args:
        images: a folder of images (its files directly inside, sorted by name; ids are the file names).
        out: the teacher store's folder (created; a folder made with other settings is refused).
        classifier, normalize, size, wave, levels, mode: see :class:`TargetSettings`.
        config: the optimizer's hyper-parameters; keyword ``overrides`` (e.g. ``steps=300``) apply on top.
        batch_size: images optimised together per device (one shard per batch).
        num_workers: DataLoader workers (image decoding is cheap next to the optimizer; 0 is fine).
        accelerator, devices, strategy, num_nodes: passed to :class:`pytorch_lightning.Trainer`.
        progress: progress bars (images with images/s, and the optimizer's steps) on rank 0.
        callbacks: extra Lightning callbacks (run after the writer).
        limit: only the first ``limit`` images of the folder (sorted by name); None (default): all. Training can
            use the whole folder: images without a teacher are trained with the RDE loss alone.

    Returns:
        a :class:`TargetsSummary`; on ranks other than 0 it covers nothing (``done`` 0).

    Raises:
        InputError: no images, an unreadable image, a size too small for the wavelet.
        ClassifierError: a classifier that cannot be loaded. ConfigError: bad settings, or ``out`` made with others.
    """
    _check_positive(size=size, batch_size=batch_size, num_nodes=num_nodes)
    if limit is not None:
        _check_positive(limit=limit)
    if num_workers < 0:
        raise ConfigError(f"num_workers must be at least 0, got {num_workers}")
    config = replace(config or OptimizerConfig(), **overrides).validate()
    settings = TargetSettings(classifier, normalize, size, wave, levels, mode, config)
    loaded = load_classifier(classifier, normalize=normalize)  # fails early and in one line on a bad spec
    optimizer = settings.build_optimizer(loaded)
    settings.config = optimizer.config  # l1_lambda resolved to the method's default
    manifest = build_manifest(settings, optimizer, loaded)
    store = TeacherMaskStore.create(out, manifest)
    settings.levels = manifest["levels"]  # the J used at this size (the cap was already reported)
    del optimizer, loaded
    plan = plan_targets(images, store, config.seed, limit)
    if not plan.ids:
        logger.info("all %d images of %s are already in %s; nothing to do", plan.total, images, out)
        return TargetsSummary(Path(out), plan.total, 0, plan.skipped, 0.0, None)
    removed = store.remove_temporary()  # no writer runs yet: any temp file is from a killed run
    if removed:
        logger.info("removed %d unfinished shard file(s) of an earlier run", removed)
    if plan.skipped:
        logger.info("resuming: %d of %d images are already stored, %d to go", plan.skipped, plan.total, len(plan.ids))

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
        use_distributed_sampler=False,  # TargetDataModule splits the plan itself, without padding
        default_root_dir=str(out),
        callbacks=[TeacherWriter(out, plan.run_id, progress=progress), *callbacks],
    )
    module = TeacherMaskModule(settings, step_progress=progress)
    data = TargetDataModule(images, size, plan, batch_size, num_workers)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        try:
            trainer.predict(module, datamodule=data, return_predictions=False)
        except SystemExit:  # Lightning turns Ctrl+C into exit(1) after a graceful stop: report an interrupt
            if trainer.interrupted:
                raise KeyboardInterrupt from None
            raise
    trainer.strategy.barrier("cartoonx-targets-end")  # every rank's shards are written before the summary
    seconds = time.perf_counter() - start
    if trainer.global_rank != 0:
        return TargetsSummary(Path(out), plan.total, 0, plan.skipped, seconds, None, rank=trainer.global_rank)

    store = TeacherMaskStore(out)
    losses = [store.get(i).loss for i in plan.ids if i in store]
    missing = len(plan.ids) - len(losses)
    if missing:
        logger.warning("%d planned images are not in %s after the run; run the command again", missing, out)
    mean_loss = math.fsum(losses) / len(losses) if losses else None
    return TargetsSummary(Path(out), plan.total, len(losses), plan.skipped, seconds, mean_loss)
