"""The result every explainer returns, and the final measurements that fill it.

Every mask explainer (the exact optimizer, the amortized network, warm start) answers
``explain(images, target=None) -> Explanation``; :func:`measure_mask` computes the same final numbers for
all of them, on noise drawn from the same per-image seeds, so their losses can be compared directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .errors import InputError, NonFiniteError
from .io import atomic_write
from .rde import RDEObjective, RDEProblem, first_non_finite, make_generators, rde_loss
from .seeding import Stream, stream_seeds
from .wavelets import Coefficients, grey, image_slice


@dataclass
class LossHistory:
    """The RDE loss at every step, before that step's update; each ``(S, N)`` (steps x images).

    Entries after an image stopped early repeat its last value.
    """

    distortion: Tensor
    sparsity: Tensor
    total: Tensor

    def select(self, index: int) -> LossHistory:
        """Image ``index``'s history (negative: from the end), the image axis kept: ``(S, 1)`` each."""
        one = image_slice(index, self.total.shape[1])
        return LossHistory(*(t[:, one] for t in (self.distortion, self.sparsity, self.total)))


@dataclass
class Explanation:
    """Explanations of a batch of N images. Tensors are on the explainer's device unless moved.

    Attributes:
        method: ``cartoonx``, ``pixel-rde``, ``amortized`` or ``warm``.
        mask: the mask in [0, 1], bands ``(N, 1, ...)``: wavelet coefficients, or pixels for Pixel RDE.
        image: ``(N, 1, H, W)`` the explanation in grey: ``clamp(f(mask * DWT(grey(x))), 0, 1)``.
        target: ``(N,)`` the explained class.
        prob_original: ``(N,)`` p(target) on the image.
        prob_masked: ``(N,)`` p(target) on ``clamp(f(mask * h))``, the colour coefficients times the mask.
        prob_obfuscated: ``(N,)`` p(target) averaged over noisy obfuscations.
        distortion: ``(N,)`` the final mean distortion over the measurement's noise samples.
        mask_mean: ``(N,)`` the mean of the mask.
        loss: ``(N,)`` ``distortion + l1_lambda * mask_mean``.
        steps: ``(N,)`` optimizer steps run (0 for a single forward pass).
        seconds: wall-clock seconds for the whole batch.
        history: per-step losses, or None without optimization.
        settings: the explainer's settings (for outputs), with what the call changed (an exact optimizer's
            ``steps`` and ``init_mask``: ``ones`` or ``given``).
        seeds: the per-image seeds of the noise (the optimizer's and the measurement's streams derive from them):
            with ``settings`` and the images, what reproduces the explanation.
    """

    method: str
    mask: Coefficients
    image: Tensor
    target: Tensor
    prob_original: Tensor
    prob_masked: Tensor
    prob_obfuscated: Tensor
    distortion: Tensor
    mask_mean: Tensor
    loss: Tensor
    steps: Tensor
    seconds: float
    history: LossHistory | None = None
    settings: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.target.shape[0]

    def cpu(self) -> Explanation:
        """A copy with every tensor on the CPU."""
        hist = self.history
        if hist is not None:
            hist = LossHistory(hist.distortion.cpu(), hist.sparsity.cpu(), hist.total.cpu())
        return Explanation(
            method=self.method,
            mask=self.mask.to("cpu"),
            image=self.image.cpu(),
            target=self.target.cpu(),
            prob_original=self.prob_original.cpu(),
            prob_masked=self.prob_masked.cpu(),
            prob_obfuscated=self.prob_obfuscated.cpu(),
            distortion=self.distortion.cpu(),
            mask_mean=self.mask_mean.cpu(),
            loss=self.loss.cpu(),
            steps=self.steps.cpu(),
            seconds=self.seconds,
            history=hist,
            settings=dict(self.settings),
            seeds=list(self.seeds),
        )

    def summary(self, index: int) -> dict:
        """The scalar results of image ``index`` as plain Python values."""
        hist = self.history
        return {
            "method": self.method,
            "target": int(self.target[index]),
            "prob_original": float(self.prob_original[index]),
            "prob_masked": float(self.prob_masked[index]),
            "prob_obfuscated": float(self.prob_obfuscated[index]),
            "distortion": float(self.distortion[index]),
            "mask_mean": float(self.mask_mean[index]),
            "loss_first": float(hist.total[0, index]) if hist is not None and len(hist.total) else None,
            "loss_final": float(self.loss[index]),
            "steps": int(self.steps[index]),
            "seconds": self.seconds / len(self),
            **({"levels_used": len(self.mask.details)} if self.mask.details else {}),  # J after the size's cap
            **({"seed_used": int(self.seeds[index])} if self.seeds else {}),  # the noise's seed for this image
        }

    def save(self, path: str | Path, index: int, metadata: dict | None = None) -> None:
        """Write image ``index``'s mask, explanation and metadata to a safetensors file, atomically.

        Tensors: ``mask`` (flat, ``(K,)`` in :meth:`Coefficients.flatten` order), ``mask_band_<i>`` (band ``i``
        without the image axis: low-pass ``(1, H_J, W_J)``, then details ``(1, 3, H_j, W_j)`` from coarse to fine,
        as in :attr:`Coefficients.bands`), ``explanation`` ``(1, H, W)``. The summary, settings and ``metadata``
        (plain JSON values) are in the file's metadata: the summary's results, the settings' other keys and
        ``metadata`` at the top level (where a setting and a result share a name, ``steps`` or ``distortion``, the
        result: the steps run and the measured distortion), and every setting under ``settings``. Read it back
        with :func:`load_saved_explanation`.
        """
        from safetensors.torch import save_file

        one = self.mask.select(index)
        tensors = {"mask": one.flatten()[0], "explanation": self.image[index]}
        tensors |= {f"mask_band_{i}": band[0] for i, band in enumerate(one.bands)}
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        info = {**self.settings, **self.summary(index), "settings": self.settings, **(metadata or {})}
        header = {"format": SAVED_FORMAT, "metadata": json.dumps(info, default=str)}
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))


