"""The synthetic benchmark's classifier: a small CNN, saved as safetensors + JSON (no code runs on load).

A saved classifier is two files side by side::

    classifier.safetensors   the weights (state dict)
    classifier.json          {"format", "architecture": CartoonCNN's hyper-parameters, "classes", "dataset":
                              the CartoonConfig it was trained on, "training": settings and timings,
                              "held_out": {"split", "seed", "num_images", "accuracy"}}

The architecture always comes from this package (:class:`CartoonCNN`), the weights from the safetensors file.
``load_classifier("synthetic")`` (or ``"synthetic:PATH"``) in :mod:`amortized_cartoonx.classifiers` calls
:func:`load_synthetic_classifier`. No Lightning here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ClassifierError, one_line
from ..io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

#: Where ``cartoonx train-classifier`` writes and ``synthetic`` (no path) reads, relative to the working directory.
DEFAULT_DIR = Path("checkpoints/synthetic")
WEIGHTS_NAME = "classifier.safetensors"
METADATA_NAME = "classifier.json"
FORMAT = "amortized-cartoonx/synthetic-classifier"
FORMAT_VERSION = 1
#: The most weights a saved record may describe (the default architecture has about 0.3 million): a hand-edited
#: ``classifier.json`` cannot make the loader allocate gigabytes before the weights are compared.
MAX_PARAMETERS = 50_000_000


@dataclass(frozen=True)
class CNNConfig:
    """Hyper-parameters of :class:`CartoonCNN`.

    Attributes:
        num_classes: number of logits K.
        widths: channels of each stage; every stage halves the resolution (stride 2 in its first convolution).
        convs_per_stage: 3x3 convolutions per stage (each followed by batch norm and ReLU).
        dropout: dropout before the linear head (training only).
    """

    num_classes: int = 8
    widths: tuple[int, ...] = (16, 32, 64, 128)
    convs_per_stage: int = 2
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict) -> CNNConfig:
        """The config of a saved record, checked (types, and at most :data:`MAX_PARAMETERS` weights) before any
        network is built from it: a hand-edited ``classifier.json`` is one :class:`ClassifierError`."""
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ClassifierError(f"the classifier's architecture must be a JSON object, got {data!r:.60}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ClassifierError(f"unknown classifier hyper-parameters: {', '.join(unknown)}")
        widths = data.get("widths", cls.widths)

        def count(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if not isinstance(widths, (list, tuple)) or not widths or not all(count(w) for w in widths):
            raise ClassifierError(f"the classifier's widths must be a list of positive integers, got {widths!r:.60}")
        config = cls(**{**data, "widths": tuple(widths)})
        if not count(config.num_classes) or config.num_classes < 2 or not count(config.convs_per_stage):
            raise ClassifierError(
                "the classifier's num_classes must be an integer of at least 2 and convs_per_stage at least 1, got "
                f"{config.num_classes!r:.20} and {config.convs_per_stage!r:.20}"
            )
        if (
            not isinstance(config.dropout, (int, float))
            or isinstance(config.dropout, bool)
            or not 0 <= config.dropout < 1
        ):
            raise ClassifierError(f"the classifier's dropout must be in [0, 1), got {config.dropout!r:.20}")
        if config.num_parameters() > MAX_PARAMETERS:
            raise ClassifierError(
                f"the classifier's architecture has {config.num_parameters():,} weights, more than the "
                f"{MAX_PARAMETERS:,} a synthetic classifier may have"
            )
        return config

    def num_parameters(self) -> int:
        """The number of weights :class:`CartoonCNN` has with this config (without building it)."""
        total, channels = 0, 3
        for width in self.widths:
            for _ in range(self.convs_per_stage):
                total += channels * width * 9 + 2 * width  # 3x3 convolution (no bias) and batch norm
                channels = width
        return total + 2 * channels * self.num_classes + self.num_classes


class CartoonCNN(nn.Module):
    """A small CNN for images in [0, 1] of any size: 3x3 conv stages, then global average and max pooling.

    Shape:
        ``(N, 3, H, W)`` in [0, 1] -> logits ``(N, num_classes)``.
    """

    def __init__(self, config: CNNConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CNNConfig()
        layers: list[nn.Module] = []
        channels = 3
        for width in config.widths:
            for k in range(config.convs_per_stage):
                stride = 2 if k == 0 else 1
                layers += [
                    nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * channels, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x - 0.5)  # (N, C', H', W')
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)  # (N, 2C')
        return self.head(self.dropout(pooled))  # (N, K)


def resolve_paths(path: str | Path | None) -> tuple[Path, Path]:
    """``(weights, metadata)`` for a classifier path: a folder, its ``.safetensors`` or its ``.json`` file."""
    path = DEFAULT_DIR if path is None or str(path) == "" else Path(path).expanduser()
    if path.suffix in (".safetensors", ".json"):
        weights = path.with_suffix(".safetensors")
    else:
        weights = path / WEIGHTS_NAME
    return weights, weights.with_suffix(".json")


def save_synthetic_classifier(model: CartoonCNN, path: str | Path | None, metadata: dict) -> tuple[Path, Path]:
    """Write ``model``'s weights and ``metadata`` (plus the architecture) atomically; returns both paths."""
    from safetensors.torch import save_file

    weights, meta_path = resolve_paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}))
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": model.config.to_dict(), **metadata}
    atomic_write_text(meta_path, json.dumps(record, indent=2) + "\n")
    return weights, meta_path


