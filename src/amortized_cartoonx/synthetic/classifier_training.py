"""Train the synthetic benchmark's classifier with PyTorch Lightning (imported inside the functions only).

Python API (the CLI ``cartoonx train-classifier`` and the demo call it)::

    from amortized_cartoonx.synthetic.classifier_training import TrainConfig, ensure_synthetic_classifier
    result = ensure_synthetic_classifier("checkpoints/synthetic", TrainConfig())   # trains only when missing
    result.accuracy, result.reused, result.weights

The training set is ``train_size`` items of the ``train`` split (seed ``seed``), generated once and kept in
memory as uint8 (``train_size * 3 * size**2`` bytes: 74 MB for the defaults), with label-preserving random
flips and quarter turns (every class is closed under them). The held-out accuracy is measured on the fixed
``test`` split, seed :data:`HELD_OUT_SEED`, items ``0 .. held_out - 1``: the same images
:func:`~amortized_cartoonx.synthetic.export.write_synthetic_folder` exports by default, never seen in training.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..runtime import single_thread, torch_threads
from .classifier import CartoonCNN, CNNConfig, read_metadata, resolve_paths, save_synthetic_classifier
from .dataset import HELD_OUT_SEED, CartoonConfig, SyntheticCartoons

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``cartoonx train-classifier`` (defaults sized for a CPU; see ``docs/synthetic.md``).

    Attributes:
        size: image side in pixels.
        train_size: training images (``train`` split), generated once.
        epochs: passes over the training images (ignored when ``max_steps`` is set).
        max_steps: optimiser steps; None: ``epochs`` passes.
        batch_size: images per step.
        lr: peak learning rate of AdamW (one-cycle schedule).
        weight_decay: AdamW weight decay.
        augment: random flips and quarter turns of the training images.
        val_size: ``val`` split images checked after every epoch (progress only).
        held_out: ``test`` split images for the final accuracy (seed :data:`HELD_OUT_SEED`).
        seed: the training data's and the initialisation's seed.
        widths: the CNN's stage widths (see :class:`~.classifier.CNNConfig`).
    """

    size: int = 64
    train_size: int = 6000
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 5e-4
    augment: bool = True
    val_size: int = 500
    held_out: int = 2000
    seed: int = 0
    widths: tuple[int, ...] = CNNConfig.widths

    def validate(self) -> TrainConfig:
        positive = {"size": self.size, "train_size": self.train_size, "batch_size": self.batch_size}
        positive |= {"epochs": self.epochs, "held_out": self.held_out}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.size < 16:
            raise ConfigError(f"the synthetic images need a size of at least 16 px, got {self.size}")
        if self.lr <= 0 or self.weight_decay < 0 or self.val_size < 0:
            raise ConfigError("lr must be positive; weight_decay and val_size non-negative")
        return self

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * math.ceil(self.train_size / self.batch_size)

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}


@dataclass
class TrainResult:
    """What :func:`train_synthetic_classifier` did: paths, held-out accuracy, seconds, whether it reused files."""

    weights: Path
    metadata: Path
    accuracy: float
    seconds: float
    reused: bool


