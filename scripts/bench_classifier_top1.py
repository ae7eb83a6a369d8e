"""Top-1 accuracy and speed of a classifier spec on a labelled image folder (``labels.csv``: file,class_index).

    OMP_NUM_THREADS=1 python scripts/bench_classifier_top1.py --classifier efficientnet-lite0 \\
        --images ../shared/data/imagenet-samples --count 200 --size 224 --threads 1

The first ``--count`` files in name order. ``--size S`` resizes (shorter side to S, antialiased, centre crop:
what ``cartoonx explain --size S`` feeds the classifier); ``--crop S`` instead cuts the centre S x S out of the
image as stored (the usual ImageNet evaluation: 256 px photos, centre 224). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from amortized_cartoonx.classifiers import NORMALIZATIONS, load_classifier  # noqa: E402
from amortized_cartoonx.cli.common import plain_text  # noqa: E402
from amortized_cartoonx.images import load_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classifier", required=True, metavar="SPEC")
    parser.add_argument("--normalize", default="auto", choices=NORMALIZATIONS)
    parser.add_argument("--images", required=True, type=Path, help="a folder with labels.csv (file,class_index)")
    parser.add_argument("--count", type=int, default=200)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, default=None, help="resize (shorter side) and centre-crop to this size")
    size.add_argument("--crop", type=int, default=None, help="cut the centre crop of this size, no resizing")
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with (args.images / "labels.csv").open() as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["file"])[: args.count]
    classifier = load_classifier(args.classifier, normalize=args.normalize)
    images = load_images([args.images / r["file"] for r in rows], size=args.size if args.crop is None else None)
    if args.crop is not None:
        top, left = (images.shape[2] - args.crop) // 2, (images.shape[3] - args.crop) // 2
        images = images[:, :, top : top + args.crop, left : left + args.crop]
    labels = torch.tensor([int(r["class_index"]) for r in rows])
    start = time.perf_counter()
    with torch.no_grad():
        predicted = torch.cat(
            [classifier(images[i : i + args.batch]).argmax(1) for i in range(0, len(rows), args.batch)]
        )
    seconds = time.perf_counter() - start
    correct = int((predicted == labels).sum())
    print(
        json.dumps(
            {
                "classifier": args.classifier,
                "images": len(rows),
                "input": list(images.shape[2:]),
                "preprocessing": f"centre crop {args.crop}" if args.crop is not None else f"resize {args.size}",
                "correct": correct,
                "top1": round(correct / len(rows), 4),
                "forward_seconds": round(seconds, 2),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
