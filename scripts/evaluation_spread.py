"""The spread of `cartoonx evaluate` figures over several runs: other seeds on the same images, or other images.

    python scripts/evaluation_spread.py OUT_SEED0 OUT_SEED1 [--names "seed 0" "seed 1"]

Each argument is an evaluation's output folder (or its ``summary.json``). Prints markdown:

1. **Areas**: per method and area, the median and range of the run means (a method missing from a run is left
   out of its figures; the JSON line has every run's mean).
2. **Paired with the reference** (exact CartoonX when it ran): per run, the images on which the method is better /
   worse than the reference and the Holm-adjusted sign test, as in each run's report; and how many runs have the
   reference clearly ahead (adjusted p below ``--alpha`` with the reference better on more images).
3. **Pooled** (only when the runs' image sets are disjoint, so no image is counted twice): the counts summed over
   the runs and one sign test per method and area, Holm-adjusted over the methods of a column, as one evaluation
   on all the images would give. Runs on the same images (other seeds) are not pooled: their outcomes are not
   independent.

Runs with different reference methods, rate grids or early rates are refused: their areas do not compare. One JSON
line follows the tables (``--json`` writes it to a file instead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from amortized_cartoonx.evaluation.results import holm, sign_test
from amortized_cartoonx.methods import title

AREAS = (
    ("area_keep", "(a) ↓"),
    ("area_keep_early", "early (a) ↓"),
    ("area_randomise", "(b) ↑"),
    ("area_randomise_early", "early (b) ↑"),
)


class SpreadError(ValueError):
    """Runs that cannot be compared (one line for the user)."""


def load_summary(path: Path) -> dict:
    """The ``summary.json`` of an evaluation folder (or the file itself)."""
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        raise SpreadError(f"{path}: no summary.json (is it a `cartoonx evaluate --out` folder?)")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SpreadError(f"{file}: not a readable summary.json ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict) or "images" not in data:
        raise SpreadError(f"{file}: not an evaluation summary (no 'methods' or 'images')")
    return data


def check_comparable(summaries: list[dict], names: list[str]) -> None:
    """Refuse runs whose areas mean different things."""
    first = summaries[0]
    for name, other in zip(names[1:], summaries[1:], strict=True):
        for key in ("rates", "early_rate"):
            if other.get(key) != first.get(key):
                raise SpreadError(f"run {name!r} has another {key} than run {names[0]!r}: its areas do not compare")
        ref_a = (first.get("paired") or {}).get("reference")
        ref_b = (other.get("paired") or {}).get("reference")
        if ref_a != ref_b:
            raise SpreadError(f"run {name!r} pairs with {ref_b!r}, run {names[0]!r} with {ref_a!r}")


def fmt_spread(values: list[float]) -> str:
    """``median (min-max)`` of ``values``; the value alone for one run."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def method_order(summaries: list[dict]) -> list[str]:
    """Every method of any run, in first-seen order."""
    order: list[str] = []
    for data in summaries:
        order += [m for m in data["methods"] if m not in order]
    return order


def areas_table(summaries: list[dict]) -> tuple[list[str], dict]:
    """Markdown lines (a row per method: each area's median and range over the runs) and the JSON part of table 1
    (every run's mean too)."""
    lines = ["| method | runs | " + " | ".join(label for _, label in AREAS) + " |", "|---|---|" + "---|" * len(AREAS)]
    out: dict = {}
    for method in method_order(summaries):
        out[method], cells = {}, []
        for key, _ in AREAS:
            values = [d["methods"][method][key]["mean"] if method in d["methods"] else None for d in summaries]
            present = [v for v in values if v is not None]
            cells.append(fmt_spread(present))
            out[method][key] = {
                "runs": values,
                "median": statistics.median(present),
                "min": min(present),
                "max": max(present),
            }
        runs = sum(method in d["methods"] for d in summaries)
        lines.append(f"| {title(method)} | {runs} | " + " | ".join(cells) + " |")
    return lines, out


