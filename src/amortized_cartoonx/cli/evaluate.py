"""``cartoonx evaluate --classifier SPEC --images DIR --out DIR [--methods ...]``: rate-distortion evaluation.

Reproduces the paper's quantitative evaluation (Fig. 7) on any classifier: for every image and method,
(a) the distortion ||p(x) - p(y)||_2 when keeping the top fraction r of the method's coefficients and
randomising the rest with adaptive Gaussian noise, (b) when randomising the top fraction r instead,
(c) for CartoonX and Pixel RDE, distortion against mean mask over a grid of lambda; areas under the
curves, seconds per explanation, and ground-truth localisation when DIR has ground_truth.safetensors.
Every method explains the class the classifier predicts, or the one --target or --target-file gives.

Writes DIR/curves.csv, DIR/summary.json, DIR/rate_distortion.png, DIR/examples.png, DIR/report.md, and a
per-image cache DIR/cache/ so an interrupted run resumes and new methods reuse the others' results. With
--sanity (nn.Module classifiers), also the sanity checks by model randomisation (DIR/sanity.png).

Methods: cartoonx, pixel-rde, amortized and warm (need --checkpoint), integrated-gradients, smoothgrad,
guided-backprop, grad-cam (nn.Module classifiers only), random-pixel, random-wavelet.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from .common import (
    add_channels_arg,
    add_classifier_args,
    add_device_arg,
    add_progress_arg,
    add_rde_args,
    add_size_arg,
    nonnegative_float,
    nonnegative_int,
    plain_text,
    positive_float,
    positive_int,
)

logger = logging.getLogger(__name__)

#: The distortions the curves can measure: those that are 0 when nothing is randomised (y = x).
CURVE_DISTORTIONS = ("l2", "label-l2", "kl", "label")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from amortized_cartoonx.methods import ALL_METHODS, DEFAULT_METHODS

    p = sub.add_parser(
        "evaluate",
        help="rate-distortion curves of CartoonX against baselines, with figures and a report",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (sorted by name)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (and its cache/)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=f"methods (space or comma separated) from: {', '.join(ALL_METHODS)}. Default: "
        f"{', '.join(DEFAULT_METHODS)}, plus amortized and warm with --checkpoint",
    )
    add_classifier_args(p)
    p.add_argument("--checkpoint", default=None, metavar="CKPT", help="amortized explainer (amortized, warm)")
    p.add_argument(
        "--refine-steps",
        type=nonnegative_int,
        default=None,
        help="optimizer steps after the warm start (default: the refine schedule's, 60)",
    )
    add_size_arg(p, "images are resized and centre-cropped")
    add_channels_arg(p)
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N images")
    p.add_argument(
        "--batch-size", type=positive_int, default=4, help="images explained and measured together (default 4)"
    )
    p.add_argument(
        "--labels", default=None, metavar="FILE", help="class names, one per line (for the figures and --target)"
    )
    tg = p.add_mutually_exclusive_group()
    tg.add_argument(
        "--target",
        default=None,
        help="the class every method explains: one index for all images, or one per image separated by commas (in "
        "file-name order, after --limit); with --labels also a class name (default: the predicted class; with "
        "--link sigmoid the label of the largest logit)",
    )
    tg.add_argument(
        "--target-file",
        default=None,
        metavar="FILE",
        help='the class to explain in each image: a JSON object {"image.jpg": class, ...} or lines NAME,CLASS '
        "(e.g. the true labels; a class is an index or, with --labels, a name); every image evaluated needs one",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="explain and measure only images K, K+N, K+2N, ... (K from 0) into --out's cache, and stop: run N "
        "such processes (one per GPU: CUDA_VISIBLE_DEVICES=K) with the same options, then once without --shard "
        "to write the report from the cache",
    )

    ev = p.add_argument_group("curves")
    ev.add_argument(
        "--rates",
        default="dense",
        metavar="GRID",
        help="the rate grid: 'dense' (the default: 21 rates, dense below 0.1, where the wavelet methods' curves "
        "fall), a number K of evenly spaced points on [0, 1] (e.g. 21: steps of 0.05), or the rates themselves, "
        "comma separated, rising from 0 to 1 (e.g. 0,0.01,0.05,0.2,1)",
    )
    ev.add_argument("--noise-draws", type=positive_int, default=8, help="noise draws averaged per rate (default 8)")
    ev.add_argument(
        "--curve-distortion",
        default=None,
        choices=CURVE_DISTORTIONS,
        help="what the curves measure (default: l2, Fig. 7's ||p(x) - p(y)||_2, with --link softmax; label-l2, "
        "the explained label's |p_c(x) - p_c(y)|, with --link sigmoid); --distortion is the optimizer's loss",
    )
    ev.add_argument("--early-rate", type=positive_float, default=0.2, help="early areas over [0, R] (default 0.2)")
    ev.add_argument(
        "--max-batch", type=positive_int, default=128, help="classifier inputs per forward pass (default 128)"
    )
    ev.add_argument("--examples", type=nonnegative_int, default=4, help="images in the example grid (default 4)")
    ev.add_argument("--no-cache", action="store_true", help="recompute everything and write no cache")

    gt = p.add_argument_group("ground truth (a folder with ground_truth.safetensors, e.g. the synthetic benchmark)")
    gt.add_argument(
        "--outline-radius",
        type=positive_int,
        default=4,
        metavar="PX",
        help="half-width in pixels of the decisive object's outline band (default 4; the outline is 2 px at 64 px)",
    )

    san = p.add_argument_group("sanity checks: model randomisation (nn.Module classifiers)")
    san.add_argument(
        "--sanity",
        action="store_true",
        help="explain the first images again with the classifier's weights randomised in cascade from the top "
        "layer (and all at once), and compare: Spearman rank correlation and SSIM per method (sanity.png)",
    )
    san.add_argument(
        "--sanity-depths",
        default=None,
        metavar="D,D,...",
        help="numbers of top layers randomised, comma separated (all layers are always added); default: the top "
        "layer, a quarter, half and three quarters of the layers with weights",
    )
    san.add_argument(
        "--sanity-limit", type=positive_int, default=None, metavar="N", help="check only the first N images"
    )

    lam = p.add_argument_group("panel (c): the exact optimizer over lambda")
    lam.add_argument(
        "--lambdas",
        nargs="*",
        default=None,
        metavar="GRID",
        help="cartoonx=10,20,40,80 pixel-rde=2,4,8,16 (the default), or one list for both; "
        "give no value (or 'none') to skip the panel",
    )
    lam.add_argument("--lambda-steps", type=nonnegative_int, default=None, help="optimizer steps (default: --steps)")
    lam.add_argument("--lambda-limit", type=positive_int, default=None, metavar="N", help="only the first N images")

    base = p.add_argument_group("gradient baselines (defaults: the paper's)")
    base.add_argument("--ig-steps", type=positive_int, default=100, help="Integrated Gradients steps (default 100)")
    base.add_argument("--smoothgrad-samples", type=positive_int, default=10, help="SmoothGrad samples (default 10)")
    base.add_argument(
        "--smoothgrad-std",
        type=nonnegative_float,
        default=0.1,
        help="SmoothGrad noise std in pixel units (images in [0, 1]; default 0.1)",
    )
    add_progress_arg(p)
    add_device_arg(p)
    add_rde_args(p)
    p.set_defaults(run=run, command_line=lambda args: command_line(p, args))


def parse_methods(values: list[str] | None, checkpoint: str | None) -> tuple[str, ...]:
    """The method list from ``--methods`` (space or comma separated), or the default."""
    from amortized_cartoonx.methods import CHECKPOINT_METHODS, DEFAULT_METHODS

    if values is None:
        return DEFAULT_METHODS + (CHECKPOINT_METHODS if checkpoint else ())
    names = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return tuple(dict.fromkeys(names))


def parse_lambdas(values: list[str] | None) -> dict[str, tuple[float, ...]]:
    """``--lambdas`` -> ``{method: grid}``; ``[]`` or ``['none']`` -> ``{}`` (skip panel c)."""
    from amortized_cartoonx.errors import ConfigError
    from amortized_cartoonx.evaluation.lambdas import DEFAULT_LAMBDAS, LAMBDA_METHODS

    if values is None:
        return dict(DEFAULT_LAMBDAS)
    if values in ([], ["none"], [""]):
        return {}
    grids: dict[str, tuple[float, ...]] = {}
    for item in values:
        method, sep, grid = item.rpartition("=")
        try:
            numbers = tuple(float(v) for v in grid.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--lambdas: cannot read {item!r}; use e.g. cartoonx=10,20,40 pixel-rde=2,4,8") from None
        if not sep:
            grids.update({m: numbers for m in LAMBDA_METHODS})
        elif method in LAMBDA_METHODS:
            grids[method] = numbers
        else:
            raise ConfigError(f"--lambdas: panel (c) is for {' and '.join(LAMBDA_METHODS)}, not {method!r}")
    return grids


def parse_rates(text: str) -> int | tuple[float, ...]:
    """``--rates``: ``dense`` -> the default grid, ``K`` -> K evenly spaced points, ``r0,r1,...`` -> that grid.

    Raises:
        ConfigError: text that is none of these, or a grid :func:`~amortized_cartoonx.evaluation.curves.rate_grid`
            refuses (the message names ``--rates``).
    """
    from amortized_cartoonx.errors import ConfigError
    from amortized_cartoonx.evaluation.curves import DEFAULT_RATES, rate_grid

    text = text.strip()
    try:
        spec: int | tuple[float, ...]
        if text == "dense":
            spec = DEFAULT_RATES
        elif "," in text:
            spec = tuple(float(v) for v in text.split(",") if v.strip())
        else:
            spec = int(text)
    except ValueError:
        raise ConfigError(
            f"--rates: expected 'dense', a number of points or comma-separated rates from 0 to 1, got {text!r}"
        ) from None
    try:
        rate_grid(spec)
    except ConfigError as exc:
        raise ConfigError(f"--rates: {exc}") from None
    return spec


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard 1/4`` -> ``(1, 4)``; None -> None (the whole run)."""
    from amortized_cartoonx.errors import ConfigError

    if text is None:
        return None
    k, slash, n = text.partition("/")
    if not (slash and k.strip().isdigit() and n.strip().isdigit()) or not 0 <= int(k) < int(n):
        raise ConfigError(f"--shard: expected K/N with 0 <= K < N (shards count from 0), such as 0/4, got {text!r}")
    return int(k), int(n)