SAVED_FORMAT = "amortized-cartoonx/explanation-v1"


def load_saved_explanation(path: str | Path) -> dict:
    """Read a file written by :meth:`Explanation.save` (no code runs: safetensors and JSON only).

    Returns ``{"mask": (K,), "mask_bands": [band, ...], "explanation": (1, H, W), "metadata": dict}``.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        raise InputError(f"explanation file not found: {path}") from None
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise InputError(f"cannot read explanation file {path}: {error}") from None
    if header.get("format") != SAVED_FORMAT:
        raise InputError(f"{path} is not a saved explanation (format {header.get('format')!r})")
    num_bands = sum(name.startswith("mask_band_") for name in tensors)
    expected = {"mask", "explanation", *(f"mask_band_{i}" for i in range(num_bands))}
    try:
        metadata = json.loads(header.get("metadata", ""))
    except ValueError:
        metadata = None
    missing = sorted(expected - set(tensors)) + ["mask_band_0"] * (not num_bands)
    missing += ["metadata"] * (not isinstance(metadata, dict))
    if missing:
        raise InputError(f"{path} is not a complete saved explanation (missing or unreadable: {', '.join(missing)})")
    return {
        "mask": tensors["mask"],
        "mask_bands": [tensors[f"mask_band_{i}"] for i in range(num_bands)],
        "explanation": tensors["explanation"],
        "metadata": metadata,
    }


def as_mask(mask: Coefficients | Tensor, like: Coefficients) -> Coefficients:
    """Accept a mask as :class:`Coefficients` ``(N, 1, ...)``, a flat ``(N, K)`` tensor or, for pixel
    masks, an ``(N, 1, H, W)`` tensor; check it against ``like`` (the image coefficients)."""
    expected = like.mask_like().band_shapes()
    if not isinstance(mask, (Tensor, Coefficients)):
        raise InputError(f"a mask must be Coefficients or a flat (N, K) tensor, got {type(mask).__name__}")
    if isinstance(mask, Tensor):
        if mask.ndim == 2:
            mask = like.unflatten(mask)
        elif like.levels == 0 and mask.ndim == 4:
            mask = like.with_bands([mask])
        else:
            raise InputError(f"a mask tensor must be flat (N, K), got shape {tuple(mask.shape)}")
    if mask.levels != like.levels or mask.band_shapes() != expected or mask.num_images != like.num_images:
        raise InputError(
            f"mask does not fit the images: {mask.num_images} masks with bands {mask.band_shapes()}, "
            f"expected {like.num_images} with {expected}"
        )
    if mask.num_channels != 1:
        raise InputError(f"a mask has one channel (shared by the colours), got {mask.num_channels}")
    if not all(bool(torch.isfinite(b).all()) for b in mask.bands):
        raise InputError("the mask has NaN or infinite entries")
    return mask.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def measure_mask(
    objective: RDEObjective,
    problem: RDEProblem,
    mask: Coefficients,
    seeds: Sequence[int],
    num_samples: int,
) -> dict[str, Tensor]:
    """The final numbers of a mask, the same for every explainer.

    Draws ``num_samples`` noise samples per image from the measurement stream of ``seeds`` (so two
    explainers given the same seeds are measured on the same noise).

    Returns: ``distortion``, ``mask_mean``, ``loss``, ``prob_original``, ``prob_masked``, ``prob_obfuscated``
    (each ``(N,)``) and ``image`` ``(N, 1, H, W)``.
    """
    generators = make_generators(stream_seeds(seeds, Stream.MEASURE), problem.images.device)
    noise = objective.sample_noise(problem, num_samples, generators)
    logits_y = objective.obfuscated_logits(problem, mask, noise)  # (N, L, K)
    loss = rde_loss(objective.distortion_of(problem, logits_y), mask, objective.l1_lambda)
    bad = first_non_finite(loss.total)
    if bad is not None:  # no NaN passes as a result
        raise NonFiniteError(
            f"the measured RDE loss of image {bad} is {float(loss.total[bad])}: the classifier's outputs on the "
            "obfuscations are not finite"
        )
    representation = objective.representation
    grey_coeffs = representation.encode(grey(problem.images))
    image = representation.decode(grey_coeffs * mask).clamp(0.0, 1.0)
    return {
        "distortion": loss.distortion,
        "mask_mean": loss.sparsity,
        "loss": loss.total,
        "prob_original": problem.prob_original(),
        "prob_masked": objective.masked_target_prob(problem, mask),
        "prob_obfuscated": objective.target_prob(problem, logits_y).mean(1),
        "image": image,
    }
