"""scripts/bench_optimizer.py's bare pass runs the classifier in the passes the optimizer makes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_optimizer as bench  # noqa: E402


class _Recorder(torch.nn.Module):
    """A classifier that records the batch size of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.linear(x.mean((2, 3)))


def test_the_bare_pass_splits_the_batch_into_the_optimizers_passes():
    classifier = _Recorder()
    bench.bare_pass(classifier, 10, 8, torch.device("cpu"), per_pass=4)()
    assert classifier.batches == [4, 4, 2]
    classifier.batches.clear()
    bench.bare_pass(classifier, 10, 8, torch.device("cpu"))()  # one pass by default
    assert classifier.batches == [10]
    assert classifier.linear.weight.grad is not None  # forward and backward both ran
