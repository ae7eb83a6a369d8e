"""The report of ``cartoonx demo``: the fast paths against the exact optimizer, and ``report.md``.

:func:`amortized_figures` compares the amortized explainer and warm start with exact CartoonX (per-image medians
of the RDE loss and the time, on the same noise seeds); :func:`report_markdown` writes the demo's report from
them, the evaluation's summary and the stage times. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from .methods import CHECKPOINT_METHODS

if TYPE_CHECKING:
    from .demo import DemoConfig, StageTimes


def exact_lr(cfg: DemoConfig) -> str:
    """The exact optimizer's learning rate as the report states it (``lr`` or the schedule's, and its decay)."""
    from .optimizer import SCHEDULES

    schedule = SCHEDULES[cfg.schedule]
    decay = schedule["lr_decay"]
    return f"{cfg.lr if cfg.lr is not None else schedule['lr']}" + ("" if decay == "constant" else f" ({decay} decay)")


def warm_steps(cfg: DemoConfig) -> int:
    """The demo's warm-start steps: ``refine_steps``, or the ``refine`` schedule's."""
    from .optimizer import SCHEDULES

    return SCHEDULES["refine"]["steps"] if cfg.refine_steps is None else cfg.refine_steps


def _median(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")


def amortized_figures(results) -> dict:
    """Loss and time of the fast paths against the exact optimizer, per image medians (same noise seeds)."""
    methods = results.methods
    out = {}
    if "cartoonx" not in methods:
        return out
    exact = methods["cartoonx"]
    for name in CHECKPOINT_METHODS:  # the amortized explainer and warm start
        if name in methods and "loss" in methods[name].scalars:
            ratio = methods[name].scalars["loss"] / exact.scalars["loss"]
            out[name] = {
                "loss_median": _median(methods[name].scalars["loss"]),
                "exact_loss_median": _median(exact.scalars["loss"]),
                "loss_ratio_median": _median(ratio),
                "seconds_median": _median(methods[name].seconds),
                "exact_seconds_median": _median(exact.seconds),
                "speedup_median": _median(exact.seconds / methods[name].seconds),
            }
    return out


def report_markdown(
    cfg: DemoConfig, classifier: dict, teachers: dict, fast: dict, summary: dict, times: StageTimes
) -> str:
    """``report.md``: the settings, the fast paths (:func:`amortized_figures`), every method's localisation and
    rate-distortion areas (the evaluation's ``summary``), each method's areas paired with exact CartoonX's on the
    same images, the figures and the stage times."""
    lines = [
        "# cartoonx demo: the synthetic cartoon benchmark",
        "",
        f"Images {cfg.size} px; explainer trained for {cfg.fit_steps} steps on {cfg.train_images} images, "
        f"{cfg.teacher_images} of them with exact CartoonX teacher masks ({cfg.schedule} schedule: {cfg.steps} "
        f"steps, {cfg.samples} noise samples, lr {exact_lr(cfg)}, lambda {cfg.l1_lambda}); evaluated on "
        f"{cfg.test_images} held-out images. Classifier held-out accuracy: {classifier['accuracy']:.2%}.",
        "",
        "## Fast paths against the exact optimizer (RDE loss, same lambda, same noise seeds; medians per image)",
        "",
        "| method | RDE loss | exact loss | loss ratio to exact | seconds | exact seconds | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in fast.items():
        lines.append(
            f"| {name} | {f['loss_median']:.4f} | {f['exact_loss_median']:.4f} | {f['loss_ratio_median']:.3f} | "
            f"{f['seconds_median']:.4f} | {f['exact_seconds_median']:.3f} | {f['speedup_median']:.0f}x |"
        )
    lines += [
        "",
        f"Warm start = the amortized mask refined by {warm_steps(cfg)} optimizer steps of the refine schedule "
        f"(the exact optimizer runs {cfg.steps}).",
        "",
        "## Localisation on the ground truth and rate-distortion areas",
        "",
        "Energy share: the share of a method's pixel relevance on the decisive object / on the distractors. "
        "Pointing game: the strongest point of the relevance falls on the decisive object. Wavelet-aware (the "
        "explanation's detail part: what it keeps of the fine-scale coefficients, levels 1..J): *detail on "
        "outline*, the share of the kept detail-coefficient energy on the object's outline band (the decision "
        "rule is the dark outline); *detail pointing*, the pointing game on the explanation minus its low-pass "
        "reconstruction. Areas under curves (a) keep the top r (lower is better) and (b) randomise the top r "
        "(higher is better). Means over the images; standard errors and the definitions: `evaluation/report.md`, "
        "`docs/evaluation.md`.",
        "",
        "| method | energy on object | energy on distractors | pointing game | detail on outline | detail pointing "
        "| area (a) | area (b) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    chance = summary.get("ground_truth_chance", {})
    if chance:
        lines.append(
            f"| *chance (area share)* | {chance['object']['mean']:.3f} | {chance['distractors']['mean']:.3f} | - | "
            f"{chance['outline']['mean']:.3f} | - | - | - | - |"
        )
    for name, entry in summary["methods"].items():
        gt = entry.get("ground_truth", {})

        def cell(key, gt=gt):
            return f"{gt[key]['mean']:.3f}" if key in gt else "-"

        lines.append(
            f"| {name} | {cell('energy_object')} | {cell('energy_distractors')} | {cell('pointing_game')} | "
            f"{cell('detail_outline')} | {cell('detail_pointing_game')} | "
            f"{entry['area_keep']['mean']:.4f} | {entry['area_randomise']['mean']:.4f} | "
            f"{entry['seconds_per_explanation']['mean']:.4f} |"
        )
    for name, reason in summary.get("skipped", {}).items():
        lines.append(f"\nSkipped {name}: {reason}")
    if summary.get("paired"):  # each method against exact CartoonX, image by image
        from .evaluation.report import paired_markdown

        lines += paired_markdown(summary["paired"])
    lines += [
        "",
        "![rate-distortion](evaluation/rate_distortion.png)",
        "",
        "![examples](evaluation/examples.png)",
        "",
        "## Stages",
        "",
        "| stage | seconds | reused |",
        "|---|---|---|",
        *[f"| {k} | {v:.1f} | {'yes' if times.reused.get(k) else 'no'} |" for k, v in times.seconds.items()],
        "",
        f"Teacher masks: {teachers['done']} computed now, {teachers['skipped']} reused.",
        "",
        "Settings: `" + json.dumps(asdict(cfg)) + "`",
        "",
    ]
    return "\n".join(lines)
