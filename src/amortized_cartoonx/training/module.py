"""The LightningModule that trains the amortized explainer.

The module trains a :class:`~amortized_cartoonx.mask_predictor.MaskPredictor` against a frozen classifier with
exactly the exact optimizer's objective, :class:`~amortized_cartoonx.rde.RDEObjective` (same obfuscation,
distortion and lambda, the same code), averaged over the batch::

    loss = mean_n [ mean_l d(p(x_n), p(y_nl)) + lambda * mean(s_n) ]  +  w * mean_{n with teacher} distill(s_n, s*_n)

where ``s_n`` is the predicted mask of image n for its target class, ``y_nl`` its L obfuscations, and the optional
distillation term pulls ``s_n`` towards the exact optimizer's teacher mask ``s*_n`` (from ``cartoonx targets``)
where one exists for that image and class. Noise is drawn per image from seeded generators (seed, stage, step,
image id), so a run is reproducible and a validation image always sees the same noise.

Checkpoints hold only the explainer's weights (the classifier is reloaded from its spec) and a plain
``checkpoint["cartoonx"]`` dict with every setting the explainer depends on (:meth:`~AmortizedCartoonXModule.settings`,
the format of :mod:`amortized_cartoonx.checkpoint`); ``torch.load(path, weights_only=True)`` reads them, and
:class:`~amortized_cartoonx.amortized.AmortizedExplainer` loads them without Lightning.

Shapes: N images per batch, L noise samples, K mask entries per image, S the image side.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KIND, META_KEY, NETWORK_KEY, STATE_PREFIX
from ..classifiers import classifier_identity, input_channels, load_classifier, normalization_name, weights_digest
from ..errors import ConfigError, InputError, NonFiniteError
from ..evaluation.agreement import mask_agreement
from ..images import to_channels
from ..mask_logits import logits_to_mask, sigmoid_for_mask
from ..mask_predictor import MaskPredictor, MaskPredictorConfig, describe_size
from ..rde import (
    DISTORTIONS,
    OBFUSCATIONS,
    RDEObjective,
    RDEProblem,
    check_link,
    make_generators,
    original_logits,
)
from ..seeding import Stream, step_seeds
from ..wavelets import Coefficients, WaveletRepresentation, grey
from .data import MaskPredictorDataModule, check_teachers
from .sparsity import SparsityGate, l1_ramp

logger = logging.getLogger(__name__)


def _entry_bce(logits: Tensor, teacher: Tensor, stretch: float = 0.0) -> Tensor:
    """``(N, K)``: the per-entry binary cross-entropy of :func:`bce_distillation` (see there)."""
    return F.binary_cross_entropy_with_logits(logits, sigmoid_for_mask(teacher, stretch), reduction="none")


def bce_distillation(logits: Tensor, teacher: Tensor, stretch: float = 0.0) -> Tensor:
    """``(N,)``: binary cross-entropy of the network's sigmoid against the teacher mapped through the stretch.

    The network's mask is ``clamp((1 + 2 s) sigmoid(z) - s, 0, 1)`` (:func:`logits_to_mask`, stretch ``s``); it
    equals the teacher's ``t`` exactly where ``sigmoid(z) = (t + s) / (1 + 2 s)``, a target strictly inside
    (0, 1) for every ``t`` in [0, 1]. So this is the BCE with logits against that target: smallest, entry by
    entry, where the mask the network outputs is the teacher's; stable (no log of a clamped mask, no gradient
    lost to the clamp); the plain BCE when ``s = 0``.
    """
    return _entry_bce(logits, teacher, stretch).mean(1)


def balanced_bce_distillation(logits: Tensor, teacher: Tensor, stretch: float = 0.0) -> Tensor:
    """``(N,)``: :func:`bce_distillation` with the teacher's kept and deleted entries given equal shares.

    Entry k of image n is weighted ``t_k / (2 sum_j t_j) + (1 - t_k) / (2 sum_j (1 - t_j))``, so the entries the
    teacher keeps weigh half of the loss however few they are. A CartoonX mask keeps about 0.5% of the
    coefficients: in the plain mean they are 0.5% of the loss, and a network that deletes everything pays almost
    nothing for it (the empty-mask collapse). An all-zero teacher leaves the deleted half alone.
    """
    bce = _entry_bce(logits, teacher, stretch)
    kept = teacher.sum(1, keepdim=True).clamp_min(1e-6)
    deleted = (1.0 - teacher).sum(1, keepdim=True).clamp_min(1e-6)
    return 0.5 * (bce * (teacher / kept + (1.0 - teacher) / deleted)).sum(1)


def l1_distillation(logits: Tensor, teacher: Tensor, stretch: float = 0.0) -> Tensor:
    """``(N,)``: mean absolute difference between the network's mask (stretch included) and the teacher's."""
    return (logits_to_mask(logits, stretch) - teacher).abs().mean(1)


#: ``distill(logits (N, K), teacher (N, K) in [0, 1], stretch) -> (N,)``: how far the mask the network outputs,
#: ``logits_to_mask(logits, stretch)``, is from the teacher's; smallest where they agree.
DISTILL_LOSSES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "bce": bce_distillation,
    "bce-balanced": balanced_bce_distillation,
    "l1": l1_distillation,
}
_NOISE_STREAMS = {"train": Stream.TRAIN_NOISE, "val": Stream.VAL_NOISE, "test": Stream.TEST_NOISE}
#: Fields of the network's config that the module decides: the classifier's classes and the module's DWT.
_DERIVED_NETWORK_FIELDS = ("num_classes", "wave", "levels", "mode", "in_channels")

#: Where a checkpoint keeps the sparsity gate's state (``l1_gate``), for resuming.
GATE_KEY = "cartoonx_sparsity_gate"


def noise_seeds(base: int, stage: str, step: int, ids: list[str]) -> list[int]:
    """Per-image noise seeds for one batch: a function of (base seed, stage, step, image id) only."""
    return step_seeds(base, _NOISE_STREAMS[stage], step, ids)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning-rate factor: linear warm-up over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if not math.isfinite(total) or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class AmortizedCartoonXModule(pl.LightningModule):
    """Train the mask predictor with the RDE loss (+ optional distillation to teacher masks).

    Args:
        classifier: the classifier spec (see :func:`~amortized_cartoonx.classifiers.load_classifier`); frozen.
        normalize: its input normalisation (``auto``, ``imagenet``, ``none``).
        image_size: side of the square training images (linked to the data module's ``image_size``).
        wave, levels, mode: the DWT (db3, J=5, zero: the paper's). J is capped for small images.
        l1_lambda: the sparsity weight of the RDE loss. Default 20 (the paper's CartoonX default).
        distortion, obfuscation: names in :data:`~amortized_cartoonx.rde.DISTORTIONS` / ``OBFUSCATIONS``.
        link: ``softmax`` (the paper's; one class per image) or ``sigmoid`` (a multi-label classifier, or a
            binary one with a single logit; :data:`~amortized_cartoonx.rde.LINKS`). Default ``softmax``.
        num_samples: noise samples L per image and training step. Default 16.
        val_samples: L for validation (default: ``num_samples``).
        distill_weight: weight of the distillation term; 0 (default) trains with the RDE loss alone.
        distill_loss: ``bce`` (default; teacher masks as soft targets), ``bce-balanced`` (the same with the kept
            and the deleted entries of each teacher at equal shares: against the empty-mask collapse) or ``l1``.
        mask_predictor: the network (:class:`~amortized_cartoonx.mask_predictor.MaskPredictorConfig`: width,
            decoder_width, embed_dim, init_bias, stretch, ...); None: its defaults. Its ``num_classes``, ``wave``,
            ``levels`` and ``mode`` are the module's (the classifier's classes, the DWT above, J as capped for
            ``image_size``): leave them at their defaults, a conflicting value is refused. A dict of its fields
            is accepted too (the module's saved hyper-parameters).
        lr, weight_decay: AdamW. Defaults 1e-3 and 1e-4 (no decay on biases and norms).
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``lr * min_lr_ratio``.
        l1_warmup_steps: ramp the sparsity weight of the training loss linearly from 0 to ``l1_lambda`` over
            this many steps (0, the default: no ramp). A network starts at "keep everything", where the
            distortion has no gradient, so the uniform sparsity pull can shrink every mask together into the
            empty-mask optimum before the network learns where it matters; the ramp gives the distortion
            time. Validation (and checkpoint selection) always uses the full lambda.
        l1_gate: 0 (default): the ramp above follows the clock. In (0, 1]: it advances only while the training
            distortion stays below ``l1_gate`` times the empty mask's and steps back otherwise
            (:class:`~amortized_cartoonx.training.sparsity.SparsityGate`; needs ``l1_warmup_steps``), so the
            sparsity cannot push the masks into the empty mask before they keep the decision. Costs one
            classifier pass per image and step (the empty mask under one noise sample).
        noise_seed: base seed of the per-image noise.
        log_images: explanations logged per validation epoch to loggers that take images (wandb); 0: none.

    Logged metrics (``train/...`` per step and epoch, ``val/...`` per epoch): ``rde_loss`` (full lambda; selects
    checkpoints), ``distortion``, ``mask_mean``, ``loss`` (what is minimised), ``l1_ramp`` (while ramping),
    ``distortion_ratio`` (with ``l1_gate``: the smoothed distortion over the empty mask's that drives the gate), with
    the synthetic stream ``rde_loss_stream`` and ``rde_loss_folder`` (training only: the fresh and the folder
    images of each batch; a folder loss below the stream's is memorisation) and, with teacher masks,
    ``distill_loss``, ``spearman``, ``top10_overlap`` and ``teacher_fraction``.
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
        link: str = "softmax",
        num_samples: int = 16,
        val_samples: int | None = None,
        distill_weight: float = 0.0,
        distill_loss: str = "bce",
        mask_predictor: MaskPredictorConfig | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
        l1_warmup_steps: int = 0,
        l1_gate: float = 0.0,
        noise_seed: int = 0,
        log_images: int = 4,
    ) -> None:
        super().__init__()
        if distill_loss not in DISTILL_LOSSES:
            raise ConfigError(f"unknown distill_loss {distill_loss!r}; choose from: {', '.join(DISTILL_LOSSES)}")
        DISTORTIONS.get(distortion)
        OBFUSCATIONS.get(obfuscation)
        check_link(link)
        for name, value in (("num_samples", num_samples), ("image_size", image_size)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if distill_weight < 0 or l1_lambda < 0:
            raise ConfigError("distill_weight and l1_lambda must be at least 0")
        if l1_gate < 0:
            raise ConfigError(f"l1_gate must be 0 (off) or in (0, 1], got {l1_gate}")
        _check_ranges(
            lr=(lr, 0.0, False),
            weight_decay=(weight_decay, 0.0, True),
            min_lr_ratio=(min_lr_ratio, 0.0, True, 1.0),
            warmup_steps=(warmup_steps, 0, True),
            l1_warmup_steps=(l1_warmup_steps, 0, True),
            log_images=(log_images, 0, True),
        )
        if not isinstance(noise_seed, int) or isinstance(noise_seed, bool) or noise_seed < 0:
            raise ConfigError(f"noise_seed must be a non-negative integer, got {noise_seed!r}")
        if val_samples is not None and val_samples < 1:
            raise ConfigError(f"val_samples must be at least 1 (or null: num_samples), got {val_samples}")
        self.sparsity_gate = SparsityGate(l1_warmup_steps, l1_gate) if l1_gate > 0 else None
        self._gate_moved_at = -1  # the optimizer step at which the gate last moved
        self._epoch_sums: dict[str, tuple[Tensor | float, int]] = {}  # validation: name -> (weighted sum, images)

        self.classifier = load_classifier(classifier, normalize=normalize)
        self.representation = WaveletRepresentation(wave, levels, mode)
        self.objective = RDEObjective(self.classifier, self.representation, l1_lambda, obfuscation, distortion, link)
        # a single-channel classifier trains on the images' luma (the batches stay RGB; step() converts them)
        self.channels = input_channels(self.classifier, image_size)
        probe = torch.zeros(1, self.channels, image_size, image_size)
        with torch.no_grad():  # logits checked: a classifier that returns a tuple or NaN is one line, here
            num_classes = int(original_logits(self.classifier, probe, link).shape[-1])
            self.mask_length = self.representation.encode(probe).numel_per_channel()
        self.levels_used = self.representation.levels_for(image_size, image_size)
        derived = {
            "num_classes": num_classes,
            "wave": wave,
            "levels": self.levels_used,
            "mode": mode,
            "in_channels": self.channels,
        }
        network = _complete(_network_config(mask_predictor), derived, levels)
        source = None  # the frozen network a tapped encoder reads
        if network.encoder == "classifier":
            source = self.classifier
        elif network.encoder == "backbone":  # frozen, not saved in checkpoints (they keep the mask predictor only)
            self.backbone = load_classifier(network.backbone, normalize="auto")
            source = self.backbone
        network = network.with_taps(source, image_size)  # the scratch encoder: unchanged
        self.mask_predictor = MaskPredictor(network, features=source)
        self.classifier_identity = classifier_identity(classifier, self.classifier)  # spec, file and weights
        # save_hyperparameters reads the arguments from this frame: the network's config in use, as a plain dict
        # (checkpoints stay readable with torch.load(weights_only=True))
        mask_predictor = self.mask_predictor.settings()
        self.save_hyperparameters()
        logger.info(
            "mask predictor: %s, %d mask entries per %dpx image",
            describe_size(self.mask_predictor),
            self.mask_length,
            image_size,
        )

    # ---- the shared step ---------------------------------------------------------------------------------
    def forward(self, images: Tensor, target: Tensor) -> Coefficients:
        """The predicted mask in [0, 1] for ``images: (N, C, H, W)`` (C: the classifier's channels) and
        ``target: (N,)``."""
        return self.mask_predictor.mask(images, target)

    def step(self, batch: dict, stage: str) -> tuple[Tensor, Coefficients, Tensor]:
        """One batch of ``stage`` (``train`` or ``val``): the loss to minimise, the predicted mask, the classes.

        The pieces: the classes to explain (:meth:`explained_classes`), the RDE loss of the predicted mask
        (:meth:`rde_loss`), the distillation term (:meth:`distillation`) and the metrics (:meth:`log_metrics`).
        """
        images = to_channels(batch["image"], self.channels)  # (N, C, S, S): the classifier's channels
        with self.mask_predictor.tapping(self.classifier) as taps:  # the classifier encoder reads this same pass
            problem = self.objective.prepare(images)  # coefficients, noise statistics, logits, predicted class
        problem = dataclasses.replace(problem, target=self.explained_classes(batch, problem.target))
        logits = self.mask_predictor(images, problem.target, taps=taps())  # mask logits, bands (N, 1, ...)
        mask = self.mask_predictor.mask_from_logits(logits)

        loss, metrics = self.rde_loss(problem, mask, list(batch["id"]), stage, batch.get("from_stream"))
        distillation = self.distillation(batch, logits, problem.target)
        weights = dict.fromkeys(metrics, images.shape[0])
        if batch.get("from_stream") is not None:
            fresh = torch.as_tensor(batch["from_stream"]).bool()
            weights |= {"rde_loss_stream": int(fresh.sum()), "rde_loss_folder": int((~fresh).sum())}
        if distillation is not None:
            distill, distill_metrics, distill_weights = distillation
            if self.hparams.distill_weight > 0 and distill is not None:
                loss = loss + self.hparams.distill_weight * distill
            metrics |= distill_metrics
            weights |= distill_weights
        metrics["loss"] = loss.detach()
        self.log_metrics(stage, metrics, weights | {"loss": images.shape[0]})
        return loss, mask, problem.target

    def explained_classes(self, batch: dict, predicted: Tensor) -> Tensor:
        """``(N,)``: the batch's given target where it has one (teacher or label), else the prediction."""
        given = batch.get("target")
        if given is None:
            return predicted
        given = given.to(predicted.device)
        num_classes = self.mask_predictor.config.num_classes
        if bool((given >= predicted.new_tensor(num_classes)).any()):
            raise InputError(f"a target class is out of range for a {num_classes}-class model")
        return torch.where(given >= 0, given, predicted)

    def rde_loss(
        self,
        problem: RDEProblem,
        mask: Coefficients,
        ids: list[str],
        stage: str,
        from_stream: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The batch's mean RDE loss of ``mask`` (what training minimises), and its parts as metrics.

        L noise samples per image (``num_samples``; ``val_samples`` outside training), drawn from generators
        seeded by (``noise_seed``, stage, step, image id). While ``l1_warmup_steps`` ramp the sparsity weight,
        the training loss uses the ramped lambda; the ``rde_loss`` metric always uses the full lambda.

        ``from_stream`` ``(N,)`` bool (batches of the synthetic stream, ``data.stream``) marks the fresh images:
        the metrics then also hold ``rde_loss_stream`` and ``rde_loss_folder``, the mean over each kind present.
        A fresh image is seen once, so a folder loss below the stream loss measures memorisation of the folder.
        """
        hp = self.hparams
        training = stage == "train"
        seeds = noise_seeds(hp.noise_seed, stage, self.global_step if training else 0, ids)
        samples = hp.num_samples if training else (hp.val_samples or hp.num_samples)
        noise = self.objective.sample_noise(problem, samples, make_generators(seeds, problem.images.device))
        rde = self.objective.loss(problem, mask, noise)  # each (N,); noise bands (N, L, C, ...)
        loss = rde.total.mean()
        metrics = {"rde_loss": loss.detach()}
        if training and hp.l1_warmup_steps > 0:  # sparsity ramped in: learn what matters first
            if self.sparsity_gate is None:
                ramp = l1_ramp(self.global_step, hp.l1_warmup_steps)
            else:
                ramp = self._gated_ramp(problem, noise, rde.distortion)
                if self.sparsity_gate.ratio is not None:
                    metrics["distortion_ratio"] = torch.tensor(self.sparsity_gate.ratio)
            loss = (rde.distortion + ramp * self.objective.l1_lambda * rde.sparsity).mean()
            metrics["l1_ramp"] = torch.tensor(ramp)
        metrics["distortion"] = rde.distortion.mean().detach()
        metrics["mask_mean"] = rde.sparsity.mean().detach()
        if from_stream is not None:
            fresh = torch.as_tensor(from_stream, device=rde.total.device).bool()
            for name, chosen in (("stream", fresh), ("folder", ~fresh)):
                if bool(chosen.any()):
                    metrics[f"rde_loss_{name}"] = rde.total[chosen].mean().detach()
        return loss, metrics

    @torch.no_grad()
    def _gated_ramp(self, problem: RDEProblem, noise: Coefficients, distortion: Tensor) -> float:
        """Advance the sparsity gate with this batch and return its fraction of lambda (the same on every rank).

        The empty mask's distortion is measured on the batch's images under their first noise sample. The gate moves
        once per optimizer step, as the plain ramp does: with gradient accumulation, on the step's first batch.
        """
        if self.global_step == self._gate_moved_at:
            return self.sparsity_gate.fraction
        self._gate_moved_at = self.global_step
        first = noise.map(lambda band: band[:, :1])  # (N, 1, C, ...)
        empty = self.objective.distortions(problem, problem.coeffs.mask_like(0.0), first)  # (N, 1)
        means = torch.stack([distortion.mean(), empty.mean()]).float()
        if self.trainer.world_size > 1:  # one gate for all ranks: they must use the same lambda
            means = self.trainer.strategy.reduce(means, reduce_op="mean")
        return self.sparsity_gate.update(float(means[0]), float(means[1]))

    def distillation(
        self, batch: dict, logits: Coefficients, target: Tensor
    ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, int]] | None:
        """The distillation loss towards the teacher masks of this batch, the agreement with them, and each
        metric's weight (the images it averages over).

        Only images whose teacher explains the same class count. None when there are no teacher masks; a batch
        without such an image has no loss (None) but the same metrics, of weight 0: every batch of a run logs the
        same names, so every rank runs the same validation all-reduces (a rank without one hung the others).

        Raises:
            ConfigError: the teacher masks have another number of entries than the predicted masks.
        """
        teacher = batch.get("teacher_mask")  # (N, K)
        if teacher is None:
            return None
        valid = batch["has_teacher"].bool() & (batch["teacher_target"] == target)  # a teacher for this class
        count = int(valid.sum())
        weights = {"distill_loss": count, "spearman": count, "top10_overlap": count, "teacher_fraction": len(valid)}
        if not count:
            zero = logits.lowpass.new_zeros((), dtype=torch.float32)
            return (
                None,
                dict.fromkeys(("distill_loss", "spearman", "top10_overlap"), zero) | {"teacher_fraction": zero},
                weights,
            )
        predicted = logits.flatten()[valid].float()  # (n, K)
        reference = teacher[valid].float()  # (n, K)
        if reference.shape[1] != predicted.shape[1]:
            raise ConfigError(
                f"teacher masks have {reference.shape[1]} entries, the {self.hparams.image_size}px images "
                f"{predicted.shape[1]}: the teachers were made at another size or with another wavelet"
            )
        stretch = self.mask_predictor.config.stretch  # compare the mask the network outputs, not its sigmoid
        distill = DISTILL_LOSSES[self.hparams.distill_loss](predicted, reference, stretch).mean()
        agreement = mask_agreement(logits_to_mask(predicted.detach(), stretch), reference)
        metrics = {
            "distill_loss": distill.detach(),
            "spearman": agreement["spearman"].mean(),
            "top10_overlap": agreement["top_overlap"].mean(),
            "teacher_fraction": valid.float().mean(),
        }
        return distill, metrics, weights

    def log_metrics(self, stage: str, metrics: dict[str, Tensor], weights: dict[str, int]) -> None:
        """Log ``metrics`` as ``<stage>/<name>``: per step and epoch in training (this rank's), per epoch over every
        rank's images otherwise (summed here, logged by :meth:`on_validation_epoch_end`).

        An epoch's value is the mean over the images each batch's value averages (``weights[name]``), so a
        metric of some images of a batch (the teachers', the stream's) is not weighted by the whole batch."""
        if stage != "train":
            for name, value in metrics.items():
                total, count = self._epoch_sums.get(name, (0.0, 0))
                self._epoch_sums[name] = (total + value.detach().float() * weights[name], count + weights[name])
            return
        for name, value in metrics.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_step=True,
                on_epoch=True,
                prog_bar=name in ("rde_loss", "mask_mean"),
                batch_size=weights[name],
            )

    def on_validation_epoch_start(self) -> None:
        self._epoch_sums = {}

    def on_validation_epoch_end(self) -> None:
        """Log each validation metric's mean over the images of every rank: the weighted sums and the image counts
        are summed over the ranks in float. (Lightning's ``sync_dist`` averages the counts as integers, so ranks of
        3 and 2 images divided by 2, not 2.5: every metric came out 1.25 times too large.)"""
        names = sorted(self._epoch_sums)
        if not names:
            return
        totals = torch.stack([torch.as_tensor(self._epoch_sums[n][0], device=self.device).float() for n in names])
        counts = torch.tensor([float(self._epoch_sums[n][1]) for n in names], device=self.device)
        if self.trainer.world_size > 1:
            reduced = self.trainer.strategy.reduce(torch.cat([totals, counts]), reduce_op="sum")
            totals, counts = reduced[: len(names)], reduced[len(names) :]
        for name, total, count in zip(names, totals, counts):
            if float(count) > 0:  # e.g. no image with a teacher for its class in the whole validation set
                self.log(f"val/{name}", total / count, prog_bar=name in ("rde_loss", "mask_mean"))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, _, _ = self.step(batch, "train")
        if not bool(torch.isfinite(loss)):  # stop at once: a NaN step would poison the weights and the checkpoint
            raise NonFiniteError(
                f"the training loss became {float(loss)} at step {self.global_step} (batch {list(batch['id'])[:3]}): "
                "lower the learning rate, or check the classifier's outputs under noise"
            )
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
        try:  # the schedule's length; outside a Trainer (a script's own loop) no decay after the warm-up
            total = float(self.trainer.estimated_stepping_batches)
        except RuntimeError:  # not attached to a Trainer (its property raises rather than return None)
            total = float("inf")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- checks and checkpoints -----------------------------------------------------------------------------
    def _datamodule(self) -> pl.LightningDataModule | None:
        """The trainer's data module; None without one (or without a trainer: a checkpoint saved by hand)."""
        try:
            return getattr(self.trainer, "datamodule", None)
        except RuntimeError:  # not attached to a Trainer
            return None

    def setup(self, stage: str) -> None:
        datamodule = self._datamodule()
        store = getattr(datamodule, "teacher_store", None)
        if store is not None:
            check_teachers(store.manifest, self.settings(), self.mask_length)
        elif isinstance(datamodule, MaskPredictorDataModule) and self.hparams.distill_weight > 0:
            logger.warning(
                "model.distill_weight is %s but data.teachers names no teacher masks: training uses the RDE loss alone",
                self.hparams.distill_weight,
            )

    def settings(self) -> dict:
        """Every setting the trained explainer depends on (plain values): ``checkpoint["cartoonx"]``."""
        hp = self.hparams
        return {
            "format_version": CHECKPOINT_FORMAT,
            "kind": CHECKPOINT_KIND,
            **self.classifier_identity,
            **self._backbone_identity(),
            "normalize": normalization_name(self.classifier),
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
            "link": self.objective.link,
            "num_samples": int(hp.num_samples),
            "distill_weight": float(hp.distill_weight),
            NETWORK_KEY: self.mask_predictor.settings(),
        }

    def _backbone_identity(self) -> dict:
        """With the ``backbone`` encoder, its weights' digest and input normalisation (checked when loaded)."""
        backbone = getattr(self, "backbone", None)
        if backbone is None:
            return {}
        return {"backbone_weights_sha256": weights_digest(backbone), "backbone_normalize": normalization_name(backbone)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the explainer's weights and add the plain ``cartoonx`` settings dict."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(STATE_PREFIX)}
        meta = self.settings()
        datamodule = self._datamodule()
        if isinstance(datamodule, MaskPredictorDataModule):
            meta["data"] = datamodule.split_settings()
        meta["saved"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        checkpoint[META_KEY] = meta
        if self.sparsity_gate is not None:  # resume the gate where it was (plain floats)
            checkpoint[GATE_KEY] = self.sparsity_gate.state()

    def _check_resumed_split(self, recorded: dict | None) -> None:
        """A resumed run must split its images as the checkpoint's run did: with other fractions, seed, folder,
        teachers or targets, images held out before would now be trained on (and the reverse)."""
        datamodule = self._datamodule()
        if not recorded or not isinstance(datamodule, MaskPredictorDataModule):
            return
        differences = _split_differences(recorded, datamodule.split_settings())
        if differences:
            raise ConfigError(
                "the checkpoint was trained on another data split (" + "; ".join(differences) + "): resuming "
                "would train on images it held out; give the --data options of the first run, or start a new run"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume: refuse another data split (see :meth:`_check_resumed_split`), warn about changed settings, and
        put the (not saved) classifier and representation state back so the strict load succeeds."""
        meta = checkpoint.get(META_KEY) or {}
        self._check_resumed_split(meta.get("data"))
        self._check_resumed_classifier(meta)
        changed = [
            f"{key} {meta[key]!r} -> {value!r}"
            for key, value in self.settings().items()
            if key in meta and key not in ("saved", "data") and meta[key] != value
        ]
        if changed:
            logger.warning("resuming with other settings than the checkpoint's: %s", "; ".join(changed))
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(STATE_PREFIX)}
        checkpoint["state_dict"] = {**own, **checkpoint["state_dict"]}
        if self.sparsity_gate is not None and GATE_KEY in checkpoint:
            self.sparsity_gate.restore(checkpoint[GATE_KEY])

    def _check_resumed_classifier(self, meta: dict) -> None:
        """Refuse to resume a checkpoint trained for another classifier (other weights, or another spec when a
        digest is missing): ``--ckpt_path last`` and ``Trainer.fit(ckpt_path=...)`` keep this run's classifier."""
        recorded = meta.get("classifier_weights_sha256")
        ours = self.classifier_identity.get("classifier_weights_sha256")
        other = (
            recorded != ours
            if recorded and ours
            else meta.get("classifier", self.hparams.classifier) != (self.hparams.classifier)
        )
        if other:
            raise ConfigError(
                f"the checkpoint was trained for classifier {meta.get('classifier')!r}, and this run explains "
                f"{self.hparams.classifier!r} with other weights: resume with the classifier it was trained for"
            )


def _check_ranges(**checks: tuple) -> None:
    """``name=(value, low, low_allowed[, high])``: a :class:`ConfigError` naming the first value outside its range
    (``value > low``, or ``>=`` when ``low_allowed``; ``<= high`` when given) or not a finite number."""
    for name, (value, low, low_allowed, *high) in checks.items():
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        inside = finite and (value >= low if low_allowed else value > low) and (not high or value <= high[0])
        if not inside:
            bound = f"at least {low}" if low_allowed else f"above {low}"
            raise ConfigError(
                f"{name} must be {bound}" + (f" and at most {high[0]}" if high else "") + f", got {value!r}"
            )


def _split_differences(recorded: dict, current: dict) -> list[str]:
    """The split settings (``MaskPredictorDataModule.split_settings``) that differ, as ``key old -> new``."""
    return [f"{k} {recorded[k]!r} -> {v!r}" for k, v in current.items() if k in recorded and recorded[k] != v]


def _network_config(given: MaskPredictorConfig | dict | None) -> MaskPredictorConfig:
    """The ``mask_predictor`` argument as a config: None gives the defaults, a dict its fields."""
    if given is None:
        return MaskPredictorConfig()
    if isinstance(given, dict):
        try:
            return MaskPredictorConfig(**given)
        except TypeError as exc:
            raise ConfigError(f"invalid mask_predictor config: {exc}") from None
    if not isinstance(given, MaskPredictorConfig):
        raise ConfigError(f"mask_predictor must be a MaskPredictorConfig, got {type(given).__name__}")
    return given


def _complete(network: MaskPredictorConfig, derived: dict, requested_levels: int) -> MaskPredictorConfig:
    """``network`` with the fields the module decides; a field set to something else is refused.

    ``levels`` is J as capped for the training size (no unused heads, which DDP refuses); the requested J is
    accepted as well.
    """
    defaults = MaskPredictorConfig()
    conflicts = []
    for name in _DERIVED_NETWORK_FIELDS:
        value = getattr(network, name)
        accepted = {getattr(defaults, name), derived[name]} | ({requested_levels} if name == "levels" else set())
        if value not in accepted:
            conflicts.append(f"mask_predictor.{name}={value!r} (the module's: {derived[name]!r})")
    if conflicts:
        raise ConfigError(
            "the module sets the network's classes, input channels and wavelet (from the classifier and its wave, "
            f"levels and mode); leave them out of mask_predictor: {', '.join(conflicts)}"
        )
    return dataclasses.replace(network, **derived)