def paired_table(summaries: list[dict], names: list[str], alpha: float) -> tuple[list[str], dict]:
    """Markdown lines and the JSON part of table 2 (runs without a paired table are skipped)."""
    paired = [d.get("paired") for d in summaries]
    if not any(paired):
        return [], {}
    lines = [
        "| method | area | " + " | ".join(names) + f" | runs with the reference ahead (p < {alpha:g}) |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    out: dict = {}
    methods = [m for m in method_order(summaries) if any(p and m in p["methods"] for p in paired)]
    for method in methods:
        out[method] = {}
        for key, label in AREAS:
            cells, ahead, counted, entries = [], 0, 0, []
            for p in paired:
                entry = p["methods"].get(method, {}).get(key) if p else None
                entries.append(entry)
                if entry is None:
                    cells.append("-")
                    continue
                counted += 1
                ahead += entry["p_holm"] < alpha and entry["worse"] > entry["better"]
                cells.append(f"{entry['better']} / {entry['worse']}, p {entry['p_holm']:.2g}")
            lines.append(f"| {title(method)} | {label} | " + " | ".join(cells) + f" | {ahead} of {counted} |")
            out[method][key] = {
                "runs": [None if e is None else {k: e[k] for k in ("better", "worse", "p_holm")} for e in entries],
                "reference_ahead": ahead,
                "runs_counted": counted,
            }
    return lines, out


def pooled_table(summaries: list[dict]) -> tuple[list[str], dict | None]:
    """Markdown lines and the JSON part of table 3, or ``([], None)`` when an image is in two runs."""
    seen: set = set()
    for data in summaries:
        images = set(map(str, data["images"]))
        if seen & images:
            return [], None
        seen |= images
    paired = [d.get("paired") for d in summaries]
    methods = [m for m in method_order(summaries) if m != (paired[0] or {}).get("reference")]
    methods = [m for m in methods if all(p and m in p["methods"] for p in paired)]
    if not methods:
        return [], None
    pooled: dict = {m: {} for m in methods}
    for key, _ in AREAS:
        for method in methods:
            better = sum(p["methods"][method][key]["better"] for p in paired)
            worse = sum(p["methods"][method][key]["worse"] for p in paired)
            pooled[method][key] = {"better": better, "worse": worse, "p": sign_test(better, worse)}
        for method, adjusted in zip(methods, holm([pooled[m][key]["p"] for m in methods]), strict=True):
            pooled[method][key]["p_holm"] = adjusted
    lines = ["| method | " + " | ".join(label for _, label in AREAS) + " |", "|---|" + "---|" * len(AREAS)]
    for method in methods:
        cells = [
            f"{pooled[method][k]['better']} / {pooled[method][k]['worse']}, p {pooled[method][k]['p_holm']:.2g}"
            for k, _ in AREAS
        ]
        lines.append(f"| {title(method)} | " + " | ".join(cells) + " |")
    return lines, pooled


def spread(summaries: list[dict], names: list[str], alpha: float = 0.05) -> tuple[str, dict]:
    """The markdown tables and their JSON for ``summaries`` (one per run, named ``names``)."""
    check_comparable(summaries, names)
    reference = next((d["paired"]["reference"] for d in summaries if d.get("paired")), None)
    counts = ", ".join(f"{n}: {len(d['images'])} images" for n, d in zip(names, summaries, strict=True))
    area_lines, area_json = areas_table(summaries)
    text = [
        f"# {len(summaries)} evaluation runs ({counts})",
        "",
        "## Area means over the runs: median (range)",
        "",
        *area_lines,
    ]
    paired_lines, paired_json = paired_table(summaries, names, alpha)
    if paired_lines:
        text += ["", f"## Paired with {title(reference)}: images better / worse, Holm-adjusted sign test", ""]
        text += paired_lines
    pooled_lines, pooled_json = pooled_table(summaries) if reference else ([], None)
    if pooled_lines:
        total = sum(len(d["images"]) for d in summaries)
        text += ["", f"## Pooled over the runs' {total} different images (Holm over the methods of a column)", ""]
        text += pooled_lines
    elif reference and len(summaries) > 1:
        text += ["", "(Not pooled: the runs share images, so their outcomes are not independent.)"]
    record = {"runs": names, "reference": reference, "areas": area_json, "paired": paired_json}
    record["pooled"] = pooled_json
    return "\n".join(text), record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="evaluation output folders (or summary.json files)")
    parser.add_argument("--names", nargs="+", help="a column title per run (default: the folder names)")
    parser.add_argument("--alpha", type=float, default=0.05, help="level of the adjusted sign test (default 0.05)")
    parser.add_argument("--json", type=Path, help="write the JSON record here instead of printing it")
    args = parser.parse_args(argv)
    names = args.names or [(p.parent if p.name == "summary.json" else p).name for p in args.runs]
    try:
        if len(names) != len(args.runs):
            raise SpreadError(f"--names has {len(names)} titles for {len(args.runs)} runs")
        if not 0 < args.alpha < 1:
            raise SpreadError(f"--alpha must lie in (0, 1), got {args.alpha}")
        text, record = spread([load_summary(p) for p in args.runs], names, args.alpha)
    except SpreadError as error:
        print(f"evaluation_spread.py: error: {error}", file=sys.stderr)
        return 2
    print(text)
    line = json.dumps(record)
    if args.json:
        args.json.write_text(line + "\n")
    else:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