def materialize(dataset: SyntheticCartoons, progress: bool = True, desc: str = "generate") -> Dataset:
    """Render every item once into memory: a dataset of ``{image: (3, S, S) uint8, label}`` dicts."""
    from tqdm.auto import tqdm

    n, s = len(dataset), dataset.size
    images = torch.empty(n, 3, s, s, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    with single_thread():
        for i in tqdm(range(n), desc=desc, unit="img", disable=not progress, leave=False):
            item = dataset[i]
            images[i] = (item["image"] * 255).round().to(torch.uint8)  # what a PNG export holds
            labels[i] = item["label"]
    return _Cached(images, labels)


class _Cached(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


def to_float(images: Tensor) -> Tensor:
    """uint8 ``(N, 3, S, S)`` -> float32 in [0, 1] (float input passes through)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


def augment_batch(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random per-image horizontal flips and one random quarter turn per batch: ``(N, C, S, S)``, same labels."""
    flip = torch.rand(images.shape[0], generator=generator, device="cpu").to(images.device) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    turns = int(torch.randint(4, (), generator=generator))
    return torch.rot90(images, turns, dims=(-2, -1))


def _lightning_module(model: CartoonCNN, config: TrainConfig):
    import pytorch_lightning as pl

    class ClassifierModule(pl.LightningModule):
        """Cross-entropy training of a :class:`CartoonCNN`; one shared step for train and validation."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def step(self, batch: dict, stage: str) -> Tensor:
            images = to_float(batch["image"])
            if stage == "train" and config.augment:
                images = augment_batch(images)
            logits = self.model(images)
            loss = F.cross_entropy(logits, batch["label"])
            acc = (logits.argmax(1) == batch["label"]).float().mean()
            self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=len(images))
            self.log(f"{stage}/acc", acc, prog_bar=True, batch_size=len(images))
            return loss

        def training_step(self, batch: dict, batch_idx: int) -> Tensor:
            return self.step(batch, "train")

        def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
            return self.step(batch, "val")

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.total_steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return ClassifierModule()


def fit_classifier(
    config: TrainConfig,
    model: CartoonCNN | None = None,
    *,
    accelerator: str = "cpu",
    progress: bool = True,
    trainer_kwargs: dict | None = None,
) -> CartoonCNN:
    """Train a :class:`CartoonCNN` on the ``train`` split and return it (on the CPU, eval mode).

    Args:
        config: the settings.
        model: the network to train (in place); None: a fresh one seeded by ``config.seed``.
        accelerator: Lightning's accelerator (``cpu``, ``gpu``, ``mps``, ``auto``).
        progress: show progress bars.
        trainer_kwargs: extra ``pl.Trainer`` arguments (tests shrink the run with them).
    """
    import pytorch_lightning as pl

    config.validate()
    pl.seed_everything(config.seed, verbose=False)
    data = CartoonConfig(size=config.size)
    train = materialize(SyntheticCartoons(config.train_size, seed=config.seed, split="train", config=data), progress)
    loaders = {"train_dataloaders": DataLoader(train, batch_size=config.batch_size, shuffle=True, drop_last=True)}
    if config.val_size:
        val = materialize(SyntheticCartoons(config.val_size, seed=config.seed, split="val", config=data), progress)
        loaders["val_dataloaders"] = DataLoader(val, batch_size=256)
    if model is None:
        model = CartoonCNN(CNNConfig(num_classes=len(data.classes), widths=config.widths))
    kwargs = {
        "accelerator": accelerator,
        "devices": 1,
        "max_steps": config.total_steps,
        "max_epochs": -1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": progress,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **(trainer_kwargs or {}),
    }
    trainer = pl.Trainer(**kwargs)
    with warnings.catch_warnings():  # Lightning's own noise: no validation set asked for, an internal deprecation
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(_lightning_module(model, config), **loaders)
    return model.cpu().eval()


def held_out_accuracy(model: torch.nn.Module, config: TrainConfig, progress: bool = True) -> float:
    """Accuracy on the fixed held-out images (``test`` split, seed :data:`HELD_OUT_SEED`)."""
    from .classifier import accuracy

    data = CartoonConfig(size=config.size)
    test = SyntheticCartoons(config.held_out, seed=HELD_OUT_SEED, split="test", config=data)
    cached = materialize(test, progress, desc="held-out images")
    return accuracy(model, _FloatView(cached))


class _FloatView(Dataset):
    def __init__(self, cached: _Cached) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> dict:
        item = self.cached[index]
        return {"image": to_float(item["image"]), "label": item["label"]}


def _comparable(config: TrainConfig) -> dict:
    return config.to_dict()


class ClassifierExistsError(ConfigError):
    """A classifier trained with other settings (``changed``: their names) exists at ``weights``; the message
    ends with ``way_out``: Python's ``force=True`` by default, a command's own option where a command re-raises
    it (``cartoonx train-classifier --force``, ``cartoonx demo --classifier-dir``)."""

    def __init__(
        self, weights: Path, changed: list[str], way_out: str = "pass force=True to retrain, or choose another folder"
    ) -> None:
        self.weights = weights
        self.changed = changed
        super().__init__(
            f"a classifier trained with other settings ({', '.join(changed)}) exists at {weights}; {way_out}"
        )


def train_synthetic_classifier(
    out: str | Path | None = None,
    config: TrainConfig | None = None,
    *,
    force: bool = False,
    accelerator: str = "cpu",
    progress: bool = True,
    threads: int | None = 1,
    trainer_kwargs: dict | None = None,
) -> TrainResult:
    """Train, measure on the held-out images and save the classifier; or reuse an existing one.

    Args:
        out: the output folder (or ``.safetensors`` path); None: ``checkpoints/synthetic/``.
        config: training settings (default :class:`TrainConfig`).
        force: retrain even when a classifier exists.
        accelerator, progress, trainer_kwargs: see :func:`fit_classifier`.
        threads: torch CPU threads while training (restored afterwards); None keeps torch's setting. The
            default, 1, suits the tiny network, whose small kernels gain nothing from more CPU threads.

    Raises:
        ClassifierExistsError: a classifier exists at ``out`` but was trained with other settings (and not ``force``).
    """
    config = (config or TrainConfig()).validate()
    weights, meta_path = resolve_paths(out)
    if not force and weights.is_file() and meta_path.is_file():
        record = read_metadata(out)
        training = record.get("training", {})
        old = training.get("config", {})
        diff = sorted(k for k in set(old) | set(_comparable(config)) if old.get(k) != _comparable(config).get(k))
        # the float sums' order, hence the weights, depend on the thread count and the device too
        run = {"threads": torch.get_num_threads() if threads is None else threads, "accelerator": accelerator}
        diff += [k for k, v in run.items() if k in training and training[k] != v]
        if diff:
            raise ClassifierExistsError(weights, diff)
        acc = float(record.get("held_out", {}).get("accuracy", float("nan")))
        log.debug("reusing the synthetic classifier at %s (held-out accuracy %.4f)", weights, acc)
        return TrainResult(weights, meta_path, acc, 0.0, reused=True)

    start = time.perf_counter()
    with torch_threads(threads):
        model = fit_classifier(config, accelerator=accelerator, progress=progress, trainer_kwargs=trainer_kwargs)
        train_seconds = time.perf_counter() - start
        acc = held_out_accuracy(model, config, progress)
        used_threads = torch.get_num_threads()
    seconds = time.perf_counter() - start
    data = CartoonConfig(size=config.size)
    metadata = {
        "classes": list(data.classes),
        "dataset": data.to_dict(),
        "training": {
            "config": _comparable(config),
            "seconds": round(train_seconds, 1),
            "threads": used_threads,
            "accelerator": accelerator,
        },
        "held_out": {"split": "test", "seed": HELD_OUT_SEED, "num_images": config.held_out, "accuracy": acc},
    }
    weights, meta_path = save_synthetic_classifier(model, out, metadata)
    log.debug("held-out accuracy %.4f on %d images; saved %s (%.0f s)", acc, config.held_out, weights, seconds)
    return TrainResult(weights, meta_path, acc, seconds, reused=False)


def ensure_synthetic_classifier(
    out: str | Path | None = None, config: TrainConfig | None = None, **kwargs
) -> TrainResult:
    """:func:`train_synthetic_classifier` without ``force``: train only when no classifier exists at ``out``."""
    return train_synthetic_classifier(out, config, force=False, **kwargs)
