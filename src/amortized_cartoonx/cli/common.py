"""Argument groups shared by the sub-commands, and small helpers. Import-light (no torch at import)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

#: Mirrors of the registries in ``rde`` (kept here so ``--help`` needs no torch; ``tests/test_methods.py`` ties them).
DISTORTION_NAMES = ("label", "maximize-target", "l2", "kl")
OBFUSCATION_NAMES = ("gaussian-adaptive", "zero", "uniform")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_classifier_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("classifier")
    group.add_argument(
        "--classifier",
        required=required,
        metavar="SPEC",
        help="torchvision:NAME[:none|WEIGHTS], PATH.pt (TorchScript), PATH.pt2 (ExportedProgram), "
        "package.module:callable, or synthetic[:PATH]",
    )
    group.add_argument(
        "--normalize",
        default="auto",
        choices=("auto", "imagenet", "none"),
        help="input normalisation inside the wrapper; auto: ImageNet's for torchvision models, none otherwise",
    )


def add_rde_args(parser: argparse.ArgumentParser, steps: int = 2000) -> None:
    """The exact optimizer's options (defaults: the paper's)."""
    group = parser.add_argument_group("RDE optimizer (defaults: the paper's)")
    group.add_argument("--steps", type=int, default=steps, help=f"Adam steps (default {steps})")
    group.add_argument("--samples", type=int, default=64, help="noise samples per step (default 64)")
    group.add_argument(
        "--l1-lambda", type=float, default=None, help="sparsity weight (default 20 CartoonX, 4 Pixel RDE)"
    )
    group.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    group.add_argument("--distortion", default="label", choices=DISTORTION_NAMES, help="default: label")
    group.add_argument(
        "--obfuscation", default="gaussian-adaptive", choices=OBFUSCATION_NAMES, help="default: gaussian-adaptive"
    )
    group.add_argument("--wavelet", default="db3", help="discrete wavelet (default db3)")
    group.add_argument("--levels", type=int, default=5, help="DWT scales J, capped for small images (default 5)")
    group.add_argument("--mode", default="zero", help="DWT padding: zero (default), symmetric, reflect, periodization")
    group.add_argument("--chunk-size", type=int, default=None, help="noise samples per forward pass (bounds memory)")
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="noise seed; an image's noise depends on this seed and its file name only (default 0)",
    )


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N, mps")


def resolve_device(name: str):
    """A torch.device from ``auto``/``cpu``/``cuda[:N]``/``mps``, checked to exist."""
    import torch

    from amortized_cartoonx.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for, but MPS is not available")
    return device


def optimizer_config(args: argparse.Namespace):
    """An :class:`OptimizerConfig` from the parsed RDE options."""
    from amortized_cartoonx.optimizer import OptimizerConfig

    return OptimizerConfig(
        steps=args.steps,
        num_samples=args.samples,
        lr=args.lr,
        l1_lambda=args.l1_lambda,
        obfuscation=args.obfuscation,
        distortion=args.distortion,
        chunk_size=args.chunk_size,
        seed=args.seed,
    ).validate()


def build_optimizer(method: str, classifier, args: argparse.Namespace):
    """The exact optimizer for ``method`` (cartoonx or pixel-rde) from the parsed options."""
    from amortized_cartoonx.optimizer import CartoonX, PixelRDE

    config = optimizer_config(args)
    if method == "pixel-rde":
        return PixelRDE(classifier, config=config)
    return CartoonX(classifier, wave=args.wavelet, levels=args.levels, mode=args.mode, config=config)


def warn(message: str) -> None:
    print(f"cartoonx: {message}", file=sys.stderr)
