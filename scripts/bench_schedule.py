"""How few optimizer steps reach the paper schedule's CartoonX loss? Step schedules against the paper's.

For every image (seeded by its file name, as the commands do) it runs the paper schedule (Adam, lr 1e-3,
2000 steps) once, then every candidate schedule at each step budget of ``--steps``, and measures every final
mask the same way (the RDE loss on ``--measure-samples`` noise samples of the MEASURE stream, the same draws
for every schedule). It prints, per candidate and budget, the median ratio of the final loss to the paper
schedule's 2000-step loss, its range, how many images stay at or below 1 and above 1.1, and the seconds per
image; and, per candidate, the smallest budget whose median ratio is at or below 1. With ``--plot`` it draws
the median loss-versus-step curves (the per-step losses are the optimizer's own noisy estimates: the loss after s
steps at x = s; the loss before the first step is left off the log axis).

    cartoonx train-classifier --export bench/synthetic-test --export-images 48
    python scripts/bench_schedule.py --classifier synthetic --images bench/synthetic-test --size 64 \\
        --offset 16 --limit 16 --samples 8 --json outputs/bench-schedule-synthetic.json \\
        --plot docs/figures/schedule.png

(``--offset 16``: images #0-15 of that export are the ones the ``fast`` schedule was tuned on.)

Seconds per image are wall-clock for the whole ``explain()`` call, the final measurement included, for the paper
schedule and every candidate alike; one short untimed run of each schedule comes first, so no row pays the
one-time costs (allocator, kernels). Paper-schedule seconds read from ``--reference-cache`` are those of the run
(and machine) that computed them, and the output says how many there are.

Candidates are named ``DECAY-LR`` (``constant-0.02``, ``cosine-0.1``, ``linear-0.05``, ``constant-1e-3``),
``DECAY-LR-FINAL`` for a decay that ends at ``FINAL`` times the lr (``cosine-0.5-0.2``), ``logit-...`` for the
logit parametrisation (``logit-cosine-0.3``), or a schedule of :data:`amortized_cartoonx.optimizer.SCHEDULES`
(``fast``); a suffix ``~L`` ramps the noise samples from ``--samples`` at the first step to L at the last
(``fast~16``), ``~L0-L1`` from L0 to L1 (``fast~4-12``: on average as many as ``--samples 8``); a suffix
``+bf16`` runs the candidate's steps with the classifier in bf16 (``fast+bf16``; the
reference and every measurement stay float32). ``--reference-cache DIR`` keeps the paper schedule's per-image
results (scripts/exact_cache.py, shared with bench_amortized.py's ``--exact-cache``), so later runs only pay for
the candidates. Every candidate and budget is checked before anything runs. Held-out images only: the schedules in
the package were chosen on other images (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from exact_cache import cached_results, classifier_key  # noqa: E402  (scripts/exact_cache.py)

from amortized_cartoonx.allocator import tune_cpu_allocator  # noqa: E402
from amortized_cartoonx.classifiers import load_classifier  # noqa: E402
from amortized_cartoonx.cli.common import add_link_arg, plain_text  # noqa: E402
from amortized_cartoonx.errors import CartoonXError, ConfigError, InputError, one_line  # noqa: E402
from amortized_cartoonx.images import list_images, load_images  # noqa: E402
from amortized_cartoonx.optimizer import LR_DECAYS, PRECISIONS, SCHEDULES, CartoonX, OptimizerConfig  # noqa: E402
from amortized_cartoonx.runtime import resolve_device  # noqa: E402
from amortized_cartoonx.seeding import file_seeds  # noqa: E402

#: A learning rate or a final fraction in a candidate's name: ``0.02``, ``.5``, ``3``, ``1e-3``, ``2.5E+1``.
NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
#: ``[logit-]DECAY-LR[-FINAL]``.
DECAY_LR = re.compile(rf"(?:(?P<logit>logit)-)?(?P<decay>[a-z]+)-(?P<lr>{NUMBER})(?:-(?P<final>{NUMBER}))?")


def candidate_config(name: str, steps: int, base: dict) -> OptimizerConfig:
    """The optimizer config of candidate ``name`` run for ``steps`` steps (suffixes: ``~L`` or ``~L0-L1`` the
    noise samples ramp to L, ``+bf16`` the bf16 path)."""
    name, plus, precision = name.rpartition("+")
    if not plus or not precision[:1].isalpha():  # no suffix: a "+" of an exponent (1e+1) is the number's
        name, precision = name + plus + precision, ""
    elif precision not in PRECISIONS:
        raise ConfigError(f"unknown precision suffix +{precision}: use +{' or +'.join(PRECISIONS)}")
    name, tilde, ramp = name.partition("~")
    first, dash, final = ramp.rpartition("-") if "-" in ramp else ("", "", ramp)
    if tilde and not (final.isdigit() and (first.isdigit() or not dash)):
        raise ConfigError(f"the suffix ~L or ~L0-L1 takes numbers of noise samples, got ~{ramp}")
    base = {**base, "precision": precision or "fp32"}
    if tilde:
        base |= {"final_samples": int(final), **({"num_samples": int(first)} if dash else {})}
    if name in SCHEDULES:
        return OptimizerConfig(schedule=name, steps=steps, **base)
    match = DECAY_LR.fullmatch(name)
    if match is None or match["decay"] not in LR_DECAYS:
        raise ConfigError(
            f"unknown candidate {name!r}: use [logit-]DECAY-LR[-FINAL] (decay in {', '.join(LR_DECAYS)}; "
            f"LR like 0.02 or 1e-3) or {list(SCHEDULES)}"
        )
    return OptimizerConfig(
        steps=steps,
        lr=float(match["lr"]),
        lr_decay=match["decay"],
        lr_final=float(match["final"] or 0.0),
        parametrisation="logit" if match["logit"] else "clamp",
        **base,
    )


def step_budgets(text: str) -> list[int]:
    """``--steps``: comma-separated positive step counts."""
    budgets = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            raise ConfigError(f"--steps takes comma-separated positive step counts, got {item.strip()!r} in {text!r}")
        budgets.append(int(item))
    return budgets


def candidate_configs(names: str, budgets: list[int], base: dict) -> dict[tuple[str, int], OptimizerConfig]:
    """Every candidate at every budget, as configs: a bad name or setting stops the run before anything runs."""
    configs = {}
    for name in names.split(","):
        for steps in budgets:
            try:
                configs[name, steps] = candidate_config(name, steps, base).validate()
            except CartoonXError as exc:  # a bad name, or a setting OptimizerConfig refuses (say an lr of 0)
                raise ConfigError(f"candidate {name!r} at {steps} steps: {one_line(exc)}") from None
    return configs


def reached(name: str, rows: list[dict]) -> str:
    """The summary line of candidate ``name``: the smallest budget whose median ratio is at or below 1."""
    tried = [r["steps"] for r in rows if r["schedule"] == name]
    hits = [r["steps"] for r in rows if r["schedule"] == name and r["median_ratio"] <= 1.0]
    if hits:
        return f"{name}: median ratio <= 1 from {min(hits)} steps"
    return f"{name}: median ratio <= 1 not reached at the budgets tried ({', '.join(map(str, tried))} steps)"


def curve_points(curve: list[float]) -> tuple[list[int], list[float]]:
    """A median loss history as points (step, loss): ``history[s]`` is the loss before update s, so after s steps;
    ``history[0]`` (after no step) has no place on a log axis and is left off."""
    return list(range(1, len(curve))), list(curve[1:])


def run(
    explainer: CartoonX, images: torch.Tensor, seeds: list[int], batch: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Final measured losses (N,), per-step history of the total loss (S, N), seconds per image."""
    losses, histories, seconds = [], [], 0.0
    for lo in range(0, len(images), batch):
        explanation = explainer.explain(images[lo : lo + batch], seeds=seeds[lo : lo + batch])
        losses.append(explanation.loss.cpu().numpy())
        histories.append(explanation.history.total.cpu().numpy())
        seconds += explanation.seconds
    return np.concatenate(losses), np.concatenate(histories, axis=1), seconds / len(images)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_cpu_allocator()  # as the cartoonx command runs (amortized_cartoonx/allocator.py)
    try:
        if args.replot:
            with open(args.replot) as fh:
                plot(json.load(fh), args.plot or "schedule.png")
            return 0
        return bench(args)
    except CartoonXError as exc:
        print(f"bench_schedule: error: {one_line(exc)}", file=sys.stderr)
        return 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", required=True)
    p.add_argument("--normalize", default="auto")
    p.add_argument("--images", required=True, help="folder of held-out images")
    p.add_argument("--offset", type=int, default=0, help="skip this many images of the folder (sorted by name)")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--samples", type=int, default=16, help="noise samples L per step")
    p.add_argument("--measure-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--levels", type=int, default=5)
    add_link_arg(p)
    p.add_argument("--paper-steps", type=int, default=2000)
    p.add_argument("--candidates", default="fast,constant-0.02,cosine-0.05,cosine-0.1,cosine-0.2")
    p.add_argument("--steps", default="25,50,100,200", help="step budgets of the candidates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--reference-cache", default=None, metavar="DIR", help="keep the paper schedule's results here")
    p.add_argument("--plot", default=None, help="write the loss-versus-step figure here (PNG)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw --plot from a --json of an earlier run")
    return p.parse_args(argv)


