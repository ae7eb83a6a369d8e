"""The Lightning side of teacher-mask generation: what ``Trainer.predict`` runs.

* :class:`SeededImages` and :class:`TeacherMaskDataModule` -- the plan's images with their seeds; rank r of W
  gets ``plan[r::W]`` (no sampler padding, so no image is computed twice);
* :class:`TeacherMaskModule` -- runs the exact CartoonX optimizer on each predict batch;
* :class:`TeacherWriter` -- writes each batch's masks as one shard of a
  :class:`~amortized_cartoonx.teacher_masks.store.TeacherMaskStore` as soon as the batch is done.

Rank 0's plan and run id are broadcast to every rank before anything is written, so all ranks agree even when
they start at different times. Each image carries its own seed (``item_seed(file name, seed)``, see
:mod:`.plan`), so which rank or batch computes it never changes its mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..classifiers import Classifier, input_channels
from ..data import ImageFolder
from ..errors import ConfigError, InputError, one_line
from ..images import to_channels
from ..io import file_sha256
from ..optimizer import CartoonX
from .plan import TeacherMaskPlan, TeacherMaskSettings
from .store import TeacherMaskStore


class SeededImages(Dataset):
    """The images ``ids`` of folder ``root`` with their seeds: items ``{image (3, S, S), id, seed, error, sha256}``
    (``sha256``: the file's digest).

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
        image_id = self.folder.ids[index]
        try:
            image, error = self.folder[index]["image"], ""
            content = file_sha256(self.folder.files[index])  # stored with the mask: a resume checks it
        except (InputError, OSError) as exc:
            image, error, content = torch.zeros(3, self.size, self.size), one_line(exc), ""
        return {"image": image, "id": image_id, "seed": self.seeds[index], "error": error, "sha256": content}


class TeacherMaskDataModule(pl.LightningDataModule):
    """Serves the plan's images; rank r of W gets ``plan[r::W]`` (disjoint, no padding).

    In ``setup`` rank 0's plan is broadcast to every rank, so all ranks split the same list.
    """

    def __init__(self, root: str | Path, size: int, plan: TeacherMaskPlan, batch_size: int, num_workers: int = 0):
        super().__init__()
        # a rank may get no image (fewer left than ranks): it idles. Set after DataHooks.__init__, which sets it
        # False on the instance (a class attribute was overridden: that rank raised and the others lost it)
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.root, self.size, self.plan = Path(root), size, plan
        self.batch_size, self.num_workers = batch_size, num_workers

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            self.plan = self.trainer.strategy.broadcast(self.plan, src=0)

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        dataset = SeededImages(self.root, self.size, self.plan.ids[rank::world], self.plan.seeds[rank::world])
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


@dataclass
class TeacherBatch:
    """One predict step's results: ``masks (n, K)`` flat, ``targets, loss, distortion, mask_mean (n,)``."""

    ids: list[str]
    seeds: list[int]
    contents: list[str]
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
        settings: the :class:`TeacherMaskSettings`.
        step_progress: show the optimizer's step bar on rank 0.
    """

    def __init__(self, settings: TeacherMaskSettings, step_progress: bool = True) -> None:
        super().__init__()
        self.settings = settings
        self.step_progress = step_progress
        self.classifier: Classifier | None = None
        self.explainer: CartoonX | None = None
        self.channels = 3  # the classifier's colour channels (setup: 1 for a single-channel classifier)

    def setup(self, stage: str) -> None:
        if self.classifier is None:
            # load straight onto this process's device: TorchScript constants do not follow Module.to()
            device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            self.classifier = self.settings.load_classifier(device)
            self.explainer = self.settings.build_optimizer(self.classifier)
            self.channels = input_channels(self.classifier, self.settings.size, device)
        trainable = [name for name, p in self.named_parameters() if p.requires_grad]
        if trainable:  # load_classifier freezes; a trainable parameter would make DDP wrap the module
            raise ConfigError(f"the teacher module must hold no trainable parameter, found {trainable[:3]}")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> TeacherBatch:
        """``batch["image"]: (n, 3, S, S)`` -> the optimizer's masks and final numbers (a single-channel
        classifier's on the images' luma)."""
        errors = [e for e in batch["error"] if e]
        if errors:
            raise InputError(errors[0])
        seeds = [int(s) for s in batch["seed"]]
        with torch.enable_grad():  # Trainer.predict runs under no_grad; the optimizer needs gradients
            explanation = self.explainer.explain(
                to_channels(batch["image"], self.channels),
                seeds=seeds,
                progress=self.step_progress and self.global_rank == 0,
            )
        return TeacherBatch(
            ids=list(batch["id"]),
            seeds=seeds,
            contents=list(batch["sha256"]),
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
                contents=[prediction.contents[i] for i in keep],
                device_type=prediction.masks.device.type,
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
