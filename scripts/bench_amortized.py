#!/usr/bin/env python
"""Benchmark the amortized explainer against exact CartoonX on held-out images.

For every image (batched, ``--batch-size`` at a time) it runs

(a) the amortized explainer (one forward pass),
(b) exact CartoonX from the all-ones mask on ``--exact-schedule`` (default ``paper``: 2000 steps at lr 1e-3;
    ``fast``: 200 steps, a cheaper reference) for ``--exact-steps`` steps (default: the schedule's),
(a') with ``--calibrate-samples L_c``: the amortized explainer calibrated per image (``--calibration shift``: the
    logit shift, ``top-k``: the binary top-k mask, with the lowest RDE loss on L_c noise samples; reported
    separately from the single pass),
(c) warm start: the amortized mask refined by K exact steps, for each K in ``--refine`` (default 50,100,200),
    with the refinement's own lr, decay and parametrisation (``--refine-lr``, ``--refine-decay``,
    ``--refine-parametrisation``; default: the ``refine`` schedule's, what the warm start ships with; ``logit``
    starts from the network's logits) and noise samples (``--refine-samples``, default ``--samples``),

and measures every mask the same way (:func:`~amortized_cartoonx.explanation.measure_mask`: same lambda,
distortion and obfuscation as training, same per-image seeds, ``--measure-samples`` noise samples), so the RDE losses
compare directly. It reports per image and as medians: the losses; the steps the cold optimizer needs to reach
each warm start's loss and the steps warm start needs to reach the cold optimizer's final loss (from the loss
histories, smoothed by a centred moving average of ``--smooth`` steps followed by a running minimum: the
per-step losses are single noisy estimates); seconds per image; the ratios amortized/exact for loss and time;
and the agreement of the amortized mask with the exact one (Spearman rank correlation, top-10% overlap).

Seconds are wall-clock per image (batch time / batch size) for producing the mask: the amortized explainer's
classifier pass (for the target) and network pass; the optimizers' explain() minus the final measurement, which
is the same reporting cost for every method and is timed and shown separately. On a CPU shared with other
processes, ``--threads 1`` gives steadier timings (torch threads that wait on each other slow small kernels
down). Images: the checkpoint's held-out test split of
``--images`` when it has one (``--split``). When ``--images`` is the folder the explainer was trained on (the
checkpoint's ``data.images``), only its test split is held out (the validation images picked the checkpoint): any
other split (``all``, ``train``, ``val``, or ``auto`` on a checkpoint without a test split) is refused unless
``--allow-training-images`` is given, and the report then says the images are not held out.

``--exact-cache DIR`` keeps each image's exact result (mask, loss history, numbers) in a safetensors file
named by the image, its seed, the classifier's weights and every setting that changes it, so benchmarks of several
checkpoints against the same slow reference compute it once. A cached result's exact seconds are the computing
run's, less that run's final measurement (this run's when the run that computed it did not time it:
bench_schedule.py's reference cache). ``--start`` skips the first images of the folder
(keep tuning images and reported images apart).

Example (CPU-sized)::

    python scripts/bench_amortized.py --checkpoint checkpoints/RUN/best.ckpt --classifier SPEC \\
        --images ../shared/data/imagenet-samples --limit 8 --exact-steps 2000 --samples 8 --threads 1 --json b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import torch  # noqa: E402
from exact_cache import cached_results, classifier_key  # noqa: E402  (scripts/exact_cache.py)

from amortized_cartoonx.allocator import tune_cpu_allocator  # noqa: E402
from amortized_cartoonx.amortized import CALIBRATIONS, AmortizedExplainer, WarmStartExplainer  # noqa: E402
from amortized_cartoonx.classifiers import frozen  # noqa: E402
from amortized_cartoonx.cli.common import plain_text  # noqa: E402
from amortized_cartoonx.errors import CartoonXError, InputError  # noqa: E402
from amortized_cartoonx.evaluation.agreement import mask_agreement  # noqa: E402
from amortized_cartoonx.explanation import measure_mask  # noqa: E402
from amortized_cartoonx.images import list_images, load_images  # noqa: E402
from amortized_cartoonx.optimizer import (  # noqa: E402
    LR_DECAYS,
    PARAMETRISATIONS,
    SCHEDULES,
    CartoonX,
    OptimizerConfig,
)
from amortized_cartoonx.runtime import resolve_device, synchronize  # noqa: E402
from amortized_cartoonx.seeding import file_seeds  # noqa: E402

#: The warm start's shipped schedule: the default of the refinement options.
REFINE = SCHEDULES["refine"]

logger = logging.getLogger("bench_amortized")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a cartoonx fit checkpoint")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument(
        "--split",
        default="auto",
        choices=("auto", "test", "val", "train", "all"),
        help="which images of the folder: auto = the checkpoint's test split if it has one, else all",
    )
    p.add_argument(
        "--allow-training-images",
        action="store_true",
        help="measure on images of the folder the explainer was trained on that are not in its test split "
        "(--split all, train or val of the checkpoint's data.images); refused without this flag",
    )
    p.add_argument("--limit", type=int, default=8, help="at most this many images (default 8)")
    p.add_argument("--start", type=int, default=0, help="skip this many images of the split first (default 0)")
    p.add_argument("--exact-cache", default=None, help="folder that keeps the exact results between runs")
    p.add_argument(
        "--calibrate-samples", type=int, default=0, help="also run the calibrated amortized explainer (0: off)"
    )
    p.add_argument(
        "--calibration",
        default="shift",
        choices=CALIBRATIONS,
        help="how the calibrated explainer's candidates are made: logit shifts or binary top-k masks",
    )
    p.add_argument(
        "--refine-lr",
        type=float,
        default=REFINE["lr"],
        help=f"warm start's lr (default: the refine schedule's, {REFINE['lr']})",
    )
    p.add_argument(
        "--refine-decay",
        default=REFINE["lr_decay"],
        choices=tuple(LR_DECAYS),
        help=f"warm start's decay (default: the refine schedule's, {REFINE['lr_decay']})",
    )
    p.add_argument(
        "--refine-samples",
        type=int,
        default=None,
        help="noise samples per warm-start step (default: --samples, the exact optimizer's)",
    )
    p.add_argument(
        "--refine-parametrisation",
        default=REFINE["parametrisation"],
        choices=PARAMETRISATIONS,
        help=f"warm start's variable (default: the refine schedule's, {REFINE['parametrisation']})",
    )
    p.add_argument(
        "--refine-from",
        default="auto",
        choices=("auto", "single", "calibrated"),
        help="warm start from the single-pass or the calibrated prediction (auto: calibrated when calibrating)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="images per batch, for every method (default 4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--refine", default="50,100,200", help="warm-start steps K, comma-separated")
    p.add_argument(
        "--exact-schedule",
        default="paper",
        choices=tuple(SCHEDULES),
        help="the cold exact optimizer's step schedule (default paper: 2000 steps at lr 1e-3)",
    )
    p.add_argument(
        "--exact-steps", type=int, default=None, help="steps of the cold exact optimizer (default: the schedule's)"
    )
    p.add_argument("--samples", type=int, default=64, help="noise samples per optimizer step (default 64)")
    p.add_argument(
        "--measure-samples", type=int, default=64, help="noise samples of the final measurement (default 64)"
    )
    p.add_argument("--chunk-size", type=int, default=None, help="noise samples per forward pass (memory)")
    p.add_argument("--smooth", type=int, default=25, help="moving-average window for the step counts (default 25)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed: each image is seeded by its file name and this, as the commands do",
    )
    p.add_argument("--classifier", required=True, help="the classifier the checkpoint explains (spec or file)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    return p.parse_args(argv)


def smoothed(history: torch.Tensor, window: int) -> torch.Tensor:
    """``(S,)`` per-step losses -> centred moving average over ``window`` steps (shorter at the ends), then a
    running minimum. Centred, so a steady trend is not delayed; the running minimum makes "reached" final."""
    if history.numel() == 0:
        return history
    size = history.numel()
    half = max(0, window // 2)
    csum = torch.cat([history.new_zeros(1, dtype=torch.float64), history.double().cumsum(0)])
    idx = torch.arange(size)
    lo, hi = (idx - half).clamp(min=0), (idx + half + 1).clamp(max=size)
    average = (csum[hi] - csum[lo]) / (hi - lo)
    return average.cummin(0).values.float()


def steps_to_reach(history: torch.Tensor, level: float, window: int) -> int | None:
    """The first step count s (1-based: after s steps) whose smoothed loss is <= ``level``; None if never.

    ``history[s]`` is the loss before update s, i.e. after s steps.
    """
    curve = smoothed(history, window)
    hits = (curve <= level).nonzero()
    return int(hits[0]) if len(hits) else None


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_interval(
    values: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the median over images (resampled with replacement, seeded).

    With 32 images the median of a per-image ratio moves by a few percent between runs that differ only in
    which images were drawn: the interval says how far a target may be from the figure before it means anything.
    """
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    return medians[int(tail * (resamples - 1))], medians[int(round((1.0 - tail) * (resamples - 1)))]


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000 or (0 < abs(value) < 10 ** -(digits - 1)):
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def same_folder(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one folder (after ``~``, symlinks and ``..``)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        return a.samefile(b)
    except OSError:  # one of them does not exist here (a checkpoint from another machine)
        return a.resolve() == b.resolve()


def select_images(args: argparse.Namespace, amortized: AmortizedExplainer) -> tuple[list[Path], str]:
    """The images to measure on and the split they come from; refuses the explainer's training folder outside its
    test split unless ``--allow-training-images`` (sets ``args.held_out``: whether the images are held out)."""
    files = list_images(args.images)
    by_id = {p.name: p for p in files}
    data = amortized.meta.get("data") or {}
    split = args.split
    if split == "auto":
        split = "test" if data.get("test_fraction", 0) > 0 else "all"
    trained_on = bool(data.get("images")) and same_folder(args.images, data["images"])
    args.held_out = not trained_on or split == "test"
    if not args.held_out and not args.allow_training_images:
        chosen = f"--split {args.split}" + (f" ({split})" if args.split != split else "")
        instead = (
            "use --split test"
            if data.get("test_fraction", 0) > 0
            else "the checkpoint has no test split: use images it was not trained on"
        )
        raise InputError(
            f"{args.images} is the folder the explainer was trained on: only its test split is held out (validation "
            f"images picked the checkpoint), not {chosen}; {instead}, or pass --allow-training-images to measure on "
            "them anyway"
        )
    if split != "all":
        ids = amortized.split(list(by_id))[split]
        files = [by_id[i] for i in ids]
    if not files:
        raise InputError(f"no images in the {split} split of {args.images}")
    if args.start >= len(files):
        raise InputError(
            f"--start {args.start} is past the last image: the {split} split of {args.images} has {len(files)}"
        )
    return files[args.start : args.start + args.limit], split


def measured(explanation, i: int, seconds: float, exact_history: torch.Tensor, smooth: int) -> dict:
    """Image ``i``'s numbers of one method, and the cold steps the exact optimizer needs to reach its loss."""
    loss = float(explanation.loss[i])
    return {
        "loss": loss,
        "distortion": float(explanation.distortion[i]),
        "mask_mean": float(explanation.mask_mean[i]),
        "prob_obfuscated": float(explanation.prob_obfuscated[i]),
        "seconds": seconds,
        "cold_steps_to_reach": steps_to_reach(exact_history, loss, smooth),
    }


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    refine = sorted({int(k) for k in args.refine.split(",") if k.strip()})
    amortized = AmortizedExplainer.from_checkpoint(
        args.checkpoint, args.classifier, device=device, measure_samples=args.measure_samples, seed=args.seed
    )
    meta = amortized.meta
    files, split = select_images(args, amortized)
    images_all = load_images(files, meta["image_size"])
    config = OptimizerConfig(
        schedule=args.exact_schedule,
        steps=args.exact_steps,
        num_samples=args.samples,
        l1_lambda=meta["l1_lambda"],
        distortion=meta["distortion"],
        obfuscation=meta["obfuscation"],
        link=amortized.objective.link,  # the checkpoint's: the exact baseline and the refinement explain the same
        chunk_size=args.chunk_size,
        measure_samples=args.measure_samples,
        seed=args.seed,
    )
    args.exact_steps = config.steps  # the schedule's when not given
    exact = CartoonX(amortized.classifier, wave=meta["wave"], levels=meta["levels"], mode=meta["mode"], config=config)
    calibrated = None
    if args.calibrate_samples:
        calibrated = AmortizedExplainer(
            amortized.mask_predictor,
            amortized.classifier,
            meta,
            path=amortized.path,
            measure_samples=args.measure_samples,
            seed=args.seed,
            calibration_samples=args.calibrate_samples,
            calibration=args.calibration,
        )
    refine_from = args.refine_from
    if refine_from == "auto":
        refine_from = "calibrated" if calibrated is not None else "single"
    if refine_from == "calibrated" and calibrated is None:
        raise InputError("--refine-from calibrated needs --calibrate-samples")
    refine_config = dataclasses.replace(
        config,
        lr=args.refine_lr,
        lr_decay=args.refine_decay,
        parametrisation=args.refine_parametrisation,
        num_samples=config.num_samples if args.refine_samples is None else args.refine_samples,
    )
    args.refine_samples_used = refine_config.num_samples
    start_from = calibrated if refine_from == "calibrated" else amortized
    warm = {k: WarmStartExplainer(start_from, refine_steps=k, config=refine_config) for k in refine}
    identity = classifier_key(amortized.classifier, str(meta["classifier"]))
    logger.info("%d %s images of %s at %dpx on %s", len(files), split, args.images, meta["image_size"], device)

    # warm-up (TorchScript's profiling runs, allocator): not timed
    first = images_all[: args.batch_size].to(device)
    amortized.explain(first)
    exact.explain(first, steps=2)

    records: list[dict] = []
    for lo in range(0, len(files), args.batch_size):
        batch = images_all[lo : lo + args.batch_size].to(device)
        n = batch.shape[0]
        seeds = file_seeds([f.name for f in files[lo : lo + n]], args.seed)  # as the commands seed them
        # (a) amortized: the mask alone, then the full explanation for the measured numbers
        synchronize(device)
        start = time.perf_counter()
        amortized.predict_mask(batch)
        synchronize(device)
        t_amortized = (time.perf_counter() - start) / n
        e_amortized = amortized.explain(batch, seeds=seeds).cpu()
        # the measurement alone (the reporting cost every method pays once)
        with frozen(amortized.classifier):
            problem = amortized.objective.prepare(batch)
            synchronize(device)
            start = time.perf_counter()
            measure_mask(amortized.objective, problem, e_amortized.mask.to(device), seeds, args.measure_samples)
            synchronize(device)
            t_measure = (time.perf_counter() - start) / n
        # (a') calibrated
        e_calibrated, t_calibrated = None, None
        if calibrated is not None:
            synchronize(device)
            start = time.perf_counter()
            calibrated.predict(batch, seeds=seeds)
            synchronize(device)
            t_calibrated = (time.perf_counter() - start) / n
            e_calibrated = calibrated.explain(batch, seeds=seeds).cpu()
        # (b) exact from ones (or the cache): its seconds without the final measurement (the computing run's own
        # when it timed it, else this run's)
        e_exact = cached_results(
            args.exact_cache, exact, identity, meta["image_size"], batch, files[lo : lo + n], seeds, t_measure
        )
        for r in e_exact:
            own = r["measure_seconds"]
            r["seconds"] = None if r["seconds"] is None else r["seconds"] - (t_measure if own is None else own)
        # (c) warm starts
        e_warm = {k: w.explain(batch, seeds=seeds, progress=True).cpu() for k, w in warm.items()}
        exact_masks = torch.stack([r["mask"] for r in e_exact])
        agreement = mask_agreement(e_amortized.mask.flatten(), exact_masks)
        k_max = refine[-1] if refine else None
        for i in range(n):
            exact_history = e_exact[i]["history"]
            record = {
                "image": files[lo + i].name,
                "target": e_exact[i]["target"],
                "prob_original": e_exact[i]["prob_original"],
                "amortized": measured(e_amortized, i, t_amortized, exact_history, args.smooth),
                "exact": {
                    "loss": e_exact[i]["loss"],
                    "distortion": e_exact[i]["distortion"],
                    "mask_mean": e_exact[i]["mask_mean"],
                    "prob_obfuscated": e_exact[i]["prob_obfuscated"],
                    "seconds": e_exact[i]["seconds"],
                    "seconds_cached": e_exact[i]["cached"],  # measured by the run that computed it
                    "steps": args.exact_steps,
                },
                "warm": {},
                "measure_seconds": t_measure,
                "spearman_amortized_exact": float(agreement["spearman"][i]),
                "top10_overlap_amortized_exact": float(agreement["top_overlap"][i]),
            }
            if e_calibrated is not None:
                record["calibrated"] = measured(e_calibrated, i, t_calibrated, exact_history, args.smooth)
            for k, e in e_warm.items():
                record["warm"][str(k)] = measured(e, i, e.seconds / n - t_measure, exact_history, args.smooth)
            if k_max is not None:
                record["warm_steps_to_exact"] = steps_to_reach(
                    e_warm[k_max].history.total[:, i], e_exact[i]["loss"], args.smooth
                )
            records.append(record)
        logger.info("%d/%d images done", len(records), len(files))
    return summarise(args, records, refine, split, device, meta)


def summarise(args, records, refine, split, device, meta) -> dict:
    def med(path):
        values = []
        for r in records:
            value = r
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            values.append(value)
        return median(values)

    exact_loss, exact_time = med(["exact", "loss"]), med(["exact", "seconds"])
    rows = [("amortized", ["amortized"])]
    if args.calibrate_samples:
        rows.append((f"calibrated ({args.calibration}, L={args.calibrate_samples})", ["calibrated"]))
    rows.append((f"exact ({args.exact_schedule}, {args.exact_steps} steps)", ["exact"]))
    rows += [(f"warm K={k}", ["warm", str(k)]) for k in refine]
    summary = []
    for name, path in rows:
        loss, seconds = med([*path, "loss"]), med([*path, "seconds"])
        ratios = [
            r_loss / r_exact
            for r_loss, r_exact in ((_get(r, [*path, "loss"]), r["exact"]["loss"]) for r in records)
            if r_exact
        ]
        summary.append(
            {
                "method": name,
                "loss": loss,
                "distortion": med([*path, "distortion"]),
                "mask_mean": med([*path, "mask_mean"]),
                "mask_mean_ratio": median(
                    [
                        _get(r, [*path, "mask_mean"]) / r["exact"]["mask_mean"]
                        for r in records
                        if r["exact"]["mask_mean"]
                    ]
                ),
                "prob_obfuscated": med([*path, "prob_obfuscated"]),
                "seconds": seconds,
                "loss_ratio": median(ratios),
                "loss_ratio_interval": median_interval(ratios),
                "at_or_below_exact": sum(ratio <= 1.0 for ratio in ratios),
                "within_5_percent": sum(ratio <= 1.05 for ratio in ratios),
                "time_ratio": seconds / exact_time if seconds is not None and exact_time else None,
                "cold_steps_to_reach": med([*path, "cold_steps_to_reach"]) if path != ["exact"] else None,
                "reached_by_cold": sum(_get(r, [*path, "cold_steps_to_reach"]) is not None for r in records)
                if path != ["exact"]
                else None,
            }
        )
    return {
        "settings": {
            "checkpoint": str(args.checkpoint),
            "images": str(args.images),
            "split": split,
            "count": len(records),
            "image_size": meta["image_size"],
            "classifier": meta["classifier"],
            "wave": meta["wave"],
            "levels": meta["levels"],
            "l1_lambda": meta["l1_lambda"],
            "distortion": meta["distortion"],
            "obfuscation": meta["obfuscation"],
            "exact_schedule": args.exact_schedule,
            "exact_steps": args.exact_steps,
            "refine": refine,
            "refine_lr": args.refine_lr,
            "refine_decay": args.refine_decay,
            "refine_parametrisation": args.refine_parametrisation,
            "refine_samples": args.refine_samples_used,
            "refine_from": args.refine_from,
            "calibrate_samples": args.calibrate_samples,
            "calibration": args.calibration,
            "start": args.start,
            "held_out": getattr(args, "held_out", True),
            "samples": args.samples,
            "measure_samples": args.measure_samples,
            "batch_size": args.batch_size,
            "smooth": args.smooth,
            "seed": args.seed,
        },
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "summary": summary,
        "medians": {
            "exact_loss": exact_loss,
            "measure_seconds": med(["measure_seconds"]),
            "exact_seconds_cached": sum(bool(r["exact"].get("seconds_cached")) for r in records),
            "warm_steps_to_exact": med(["warm_steps_to_exact"]),
            "warm_reached_exact": sum(r.get("warm_steps_to_exact") is not None for r in records),
            "warm_within_40": sum(
                r.get("warm_steps_to_exact") is not None and r["warm_steps_to_exact"] <= 40 for r in records
            ),
            "spearman_amortized_exact": med(["spearman_amortized_exact"]),
            "top10_overlap_amortized_exact": med(["top10_overlap_amortized_exact"]),
        },
        "images": records,
    }


def _get(record: dict, path: list[str]):
    value = record
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def markdown(result: dict) -> str:
    s, m = result["settings"], result["medians"]
    n = s["count"]
    trained_on = "" if s.get("held_out", True) else ", NOT held out: the explainer was trained on this folder"
    lines = [
        f"Images: {n} ({s['split']} split of {s['images']}{trained_on}), {s['image_size']} px, "
        f"classifier {s['classifier']}, "
        f"{s['wave']} J={s['levels']}, lambda {s['l1_lambda']}, {s['distortion']} distortion, "
        f"L = {s['samples']} noise samples per optimizer step, {s['measure_samples']} for the final measurement, "
        f"batches of {s['batch_size']}; "
        f"machine: {result['machine']['device']} ({result['machine']['device_name']}, "
        f"{result['machine']['torch_threads']} threads).",
        "",
        "| method | median RDE loss | median distortion | median mask mean | mask mean / exact | p(obfuscated) | "
        "s / image | loss / exact [95% interval] | at or below exact (within 5%) | time / exact | "
        "cold steps to reach (median, reached) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["summary"]:
        reach = (
            "-"
            if row["reached_by_cold"] is None
            else f"{fmt(row['cold_steps_to_reach'], 0)} ({row['reached_by_cold']}/{n})"
        )
        interval = row["loss_ratio_interval"]
        ratio = fmt(row["loss_ratio"], 3) + (f" [{interval[0]:.3f}-{interval[1]:.3f}]" if interval else "")
        lines.append(
            f"| {row['method']} | {fmt(row['loss'])} | {fmt(row['distortion'])} | {fmt(row['mask_mean'])} | "
            f"{fmt(row['mask_mean_ratio'], 3)} | {fmt(row['prob_obfuscated'], 3)} | {fmt(row['seconds'], 3)} | "
            f"{ratio} | {row['at_or_below_exact']}/{n} ({row['within_5_percent']}/{n}) | "
            f"{fmt(row['time_ratio'], 3)} | {reach} |"
        )
    speed = next(r for r in result["summary"] if r["method"] == "amortized")["time_ratio"]
    warm_sentence = (
        f"Warm start K={s['refine'][-1]} reaches the exact loss after a median of "
        f"{fmt(m['warm_steps_to_exact'], 0)} steps ({m['warm_reached_exact']}/{n} images reach it, "
        f"{m['warm_within_40']}/{n} within 40 steps). "
        if s["refine"]
        else "No warm start (--refine empty). "
    )
    lines += [
        "",
        f"Amortized vs exact: speed-up {fmt(1 / speed if speed else None, 1)}x; mask agreement: Spearman "
        f"{fmt(m['spearman_amortized_exact'], 3)}, top-10% overlap {fmt(m['top10_overlap_amortized_exact'], 3)} "
        f"(medians). {warm_sentence}"
        f"Final measurement: {fmt(m['measure_seconds'], 3)} s / image (not in the times above). Step counts: "
        f"centred {s['smooth']}-step moving average of the per-step loss, then running minimum."
        + (
            f" The exact seconds of {m['exact_seconds_cached']} image(s) come from the exact cache: they were measured "
            "by the run that computed them, perhaps on another machine, as are the time ratios built on them."
            if m.get("exact_seconds_cached")
            else ""
        ),
        "",
        "Per image (RDE loss; cold steps to reach in brackets):",
        "",
        "| " + " | ".join(["image", "amortized", "exact", *(f"warm K={k}" for k in s["refine"])]) + " |",
        "|" + " --- |" * (3 + len(s["refine"])),
    ]
    for r in result["images"]:
        never = ">" + str(s["exact_steps"])
        warm = " | ".join(
            f"{fmt(r['warm'][str(k)]['loss'])} ({_steps(r['warm'][str(k)]['cold_steps_to_reach'], never)})"
            for k in s["refine"]
        )
        reach = _steps(r["amortized"]["cold_steps_to_reach"], never)
        cells = [r["image"], f"{fmt(r['amortized']['loss'])} ({reach})", fmt(r["exact"]["loss"])]
        cells += [warm] if warm else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _steps(value: int | None, never: str) -> str:
    return never if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    tune_cpu_allocator()  # as the cartoonx command runs (amortized_cartoonx/allocator.py)
    try:
        result = run(args)
    except CartoonXError as exc:
        print(f"bench_amortized: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
