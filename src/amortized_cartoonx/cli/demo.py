"""``cartoonx demo``: the whole pipeline offline on the synthetic cartoon benchmark, in about 15 minutes on
2 CPU cores. Trains the classifier if missing, makes teacher masks, fits the amortized explainer, evaluates
exact CartoonX, the amortized explainer, warm start, Pixel RDE and baselines on held-out images, and writes
``outputs/demo/report.md`` with figures. A second run reuses everything that exists.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline offline on the synthetic benchmark (about 15 min on 2 CPU cores)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="outputs/demo", help="outputs: data, evaluation, report (default outputs/demo)")
    p.add_argument("--checkpoints", default="checkpoints/demo", help="what the demo trains (default checkpoints/demo)")
    p.add_argument("--train-images", type=int, default=None, help="explainer training images (default 256)")
    p.add_argument("--test-images", type=int, default=None, help="held-out evaluation images (default 16)")
    p.add_argument("--steps", type=int, default=None, help="exact optimizer steps (default 200)")
    p.add_argument("--fit-steps", type=int, default=None, help="explainer training steps (default 300)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    from amortized_cartoonx.demo import DemoConfig, run_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        "train_images": args.train_images,
        "test_images": args.test_images,
        "steps": args.steps,
        "fit_steps": args.fit_steps,
    }
    cfg = DemoConfig(
        out=args.out,
        checkpoints=args.checkpoints,
        progress=not args.no_progress,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    figures = run_demo(cfg)
    for name, f in figures["fast_paths"].items():
        print(
            f"{name}: RDE loss {f['loss_median']:.4f} vs exact {f['exact_loss_median']:.4f} "
            f"(ratio {f['loss_ratio_median']:.3f}), {f['speedup_median']:.0f}x faster"
        )
    print(f"wrote {args.out}/report.md")
    return 0
