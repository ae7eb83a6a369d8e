"""What the amortized explainer trains on, batch by batch: augmented views of folder images, the order of an
epoch, and an endless stream of fresh synthetic images mixed with the folder's (teacher-masked) images.

Everything here is a function of seeds, image ids and positions, never of a global random state, the number of
data-loading workers or the order of access (the seeding table's rules, :mod:`amortized_cartoonx.seeding`):

* **Augmentation** (:class:`AugmentConfig`): the view of image ``id`` in epoch ``e`` is drawn from the generator
  of ``derive_seed(seed, Stream.AUGMENT, e, item_seed(id))``: a random resized crop of the whole image (area share
  in ``scale``, aspect ratio in ``ratio``), resized to S x S, then a horizontal flip with probability 1/2. Images
  with a teacher mask are never augmented (the teacher mask explains the unaugmented image); validation and test
  images never are.
* **Order** (:func:`epoch_order`): epoch ``e`` visits the N training images in the permutation drawn from
  ``derive_seed(seed, Stream.TRAIN_ORDER, e)``. :class:`FolderViews` hands out ``(index, epoch)`` keys in that
  order, each rank of a DDP run its own share. A pass over the training loader starts where the optimizer steps
  taken say (``position``): a run resumed from a checkpoint written inside an epoch trains on the rest of that
  epoch, in its order, as the uninterrupted run did.
* **Stream** (:class:`TrainingStream`): every training batch holds ``Bf`` folder draws and ``Bs`` stream items.
  Batch ``t`` of rank ``r`` among ``R`` holds the folder draws ``p = (t Bf + i) R + r`` and the stream items
  ``k = (t Bs + i) R + r`` (``i < Bf``, resp. ``i < Bs``); folder draw ``p`` is image
  ``epoch_order(N, seed, p // N)[p % N]`` in its view of epoch ``p // N``, and stream item ``k`` is item ``k`` of
  :class:`~amortized_cartoonx.synthetic.dataset.SyntheticStream`. So a batch is a function of (seeds, step, rank,
  number of ranks) alone, the ranks' items are disjoint and together are the single-rank stream, and data-loading
  worker ``w`` of ``W`` makes the batches ``t = start + w + m W``, which the DataLoader hands out in step order.
  :class:`StreamLoader` starts every pass at the batches already trained, counted from the optimizer steps
  (Lightning's global step, or the checkpoint's data-module state while Lightning has not yet restored it) as
  Lightning steps: every ``accumulate_grad_batches`` batches and on the last batch of an epoch (epochs of
  ``limit_train_batches`` batches when that is a number): a resumed run, or a new epoch under
  ``limit_train_batches``, continues the stream without a gap. A checkpoint saved between two optimizer steps goes
  on after the last step (as its weights do), so the batches since are trained again; no batch is trained twice
  within a pass.

Shapes: S the image side; images ``(3, S, S)`` float32 in [0, 1].
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data.distributed import DistributedSampler

from ..errors import ConfigError
from ..seeding import Stream, derive_seed, item_seed
from ..synthetic.dataset import CartoonConfig, SyntheticStream

if TYPE_CHECKING:
    from .data import TrainingImages

#: Tries of a random crop box before the central crop is taken (as torchvision's ``RandomResizedCrop``).
CROP_TRIES = 10


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AugmentConfig:
    """Training views of folder images: a random resized crop, then a horizontal flip (``data.augment``).

    Images with a teacher mask are never augmented; validation and test images never are.

    Attributes:
        scale: range of the crop's area as a share of the whole image. Default (0.5, 1).
        ratio: range of the crop's aspect ratio (width / height), drawn log-uniformly; the crop is resized to
            S x S. Default (3/4, 4/3).
        flip: flip horizontally with probability 1/2. Default True.
    """

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def validate(self) -> AugmentConfig:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"augment.scale must satisfy 0 < low <= high <= 1, got {list(self.scale)}")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"augment.ratio must satisfy 0 < low <= high, got {list(self.ratio)}")
        return self

    def to_dict(self) -> dict:
        """Plain values (lists, not tuples): the data module's saved hyper-parameters and ``config.yaml``."""
        return {"scale": list(self.scale), "ratio": list(self.ratio), "flip": bool(self.flip)}


@dataclass(frozen=True)
class StreamConfig:
    """Fresh procedural training images of the synthetic benchmark, mixed into every training batch
    (``data.stream``).

    They carry no teacher mask, so they train with the RDE loss alone; the class to explain is the scene's
    label with ``target_source: label``, else the classifier's prediction.

    Attributes:
        fraction: share of every training batch taken from the stream, rounded to whole images (at least one);
            the rest comes from the folder's training split, teacher masks included. 1: the folder only
            validates. Default 0.5.
        seed: the stream's seed (item ``k`` of the stream is a function of ``(seed, k)`` alone). Default 0.
        scenes: how scenes are drawn (:class:`~amortized_cartoonx.synthetic.dataset.CartoonConfig`); their
            ``size`` is ``data.image_size``.
    """

    fraction: float = 0.5
    seed: int = 0
    scenes: CartoonConfig = field(default_factory=CartoonConfig)

    def validate(self) -> StreamConfig:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"stream.fraction must be in (0, 1], got {self.fraction}")
        self.scenes.validate()
        return self

    def count(self, batch_size: int) -> int:
        """Stream images per training batch of ``batch_size``.

        Raises:
            ConfigError: the fraction rounds to no image.
        """
        count = min(batch_size, round(self.fraction * batch_size))
        if count < 1:
            raise ConfigError(
                f"stream.fraction {self.fraction} of batch_size {batch_size} rounds to no stream image; "
                "raise one of them"
            )
        return count

    def to_dict(self) -> dict:
        """Plain values: the data module's saved hyper-parameters and ``config.yaml``."""
        return {"fraction": float(self.fraction), "seed": int(self.seed), "scenes": self.scenes.to_dict()}