def parse_depths(text: str | None) -> tuple[int, ...] | None:
    """``--sanity-depths 1,3,6`` -> ``(1, 3, 6)``; None -> None (the default depths)."""
    from amortized_cartoonx.errors import ConfigError

    if text is None:
        return None
    try:
        depths = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--sanity-depths: expected layer counts such as 1,3,6, got {text!r}") from None
    if not depths or min(depths) < 1:
        raise ConfigError(f"--sanity-depths: every depth must be at least 1 layer, got {text!r}")
    return depths


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reproduces ``args``: every option whose value differs from its default."""
    parts = ["cartoonx", "evaluate"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if action.nargs == 0:  # store_true
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *(shlex.quote(str(v)) for v in value)]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    from amortized_cartoonx.classifiers import load_classifier
    from amortized_cartoonx.errors import ConfigError, InputError
    from amortized_cartoonx.evaluation.config import SanityConfig
    from amortized_cartoonx.evaluation.methods import BaselineConfig, MethodContext, method_names
    from amortized_cartoonx.evaluation.report import write_report
    from amortized_cartoonx.evaluation.runner import Evaluation, EvaluationConfig
    from amortized_cartoonx.images import list_images, read_class_names
    from amortized_cartoonx.methods import CHECKPOINT_METHODS, EXACT_METHODS
    from amortized_cartoonx.runtime import resolve_device
    from amortized_cartoonx.wavelets import WaveletRepresentation

    from .common import (
        check_class_names,
        check_output_folder,
        fill_defaults,
        optimizer_config,
        recorded_settings,
        resolve_channels,
    )

    command = args.command_line(args)  # as typed, before the defaults below are filled in
    methods = parse_methods(args.methods, args.checkpoint)
    rates = parse_rates(args.rates)
    sanity = SanityConfig(enabled=args.sanity, depths=parse_depths(args.sanity_depths), limit=args.sanity_limit)
    known = method_names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from: {', '.join(known)}")
    if any(m in CHECKPOINT_METHODS for m in methods) and not args.checkpoint:
        raise ConfigError("the methods amortized and warm need --checkpoint (an amortized explainer checkpoint)")
    if args.checkpoint and not any(m in CHECKPOINT_METHODS for m in methods):
        raise ConfigError("--checkpoint is for the methods amortized and warm, neither of which is evaluated")
    if args.checkpoint and not Path(args.checkpoint).expanduser().is_file():
        raise InputError(f"checkpoint not found: {args.checkpoint}")
    if args.refine_steps is not None and "warm" not in methods:
        raise ConfigError("--refine-steps is for the method warm, which is not among the methods evaluated")
    step_options = [f"--{name}" for name in ("schedule", "lr", "parametrisation") if getattr(args, name) is not None]
    if step_options and not any(m in EXACT_METHODS for m in methods):
        raise ConfigError(
            f"{', '.join(step_options)}: for the exact methods ({', '.join(EXACT_METHODS)}), none of which is evaluated"
            " (warm refines with the 'refine' schedule)"
        )
    if step_options and "warm" in methods:
        logger.warning(
            "%s apply to %s; warm refines with the 'refine' schedule (--refine-steps sets its steps)",
            ", ".join(step_options),
            " and ".join(m for m in EXACT_METHODS if m in methods),
        )
    images = list_images(args.images)
    check_output_folder(args.out, inputs=images, outputs=[Path(args.out) / p.name for p in images])
    # --size and the DWT default to the checkpoint's settings (or a synthetic classifier's size)
    checkpoint = args.checkpoint if any(m in CHECKPOINT_METHODS for m in methods) else None
    fill_defaults(args, *recorded_settings(checkpoint, args.classifier))
    if args.size < 8:
        raise ConfigError(f"--size must be at least 8, got {args.size}")
    # the J used at this size (said once when capped), so the report, summary.json and the cache keys record it
    args.levels = WaveletRepresentation(args.wavelet, args.levels, args.mode).levels_for(args.size, args.size)
    labels = read_class_names(args.labels)
    target = evaluation_target(args, [p.name for p in (images[: args.limit] if args.limit else images)], labels)
    config = EvaluationConfig(
        methods=methods,
        limit=args.limit,
        batch_size=args.batch_size,
        rates=rates,
        noise_draws=args.noise_draws,
        distortion=args.curve_distortion,
        early_rate=args.early_rate,
        seed=args.seed,
        target=target,
        lambdas=parse_lambdas(args.lambdas),
        lambda_steps=args.lambda_steps,
        lambda_limit=args.lambda_limit,
        outline_radius=args.outline_radius,
        examples=args.examples,
        max_batch=args.max_batch,
        cache=not args.no_cache,
        sanity=sanity,
        progress=not args.no_progress,
        shard=parse_shard(args.shard),
    ).validate()
    optimizer = optimizer_config(args)
    baselines = BaselineConfig(
        ig_steps=args.ig_steps, smoothgrad_samples=args.smoothgrad_samples, smoothgrad_std=args.smoothgrad_std
    ).validate()
    device = resolve_device(args.device)
    if args.device == "auto":  # the command reproduces this run on a machine with another device too
        command += f" --device {device.type}"
    classifier = load_classifier(args.classifier, normalize=args.normalize, device=device)
    channels = resolve_channels(args.channels, classifier, args.size, device)
    if labels is not None or target is not None:
        num_classes = _num_classes(classifier, args.size, channels, device, args.link)
        if labels is not None:
            check_class_names(labels, num_classes, args.labels, args.link)
        check_target_range(target, num_classes)
    context = MethodContext(
        classifier=classifier,
        classifier_spec=args.classifier,
        image_size=args.size,
        channels=channels,
        optimizer=optimizer,
        wave=args.wavelet,
        levels=args.levels,
        mode=args.mode,
        checkpoint=args.checkpoint,
        refine_steps=args.refine_steps,
        baselines=baselines,
    )
    evaluation = Evaluation(
        classifier, args.images, args.out, config, context, device=device, class_names=labels, command=command
    )
    if config.shard is not None:
        computed = evaluation.run_shard()
        k, n = config.shard
        names = {"explanations": "explanations", "curves": "curve pairs", "lambda": "panel (c) optimisations"}
        done = ", ".join(f"{sum(computed[phase].values())} {name}" for phase, name in names.items())
        print(f"shard {k}/{n}: computed {done} (each method and image; the rest came from {args.out}/cache)")
        print(f"when every shard is done, run the same command without --shard: it writes {args.out}/report.md")
        return 0
    results = evaluation.run()
    summary = write_report(results, args.out, labels)
    print(_table(summary))
    print(f"wrote {args.out}/report.md, curves.csv, summary.json, {', '.join(summary['figures'])}")
    return 0


def evaluation_target(args: argparse.Namespace, names: list[str], labels: list[str] | None):
    """:attr:`~amortized_cartoonx.evaluation.config.EvaluationConfig.target` from ``--target`` or
    ``--target-file`` for the evaluated images ``names``: None (the predicted class), one class for all, or file
    name -> class."""
    from .common import parse_targets, read_target_file

    if args.target_file is not None:
        return read_target_file(args.target_file, labels)
    values = parse_targets(args.target, len(names), labels)
    if values is None:
        return None
    if len(set(values)) == 1:
        return values[0]
    return dict(zip(names, values, strict=True))


def check_target_range(target, num_classes: int) -> None:
    """An :class:`~amortized_cartoonx.errors.InputError` for a given class the classifier does not have."""
    from amortized_cartoonx.errors import InputError

    given = [] if target is None else list(target.values()) if isinstance(target, dict) else [target]
    beyond = sorted({v for v in given if not 0 <= v < num_classes})
    if beyond:
        raise InputError(
            f"the classifier has {num_classes} classes (0-{num_classes - 1}); the targets name "
            f"{', '.join(map(str, beyond))}"
        )


def _num_classes(classifier, size: int, channels: int, device, link: str) -> int:
    """The classifier's number of classes (its logits for one mid-grey image, checked for ``link``)."""
    import torch

    from amortized_cartoonx.rde import original_logits

    with torch.no_grad():
        probe = torch.full((1, channels, size, size), 0.5, device=device)
        return original_logits(classifier, probe, link).shape[-1]


def _table(summary: dict) -> str:
    """A short text table of the areas for the terminal."""
    rows = [f"{'method':<22} {'area (a) lower=better':>24} {'area (b) higher=better':>24} {'s/expl':>8}"]
    for name, e in summary["methods"].items():
        a, b = e["area_keep"], e["area_randomise"]
        rows.append(
            f"{name:<22} {a['mean']:>15.4f} ± {a['se']:<6.4f} {b['mean']:>15.4f} ± {b['se']:<6.4f} "
            f"{e['seconds_per_explanation']['mean']:>8.3f}"
        )
    for name, reason in summary["skipped"].items():
        rows.append(f"{name:<22} skipped: {reason}")
    if "sanity" in summary:
        rows.append(f"{'sanity: all layers randomised':<30} {'Spearman':>15} {'SSIM':>8}  (vs trained; low = depends)")
        for name, values in summary["sanity"]["methods"].items():
            rho, ssim = values["spearman"][-1]["mean"], values["ssim"][-1]["mean"]
            rows.append(f"{name:<30} {rho:>15.3f} {ssim:>8.3f}")
    return "\n".join(rows)
