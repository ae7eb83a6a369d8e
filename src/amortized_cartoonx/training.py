"""Training the amortized explainer with PyTorch Lightning: the LightningModule and the LightningDataModule.

The module trains a :class:`~amortized_cartoonx.mask_predictor.MaskPredictor` against a frozen classifier with
exactly the exact optimizer's objective, :class:`~amortized_cartoonx.rde.RDEObjective` (same obfuscation,
distortion and lambda, the same code), averaged over the batch::

    loss = mean_n [ mean_l d(p(x_n), p(y_nl)) + lambda * mean(s_n) ]  +  w * mean_{n with teacher} distill(s_n, s*_n)

where ``s_n`` is the predicted mask of image n for its target class, ``y_nl`` its L obfuscations, and the optional
distillation term pulls ``s_n`` towards the exact optimizer's teacher mask ``s*_n`` (from ``cartoonx targets``)
where one exists for that image and class. Noise is drawn per image from seeded generators (seed, split, step,
image id), so a run is reproducible and a validation image always sees the same noise.

The data module reads an image folder (optional ``labels.csv``), joins teacher masks by image id and splits the
folder deterministically into train / validation / test (held out: never trained on, never used to pick the
checkpoint) with :func:`~amortized_cartoonx.data.split_train_val_test`.

Checkpoints hold only the explainer's weights (the classifier is reloaded from its spec) and a plain
``checkpoint["cartoonx"]`` dict with every setting the explainer depends on (see :func:`checkpoint_metadata`);
``torch.load(path, weights_only=True)`` reads them, and :class:`~amortized_cartoonx.amortized.AmortizedExplainer`
loads them without Lightning.

Shapes: N images per batch, L noise samples, K mask entries per image.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KIND, META_KEY, NETWORK_KEY, STATE_PREFIX
from .classifiers import classifier_identity, load_classifier, same_classifier
from .data import ImageFolder, split_train_val_test
from .errors import ConfigError, InputError
from .evaluation.agreement import mask_agreement
from .mask_predictor import MaskPredictor, MaskPredictorConfig, describe_size
from .rde import DISTORTIONS, OBFUSCATIONS, RDEObjective, make_generators
from .seeding import Stream, step_seeds
from .teacher_masks.store import TeacherMaskStore
from .wavelets import Coefficients, WaveletRepresentation, grey

logger = logging.getLogger(__name__)

#: ``distill(logits (N, K), teacher (N, K) in [0, 1]) -> (N,)``: how far the predicted mask is from the teacher's.
DISTILL_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "bce": lambda logits, teacher: F.binary_cross_entropy_with_logits(logits, teacher, reduction="none").mean(1),
    "l1": lambda logits, teacher: (logits.sigmoid() - teacher).abs().mean(1),
}
TARGET_SOURCES = ("auto", "predicted", "label")
_NOISE_STREAMS = {"train": Stream.TRAIN_NOISE, "val": Stream.VAL_NOISE, "test": Stream.TEST_NOISE}


def noise_seeds(base: int, stage: str, step: int, ids: list[str]) -> list[int]:
    """Per-image noise seeds for one batch: a function of (base seed, stage, step, image id) only."""
    return step_seeds(base, _NOISE_STREAMS[stage], step, ids)


def l1_ramp(step: int, warmup: int) -> float:
    """Fraction of ``l1_lambda`` in the training loss at ``step``: linear from 0 to 1 over ``warmup`` steps."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning-rate factor: linear warm-up over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if not math.isfinite(total) or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------------------


