"""Shared fixtures: a tiny seeded CNN, small images, and the optional ../shared material."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("WANDB_MODE", "disabled")
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def tiny_fit_command(images: Path, classifier: str, monkeypatch: pytest.MonkeyPatch, here: Path) -> list[str]:
    """``cartoonx fit`` arguments for ``configs/tiny.yaml`` on the image folder ``images``, 2 steps, validating at
    each: half of the images for validation, with a split seed that leaves both halves non-empty. Runs in
    ``here`` (checkpoints/ and logs/), with LightningCLI's command line emptied and wandb off."""
    from amortized_cartoonx.data import split_train_val_test

    monkeypatch.chdir(here)
    monkeypatch.setattr("sys.argv", ["cartoonx"])  # LightningCLI compares its args with the command line
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ids = sorted(p.name for p in images.iterdir())
    seed = next(k for k in range(100) if all(split_train_val_test(ids, 0.5, 0.0, k)[s] for s in ("train", "val")))
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    fit = ["fit", "--config", str(config), "--data.images", str(images), "--model.classifier", classifier]
    split = ["--data.val_fraction", "0.5", "--data.split_seed", str(seed)]
    return [*fit, *split, "--trainer.max_steps", "2", "--trainer.val_check_interval", "1"]


class TinyCNN(nn.Module):
    """A small convolutional classifier over [0, 1] images of any size (5 classes by default)."""

    def __init__(self, num_classes: int = 5, channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(16 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def make_tiny_cnn(num_classes: int = 5, channels: int = 3, seed: int = 0) -> TinyCNN:
    """A seeded TinyCNN whose logits are large enough that its predictions are confident."""
    torch.manual_seed(seed)
    model = TinyCNN(num_classes, channels)
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    return model.eval()


class TupleCNN(TinyCNN):
    """A TinyCNN that returns ``(logits, features)``, as some detection-style models do: not a classifier."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x), self.features(x)


def make_tuple_cnn() -> TupleCNN:
    """The spec ``conftest:make_tuple_cnn`` (tests of the errors for a model that returns no logits)."""
    return TupleCNN(5, 3).eval()


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    return make_tiny_cnn()


@pytest.fixture
def images() -> torch.Tensor:
    """``(3, 3, 48, 48)`` seeded smooth-ish images in [0, 1]."""
    gen = torch.Generator().manual_seed(1)
    coarse = torch.rand(3, 3, 6, 6, generator=gen)
    x = nn.functional.interpolate(coarse, size=(48, 48), mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.rand(3, 3, 48, 48, generator=gen)).clamp(0, 1)


@pytest.fixture
def shared() -> Path:
    """The ../shared folder, or a skip when it is absent."""
    if not (SHARED / "models").is_dir():
        pytest.skip("../shared (real classifiers and photos) is not present")
    return SHARED
