"""``cartoonx fit --config configs/X.yaml [--trainer.* ...] [--ckpt_path CKPT]``: train the amortized explainer.

Every argument goes to PyTorch Lightning's ``LightningCLI`` (see ``cartoonx fit --help``), so every Trainer
option works from the command line: ``--trainer.devices 4 --trainer.strategy ddp``, ``--trainer.precision
bf16-mixed``, ``--trainer.max_steps 2000``, ``--ckpt_path last.ckpt`` to resume. Sections: ``model``
(:class:`~amortized_cartoonx.training.AmortizedCartoonXModule`; the network under ``model.mask_predictor``,
e.g. ``--model.mask_predictor.width 16``), ``data`` (:class:`~amortized_cartoonx.training.MaskPredictorDataModule`),
``trainer``, and ``run_name``, ``checkpoint_dir``, ``log_dir``, ``wandb_project``.

Logs go to wandb in offline mode (WANDB_MODE=offline unless you set WANDB_MODE; ``disabled`` turns it off)
and to CSV under ``logs/<run_name>/``; checkpoints (best by ``val/rde_loss``, and last) to
``checkpoints/<run_name>/``. Use a checkpoint with ``cartoonx explain --method amortized --checkpoint CKPT``.
"""

from __future__ import annotations

import argparse
import sys

from .common import plain_text


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fit`` for ``cartoonx --help``; the command itself is dispatched by :func:`main`."""
    p = sub.add_parser(
        "fit",
        help="train the amortized explainer (LightningCLI: --config configs/X.yaml, any --trainer.* option)",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(run=lambda args: main(args.rest))


def main(argv: list[str]) -> int:
    """Run ``cartoonx fit ARGV`` through LightningCLI; a :class:`CartoonXError` becomes one line and exit 2."""
    from amortized_cartoonx.cli import configure_logging
    from amortized_cartoonx.errors import CartoonXError

    configure_logging()
    from amortized_cartoonx.training import run_fit

    # LightningCLI reads sys.argv itself when the command came from the command line: DDP re-launches the
    # same command line in its child processes, so it must stay as the user typed it.
    from_command_line = list(sys.argv[1:]) == ["fit", *argv]
    try:
        run_fit(None if from_command_line else ["fit", *argv])
    except CartoonXError as exc:
        print(f"cartoonx fit: error: {exc}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as exc:  # a bad option or config value (jsonargparse)
        message = " ".join(str(exc).split())  # one line; jsonargparse's messages can span several
        print(f"cartoonx fit: error: {message[:500]} (cartoonx fit --help lists the options)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cartoonx fit: interrupted", file=sys.stderr)
        return 130
    return 0
