"""Writing an evaluation's results: ``curves.csv``, ``summary.json``, ``rate_distortion.png``,
``examples.png`` and ``report.md`` (every file atomically).

- ``curves.csv``: one row per (image, method, curve, r): columns ``image, method, curve, r, distortion, lambda``;
  ``curve`` is ``keep`` (a), ``randomise`` (b) or ``lambda`` (c; then ``r`` is the image's mask mean and
  ``lambda`` the sparsity weight).
- ``summary.json``: per method the mean and standard error over images of each area, of the seconds per
  explanation and, with ground truth, of each localisation metric (and the chance levels); each method's areas
  paired with the reference method's on the same images (:func:`paired_summary`); panel (c) per lambda; the
  sanity checks; the settings.
- ``rate_distortion.png``: the three panels of the paper's Fig. 7 (mean curve, band = +-1 standard error).
- ``examples.png``: the first images, one column per method (explanation image or heat map).
- ``ground_truth.png`` (with ground truth): per example image, each method's detail-coefficient energy map with
  the decisive object's outline band.
- ``sanity.png`` (with the sanity checks): rows methods, columns the cascade depths of the model randomisation.
- ``report.md``: the command, the settings, the tables and the figures.

Titles and colours come from the method table (:data:`~amortized_cartoonx.methods.METHOD_TABLE`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..io import atomic_write_text
from ..methods import method_info, title
from ..plotting import image_array, save_figure, target_word
from .results import EvaluationResults, holm, mean_se, paired_difference

AREA_KEYS = ("area_keep", "area_keep_early", "area_randomise", "area_randomise_early")
#: The ground-truth tables of report.md: (metric, column title, chance-level region or None), on the pixel
#: relevance R and on the explanation's detail part (docs/evaluation.md defines them).
PIXEL_GROUND_TRUTH = (
    ("energy_object", "on object ↑", "object"),
    ("energy_distractors", "on distractors ↓", "distractors"),
    ("energy_outline", "on outline band ↑", "outline"),
    ("pointing_game", "pointing game ↑", None),
)
DETAIL_GROUND_TRUTH = (
    ("detail_object", "on object ↑", "object"),
    ("detail_distractors", "on distractors ↓", "distractors"),
    ("detail_outline", "on outline band ↑", "outline"),
    ("detail_pointing_game", "pointing game ↑", None),
)


def _style(name: str, representation: str) -> dict:
    """Line style of ``name`` in the figures: the method table's title and colour; dashed for pixel methods."""
    return {
        "color": method_info(name).colour,
        "linestyle": "-" if representation == "wavelet" else "--",
        "label": title(name),
    }


