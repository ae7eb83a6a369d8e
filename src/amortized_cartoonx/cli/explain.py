"""``cartoonx explain IMAGE [IMAGE ...] --classifier SPEC --out DIR``: explain images (or the images of folders),
one figure each.

Writes per image ``DIR/<stem>.png`` (figure), ``DIR/<stem>.safetensors`` (mask, explanation, metadata; read
it with :func:`amortized_cartoonx.explanation.load_saved_explanation`) and one JSON line in ``DIR/summary.jsonl``.
Every file is written atomically; all images are read and checked before any work starts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..methods import CHECKPOINT_METHODS, EXACT_METHODS, EXPLAIN_METHODS
from .common import (
    CALIBRATION_NAMES,
    add_channels_arg,
    add_classifier_args,
    add_device_arg,
    add_progress_arg,
    add_rde_args,
    add_size_arg,
    nonnegative_int,
    parse_targets,
    plain_text,
    positive_int,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="explain images with CartoonX, Pixel RDE or the amortized explainer",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (any format PIL reads), or folders: their images, sorted by name",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--method", default="cartoonx", choices=EXPLAIN_METHODS, help="default: cartoonx")
    add_classifier_args(p)
    tg = p.add_mutually_exclusive_group()
    tg.add_argument(
        "--target",
        default=None,
        help="class to explain: one index for all, or one per image separated by commas; with --labels also a "
        "class name (a whole line of the file, or one of its comma-separated names) (default: the predicted class; "
        "with --link sigmoid the label of the largest logit)",
    )
    tg.add_argument(
        "--target-file",
        default=None,
        metavar="FILE",
        help='the class to explain in each image by its file name: a JSON object {"image.jpg": class, ...} or '
        "lines NAME,CLASS (as cartoonx evaluate reads it); every image needs one",
    )
    add_size_arg(p)
    p.add_argument(
        "--keep-aspect",
        action="store_true",
        help="resize the shorter side to --size and keep the aspect ratio instead of centre-cropping a square "
        "(cartoonx and pixel-rde; images of one shape are batched together)",
    )
    add_channels_arg(p)
    p.add_argument("--batch-size", type=positive_int, default=4, help="images optimised together (default 4)")
    p.add_argument("--labels", default=None, metavar="FILE", help="class names, one per line")
    p.add_argument("--checkpoint", default=None, metavar="CKPT", help="amortized explainer (amortized, warm)")
    p.add_argument(
        "--refine-steps",
        type=nonnegative_int,
        default=None,
        help="warm: optimizer steps after the warm start (default: the schedule's; refine: 60)",
    )
    p.add_argument(
        "--calibrate-samples",
        type=nonnegative_int,
        default=0,
        help="amortized and warm: calibrate each predicted mask (the candidate with the lowest RDE loss on this "
        "many noise samples; 0, the default: the single forward pass)",
    )
    p.add_argument(
        "--calibration",
        choices=CALIBRATION_NAMES,
        default=None,
        help="with --calibrate-samples: the candidates are the logits plus a few shifts (shift, default) or binary "
        "masks of the k largest predicted entries for a few k (top-k)",
    )
    add_progress_arg(p)
    add_device_arg(p)
    add_rde_args(p)
    p.set_defaults(run=run)


def file_targets(path: str, images: list[Path], labels: list[str] | None) -> list[int]:
    """``--target-file``: each image's class by its file name (:func:`~.common.read_target_file`).

    Raises:
        InputError: an image without an entry, or two images of one file name (in different folders).
    """
    from amortized_cartoonx.errors import InputError
    from amortized_cartoonx.evaluation.context import check_targets

    from .common import read_target_file

    mapping = read_target_file(path, labels)
    names = [p.name for p in images]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--target-file names images by file name, and {twice[0]!r} is the name of two inputs")
    check_targets(mapping, names, f"--target-file {path}")
    return [mapping[n] for n in names]


def output_stems(paths: list[Path]) -> list[str]:
    """One output stem per input, all different: the file's stem, or ``stem_1``, ``stem_2``, ... when taken
    (``a/x.jpg b/x.jpg c/x_1.png`` give ``x``, ``x_1``, ``x_1_1``). Compared case-insensitively, so the names
    stay distinct on case-insensitive file systems too."""
    used: set[str] = {"summary"}
    stems = []
    for p in paths:
        stem, k = p.stem, 0
        while stem.lower() in used:
            k += 1
            stem = f"{p.stem}_{k}"
        used.add(stem.lower())
        stems.append(stem)
    return stems


def build_explainer(args: argparse.Namespace, classifier, device, channels: int = 3):
    """The explainer for ``--method``; every one answers ``explain(images, target, seeds=...)``."""
    from amortized_cartoonx.errors import ConfigError

    from .common import build_optimizer

    if args.refine_steps is not None and args.method != "warm":
        raise ConfigError(f"--refine-steps is for --method warm, not {args.method}")
    step_options = ("steps", "schedule", "lr", "parametrisation", "precision")  # None unless given
    given = [f"--{name}" for name in step_options if getattr(args, name, None) is not None]
    if given and args.method == "amortized":
        verb = "is" if len(given) == 1 else "are"
        raise ConfigError(
            f"{', '.join(given)} {verb} for --method cartoonx, pixel-rde or warm, not amortized (it runs no steps)"
        )
    if args.calibration is not None and not args.calibrate_samples:
        raise ConfigError("--calibration chooses the candidates of --calibrate-samples N (N > 0), which is not given")
    if args.method in EXACT_METHODS:
        if args.calibrate_samples:
            raise ConfigError(f"--calibrate-samples is for --method amortized or warm, not {args.method}")
        if args.checkpoint:
            raise ConfigError(f"--checkpoint is for --method amortized or warm, not {args.method}")
        return build_optimizer(args.method, classifier, args)
    if not args.checkpoint:
        raise ConfigError(f"--method {args.method} needs --checkpoint CKPT (a cartoonx fit checkpoint)")
    from amortized_cartoonx.amortized import AmortizedExplainer, WarmStartExplainer

    from .common import optimizer_config

    amortized = AmortizedExplainer.from_checkpoint(
        args.checkpoint,
        classifier,
        device=device,
        measure_samples=args.samples,
        seed=args.seed,
        calibration_samples=args.calibrate_samples,
        calibration=args.calibration or "shift",
    )  # measured on as many noise samples as the exact optimizer
    amortized.check_compatible(
        args.classifier,
        image_size=args.size,
        wave=args.wavelet,
        levels=args.levels,
        mode=args.mode,
        l1_lambda=args.l1_lambda,
        distortion=args.distortion,
        obfuscation=args.obfuscation,
        channels=channels,
        link=args.link,
    )
    if args.method == "amortized":
        return amortized
    config = optimizer_config(args, default_schedule="refine")  # the warm start's own schedule unless given
    return WarmStartExplainer(amortized, refine_steps=args.refine_steps, config=config)


def preflight(classifier, explainer, images, targets, device, link: str = "softmax") -> int:
    """Fail on what would fail later (classifier output, target range, image size) before any output, once per
    image shape (``images``: a list of ``(C, H, W)``); returns the classifier's number of classes."""
    import torch

    from amortized_cartoonx.rde import original_logits, resolve_target

    firsts = {tuple(x.shape): x for x in reversed(images)}  # the first image of each shape
    with torch.no_grad():
        for k, image in enumerate(firsts.values()):
            first = image[None].to(device)
            # two copies: a model traced or exported for batch size 1 fails here, not after the first outputs
            logits = original_logits(classifier, first.repeat(2, 1, 1, 1), link)[:1]
            if targets is not None and k == 0:
                resolve_target(targets, logits.expand(len(targets), -1))
            representation = getattr(explainer, "representation", None)
            if representation is not None:
                representation.encode(first)
    return logits.shape[-1]


