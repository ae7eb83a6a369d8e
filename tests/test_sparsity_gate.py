"""The distortion-gated sparsity ramp's rule (``l1_gate``); the gate inside a fit is tested in test_training.py."""

from __future__ import annotations

import math

import pytest

from amortized_cartoonx.errors import ConfigError
from amortized_cartoonx.training.sparsity import SparsityGate, l1_ramp


def test_a_gate_that_always_passes_is_the_linear_ramp():
    gate = SparsityGate(warmup=4, gate=0.5, smoothing=0.0)
    fractions = [gate.update(0.1, 1.0) for _ in range(6)]
    assert fractions == [l1_ramp(step, 4) for step in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_the_gate_steps_back_while_the_masks_lose_the_decision_and_never_below_zero():
    gate = SparsityGate(warmup=4, gate=0.5, smoothing=0.0)
    for _ in range(3):
        gate.update(0.2, 1.0)  # ratio 0.2: climbs to 3/4
    assert gate.fraction == 0.75
    assert gate.update(0.8, 1.0) == 0.5  # ratio 0.8 >= 0.5: one step back
    assert gate.update(1.0, 1.0) == 0.25
    for _ in range(5):
        gate.update(1.2, 1.0)
    assert gate.fraction == 0.0 and gate.position == 0.0


def test_the_ratio_is_smoothed_and_bad_reports_leave_it_unchanged():
    gate = SparsityGate(warmup=10, gate=0.5, smoothing=0.5)
    gate.update(0.2, 1.0)
    assert gate.ratio == pytest.approx(0.2)
    gate.update(1.0, 1.0)  # one bad batch: the average 0.6 is above the gate
    assert gate.ratio == pytest.approx(0.6) and gate.position == 0.0
    gate.update(0.2, 1.0)  # 0.4: below again
    assert gate.ratio == pytest.approx(0.4) and gate.position == 1.0
    for distortion, empty in ((math.nan, 1.0), (0.3, 0.0), (0.3, math.inf)):
        gate.update(distortion, empty)
        assert gate.ratio == pytest.approx(0.4)
    fresh = SparsityGate(warmup=10, gate=0.5)
    assert fresh.update(math.nan, 1.0) == 0.0 and fresh.ratio is None  # no ratio yet: no sparsity


def test_the_gate_state_round_trips_and_bad_settings_are_refused():
    gate = SparsityGate(warmup=10, gate=0.5, smoothing=0.0)
    for _ in range(3):
        gate.update(0.1, 1.0)
    other = SparsityGate(warmup=10, gate=0.5, smoothing=0.0)
    other.restore(gate.state())
    assert (other.position, other.ratio) == (3.0, pytest.approx(0.1))
    for kwargs, message in (
        (dict(warmup=0, gate=0.5), "l1_warmup_steps"),
        (dict(warmup=5, gate=1.5), "l1_gate"),
        (dict(warmup=5, gate=0.5, smoothing=1.0), "smoothing"),
    ):
        with pytest.raises(ConfigError, match=message):
            SparsityGate(**kwargs)