# ---- data files -------------------------------------------------------------------------------------------------
def curves_csv(results: EvaluationResults) -> str:
    """The long-format table of every curve value (see the module docstring)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "method", "curve", "r", "distortion", "lambda"])
    for name, res in results.methods.items():
        for n, image_id in enumerate(results.ids):
            for curve in ("keep", "randomise"):
                for r, d in zip(results.rates, getattr(res, curve)[n]):
                    writer.writerow([image_id, name, curve, f"{r:.6g}", f"{d:.8g}", ""])
    for name, points in results.lambda_points.items():
        for p in points:
            writer.writerow(
                [p["image"], name, "lambda", f"{p['mask_mean']:.8g}", f"{p['distortion']:.8g}", p["lambda"]]
            )
    return buf.getvalue()


def lambda_summary(results: EvaluationResults) -> dict[str, list[dict]]:
    """Panel (c) per method: per lambda, mean and standard error of mask mean and distortion."""
    out: dict[str, list[dict]] = {}
    for name, points in results.lambda_points.items():
        rows = []
        for lam in sorted({p["lambda"] for p in points}):
            at = [p for p in points if p["lambda"] == lam]
            rows.append(
                {
                    "lambda": lam,
                    "mask_mean": mean_se([p["mask_mean"] for p in at]),
                    "distortion": mean_se([p["distortion"] for p in at]),
                    "optimizer_distortion": mean_se([p["optimizer_distortion"] for p in at]),
                    "seconds_per_explanation": mean_se([p["seconds"] for p in at]),
                }
            )
        out[name] = rows
    return out


#: The method the others are paired with in the report, when it ran: the exact optimizer.
PAIRED_REFERENCE = "cartoonx"


def paired_summary(results: EvaluationResults) -> dict | None:
    """Each method's areas against the reference method's on the same images (the paired differences, how many
    images each side wins, the sign test: :func:`~.results.paired_difference`), or None with a single method.

    The reference is :data:`PAIRED_REFERENCE` when it ran, else the first method. Pairing removes what the
    images have in common (some images are hard for every method), so a difference far smaller than the two
    methods' standard errors can still be clear.
    """
    names = list(results.methods)
    if len(names) < 2:
        return None
    reference = PAIRED_REFERENCE if PAIRED_REFERENCE in results.methods else names[0]
    early = results.settings["evaluation"]["early_rate"]
    areas = {name: res.areas(results.rates, early) for name, res in results.methods.items()}
    out = {}
    for name in names:
        if name != reference:
            out[name] = {
                key: paired_difference(areas[name][key], areas[reference][key], key.startswith("area_keep"))
                for key in AREA_KEYS
            }
    for key in AREA_KEYS:  # each area's tests of every method against the reference form one family
        for entry, p in zip(out.values(), holm([entry[key]["p"] for entry in out.values()]), strict=True):
            entry[key]["p_holm"] = p
    return {"reference": reference, "methods": out}


def summary(results: EvaluationResults) -> dict:
    """The content of ``summary.json``."""
    early = results.settings["evaluation"]["early_rate"]
    methods = {}
    for name, res in results.methods.items():
        areas = res.areas(results.rates, early)
        entry = {
            "representation": res.representation,
            "kind": res.kind,
            "images": len(results.ids),
            **{k: mean_se(v) for k, v in areas.items()},
            "seconds_per_explanation": mean_se(res.seconds),
            "mean_curve": {c: getattr(res, c).mean(0).tolist() for c in ("keep", "randomise")},
        }
        if res.scalars:
            entry["mask_scalars"] = {k: mean_se(v) for k, v in res.scalars.items()}
        if res.ground_truth:
            entry["ground_truth"] = {k: mean_se(v) for k, v in res.ground_truth.items()}
        methods[name] = entry
    out = {
        "images": results.ids,
        "rates": results.rates,
        "early_rate": early,
        "methods": methods,
        "skipped": results.skipped,
        "paired": paired_summary(results),
        "lambda_panel": lambda_summary(results),
        "computed_this_run": results.computed,
        "settings": results.settings,
    }
    if results.ground_truth_chance:
        out["ground_truth_chance"] = {k: mean_se(v) for k, v in results.ground_truth_chance.items()}
    if results.sanity is not None:
        out["sanity"] = sanity_summary(results)
    return out


def depth_label(depth: int, layers: list[str]) -> str:
    """A cascade depth in words: ``top 3 (down to features.6)``, or ``all 13`` for every layer."""
    if depth >= len(layers):
        return f"all {len(layers)}"
    return f"top {depth} (down to {layers[-depth]})"


def sanity_summary(results: EvaluationResults) -> dict:
    """summary.json's ``sanity``: the layers, the depths, and per method and comparison the mean and standard
    error over images at each depth."""
    s = results.sanity
    return {
        "images": s.ids,
        "seed": s.seed,
        "layers": s.layers,
        "depths": [{"depth": d, "label": depth_label(d, s.layers)} for d in s.depths],
        "methods": {
            name: {c: [mean_se(row) for row in values] for c, values in comparisons.items()}
            for name, comparisons in s.scores.items()
        },
        "computed_this_run": s.computed,
    }


# ---- figures ------------------------------------------------------------------------------------------------------
#: A rate grid whose smallest positive rate is below this is drawn on a log-like axis (see :func:`rate_axis`).
LOG_AXIS_BELOW = 0.05


def _band(ax, x, values: np.ndarray, style: dict, marker: str | None = None) -> None:
    mean = values.mean(0)
    se = values.std(0, ddof=1) / math.sqrt(values.shape[0]) if values.shape[0] > 1 else np.zeros_like(mean)
    ax.plot(x, mean, **style, linewidth=1.5, marker=marker, markersize=2.5)
    ax.fill_between(x, mean - se, mean + se, color=style["color"], alpha=0.18, linewidth=0)


def rate_axis(ax, rates) -> None:
    """The x axis of curves (a) and (b): [0, 1], log-like (``symlog``: linear from 0 to the smallest positive rate,
    logarithmic above) when the grid is dense at low rates (its smallest positive rate below
    :data:`LOG_AXIS_BELOW`), where the wavelet methods' curves fall; linear otherwise."""
    positive = [r for r in rates if r > 0]
    if positive and min(positive) < LOG_AXIS_BELOW:
        ax.set_xscale("symlog", linthresh=min(positive), linscale=0.4)
        ticks = [0.0] + [t for t in (0.001, 0.01, 0.1, 1.0) if t >= min(positive)]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlim(0, 1)


