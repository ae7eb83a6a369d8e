"""``cartoonx train-classifier``: train the synthetic cartoon benchmark's classifier (PyTorch Lightning).

Writes ``OUT/classifier.safetensors`` (weights) and ``OUT/classifier.json`` (architecture, dataset settings,
held-out accuracy); every command then accepts ``--classifier synthetic`` (the default OUT) or
``--classifier synthetic:OUT``. An existing classifier trained with the same settings is reused (and said so);
``--force`` retrains. Optionally exports benchmark images with ground-truth masks (``--export DIR``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_device_arg, plain_text, positive_int

_DEFAULTS = {  # mirror of TrainConfig's defaults; kept here so --help needs no torch (a test checks they agree)
    "size": 64,
    "train_size": 6000,
    "epochs": 5,
    "batch_size": 64,
    "lr": 4e-3,
    "held_out": 2000,
    "seed": 0,
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-classifier",
        help="train the synthetic cartoon benchmark's classifier",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = _DEFAULTS
    p.add_argument("--out", default="checkpoints/synthetic", metavar="DIR", help="default: checkpoints/synthetic")
    p.add_argument("--size", type=int, default=d["size"], help=f"image side in pixels (default {d['size']})")
    p.add_argument(
        "--train-size", type=int, default=d["train_size"], help=f"training images (default {d['train_size']})"
    )
    p.add_argument(
        "--epochs", type=int, default=d["epochs"], help=f"passes over the training images (default {d['epochs']})"
    )
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"default {d['batch_size']}")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate, one-cycle AdamW (default {d['lr']})")
    p.add_argument(
        "--held-out", type=int, default=d["held_out"], help=f"held-out test images (default {d['held_out']})"
    )
    p.add_argument(
        "--seed", type=int, default=d["seed"], help=f"training data and initialisation seed (default {d['seed']})"
    )
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no random flips and quarter turns")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the network is tiny; 0: torch's choice)"
    )
    p.add_argument("--force", action="store_true", help="retrain even if a classifier exists at --out")
    p.add_argument("--export", default=None, metavar="DIR", help="also write held-out benchmark images to DIR")
    p.add_argument("--export-images", type=positive_int, default=None, help="images for --export (default 100)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_device_arg(p)
    p.set_defaults(run=run)


_ACCELERATORS = {"cpu": "cpu", "cuda": "gpu", "mps": "mps"}


def run(args: argparse.Namespace) -> int:
    from amortized_cartoonx.errors import ConfigError
    from amortized_cartoonx.runtime import resolve_device
    from amortized_cartoonx.synthetic.classifier_training import (
        ClassifierExistsError,
        TrainConfig,
        train_synthetic_classifier,
    )

    device = resolve_device(args.device)
    if args.threads < 0:
        raise ConfigError(f"--threads must be 0 (torch's choice) or more, got {args.threads}")
    if args.export_images is not None and not args.export:
        raise ConfigError("--export-images is for --export DIR (the folder to write the images to)")
    if args.export and Path(args.export).exists() and not Path(args.export).is_dir():
        raise ConfigError(f"--export {args.export} is a file, not a folder")  # checked before the training
    export_images = args.export_images or 100
    config = TrainConfig(
        size=args.size,
        train_size=args.train_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        augment=args.augment,
        held_out=args.held_out,
        seed=args.seed,
    ).validate()
    try:
        result = train_synthetic_classifier(
            args.out,
            config,
            force=args.force,
            accelerator=_ACCELERATORS[device.type],
            progress=args.progress,
            threads=args.threads or None,
        )
    except ClassifierExistsError as exc:  # the command's way out, not the function's force=True
        raise ClassifierExistsError(
            exc.weights, exc.changed, "pass --force to retrain, or choose another --out"
        ) from None
    if result.reused:
        print(f"reusing the classifier at {result.weights} (held-out accuracy {result.accuracy:.2%}); --force retrains")
    else:
        print(
            f"trained in {result.seconds:.0f} s: held-out accuracy {result.accuracy:.2%} on {config.held_out} images; "
            f"saved {result.weights} and {result.metadata.name}"
        )
    if args.export:
        from amortized_cartoonx.synthetic.export import write_synthetic_folder

        write_synthetic_folder(args.export, export_images, size=args.size, progress=args.progress)
        print(f"wrote {export_images} held-out images with ground truth to {args.export}/")
    return 0