def _option_fields(given: object, kind: type, name: str) -> dict | None:
    """The fields of option ``name`` given as a dict (saved hyper-parameters), checked against dataclass ``kind``;
    None when ``given`` is None or already a ``kind``."""
    if given is None or isinstance(given, kind):
        return None
    if not isinstance(given, dict):
        raise ConfigError(
            f"{name} must be a{'n' if kind.__name__[0] in 'AEIOU' else ''} {kind.__name__}, a dict of its fields "
            f"or null, got {type(given).__name__}"
        )
    unknown = sorted(set(given) - set(kind.__dataclass_fields__))
    if unknown:
        raise ConfigError(
            f"unknown {name} settings: {', '.join(unknown)}; known: {', '.join(kind.__dataclass_fields__)}"
        )
    return dict(given)


def augment_config(given: AugmentConfig | dict | None) -> AugmentConfig | None:
    """The ``augment`` option as a checked config (a dict of its fields is accepted: saved hyper-parameters)."""
    values = _option_fields(given, AugmentConfig, "augment")
    if values is None:
        return given.validate() if given is not None else None
    return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}).validate()


def stream_config(given: StreamConfig | dict | None) -> StreamConfig | None:
    """The ``stream`` option as a checked config (a dict of its fields is accepted: saved hyper-parameters)."""
    values = _option_fields(given, StreamConfig, "stream")
    if values is None:
        return given.validate() if given is not None else None
    scenes = values.get("scenes")
    if isinstance(scenes, dict):
        values["scenes"] = CartoonConfig.from_dict(scenes)
    elif scenes is None:
        values.pop("scenes", None)
    return StreamConfig(**values).validate()


# --------------------------------------------------------------------------------------------- augmentation


