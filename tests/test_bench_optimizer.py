"""scripts/bench_optimizer.py: the bare pass runs the classifier in the passes the optimizer makes, and the timings
are taken in paired rounds."""

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


def test_paired_rounds_time_every_function_once_per_round_in_turn():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("long", "short", "bare")}
    times = bench.paired_rounds(fns, torch.device("cpu"), repeats=3)
    assert calls == ["long", "short", "bare"] * 4  # one warm-up round, then three timed ones
    assert {name: len(t) for name, t in times.items()} == {"long": 3, "short": 3, "bare": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def usage_error(capsys, option: str, value: str) -> None:
    """``bench.main`` refuses ``option value`` as a usage error (exit 2, the option named), loading nothing."""
    try:
        bench.main(["--classifier", "unused", option, value])
    except SystemExit as exc:
        assert exc.code == 2, option
    else:
        raise AssertionError(f"{option} {value} was accepted")
    assert option in capsys.readouterr().err


def test_counts_that_would_divide_by_zero_are_usage_errors(capsys):
    for option, value in (("--steps", "0"), ("--repeats", "0"), ("--warmup", "-1"), ("--chunk-size", "0")):
        usage_error(capsys, option, value)


def test_every_rows_settings_are_checked_before_the_first_row_runs(capsys):
    """A bad --precision (or --batch, --samples) is a usage error at once, not after the rows before it ran: the
    classifier ("unused") is never loaded."""
    for option, value in (("--precision", "fp32,fp8"), ("--batch", "1,x"), ("--samples", "16,0")):
        usage_error(capsys, option, value)
