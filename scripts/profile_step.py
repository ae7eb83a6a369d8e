"""Where does an optimizer step spend its time? Timings and a torch.profiler table of a few steps.

For one classifier and one (B images, L noise samples) it prints: seconds of a bare classifier forward+backward
on the B*L batch (first call and steady state), seconds per optimizer step (steady state, as
``scripts/bench_optimizer.py`` measures it), and the profiler's top operators over ``--profile-steps`` steps
sorted by device time (CUDA) or CPU time, so the step's own costs (noise, DWT, copies) can be told from the
classifier's.

    python scripts/profile_step.py --classifier ../shared/models/mobilenet_v3_small_imagenet.pt \\
        --size 256 --batch 8 --samples 64 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from bench_optimizer import bare_pass  # noqa: E402  (scripts/bench_optimizer.py)

from amortized_cartoonx.allocator import tune_cpu_allocator  # noqa: E402
from amortized_cartoonx.classifiers import load_classifier  # noqa: E402
from amortized_cartoonx.cli.common import add_link_arg, plain_text  # noqa: E402
from amortized_cartoonx.optimizer import CartoonX, PixelRDE, default_chunk  # noqa: E402
from amortized_cartoonx.runtime import resolve_device, synchronize  # noqa: E402


def seconds(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", required=True)
    p.add_argument("--method", default="cartoonx", choices=("cartoonx", "pixel-rde"))
    add_link_arg(p)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=10, help="steps timed for the per-step figure")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    tune_cpu_allocator()  # as the cartoonx command runs (amortized_cartoonx/allocator.py)

    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    device = resolve_device(args.device)
    classifier = load_classifier(args.classifier, device=device)
    n = args.batch * args.samples
    print(
        f"# profile_step: {args.method}, {args.classifier}, {args.size}px, B={args.batch}, L={args.samples}, "
        f"{args.precision}, {device}, torch {torch.__version__}, cudnn.benchmark={torch.backends.cudnn.benchmark}",
        flush=True,
    )
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    per_pass = args.batch * default_chunk(args.samples, images)  # the optimizer's sample chunks
    bare = bare_pass(classifier, n, args.size, device, args.precision, per_pass)
    first = seconds(bare, device)
    for _ in range(2):
        bare()
    steady = min(seconds(bare, device) for _ in range(3))
    print(
        f"bare forward+backward on {n} inputs in passes of {per_pass}: first call {first:.3f} s, steady {steady:.4f} s",
        flush=True,
    )

    cls = PixelRDE if args.method == "pixel-rde" else CartoonX
    explainer = cls(classifier, num_samples=args.samples, measure_samples=1, precision=args.precision, link=args.link)
    first = seconds(lambda: explainer.explain(images, steps=2), device)
    short = min(seconds(lambda: explainer.explain(images, steps=2), device) for _ in range(2))
    long = min(seconds(lambda: explainer.explain(images, steps=2 + args.steps), device) for _ in range(2))
    step = (long - short) / args.steps
    print(
        f"optimizer: first call (2 steps) {first:.3f} s, fixed cost of a call {short - 2 * step:.3f} s, "
        f"{step:.4f} s/step, overhead ratio {step / steady:.2f}",
        flush=True,
    )

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        explainer.explain(images, steps=args.profile_steps)
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=48), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