def bench(args: argparse.Namespace) -> int:
    base = {"num_samples": args.samples, "measure_samples": args.measure_samples, "seed": args.seed, "link": args.link}
    paper_config = OptimizerConfig(schedule="paper", steps=args.paper_steps, **base).validate()
    budgets = step_budgets(args.steps)
    configs = candidate_configs(args.candidates, budgets, base)  # all checked before anything runs
    names = list(dict.fromkeys(name for name, _ in configs))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    every = list_images(args.images)
    if not 0 <= args.offset < len(every) or args.limit < 1:
        raise InputError(
            f"--offset {args.offset} --limit {args.limit} selects no image: {args.images} has {len(every)} images"
        )
    files = every[args.offset : args.offset + args.limit]
    classifier = load_classifier(args.classifier, normalize=args.normalize, device=device)
    images = load_images(files, args.size).to(device)
    seeds = file_seeds([f.name for f in files], args.seed)
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# bench_schedule: {args.classifier}, {len(files)} images of {args.images} from #{args.offset}, "
        f"{args.size}px, L={args.samples}, measured on {args.measure_samples} samples, {device} ({hardware}), "
        f"torch {torch.__version__}",
        flush=True,
    )

    def explainer(config: OptimizerConfig) -> CartoonX:
        return CartoonX(classifier, levels=args.levels, config=config)

    paper = explainer(paper_config)
    # warm-up (allocator, kernels, the bf16 path): one short untimed run of each schedule, so that neither the
    # reference (when computed) nor the first candidate pays the one-time costs
    first = images[: args.batch_size]
    for config in [paper_config, *(configs[name, budgets[0]] for name in names)]:
        explainer(config).explain(first, steps=2)
    identity = classifier_key(classifier, args.classifier)
    reference = []
    for lo in range(0, len(images), args.batch_size):
        hi = lo + args.batch_size
        reference += cached_results(
            args.reference_cache, paper, identity, args.size, images[lo:hi], files[lo:hi], seeds[lo:hi]
        )
    paper_loss = np.array([r["loss"] for r in reference])
    paper_history = torch.stack([r["history"] for r in reference], dim=1).numpy()  # (S, N)
    # seconds of the whole explain() call, as the candidates' (None: a cache file from before they were defined so)
    known = [r["seconds"] for r in reference if r["seconds"] is not None]
    paper_seconds = float(np.mean(known)) if known else None
    seconds_cached = sum(r["cached"] and r["seconds"] is not None for r in reference)
    print(
        f"paper schedule: {args.paper_steps} steps, median loss {np.median(paper_loss):.4f}, "
        f"{'n/a' if paper_seconds is None else f'{paper_seconds:.2f}'} s/image"
        + (
            f" (the seconds of {seconds_cached}/{len(reference)} images come from the reference cache: measured by "
            "the run that computed them, perhaps on another machine)"
            if seconds_cached
            else ""
        )
        + (f" ({len(reference) - len(known)} cached images' seconds unknown)" if len(known) < len(reference) else ""),
        flush=True,
    )

    rows, curves = [], {"paper": np.median(paper_history, axis=1).tolist()}
    print()
    print("| schedule | steps | median ratio | range | images <= 1 | images > 1.1 | s / image |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        for steps in budgets:
            loss, history, seconds = run(explainer(configs[name, steps]), images, seeds, args.batch_size)
            ratio = loss / paper_loss
            row = {
                "schedule": name,
                "steps": steps,
                "median_ratio": float(np.median(ratio)),
                "min_ratio": float(ratio.min()),
                "max_ratio": float(ratio.max()),
                "at_or_below_1": int((ratio <= 1).sum()),
                "above_1_1": int((ratio > 1.1).sum()),
                "images": len(ratio),
                "seconds_per_image": seconds,
                "ratios": ratio.tolist(),
            }
            rows.append(row)
            curves[f"{name}@{steps}"] = np.median(history, axis=1).tolist()
            print(
                f"| {name} | {steps} | {row['median_ratio']:.3f} | {row['min_ratio']:.3f}-{row['max_ratio']:.3f} | "
                f"{row['at_or_below_1']}/{len(ratio)} | {row['above_1_1']} | {seconds:.2f} |",
                flush=True,
            )
    print()
    for name in names:
        print(reached(name, rows))
    result = {
        "classifier": args.classifier,
        "images": [f.name for f in files],
        "size": args.size,
        "samples": args.samples,
        "measure_samples": args.measure_samples,
        "device": str(device),
        "hardware": hardware,
        "torch": torch.__version__,
        "paper": {
            "steps": args.paper_steps,
            "losses": paper_loss.tolist(),
            "seconds_per_image": paper_seconds,
            "seconds_cached": seconds_cached,
        },
        "rows": rows,
        "curves": curves,
        "command": " ".join(sys.argv),
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.plot:
        plot(result, args.plot)
    return 0


def plot(result: dict, path: str) -> None:
    from matplotlib.figure import Figure

    from amortized_cartoonx.plotting import save_figure

    fig = Figure(figsize=(9, 3.6))
    ax_curve, ax_ratio = fig.subplots(1, 2)
    paper = result["curves"]["paper"]
    ax_curve.plot(*curve_points(paper), color="black", label=f"paper ({len(paper)} steps)")
    longest = max(r["steps"] for r in result["rows"])
    for key, curve in result["curves"].items():
        if key.endswith(f"@{longest}"):
            ax_curve.plot(*curve_points(curve), label=key)
    ax_curve.axhline(statistics.median(result["paper"]["losses"]), color="black", linestyle=":", linewidth=1)
    ax_curve.set(
        xscale="log",
        yscale="log",
        xlabel="step",
        ylabel="RDE loss (median, per-step estimate)",
        title="loss vs step (dotted: paper's final loss)",
    )
    ax_curve.legend(fontsize=7)
    for name in dict.fromkeys(r["schedule"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["schedule"] == name]
        ax_ratio.plot([r["steps"] for r in rows], [r["median_ratio"] for r in rows], marker="o", label=name)
    ax_ratio.axhline(1.0, color="black", linestyle=":", linewidth=1)
    budgets = sorted({r["steps"] for r in result["rows"]})
    ax_ratio.set(
        xscale="log",
        yscale="log",
        xlabel="step budget",
        ylabel=f"final loss / paper's {result['paper']['steps']}-step loss",
        title="final-loss ratio (median)",
    )
    ax_ratio.set_xticks(budgets, [str(b) for b in budgets])
    ax_ratio.minorticks_off()
    ax_ratio.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