def image_paths(given: list[str]) -> list[Path]:
    """The files to explain: each given file, and the images directly in each given folder (sorted by name;
    :func:`~amortized_cartoonx.images.list_images`)."""
    from amortized_cartoonx.images import list_images

    paths: list[Path] = []
    for item in given:
        path = Path(item)
        paths.extend(list_images(path) if path.is_dir() else [path])
    return paths


def shape_batches(images: list, batch_size: int) -> list[list[int]]:
    """The images' indices in batches of at most ``batch_size`` images of one shape: the shapes in the order
    they first appear, each shape's images in their order (images of one size: consecutive runs)."""
    groups: dict[tuple, list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(k)
    return [ks[i : i + batch_size] for ks in groups.values() for i in range(0, len(ks), batch_size)]


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from amortized_cartoonx.classifiers import load_classifier, normalization_name
    from amortized_cartoonx.errors import ConfigError
    from amortized_cartoonx.images import load_image, read_class_names, to_channels
    from amortized_cartoonx.io import atomic_write_text, remove_stale_temporaries
    from amortized_cartoonx.plotting import explanation_figure, save_figure
    from amortized_cartoonx.runtime import resolve_device
    from amortized_cartoonx.seeding import FILE_SEEDING, file_seeds

    from .common import check_class_names, check_output_folder, fill_defaults, recorded_settings, resolve_channels

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.keep_aspect and args.method in CHECKPOINT_METHODS:
        raise ConfigError(f"--keep-aspect is for --method cartoonx or pixel-rde: {args.method} explains square images")
    folders = {Path(p).resolve() for p in args.images if Path(p).is_dir()}
    if Path(args.out).resolve() in folders:  # the figures (.png) would be images of that folder next time
        raise ConfigError(f"--out {args.out} is an input folder: its figures would join its images; choose another")
    paths = image_paths(args.images)
    stems = output_stems(paths)
    outputs = [Path(args.out) / f"{s}{suffix}" for s in stems for suffix in (".png", ".safetensors")]
    out = check_output_folder(args.out, inputs=paths, outputs=[*outputs, Path(args.out) / "summary.jsonl"])
    # --size and the DWT default to the checkpoint's settings (or a synthetic classifier's size)
    checkpoint = args.checkpoint if args.method in CHECKPOINT_METHODS else None
    fill_defaults(args, *recorded_settings(checkpoint, args.classifier))
    # (3, H, W) each; fails on a bad file before any work
    images = [load_image(p, args.size, crop=not args.keep_aspect) for p in paths]
    labels = read_class_names(args.labels)
    targets = file_targets(args.target_file, paths, labels) if args.target_file else None
    targets = parse_targets(args.target, len(paths), labels) if targets is None else targets
    device = resolve_device(args.device)
    classifier = load_classifier(args.classifier, normalize=args.normalize, device=device)
    channels = resolve_channels(args.channels, classifier, args.size, device)
    images = [to_channels(x, channels) for x in images]
    explainer = build_explainer(args, classifier, device, channels)
    check_class_names(
        labels, preflight(classifier, explainer, images, targets, device, args.link), args.labels, args.link
    )

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run left half-written (hidden files, never read)
    # what the saved files record beside the explainer's settings: the run's own choices
    run_settings = {
        "classifier": args.classifier,
        "normalize": normalization_name(classifier),
        "size": args.size,
        "keep_aspect": args.keep_aspect,
        "channels": channels,
        "device": str(device),
        "batch_size": args.batch_size,  # the batch's composition moves the last bits of a mask
        "seeding": FILE_SEEDING,  # seed_used = item_seed(file name, --seed)
    }
    progress = not args.no_progress
    bar = tqdm(total=len(paths), desc=f"explain ({args.method})", unit="img", disable=not progress)
    lines: dict[int, str] = {}  # summary.jsonl keeps the input order whatever the batches
    for ks in shape_batches(images, args.batch_size):
        batch = torch.stack([images[k] for k in ks]).to(device)
        target = None if targets is None else [targets[k] for k in ks]
        seeds = file_seeds([paths[k].name for k in ks], args.seed)  # the same noise as targets/evaluate
        explanation = explainer.explain(batch, target, seeds=seeds, progress=progress).cpu()
        for i, k in enumerate(ks):
            target_k = int(explanation.target[i])
            name = (labels[target_k] or None) if labels and target_k < len(labels) else None  # "": no name
            files = {"png": f"{stems[k]}.png", "safetensors": f"{stems[k]}.safetensors"}
            record = {"image": str(paths[k]), **files, "target_name": name, **explanation.summary(i), **run_settings}
            explanation.save(out / f"{stems[k]}.safetensors", i, metadata=record)
            save_figure(explanation_figure(images[k], explanation, i, name, args.link), out / f"{stems[k]}.png")
            lines[k] = json.dumps({**record, "settings": explanation.settings}, allow_nan=False, default=str)
        atomic_write_text(out / "summary.jsonl", "\n".join(lines[k] for k in sorted(lines)) + "\n")
        bar.update(len(ks))
        bar.set_postfix(
            prob_obf=f"{float(explanation.prob_obfuscated.mean()):.3f}",
            mask=f"{float(explanation.mask_mean.mean()):.3f}",
        )
    bar.close()
    print(f"wrote {len(paths)} explanations to {out}/ (summary.jsonl, <image>.png, <image>.safetensors)")
    return 0
