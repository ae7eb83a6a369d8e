"""Every list of names the CLI keeps for a fast ``--help`` (methods, distortions, obfuscations, schedules,
calibrations, size limits) agrees with the registry it mirrors (one table, no drift)."""

from __future__ import annotations

from amortized_cartoonx import methods
from amortized_cartoonx.amortized import CALIBRATIONS
from amortized_cartoonx.cli import build_parser
from amortized_cartoonx.cli.common import (
    CALIBRATION_NAMES,
    DISTORTION_NAMES,
    DWT_DEFAULTS,
    LINK_NAMES,
    MAX_IMAGE_SIZE,
    OBFUSCATION_NAMES,
    PARAMETRISATION_NAMES,
    PRECISION_NAMES,
    SCHEDULE_NAMES,
)
from amortized_cartoonx.evaluation.methods import METHODS, method_names
from amortized_cartoonx.images import MAX_SIZE
from amortized_cartoonx.optimizer import PARAMETRISATIONS, PRECISIONS, SCHEDULES
from amortized_cartoonx.rde import DISTORTIONS, LINKS, OBFUSCATIONS
from amortized_cartoonx.wavelets import DEFAULT_LEVELS, DEFAULT_MODE, DEFAULT_WAVE


def _choices(command: str, option: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    return list(action.choices)


def test_the_evaluation_registry_is_the_method_table():
    assert sorted(method_names()) == sorted(methods.ALL_METHODS)
    assert all(name in METHODS for name in methods.ALL_METHODS)


def test_the_table_is_consistent():
    names = [m.name for m in methods.METHOD_TABLE]
    assert len(set(names)) == len(names)
    assert all(m.representation in (methods.WAVELET, methods.PIXEL) for m in methods.METHOD_TABLE)
    assert set(methods.DEFAULT_METHODS) | set(methods.CHECKPOINT_METHODS) == set(methods.ALL_METHODS)
    assert methods.title("cartoonx") == "CartoonX" and methods.title("unknown") == "unknown"


def test_cli_choices_follow_the_registries():
    assert _choices("explain", "--method") == list(methods.EXPLAIN_METHODS)
    assert sorted(DISTORTION_NAMES) == sorted(DISTORTIONS.names())
    assert list(LINK_NAMES) == list(LINKS)
    assert sorted(OBFUSCATION_NAMES) == sorted(OBFUSCATIONS.names())
    assert list(SCHEDULE_NAMES) == list(SCHEDULES)
    assert list(PARAMETRISATION_NAMES) == list(PARAMETRISATIONS)
    assert list(PRECISION_NAMES) == list(PRECISIONS)
    assert MAX_IMAGE_SIZE == MAX_SIZE
    assert list(CALIBRATION_NAMES) == list(CALIBRATIONS)
    assert DWT_DEFAULTS == {"wavelet": DEFAULT_WAVE, "levels": DEFAULT_LEVELS, "mode": DEFAULT_MODE}
    assert _choices("explain", "--calibration") == list(CALIBRATION_NAMES)
    for command in ("explain", "targets", "evaluate"):
        assert _choices(command, "--schedule") == list(SCHEDULE_NAMES)
        assert _choices(command, "--parametrisation") == list(PARAMETRISATION_NAMES)
        assert _choices(command, "--precision") == list(PRECISION_NAMES)
        assert _choices(command, "--distortion") == list(DISTORTION_NAMES)
        assert _choices(command, "--obfuscation") == list(OBFUSCATION_NAMES)
        assert _choices(command, "--link") == list(LINK_NAMES)
