"""``cartoonx demo``: the whole pipeline offline on the synthetic cartoon benchmark, in about 9 minutes on
2 idle CPU cores. Trains the classifier if missing, makes teacher masks, fits the amortized explainer, evaluates
exact CartoonX, the amortized explainer, warm start, Pixel RDE and baselines on held-out images, and writes
``outputs/demo/report.md`` with figures. A second run reuses everything that exists.
"""

from __future__ import annotations

import argparse

from .common import plain_text, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline offline on the synthetic benchmark (about 9 min on 2 idle CPU cores)",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="outputs/demo", help="outputs: data, evaluation, report (default outputs/demo)")
    p.add_argument("--checkpoints", default="checkpoints/demo", help="what the demo trains (default checkpoints/demo)")
    p.add_argument(
        "--classifier-dir",
        default="checkpoints/synthetic",
        help="the synthetic classifier, trained there if missing (default checkpoints/synthetic, shared with "
        "cartoonx train-classifier)",
    )
    defaults = _defaults()
    for flag, field, what in (
        ("--train-images", "train_images", "explainer training images"),
        ("--teacher-images", "teacher_images", "training images with an exact teacher mask, 0 for none"),
        ("--test-images", "test_images", "held-out evaluation images"),
        ("--steps", "steps", "exact optimizer steps (teachers and reference)"),
        ("--fit-steps", "fit_steps", "explainer training steps"),
    ):
        p.add_argument(flag, type=int, default=None, dest=field, help=f"{what} (default {defaults[field]})")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _defaults() -> dict:
    """The demo's defaults, read from :class:`DemoConfig` itself (a light import: no Lightning)."""
    from dataclasses import fields

    from amortized_cartoonx.demo import DemoConfig

    return {f.name: f.default for f in fields(DemoConfig)}


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    from amortized_cartoonx.demo import DemoConfig, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        name: getattr(args, name) for name in ("train_images", "teacher_images", "test_images", "steps", "fit_steps")
    }
    cfg = DemoConfig(
        out=args.out,
        checkpoints=args.checkpoints,
        classifier_dir=args.classifier_dir,
        progress=not args.no_progress,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    figures = run_demo(cfg)
    for name, f in figures["results"]["fast_paths"].items():
        speedup = figures["run"]["fast_paths"][name]["speedup_median"]
        print(
            f"{name}: RDE loss {f['loss_median']:.4f} vs exact {f['exact_loss_median']:.4f} "
            f"(ratio {f['loss_ratio_median']:.3f}), {_speed(speedup)}"
        )
    print(f"wrote {args.out}/report.md")
    return 0


def _speed(speedup: float) -> str:
    """``223x faster``, or ``1.6x slower`` (a warm start with many steps can take longer than the exact run)."""
    if speedup >= 1:
        return f"{speedup:.0f}x faster" if speedup >= 10 else f"{speedup:.1f}x faster"
    return f"{1 / speedup:.1f}x slower" if speedup > 0 else "speed not measured"
