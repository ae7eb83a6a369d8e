"""Small helpers about where and how torch runs: a module's device, device synchronisation and intra-op thread
counts."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

#: A deprecation inside pytorch_lightning (torch's ``LeafSpec``) that Lightning prints on every run and no user
#: can act on; the commands that run Lightning ignore it (:func:`ignore_lightning_noise`).
LIGHTNING_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def ignore_lightning_noise() -> None:
    """Ignore, in the current warnings context, what Lightning prints on every run that asks nothing of the user:
    the notice that modules are in eval mode (the frozen classifier is, on purpose) and
    :data:`LIGHTNING_LEAFSPEC_WARNING`."""
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=LIGHTNING_LEAFSPEC_WARNING, category=FutureWarning)


@contextmanager
def lightning_interrupts(trainer: Callable[[], object | None]) -> Iterator[None]:
    """Around ``Trainer.fit``/``predict``: Lightning turns Ctrl+C into ``exit(1)`` after its graceful stop; raise
    it as the ``KeyboardInterrupt`` it was when ``trainer()`` (the Trainer, or None before it exists) says so."""
    try:
        yield
    except SystemExit:
        if getattr(trainer(), "interrupted", False):
            raise KeyboardInterrupt from None
        raise


def module_device(module: object) -> torch.device:
    """Where ``module`` lives: the device of its first parameter or buffer; the CPU for a module without any
    (or a plain callable)."""
    if isinstance(module, torch.nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device from ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda[:N]``, ``mps`` or a
    :class:`torch.device`, checked to exist here.

    Raises:
        ConfigError: an unknown name, or a device this machine does not have (before any model is moved there).
    """
    from .errors import ConfigError

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for, but no CUDA GPU is available (use 'cpu' or 'auto')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r} was asked for, but there are {torch.cuda.device_count()} GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for, but MPS is not available (use 'cpu' or 'auto')")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so wall-clock timings are honest on a GPU); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op torch threads (None: unchanged), restoring the setting afterwards."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread() -> AbstractContextManager[None]:
    """Run tiny-tensor work (e.g. rendering a synthetic scene: many small tensor operations) on one thread,
    where torch's intra-op threads only add overhead."""
    return torch_threads(1)