class AmortizedCartoonXModule(pl.LightningModule):
    """Train the mask predictor with the RDE loss (+ optional distillation to teacher masks).

    Args:
        classifier: the classifier spec (see :func:`~amortized_cartoonx.classifiers.load_classifier`); frozen.
        normalize: its input normalisation (``auto``, ``imagenet``, ``none``).
        image_size: side of the square training images (linked to the data module's ``image_size``).
        wave, levels, mode: the DWT (db3, J=5, zero: the paper's). J is capped for small images.
        l1_lambda: the sparsity weight of the RDE loss. Default 20 (the paper's CartoonX default).
        distortion, obfuscation: names in :data:`~amortized_cartoonx.rde.DISTORTIONS` / ``OBFUSCATIONS``.
        num_samples: noise samples L per image and training step. Default 16.
        val_samples: L for validation (default: ``num_samples``).
        distill_weight: weight of the distillation term; 0 (default) trains with the RDE loss alone.
        distill_loss: ``bce`` (default; teacher masks as soft targets) or ``l1``.
        width, decoder_width, embed_dim, init_bias, stretch: the network (:class:`MaskPredictorConfig`).
        lr, weight_decay: AdamW. Defaults 1e-3 and 1e-4 (no decay on biases and norms).
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``lr * min_lr_ratio``.
        l1_warmup_steps: ramp the sparsity weight of the training loss linearly from 0 to ``l1_lambda`` over
            this many steps (0, the default: no ramp). A network starts at "keep everything", where the
            distortion has no gradient, so the uniform sparsity pull can shrink every mask together into the
            empty-mask optimum before the network learns where it matters; the ramp gives the distortion
            time. Validation (and checkpoint selection) always uses the full lambda.
        noise_seed: base seed of the per-image noise.
        log_images: explanations logged per validation epoch to loggers that take images (wandb); 0: none.
    """

    def __init__(
        self,
        classifier: str,
        normalize: str = "auto",
        image_size: int = 256,
        wave: str = "db3",
        levels: int = 5,
        mode: str = "zero",
        l1_lambda: float = 20.0,
        distortion: str = "label",
        obfuscation: str = "gaussian-adaptive",
        num_samples: int = 16,
        val_samples: int | None = None,
        distill_weight: float = 0.0,
        distill_loss: str = "bce",
        width: int = 32,
        decoder_width: int = 64,
        embed_dim: int = 128,
        init_bias: float = 4.0,
        stretch: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
        l1_warmup_steps: int = 0,
        noise_seed: int = 0,
        log_images: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if distill_loss not in DISTILL_LOSSES:
            raise ConfigError(f"unknown distill_loss {distill_loss!r}; choose from: {', '.join(DISTILL_LOSSES)}")
        DISTORTIONS.get(distortion)
        OBFUSCATIONS.get(obfuscation)
        for name in ("num_samples", "image_size"):
            if getattr(self.hparams, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self.hparams, name)}")
        if distill_weight < 0 or l1_lambda < 0:
            raise ConfigError("distill_weight and l1_lambda must be at least 0")

        self.classifier = load_classifier(classifier, normalize=normalize)
        self.representation = WaveletRepresentation(wave, levels, mode)
        self.objective = RDEObjective(self.classifier, self.representation, l1_lambda, obfuscation, distortion)
        probe = torch.zeros(1, 3, image_size, image_size)
        with torch.no_grad():
            num_classes = int(self.classifier(probe).shape[-1])
            self.mask_length = self.representation.encode(probe).numel_per_channel()
        self.levels_used = self.representation.levels_for(image_size, image_size)
        self.mask_predictor = MaskPredictor(
            MaskPredictorConfig(
                num_classes=num_classes,
                wave=wave,
                levels=self.levels_used,  # no unused heads (DDP) when the size caps J
                mode=mode,
                width=width,
                decoder_width=decoder_width,
                embed_dim=embed_dim,
                init_bias=init_bias,
                stretch=stretch,
            )
        )
        self.classifier_identity = classifier_identity(classifier)
        logger.info(
            "mask predictor: %s, %d mask entries per %dpx image",
            describe_size(self.mask_predictor),
            self.mask_length,
            image_size,
        )

    # ---- the shared step ---------------------------------------------------------------------------------
    def forward(self, images: Tensor, target: Tensor) -> Coefficients:
        """The predicted mask in [0, 1] for ``images: (N, 3, H, W)`` and ``target: (N,)``."""
        return self.mask_predictor.mask(images, target)

    def _targets(self, batch: dict, predicted: Tensor) -> Tensor:
        """``(N,)``: the batch's given target where it has one (teacher or label), else the prediction."""
        given = batch.get("target")
        if given is None:
            return predicted
        given = given.to(predicted.device)
        if bool((given >= predicted.new_tensor(self.mask_predictor.config.num_classes)).any()):
            raise InputError(
                f"a target class is out of range for a {self.mask_predictor.config.num_classes}-class model"
            )
        return torch.where(given >= 0, given, predicted)

    def step(self, batch: dict, stage: str) -> tuple[Tensor, Coefficients, Tensor]:
        """One batch of train or validation: returns the loss, the predicted mask and the targets."""
        hp = self.hparams
        images = batch["image"]  # (N, 3, S, S)
        num = images.shape[0]
        problem = self.objective.prepare(images)  # coefficients, noise statistics, logits, predicted target
        target = self._targets(batch, problem.target)
        problem = dataclasses.replace(problem, target=target)

        logits = self.mask_predictor(images, target)  # mask logits, bands (N, 1, ...)
        mask = self.mask_predictor.mask_from_logits(logits)
        step = self.global_step if stage == "train" else 0
        generators = make_generators(noise_seeds(hp.noise_seed, stage, step, list(batch["id"])), images.device)
        samples = hp.num_samples if stage == "train" else (hp.val_samples or hp.num_samples)
        noise = self.objective.sample_noise(problem, samples, generators)  # bands (N, L, C, ...)
        rde = self.objective.loss(problem, mask, noise)  # each (N,)
        loss = rde.total.mean()  # the RDE loss with the full lambda (logged; selects checkpoints)
        metrics = {"rde_loss": loss.detach()}
        if stage == "train" and hp.l1_warmup_steps > 0:  # sparsity ramped in: learn what matters first
            ramp = l1_ramp(self.global_step, hp.l1_warmup_steps)
            loss = (rde.distortion + ramp * self.objective.l1_lambda * rde.sparsity).mean()
            metrics["l1_ramp"] = torch.tensor(ramp)
        metrics |= {
            "distortion": rde.distortion.mean().detach(),
            "mask_mean": rde.sparsity.mean().detach(),
        }

        teacher = batch.get("teacher_mask")
        if teacher is not None:
            valid = batch["has_teacher"].bool() & (batch["teacher_target"] == target)  # teacher for this class
            if bool(valid.any()):
                flat_logits = logits.flatten()[valid].float()  # (n, K)
                reference = teacher[valid].float()
                if reference.shape[1] != flat_logits.shape[1]:
                    raise ConfigError(
                        f"teacher masks have {reference.shape[1]} entries, the {hp.image_size}px images "
                        f"{flat_logits.shape[1]}: the teachers were made at another size or with another wavelet"
                    )
                distill = DISTILL_LOSSES[hp.distill_loss](flat_logits, reference).mean()
                if hp.distill_weight > 0:
                    loss = loss + hp.distill_weight * distill
                agreement = mask_agreement(flat_logits.detach().sigmoid(), reference)
                metrics["distill_loss"] = distill.detach()
                metrics["spearman"] = agreement["spearman"].mean()
                metrics["top10_overlap"] = agreement["top_overlap"].mean()
                metrics["teacher_fraction"] = valid.float().mean()
        metrics["loss"] = loss.detach()
        on_step = stage == "train"
        for name, value in metrics.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_step=on_step,
                on_epoch=True,
                prog_bar=name in ("rde_loss", "mask_mean"),
                batch_size=num,
                sync_dist=not on_step,
            )
        return loss, mask, target

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, _, _ = self.step(batch, "train")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, mask, target = self.step(batch, "val")
        if batch_idx == 0 and self.hparams.log_images and not self.trainer.sanity_checking:
            self._log_images(batch["image"], mask, target)
        return loss

    @torch.no_grad()
    def _log_images(self, images: Tensor, mask: Coefficients, target: Tensor) -> None:
        """Log image | explanation pairs to the loggers that take images (wandb), on rank 0 only."""
        loggers = [lg for lg in self.loggers if callable(getattr(lg, "log_image", None))]
        if not loggers or not self.trainer.is_global_zero:
            return
        count = min(self.hparams.log_images, images.shape[0])
        images = images[:count].float()
        part = mask.select(slice(0, count)).to(dtype=torch.float32)
        explanation = self.representation.decode(self.representation.encode(grey(images)) * part).clamp(0, 1)
        panels = [
            (torch.cat([images[i], explanation[i].expand(3, -1, -1)], dim=2).permute(1, 2, 0).cpu().numpy() * 255)
            .round()
            .astype(np.uint8)
            for i in range(count)
        ]
        captions = [
            f"class {int(t)}, mask mean {float(part.select(i).flatten().mean()):.3f}"
            for i, t in enumerate(target[:count])
        ]
        for lg in loggers:
            lg.log_image(key="val/explanations", images=panels, step=self.global_step, caption=captions)

    # ---- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for p in self.mask_predictor.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.mask_predictor.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
        )
        total = float(self.trainer.estimated_stepping_batches) if self.trainer is not None else float("inf")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- checks and checkpoints -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        store = getattr(datamodule, "teacher_store", None)
        if store is not None:
            check_teachers(store.manifest, self.settings(), self.mask_length)

    def settings(self) -> dict:
        """Every setting the trained explainer depends on (plain values)."""
        hp = self.hparams
        return {
            "format_version": CHECKPOINT_FORMAT,
            "kind": CHECKPOINT_KIND,
            **self.classifier_identity,
            "normalize": "none" if self.classifier.normalization is None else "imagenet",
            "image_size": int(hp.image_size),
            "representation": "wavelet",
            "wave": hp.wave,
            "levels": int(hp.levels),
            "levels_used": int(self.levels_used),
            "mode": hp.mode,
            "mask_length": int(self.mask_length),
            "l1_lambda": float(hp.l1_lambda),
            "distortion": hp.distortion,
            "obfuscation": hp.obfuscation,
            "num_samples": int(hp.num_samples),
            "distill_weight": float(hp.distill_weight),
            NETWORK_KEY: self.mask_predictor.settings(),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the explainer's weights and add the plain ``cartoonx`` settings dict."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(STATE_PREFIX)}
        meta = self.settings()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(datamodule, ExplainerDataModule):
            meta["data"] = datamodule.split_settings()
        meta["saved"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        checkpoint[META_KEY] = meta

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume: put the (not saved) classifier and representation state back so the strict load succeeds."""
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(STATE_PREFIX)}
        checkpoint["state_dict"] = {**own, **checkpoint["state_dict"]}


def check_teachers(manifest: dict, settings: dict, mask_length: int) -> None:
    """Refuse teacher masks that do not fit the training settings; warn when they optimised another loss."""
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


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


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


class ExplainerDataModule(pl.LightningDataModule):
    """An image folder (optional ``labels.csv``) with optional teacher masks, split train / val / test.

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


# ---------------------------------------------------------------------------------------------------------
# The command line (cartoonx fit)
# ---------------------------------------------------------------------------------------------------------


def default_run_stamp() -> str:
    """One timestamp per launch, shared with DDP child processes through the environment."""
    return os.environ.setdefault("CARTOONX_RUN_STAMP", time.strftime("%Y%m%d-%H%M%S"))


def _make_cli_class():
    """The LightningCLI subclass (built lazily: importing :mod:`pytorch_lightning.cli` pulls in jsonargparse)."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.cli import LightningCLI
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    class FitCLI(LightningCLI):
        """``cartoonx fit``: LightningCLI with the project's loggers and checkpoints as defaults.

        Adds ``--run_name`` (default: ``<config stem>-<timestamp>``), ``--checkpoint_dir`` (default
        ``checkpoints``: best by ``val/rde_loss`` and last go to ``<checkpoint_dir>/<run_name>/``), ``--log_dir``
        (default ``logs``) and ``--wandb_project``. Unless the config sets ``trainer.logger``, it logs to wandb
        (offline unless WANDB_MODE says otherwise) and CSV.
        """

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_name", type=str | None, default=None, help="name of the run (folders, wandb)")
            parser.add_argument("--checkpoint_dir", type=str, default="checkpoints", help="checkpoints go below")
            parser.add_argument("--log_dir", type=str, default="logs", help="CSV and wandb logs go below")
            parser.add_argument("--wandb_project", type=str, default="amortized-cartoonx", help="wandb project")
            parser.link_arguments("data.image_size", "model.image_size")

        def _run_name(self) -> str:
            name = self._get(self.config, "run_name")
            if name:
                return str(name)
            configs = self._get(self.config, "config") or []
            stem = Path(str(configs[-1])).stem if configs else "fit"
            return f"{stem}-{default_run_stamp()}"

        def instantiate_trainer(self, **kwargs):
            run_name = self._run_name()
            trainer_config = dict(self._get(self.config_init, "trainer", default={}))
            callbacks = trainer_config.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
            if trainer_config.get("enable_checkpointing", True) is not False:
                callbacks.append(
                    ModelCheckpoint(
                        dirpath=str(Path(self._get(self.config, "checkpoint_dir")) / run_name),
                        filename="best",
                        monitor="val/rde_loss",
                        mode="min",
                        save_top_k=1,
                        save_last=True,
                        auto_insert_metric_name=False,
                    )
                )
            logger_setting = trainer_config.get("logger")
            if logger_setting is None or logger_setting is True:
                log_dir = str(self._get(self.config, "log_dir"))
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                loggers = [CSVLogger(log_dir, name=run_name, version="")]  # first: trainer.log_dir is its folder
                if os.environ.get("WANDB_MODE", "offline") != "disabled":
                    loggers.append(
                        WandbLogger(
                            name=run_name,
                            project=self._get(self.config, "wandb_project"),
                            save_dir=log_dir,
                            offline=os.environ.get("WANDB_MODE", "offline") == "offline",
                        )
                    )
                trainer_config["logger"] = loggers
            if trainer_config.get("logger") not in (None, False):
                callbacks.append(LearningRateMonitor(logging_interval="step"))
            trainer_config["callbacks"] = callbacks
            if trainer_config.get("default_root_dir") is None:  # where config.yaml goes when no logger is set
                trainer_config["default_root_dir"] = str(Path(self._get(self.config, "log_dir")) / run_name)
            extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            logger.info(
                "run %s: checkpoints in %s", run_name, Path(self._get(self.config, "checkpoint_dir")) / run_name
            )
            return self._instantiate_trainer({**trainer_config, **kwargs}, extra)

    return FitCLI


def run_fit(args: list[str] | None) -> None:
    """Run ``LightningCLI`` for :class:`AmortizedCartoonXModule` and :class:`ExplainerDataModule`.

    ``args`` are the command-line arguments after ``cartoonx`` (starting with ``fit``); None reads ``sys.argv``.
    """
    os.environ.setdefault("WANDB_MODE", "offline")  # never a network call unless the user asks for one
    default_run_stamp()
    # the frozen classifier is in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    cli_class = _make_cli_class()
    cli_class(
        AmortizedCartoonXModule,
        ExplainerDataModule,
        args=args,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_kwargs={"fit": {"default_env": False}},
        save_config_kwargs={"overwrite": True},
    )
