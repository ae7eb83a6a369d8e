"""The C allocator's settings for CPU runs."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from amortized_cartoonx import allocator


def test_the_environment_keeps_the_defaults(monkeypatch):
    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setenv(allocator.ENV_VAR, "default")
    assert allocator.tune_cpu_allocator() is False


def _has_glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_glibc(), reason="needs glibc's mallopt")
def test_tuning_applies_on_glibc_once_and_the_command_line_does_it_without_torch():
    code = (
        "import sys; from amortized_cartoonx.allocator import tune_cpu_allocator as t; "
        "print(t(), t(), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["True", "True", "False"]