def read_metadata(path: str | Path | None = None) -> dict:
    """The JSON record of a saved classifier (raises :class:`ClassifierError` when missing or not ours)."""
    weights, meta_path = resolve_paths(path)
    if not weights.is_file() or not meta_path.is_file():
        default = path is None or str(path) == ""
        hint = (
            "run `cartoonx train-classifier` first" if default else "train one with `cartoonx train-classifier --out`"
        )
        missing = weights if not weights.is_file() else meta_path
        raise ClassifierError(f"no synthetic classifier at {missing}; {hint}")
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSON, and bytes that are not UTF-8
        raise ClassifierError(f"cannot read {meta_path}: {one_line(exc)}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ClassifierError(f"{meta_path} is not a synthetic classifier record (format {FORMAT!r})")
    version = record.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ClassifierError(f"{meta_path}: format_version must be an integer, got {version!r:.40}")
    if version > FORMAT_VERSION:
        raise ClassifierError(f"{meta_path} was written by a newer version (format {record['format_version']})")
    return record


def load_synthetic_classifier(path: str | Path | None = None) -> CartoonCNN:
    """Load a trained :class:`CartoonCNN` in eval mode.

    Args:
        path: a folder holding ``classifier.safetensors`` + ``classifier.json``, or either file; None for the
            default ``checkpoints/synthetic/`` (relative to the working directory).

    Raises:
        ClassifierError: missing files (telling the user to run ``cartoonx train-classifier``), or weights
            that do not fit the recorded architecture.
    """
    from safetensors.torch import load_file

    record = read_metadata(path)
    weights, meta_path = resolve_paths(path)
    try:
        config = CNNConfig.from_dict(record.get("architecture", {}))
    except (ClassifierError, TypeError) as exc:  # TypeError: a field of the wrong type the dataclass refuses
        raise ClassifierError(f"{meta_path}: {one_line(exc)}") from None
    model = CartoonCNN(config)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - a corrupt or mismatched file is the user's
        raise ClassifierError(
            f"cannot load {weights} into the synthetic classifier: {str(exc).splitlines()[0]}"
        ) from None
    log.debug("loaded synthetic classifier %s (held-out accuracy %s)", weights, record.get("held_out", {}))
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, dataset, batch_size: int = 256, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on a :class:`~.dataset.SyntheticCartoons` (or any dataset of dicts)."""
    from torch.utils.data import DataLoader

    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size):
            logits = model(batch["image"].to(device))
            correct += int((logits.argmax(1).cpu() == batch["label"]).sum())
            total += len(batch["label"])
    finally:
        model.train(was_training)
    return correct / max(total, 1)
