"""Benchmark the exact optimizer against the bare classifier it is built on.

For each (B images, L noise samples) it prints: seconds per optimizer step, seconds of the bare classifier's
forward+backward (gradient w.r.t. the input) on the same B*L images in the optimizer's passes (``chunk`` samples
of the B images per pass: on a CPU cache-sized chunks by default, ``--chunk-size`` to set), their ratio (the
optimizer's overhead: noise, DWT/IDWT, loss, Adam; the aim is <= 1.2), and seconds per image at the paper's
2000 steps.

    python scripts/bench_optimizer.py --classifier ../shared/models/mobilenet_v3_small_imagenet.pt \\
        --size 256 --batch 1,4 --samples 16,64 --device cpu

Seconds per step are measured as (time of S + W steps - time of W steps) / S, so the fixed costs of a call
(classifier on the clean image, DWT, final measurement) cancel out. The steps and the bare pass are timed in
``--repeats`` rounds that run each once in turn; the ratio is the median of the rounds' ratios (range in
brackets), so a drift of the host's speed between measurements cancels.

``--precision fp32,bf16`` also times the optimizer's bf16 path (``OptimizerConfig.precision``; the classifier
under bfloat16 autocast). ``--compile`` wraps the classifier in ``torch.compile`` first (its compilation is
paid in the warm-up and not timed). ``--allocator`` (default ``tuned``, as the ``cartoonx`` command runs) sets
glibc's allocator with :func:`amortized_cartoonx.allocator.tune_cpu_allocator`; ``default`` keeps glibc's
defaults, under which a CPU step can fault in fresh pages for its large tensors.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from amortized_cartoonx.allocator import tune_cpu_allocator  # noqa: E402
from amortized_cartoonx.classifiers import load_classifier  # noqa: E402
from amortized_cartoonx.cli.common import add_link_arg, nonnegative_int, plain_text, positive_int  # noqa: E402
from amortized_cartoonx.errors import CartoonXError, one_line  # noqa: E402
from amortized_cartoonx.optimizer import PRECISIONS, CartoonX, PixelRDE, default_chunk  # noqa: E402
from amortized_cartoonx.runtime import resolve_device, synchronize  # noqa: E402


def paired_rounds(fns: dict, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Wall-clock seconds of every function in ``fns``, in ``repeats`` rounds that run each once in turn (after one
    warm-up each): a round's figures share the host's state, so ratios taken within a round cancel its drift."""
    for fn in fns.values():
        fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def bare_pass(
    classifier,
    batch: int,
    size: int,
    device: torch.device,
    precision: str = "fp32",
    per_pass: int | None = None,
    link: str = "softmax",
):
    """A function that runs the classifier forward+backward on ``batch`` random images (gradient w.r.t. the input;
    the classifier under bf16 autocast for ``precision="bf16"``, as the optimizer runs it), in passes of at most
    ``per_pass`` images (default: one pass), as the optimizer's sample chunks run it."""
    per_pass = min(batch, per_pass or batch)
    sizes = [per_pass] * (batch // per_pass) + ([batch % per_pass] if batch % per_pass else [])
    inputs = {n: torch.rand(n, 3, size, size, device=device, requires_grad=True) for n in set(sizes)}

    def step():
        for n in sizes:
            x = inputs[n]
            x.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = classifier(x)
            probs = logits.float().softmax(-1) if link == "softmax" else logits.float().sigmoid()
            probs[:, 0].sum().backward()

    return step


class StandIn(torch.nn.Module):
    """A classifier that costs next to nothing (channel means, then a linear layer to ``classes`` logits): the
    optimizer's step with it measures the optimizer's own cost (noise, mixing, inverse DWT, loss, Adam)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean((2, 3)))


def step_rounds(
    explainer, images: torch.Tensor, steps: int, warmup: int, repeats: int, others: dict | None = None
) -> tuple[list[float], dict[str, list[float]]]:
    """Seconds per optimizer step in each of ``repeats`` rounds, ``(W + S steps - W steps) / S`` within the round
    (the fixed costs of a call cancel), and the seconds of the ``others`` (name -> function) in the same rounds."""
    fns = {
        "long": lambda: explainer.explain(images, steps=warmup + steps),
        "short": lambda: explainer.explain(images, steps=warmup),
        **(others or {}),
    }
    times = paired_rounds(fns, images.device, repeats)
    per_step = [max(a - b, 1e-9) / steps for a, b in zip(times.pop("long"), times.pop("short"))]
    return per_step, times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", required=True)
    p.add_argument("--method", default="cartoonx", choices=("cartoonx", "pixel-rde"))
    add_link_arg(p)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", default="1,4", help="comma-separated B values")
    p.add_argument("--samples", default="16,64", help="comma-separated L values")
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps per measurement (default 20)")
    p.add_argument("--warmup", type=nonnegative_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=5, help="measurement rounds (default 5)")
    p.add_argument("--paper-steps", type=int, default=2000)
    p.add_argument("--fast-steps", type=int, default=200)
    p.add_argument("--precision", default="fp32", help=f"comma-separated: {', '.join(PRECISIONS)}")
    p.add_argument("--compile", action="store_true", help="torch.compile the classifier first")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument(
        "--allocator",
        default="tuned",
        choices=("tuned", "default"),
        help="glibc malloc settings: tuned (as the cartoonx command runs) or glibc's defaults",
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=None,
        help="noise samples per pass (the optimizer's chunk_size); default: the optimizer's (cache-sized on a CPU)",
    )
    args = p.parse_args(argv)
    # every row's settings checked before the first row runs
    batches, samples = positive_list(p, "--batch", args.batch), positive_list(p, "--samples", args.samples)
    precisions = args.precision.split(",")
    unknown = [v for v in precisions if v not in PRECISIONS]
    if unknown:
        p.error(f"--precision: unknown {', '.join(map(repr, unknown))}; use comma-separated {', '.join(PRECISIONS)}")
    try:
        return bench(args, batches, samples, precisions)
    except CartoonXError as exc:
        print(f"bench_optimizer: error: {one_line(exc)}", file=sys.stderr)
        return 2


def positive_list(p: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    """A comma-separated list of positive integers, or a usage error naming ``option``."""
    items = text.split(",")
    if not all(item.strip().isdigit() and int(item) > 0 for item in items):
        p.error(f"{option} takes comma-separated positive integers, got {text!r}")
    return [int(item) for item in items]


def bench(args: argparse.Namespace, batches: list[int], samples: list[int], precisions: list[str]) -> int:
    allocator = "tuned" if args.allocator == "tuned" and tune_cpu_allocator() else "default"

    device = resolve_device(args.device)
    classifier = load_classifier(args.classifier, device=device)
    if args.compile:
        classifier = torch.compile(classifier)
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    )
    print(
        f"# bench_optimizer: {args.method}, {args.classifier}, {args.size}px, device {device} ({hardware}), "
        f"torch {torch.__version__}{', torch.compile' if args.compile else ''}, allocator {allocator}, "
        f"chunk size {args.chunk_size or 'default'}"
    )
    print()
    print(
        f"| B | L | chunk | precision | s/step | bare fwd+bwd s | overhead ratio (range) | own s/step | s/image, "
        f"{args.paper_steps} steps | s/image, {args.fast_steps} steps |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with torch.no_grad():  # the stand-in's class count: the classifier's, once
        classes = classifier(torch.rand(1, 3, args.size, args.size, device=device)).shape[-1]
    for b in batches:
        for L in samples:
            for precision in precisions:
                gen = torch.Generator().manual_seed(0)
                images = torch.rand(b, 3, args.size, args.size, generator=gen).to(device)
                cls = PixelRDE if args.method == "pixel-rde" else CartoonX
                settings = dict(
                    num_samples=L, measure_samples=1, precision=precision, chunk_size=args.chunk_size, link=args.link
                )
                chunk = args.chunk_size or default_chunk(L, images)  # the optimizer's samples per pass
                bare_fn = bare_pass(classifier, b * L, args.size, device, precision, per_pass=b * chunk, link=args.link)
                steps, others = step_rounds(
                    cls(classifier, **settings), images, args.steps, args.warmup, args.repeats, {"bare": bare_fn}
                )
                ratios = [s / t for s, t in zip(steps, others["bare"])]  # within each round
                step, bare, ratio = (statistics.median(v) for v in (steps, others["bare"], ratios))
                stand_in = cls(StandIn(classes).to(device), **settings)  # the same optimizer, a free classifier
                own = statistics.median(step_rounds(stand_in, images, args.steps, args.warmup, args.repeats)[0])
                row = {
                    "B": b,
                    "L": L,
                    "chunk": chunk,
                    "precision": precision,
                    "compile": args.compile,
                    "seconds_per_step": step,
                    "bare_seconds": bare,
                    "ratio": ratio,
                    "ratio_range": [min(ratios), max(ratios)],
                    "own_seconds_per_step": own,
                    "seconds_per_image_paper": step * args.paper_steps / b,
                    "seconds_per_image_fast": step * args.fast_steps / b,
                    "device": str(device),
                    "hardware": hardware,
                    "size": args.size,
                    "classifier": args.classifier,
                    "method": args.method,
                    "allocator": allocator,
                }
                rows.append(row)
                print(
                    f"| {b} | {L} | {chunk} | {precision} | {step:.4f} | {bare:.4f} | {ratio:.2f} "
                    f"({min(ratios):.2f}-{max(ratios):.2f}) | {own:.4f} "
                    f"| {row['seconds_per_image_paper']:.2f} | {row['seconds_per_image_fast']:.3f} |",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