#: The y label of each distortion measure (:data:`~amortized_cartoonx.rde.DISTORTIONS`), as plotted.
DISTORTION_LABELS = {
    "l2": r"distortion $\|p(x) - p(y)\|_2$",
    "label": r"distortion $(p_c(x) - p_c(y))^2$",
    "maximize-target": r"distortion $(1 - p_c(y))^2$",
    "label-l2": r"distortion $|p_c(x) - p_c(y)|$",
    "kl": r"distortion $\mathrm{KL}(p(y) \| p(x))$",
}


def distortion_label(name: str) -> str:
    """The y label for the distortion measure ``name`` (its name for a measure registered elsewhere)."""
    return DISTORTION_LABELS.get(name, f"distortion ({name})")


def rate_distortion_figure(results: EvaluationResults) -> Figure:
    """Fig. 7's panels: (a) keep, (b) randomise and, when there is a lambda grid, (c) distortion against mean
    mask over lambda (without one, the figure has two panels, not an empty third)."""
    panel = lambda_summary(results)
    ylabel = distortion_label(results.settings.get("evaluation", {}).get("distortion", "l2"))
    fig = Figure(figsize=(15 if panel else 10, 4.4))
    axes = fig.subplots(1, 3 if panel else 2)
    rates = np.asarray(results.rates)
    log_axis = any(0 < r < LOG_AXIS_BELOW for r in results.rates)
    for name, res in results.methods.items():
        style = _style(name, res.representation)
        _band(axes[0], rates, res.keep, style, "." if log_axis else None)
        _band(axes[1], rates, res.randomise, style, "." if log_axis else None)
    axes[0].set(
        title="(a) keep the most relevant, randomise the rest",
        xlabel="rate: fraction of coefficients kept",
        ylabel=ylabel,
    )
    axes[1].set(
        title="(b) randomise the most relevant, keep the rest",
        xlabel="fraction of most relevant coefficients randomised",
        ylabel=ylabel,
    )
    axes[0].legend(fontsize=7, loc="lower left" if log_axis else "upper right")
    for a in axes[:2]:
        rate_axis(a, results.rates)
        a.grid(alpha=0.3)
    if panel:
        ax = axes[2]
        for name, rows in panel.items():
            res = results.methods.get(name)
            style = _style(name, res.representation if res else "wavelet")
            x = [r["mask_mean"]["mean"] for r in rows]
            y = [r["distortion"]["mean"] for r in rows]
            ax.errorbar(
                x,
                y,
                xerr=[r["mask_mean"]["se"] for r in rows],
                yerr=[r["distortion"]["se"] for r in rows],
                marker="o",
                markersize=4,
                capsize=2,
                **style,
            )
            for r, xi, yi in zip(rows, x, y):
                ax.annotate(f"{r['lambda']:g}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.legend(fontsize=7)
        panel_images = max(r["mask_mean"]["n"] for rows in panel.values() for r in rows)  # --lambda-limit's
        ax.set(
            title=rf"(c) over $\lambda$ (labels): distortion vs mask, {panel_images} images",
            xlabel=r"mean of the mask (normalised $\ell_1$)",
            ylabel=ylabel,
        )
        ax.grid(alpha=0.3)
        ax.ticklabel_format(useOffset=False)
    scale = "; x axis logarithmic above the smallest positive rate" if log_axis else ""
    panels = " in (a) and (b)" if panel else ""
    fig.suptitle(f"{len(results.ids)} images{panels}; band: +-1 standard error{scale}", fontsize=9)
    fig.tight_layout()
    return fig


def examples_figure(results: EvaluationResults, class_names: list[str] | None = None) -> Figure | None:
    """A grid: one row per example image, the input then one column per method."""
    if results.example_images is None or not results.examples:
        return None
    names = list(results.examples)
    rows, cols = results.example_images.shape[0], 1 + len(names)
    fig = Figure(figsize=(1.9 * cols, 2.0 * rows + 0.3))
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    first = names[0]
    word = target_word(results.settings.get("optimizer", {}).get("link", "softmax"))
    for r in range(rows):
        target = results.example_targets[first][r]
        label = class_names[target] if class_names and target < len(class_names) else f"{word} {target}"
        axes[r, 0].imshow(image_array(results.example_images[r]), interpolation="nearest")
        axes[r, 0].set_title(f"{results.ids[r]}\n{label}", fontsize=6)
        for c, name in enumerate(names, start=1):
            img = results.examples[name][r, 0].numpy()
            heat = results.methods[name].representation == "pixel"
            axes[r, c].imshow(img, cmap="inferno" if heat else "gray", vmin=0, vmax=1, interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(title(name), fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def ground_truth_figure(results: EvaluationResults) -> Figure | None:
    """Where each method's kept detail energy sits: one row per example image, the input with its regions, then
    per method the coefficient energy map M (scaled to its maximum) with the outline band's edges drawn on it and
    the image's ``detail_outline`` share in the title."""
    regions, detail = results.ground_truth_examples
    if regions is None or not detail or results.example_images is None:
        return None
    names = [n for n in results.methods if n in detail]
    rows = min(regions.shape[0], results.example_images.shape[0])
    cols = 1 + len(names)
    fig = Figure(figsize=(1.9 * cols, 2.0 * rows + 0.5))
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for r in range(rows):
        band = (regions[r] == 2).numpy().astype(float)
        ax = axes[r, 0]
        ax.imshow(image_array(results.example_images[r]), interpolation="nearest")
        ax.contour(band, levels=[0.5], colors="cyan", linewidths=0.6)
        ax.contour((regions[r] == 3).numpy().astype(float), levels=[0.5], colors="red", linewidths=0.6)
        ax.set_title(f"{results.ids[r]}\noutline band (cyan), distractors (red)", fontsize=6)
        for c, name in enumerate(names, start=1):
            ax = axes[r, c]
            m = detail[name][r].numpy()
            ax.imshow(m / max(float(m.max()), 1e-12), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.contour(band, levels=[0.5], colors="cyan", linewidths=0.4)
            share = results.methods[name].ground_truth.get("detail_outline")
            label = f"{title(name)}\n" if r == 0 else ""
            ax.set_title(label + (f"on outline {share[r]:.2f}" if share is not None else ""), fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Detail-coefficient energy M (each method's kept fine-scale structure), scaled per map", fontsize=8)
    fig.tight_layout()
    return fig


def sanity_figure(results: EvaluationResults) -> Figure | None:
    """Rows: methods; columns: the first image's picture under the trained classifier, then under each cascade
    depth; last column: mean Spearman correlation and SSIM (+-1 standard error) against depth."""
    s = results.sanity
    if s is None or not s.pictures:
        return None
    names = list(s.pictures)
    cols = 2 + len(s.depths) + 1  # input, trained, depths, plot
    fig = Figure(figsize=(1.7 * cols + 1.2, 1.8 * len(names) + 0.6))
    axes = np.atleast_2d(fig.subplots(len(names), cols, squeeze=False))
    x = np.arange(len(s.depths))
    for r, name in enumerate(names):
        heat = results.methods[name].representation == "pixel" if name in results.methods else False
        for c in range(cols - 1):
            ax = axes[r, c]
            ax.axis("off")
            if c == 0:
                if r == 0 and s.image is not None:
                    ax.imshow(image_array(s.image), interpolation="nearest")
                    ax.set_title(f"{s.ids[0]}", fontsize=6)
                continue
            ax.imshow(
                s.pictures[name][c - 1, 0].numpy(),
                cmap="inferno" if heat else "gray",
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            if r == 0:
                label = "trained" if c == 1 else depth_label(s.depths[c - 2], s.layers).replace(" (", "\n(")
                ax.set_title(label, fontsize=6)
            if c == 1:
                ax.text(
                    -0.08, 0.5, title(name), transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=7
                )
        ax = axes[r, -1]
        lows = [-0.3]  # the axis reaches below every point's error bar (Spearman goes down to -1)
        for comparison, marker in (("spearman", "o"), ("ssim", "s")):
            values = s.scores[name][comparison]
            stats = [mean_se(row) for row in values]
            lows += [st["mean"] - st["se"] - 0.05 for st in stats if math.isfinite(st["mean"])]
            ax.errorbar(
                x,
                [st["mean"] for st in stats],
                yerr=[st["se"] for st in stats],
                marker=marker,
                markersize=3,
                capsize=2,
                label="Spearman" if comparison == "spearman" else "SSIM",
            )
        ax.set_ylim(min(lows), 1.05)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xticks(x, [str(d) for d in s.depths], fontsize=6)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if r == 0:
            ax.legend(fontsize=6)
            ax.set_title("vs trained (mean)", fontsize=7)
        if r == len(names) - 1:
            ax.set_xlabel("top layers randomised", fontsize=6)
    fig.suptitle(
        f"Sanity check: weights randomised in cascade from the top ({len(s.ids)} images, seed {s.seed})", fontsize=8
    )
    fig.tight_layout()
    return fig


# ---- report.md -----------------------------------------------------------------------------------------------------
def _fmt(stat: dict, digits: int = 4) -> str:
    if not stat or stat.get("n", 0) == 0 or not math.isfinite(stat["mean"]):
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['se']:.{digits}f}"


def _best(entries: dict, key: str, lower: bool) -> str | None:
    values = {n: e[key]["mean"] for n, e in entries.items() if key in e and math.isfinite(e[key]["mean"])}
    if not values:
        return None
    return (min if lower else max)(values, key=values.get)


def _ground_truth_table(methods: dict, chance: dict, columns: tuple) -> list[str]:
    lines = [
        "| method | " + " | ".join(c[1] for c in columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    if chance:
        cells = [_fmt(chance.get(region, {}), 3) if region else "-" for _, _, region in columns]
        lines.append("| *chance (area share)* | " + " | ".join(cells) + " |")
    for name, e in methods.items():
        gt = e.get("ground_truth", {})
        lines.append(f"| {title(name)} | " + " | ".join(_fmt(gt.get(key, {}), 3) for key, _, _ in columns) + " |")
    return lines


def ground_truth_markdown(methods: dict, chance: dict, evaluation_settings: dict) -> list[str]:
    """The two ground-truth tables of report.md: the pixel relevance R, and the explanation's detail part."""
    radius = evaluation_settings.get("outline_radius")
    return [
        "",
        "## Ground truth (decisive object vs distractors)",
        "",
        "Mean ± standard error over images. Shares of a map on the decisive object, on the distractors and on the "
        f"object's outline band (±{radius} px around its boundary); pointing game: the map's strongest point hits "
        "the object. The chance row is each region's share of the image (what a uniform map scores). "
        "Definitions: docs/evaluation.md.",
        "",
        "**Pixel relevance R** (mask methods: the energy of what the mask keeps; gradient methods: |attribution| "
        "summed over channels):",
        "",
        *_ground_truth_table(methods, chance, PIXEL_GROUND_TRUTH),
        "",
        "**Detail part** (wavelet-aware: the explanation's detail coefficients, levels 1..J; shares of their energy "
        "spread over each coefficient's footprint; pointing game on the explanation minus its low-pass "
        "reconstruction):",
        "",
        *_ground_truth_table(methods, chance, DETAIL_GROUND_TRUTH),
    ]


def sanity_markdown(sanity: dict, figure: bool = True) -> list[str]:
    """The sanity checks' section of report.md: Spearman and SSIM per method (rows) and depth (columns)."""
    labels = [d["label"] for d in sanity["depths"]]
    lines = ["", "## Sanity checks: model randomisation", ""]
    if not sanity["methods"]:
        return [
            *lines,
            "No method to check: the random orderings, the only methods of this run, do not look at the classifier.",
        ]
    lines += [
        f"The first {len(sanity['images'])} images explained again (the trained classifier's class) with the "
        f"classifier's weights randomised in cascade from the top layer (columns: the layers randomised; the last: "
        f"all {len(sanity['layers'])} at once; seed {sanity['seed']}), compared with the trained classifier's "
        "explanation: Spearman rank correlation of the relevance (the method's own ranking scores) and SSIM of the "
        "pictures. Mean ± standard error over images. **Lower means the explanation depends on the weights**, as "
        "it should; the trained explanation scores 1 against itself." + (" Figure: `sanity.png`." if figure else ""),
    ]
    comparisons = (
        ("spearman", "Spearman rank correlation (a constant explanation against a non-constant one: 0)"),
        ("ssim", "SSIM of the pictures"),
        ("constant", "Share of randomised explanations that are constant (rank nothing, e.g. an all-zero mask)"),
    )
    for comparison, heading in comparisons:
        lines += [
            "",
            f"{heading}:",
            "",
            "| method | " + " | ".join(labels) + " |",
            "| --- | " + " | ".join("---" for _ in labels) + " |",
        ]
        for name, values in sanity["methods"].items():
            lines.append(f"| {title(name)} | " + " | ".join(_fmt(v, 3) for v in values[comparison]) + " |")
    return lines


def paired_markdown(paired: dict) -> list[str]:
    """report.md's table of each method's areas against the reference's on the same images."""
    ref = title(paired["reference"])
    lines = [
        "",
        f"## Paired with {ref} on the same images",
        "",
        f"Per image, the method's area minus {ref}'s (mean ± standard error over images); wins: the images on which "
        f"the method is better than {ref} (lower (a), higher (b)) and on which it is worse; p: the two-sided sign "
        "test of the two counts (images where both are equal left out), adjusted by Holm's method for the "
        f"{len(paired['methods'])} methods compared in each column (summary.json: `p_holm`, and the unadjusted "
        "`p`). Pairing removes what the images share, so it separates methods whose areas' error bars overlap.",
        "",
        "| method | Δ area (a) | wins / losses (a) | p (a) | Δ area (b) | wins / losses (b) | p (b) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in paired["methods"].items():
        cells = []
        for key in ("area_keep", "area_randomise"):
            e = entry[key]
            cells += [f"{e['mean']:+.4f} ± {e['se']:.4f}", f"{e['better']} / {e['worse']}", f"{e['p_holm']:.2g}"]
        lines.append(f"| {title(name)} | {' | '.join(cells)} |")
    return lines


def _target_text(target, link: str) -> str:
    """The report's words for ``settings["evaluation"]["target"]``."""
    if target == "predicted":
        return "the classifier's prediction" + (" (the label of the largest logit)" if link == "sigmoid" else "")
    if isinstance(target, dict):
        return f"given per image ({len(set(target.values()))} different classes; summary.json lists them)"
    return f"{target_word(link)} {target}, in every image"


def report_markdown(results: EvaluationResults, summary_data: dict, figures: list[str]) -> str:
    s = results.settings
    ev = s["evaluation"]
    opt = s["optimizer"]
    methods = summary_data["methods"]
    lines = [
        "# Rate-distortion evaluation",
        "",
        f"{len(results.ids)} images from `{s['images_dir']}`, classifier `{s['classifier']}`, "
        f"{s['image_size']}x{s['image_size']} px, device `{s['device']}`.",
        "",
        "Command:",
        "",
        f"```\n{s.get('command') or '(called from Python)'}\n```",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| rates | {len(results.rates)} on [0, 1]: {', '.join(f'{r:g}' for r in results.rates)} |",
        f"| noise draws per rate | {ev['noise_draws']} ({ev['obfuscation']}, the same draws for every method "
        "of a representation) |",
        f"| distortion | `{ev['distortion']}` (of the {opt.get('link', 'softmax')} probabilities) |",
        f"| early areas | over r in [0, {ev['early_rate']}] |",
        f"| exact optimizer (cartoonx, pixel-rde) | schedule `{opt.get('schedule', 'paper')}`: {opt['steps']} steps, "
        f"{opt['num_samples']} samples, lr {opt['lr']} ({opt.get('lr_decay', 'constant')}), "
        f"{opt.get('parametrisation', 'clamp')} mask, {opt.get('precision', 'fp32')}, lambda "
        f"{opt['l1_lambda'] if opt['l1_lambda'] is not None else 'default (20 / 4)'}, "
        f"distortion `{opt['distortion']}` |",
        f"| DWT | {s['dwt']['wave']}, J={s['dwt']['levels']}, {s['dwt']['mode']} padding |",
        f"| baselines | IG {s['baselines']['ig_steps']} steps; SmoothGrad {s['baselines']['smoothgrad_samples']} "
        f"samples, std {s['baselines']['smoothgrad_std']} |",
        f"| seed | {ev['seed']} |",
        f"| explained class | {_target_text(ev.get('target', 'predicted'), opt.get('link', 'softmax'))} |",
    ]
    if s.get("checkpoint"):
        lines.append(f"| amortized checkpoint | `{s['checkpoint']}` (warm start: {s['refine_steps']} steps) |")
    lines += [
        "",
        "## Areas under the curves (mean ± standard error over images)",
        "",
        "(a) keep the top fraction r, randomise the rest: **lower is better**. (b) randomise the top fraction r, "
        "keep the rest: **higher is better**. Bold: the best method per column (random orderings included).",
        "",
        "| method | representation | area (a) ↓ | early (a) ↓ | area (b) ↑ | early (b) ↑ | seconds / explanation |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    best = {
        "area_keep": _best(methods, "area_keep", True),
        "area_keep_early": _best(methods, "area_keep_early", True),
        "area_randomise": _best(methods, "area_randomise", False),
        "area_randomise_early": _best(methods, "area_randomise_early", False),
    }
    for name, e in methods.items():
        cells = []
        for key in AREA_KEYS:
            text = _fmt(e[key])
            cells.append(f"**{text}**" if best[key] == name else text)
        lines.append(
            f"| {title(name)} | {e['representation']} | {' | '.join(cells)} | {_fmt(e['seconds_per_explanation'], 3)} |"
        )
    if summary_data.get("paired"):
        lines += paired_markdown(summary_data["paired"])
    if results.has_ground_truth:
        lines += ground_truth_markdown(methods, summary_data.get("ground_truth_chance", {}), ev)
    if "sanity" in summary_data:
        lines += sanity_markdown(summary_data["sanity"], "sanity.png" in figures)
    panel = summary_data["lambda_panel"]
    if panel:
        lines += [
            "",
            "## Panel (c): the exact optimizer over lambda",
            "",
            f"Steps: {opt['steps'] if ev['lambda_steps'] is None else ev['lambda_steps']}; images: "
            f"{min(ev['lambda_limit'] or len(results.ids), len(results.ids))} (the first ones). Distortion as in "
            "(a) and (b), of the "
            "continuous mask.",
            "",
            "| method | lambda | mean mask ↓ | distortion ↓ | seconds / explanation |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, rows in panel.items():
            for r in rows:
                lines.append(
                    f"| {title(name)} | {r['lambda']:g} | {_fmt(r['mask_mean'])} | {_fmt(r['distortion'])} | "
                    f"{_fmt(r['seconds_per_explanation'], 3)} |"
                )
    if results.skipped:
        lines += ["", "## Skipped methods", ""]
        lines += [f"- {title(n)}: {reason}" for n, reason in results.skipped.items()]
    lines += ["", "## Figures", ""]
    lines += [f"![{f}]({f})" for f in figures]
    lines += [
        "",
        "Files: `curves.csv` (every curve value), `summary.json` (these tables and more), `cache/` (per-image "
        "results, reused by the next run).",
        "",
    ]
    return "\n".join(lines)


def write_report(results: EvaluationResults, out_dir: str | Path, class_names: list[str] | None = None) -> dict:
    """Write every output file into ``out_dir``; returns the summary dict (its ``figures``: the figures written)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "curves.csv", curves_csv(results))
    data = summary(results)
    figures = ["rate_distortion.png"]
    save_figure(rate_distortion_figure(results), out / "rate_distortion.png")
    grid = examples_figure(results, class_names)
    if grid is not None:
        save_figure(grid, out / "examples.png")
        figures.append("examples.png")
    truth = ground_truth_figure(results)
    if truth is not None:
        save_figure(truth, out / "ground_truth.png")
        figures.append("ground_truth.png")
    sanity = sanity_figure(results)
    if sanity is not None:
        save_figure(sanity, out / "sanity.png")
        figures.append("sanity.png")
    data["figures"] = figures
    atomic_write_text(out / "summary.json", json.dumps(data, indent=2, default=str) + "\n")
    atomic_write_text(out / "report.md", report_markdown(results, data, figures))
    return data
