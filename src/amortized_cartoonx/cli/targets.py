"""``cartoonx targets --classifier SPEC --images DIR --out DIR``: teacher masks for the amortized explainer.

Runs the exact CartoonX optimizer over every image of DIR (each seeded by its file name and ``--seed``, so
``--limit``, a resume or the folder's other files never change an image's mask) through Lightning's
``Trainer.predict``, so the same command runs on the CPU, one GPU or many:

    cartoonx targets --classifier ../shared/models/mobilenet_v1_025_imagenet.pt --images photos/ --out teachers/
    cartoonx targets ... --accelerator gpu --devices 4 --strategy ddp

The output folder holds ``manifest.json`` (classifier, normalisation, size, wavelet and J, mask length,
every optimizer setting) and ``shard-<run-id>-r<rank>-<batch>.safetensors`` files of float16 masks, written
atomically. A killed run resumes where it stopped (run the same command again; the masks already there are
checked first, and a corrupt shard or manifest stops it with one line naming the file); a run with other
settings into the same folder, or into a folder of an older format, is refused. Read the masks with
``amortized_cartoonx.teacher_masks.store.TeacherMaskStore``.
"""

from __future__ import annotations

import argparse

from .common import (
    add_classifier_args,
    add_progress_arg,
    add_rde_args,
    add_size_arg,
    nonnegative_int,
    plain_text,
    positive_int,
)


def parse_devices(text: str) -> int | str:
    """``--devices``: an int (count, or -1 for all), ``auto``, or a list of indices such as ``0,2``."""
    try:
        return int(text)
    except ValueError:
        return text


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "targets",
        help="teacher masks: the exact CartoonX optimizer over an image folder (Lightning predict; CPU/GPU/DDP)",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (ids are the file names)")
    p.add_argument("--out", required=True, metavar="DIR", help="teacher-mask folder (created, or resumed)")
    add_classifier_args(p)
    add_size_arg(p, recorded="a synthetic classifier's training size")
    p.add_argument(
        "--limit", type=positive_int, default=None, metavar="N", help="only the first N images, by name (default: all)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=4, help="images optimised together per device (default 4)"
    )
    p.add_argument("--workers", type=nonnegative_int, default=0, help="DataLoader workers per device (default 0)")
    add_progress_arg(p)
    trainer = p.add_argument_group("Lightning Trainer")
    trainer.add_argument("--accelerator", default="auto", help="auto (default), cpu, gpu, cuda, mps, ...")
    trainer.add_argument(
        "--devices", type=parse_devices, default="auto", help="auto (default), a count, -1 for all, or ids like 0,1"
    )
    trainer.add_argument("--strategy", default="auto", help="auto (default), ddp, ddp_spawn, ...")
    trainer.add_argument("--num-nodes", type=positive_int, default=1, help="machines for multi-node DDP (default 1)")
    add_rde_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from amortized_cartoonx.teacher_masks.generate import generate_teacher_masks

    from .common import check_output_folder, fill_defaults, optimizer_config, recorded_settings

    check_output_folder(args.out)
    fill_defaults(args, *recorded_settings(None, args.classifier))  # a synthetic classifier's size
    summary = generate_teacher_masks(
        args.images,
        args.out,
        args.classifier,
        normalize=args.normalize,
        size=args.size,
        wave=args.wavelet,
        levels=args.levels,
        mode=args.mode,
        config=optimizer_config(args),
        batch_size=args.batch_size,
        num_workers=args.workers,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        progress=not args.no_progress,
        limit=args.limit,
    )
    if summary.rank == 0:
        print(summary.line())
    return 0