def view_generator(seed: int, epoch: int, image_id: str) -> torch.Generator:
    """The generator of image ``image_id``'s view in ``epoch`` (:data:`~amortized_cartoonx.seeding.Stream.AUGMENT`)."""
    return torch.Generator().manual_seed(derive_seed(seed, int(Stream.AUGMENT), epoch, item_seed(image_id)))


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    """A random crop box ``(top, left, h, w)`` of a ``height x width`` image: area share in ``scale``, aspect
    ratio (w / h) log-uniform in ``ratio``; after :data:`CROP_TRIES` boxes that do not fit, the largest central
    box with a ratio in range (torchvision's ``RandomResizedCrop`` rule, drawn from ``gen``)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_TRIES):
        target = area * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, *log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_image(image: Tensor, size: int, config: AugmentConfig, gen: torch.Generator) -> Tensor:
    """``(3, H, W)`` (the whole image) -> ``(3, size, size)``: a random resized crop (:func:`crop_box`, resized
    with antialiased bilinear interpolation), then a horizontal flip with probability 1/2 when ``config.flip``."""
    top, left, h, w = crop_box(image.shape[1], image.shape[2], config.scale, config.ratio, gen)
    crop = image[:, top : top + h, left : left + w]
    if (h, w) != (size, size):
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    flip = config.flip and bool(torch.rand((), generator=gen) < 0.5)
    if flip:
        crop = crop.flip(-1)
    return crop.clamp(0.0, 1.0).contiguous()


# --------------------------------------------------------------------------------------------- order


def epoch_order(num_images: int, seed: int, epoch: int) -> list[int]:
    """The training images' order in ``epoch``: a permutation of ``range(num_images)`` from
    :data:`~amortized_cartoonx.seeding.Stream.TRAIN_ORDER`."""
    gen = torch.Generator().manual_seed(derive_seed(seed, int(Stream.TRAIN_ORDER), epoch))
    return torch.randperm(num_images, generator=gen).tolist()


class FolderViews(DistributedSampler):
    """The training images of an epoch as ``(index, epoch)`` keys of :class:`~.data.TrainingImages` (the epoch
    selects the augmented view), in :func:`epoch_order`.

    Rank ``r`` of ``R`` gets every R-th key from position ``r`` (the order padded from its start to a multiple
    of R, as ``DistributedSampler`` does). A ``DistributedSampler``, so Lightning neither replaces it under DDP
    nor forgets to call :meth:`set_epoch`; the keys are made in the main process, so data-loading workers
    (persistent or not) do not change them.

    Without ``position`` a pass hands out the whole epoch set by :meth:`set_epoch`. With it, each pass asks it
    where to start: ``(epoch, batch)`` hands out that epoch's keys from batch ``batch`` on (``batch_size`` keys a
    batch), so a resumed run goes on inside the epoch it was interrupted in; None falls back to the set epoch.

    Args:
        dataset: the training images.
        seed: the order's seed (``data.train_seed``).
        rank, world_size: this process's rank and the number of ranks.
        batch_size: keys per batch (the loader's batch size; used with ``position`` only).
        position: called at the start of every pass; see above.
    """

    def __init__(
        self,
        dataset: TrainingImages,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        position: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.position = position

    def epoch_keys(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's keys of ``epoch``, in order."""
        count = len(self.dataset)
        order = epoch_order(count, self.seed, epoch)
        padding = self.total_size - count
        order += (order * math.ceil(padding / count))[:padding] if padding > 0 else []
        return [(index, epoch) for index in order[self.rank : self.total_size : self.num_replicas]]

    def __iter__(self):
        where = self.position() if self.position is not None else None
        if where is None:
            return iter(self.epoch_keys(self.epoch))
        self.epoch, batch = where
        return iter(self.epoch_keys(self.epoch)[batch * self.batch_size :])


# --------------------------------------------------------------------------------------------- stream


class TrainingStream(IterableDataset):
    """Endless training items: every batch ``folder_count`` draws of the training folder (augmented views, teacher
    masks included) and ``stream_count`` fresh synthetic images, sharded by rank and data-loading worker.

    The items are :class:`~.data.TrainingImages` items (the same keys, so they share a batch) plus
    ``from_stream`` (True for the fresh images); stream images have no teacher mask. Read it with a DataLoader of
    ``batch_size`` (:class:`StreamLoader`): batch ``t`` of this rank is :meth:`batch` ``(t)`` (see the module's
    docstring for which draws that is).

    Args:
        folder: the training images (may be empty when ``stream_count == batch_size``).
        scenes: the stream of fresh images.
        batch_size: images per batch (per rank).
        stream_count: stream images per batch, 1 to ``batch_size``.
        seed: the folder order's and augmentation's seed (``data.train_seed``).
        rank, world_size: this process's rank and the number of ranks.
        start: the first batch (``StreamLoader`` sets it to the batches already trained).
    """

    def __init__(
        self,
        folder: TrainingImages,
        scenes: SyntheticStream,
        batch_size: int,
        stream_count: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        if not 1 <= stream_count <= batch_size:
            raise ConfigError(f"stream images per batch must be 1 to {batch_size}, got {stream_count}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not one of {world_size} ranks")
        if stream_count < batch_size and len(folder) == 0:
            raise ConfigError("the training folder is empty: take every training image from the stream (fraction 1)")
        self.folder = folder
        self.scenes = scenes
        self.batch_size = batch_size
        self.stream_count = stream_count
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self._order: tuple[int, list[int]] | None = None  # (epoch, order): the last epoch's order

    @property
    def folder_count(self) -> int:
        return self.batch_size - self.stream_count

    def order(self, epoch: int) -> list[int]:
        """:func:`epoch_order` of the folder (the last epoch's is kept)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.folder), self.seed, epoch))
        return self._order[1]

    def folder_draw(self, draw: int) -> dict:
        """Folder draw ``draw``: image ``order(epoch)[draw % N]`` in its view of epoch ``draw // N``."""
        epoch, position = divmod(draw, len(self.folder))
        return self.folder.view(self.order(epoch)[position], epoch) | {"from_stream": False}

    def stream_item(self, index: int) -> dict:
        """Stream item ``index`` as a training item (no teacher mask; target as ``target_source`` says)."""
        item = self.scenes[index]
        return self.folder.training_item(item["image"], item["id"], item["label"]) | {"from_stream": True}

    def batch(self, step: int) -> list[dict]:
        """This rank's items of batch ``step``: its folder draws, then its stream items."""
        ranks, rank = self.world_size, self.rank
        folder = [self.folder_draw((step * self.folder_count + i) * ranks + rank) for i in range(self.folder_count)]
        stream = [self.stream_item((step * self.stream_count + i) * ranks + rank) for i in range(self.stream_count)]
        return folder + stream

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in itertools.count(self.start + worker, workers):
            yield from self.batch(step)


class StreamLoader(DataLoader):
    """A DataLoader of :class:`TrainingStream` batches that starts every pass at ``position()`` (the batches
    already trained), so a resumed run and a new epoch continue the stream instead of repeating it.

    Its workers are never persistent: each pass gives them the dataset with its new start.

    Args:
        dataset: the stream.
        position: the first batch of a new pass (the data module passes Lightning's global step times the
            gradient accumulation).
        num_workers: data-loading workers (worker w makes every W-th batch; the order is the same for any W).
    """

    def __init__(self, dataset: TrainingStream, position: Callable[[], int] = lambda: 0, num_workers: int = 0) -> None:
        super().__init__(dataset, batch_size=dataset.batch_size, num_workers=num_workers, persistent_workers=False)
        self.position = position

    def __iter__(self):
        self.dataset.start = int(self.position())
        return super().__iter__()
