"""scripts/evaluation_spread.py: the spread of evaluation figures over runs, read from real summary.json content."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from amortized_cartoonx.evaluation.report import summary
from amortized_cartoonx.evaluation.results import EvaluationResults, MethodResults, sign_test

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from evaluation_spread import main, spread  # noqa: E402

RATES = [0.0, 0.1, 0.2, 0.5, 1.0]


def method(name: str, keep_level: np.ndarray) -> MethodResults:
    """Flat curves: area (a) equals ``keep_level`` per image, area (b) equals ``1 - keep_level``."""
    n = len(keep_level)
    keep = np.repeat(keep_level[:, None], len(RATES), axis=1)
    return MethodResults(name, "wavelet", "mask", keep, 1.0 - keep, np.ones(n), np.zeros(n, dtype=np.int64))


def run_summary(ids: list[str], levels: dict[str, np.ndarray]) -> dict:
    """What `cartoonx evaluate` writes to summary.json for these per-image areas (a)."""
    results = EvaluationResults(
        ids=ids,
        rates=RATES,
        methods={name: method(name, values) for name, values in levels.items()},
        skipped={},
        lambda_points={},
        examples={},
        example_images=None,
        example_targets={},
        settings={"evaluation": {"early_rate": 0.2}},
        computed={},
        has_ground_truth=False,
    )
    return json.loads(json.dumps(summary(results)))


def two_runs(same_images: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    first = [f"a{i}.jpg" for i in range(10)]
    second = first if same_images else [f"b{i}.jpg" for i in range(10)]
    out = []
    for ids in (first, second):
        exact = rng.uniform(0.1, 0.2, 10)
        worse = exact + 0.1  # worse than CartoonX on every image
        mixed = exact + np.where(np.arange(10) < 6, 0.05, -0.05)  # worse on 6, better on 4
        out.append(run_summary(ids, {"cartoonx": exact, "grad-cam": worse, "pixel-rde": mixed}))
    return out


def test_areas_show_each_run_and_the_median_and_range():
    runs = two_runs(same_images=True)
    text, record = spread(runs, ["seed 0", "seed 1"])
    means = [r["methods"]["grad-cam"]["area_keep"]["mean"] for r in runs]
    entry = record["areas"]["grad-cam"]["area_keep"]
    assert entry["runs"] == pytest.approx(means)
    assert entry["median"] == pytest.approx(np.median(means))
    assert (entry["min"], entry["max"]) == (pytest.approx(min(means)), pytest.approx(max(means)))
    assert f"{np.median(means):.3f} ({min(means):.3f}-{max(means):.3f})" in text


def test_paired_counts_per_run_and_runs_with_the_reference_ahead():
    _, record = spread(two_runs(same_images=True), ["s0", "s1"])
    cam = record["paired"]["grad-cam"]["area_keep"]
    assert [(r["better"], r["worse"]) for r in cam["runs"]] == [(0, 10), (0, 10)]
    assert cam["reference_ahead"] == 2  # 0/10 twice: p = 0.002, Holm over 2 methods 0.004
    mixed = record["paired"]["pixel-rde"]["area_keep"]
    assert [(r["better"], r["worse"]) for r in mixed["runs"]] == [(4, 6), (4, 6)]
    assert mixed["reference_ahead"] == 0
    # area (b) is 1 - (a) here: higher is better there, so the counts swap sides consistently
    assert [(r["better"], r["worse"]) for r in record["paired"]["grad-cam"]["area_randomise"]["runs"]] == [(0, 10)] * 2


def test_runs_on_the_same_images_are_not_pooled():
    text, record = spread(two_runs(same_images=True), ["s0", "s1"])
    assert record["pooled"] is None
    assert "Not pooled" in text


def test_runs_on_disjoint_images_pool_their_counts_into_one_sign_test():
    _, record = spread(two_runs(same_images=False), ["first", "next"])
    mixed = record["pooled"]["pixel-rde"]["area_keep"]
    assert (mixed["better"], mixed["worse"]) == (8, 12)
    assert mixed["p"] == pytest.approx(sign_test(8, 12))
    cam = record["pooled"]["grad-cam"]["area_keep"]
    assert (cam["better"], cam["worse"]) == (0, 20)
    # Holm over the 2 methods of the column: the smaller p doubled, the larger kept (it is above it already)
    assert cam["p_holm"] == pytest.approx(2 * sign_test(0, 20))
    assert mixed["p_holm"] == pytest.approx(sign_test(8, 12))
    assert "cartoonx" not in record["pooled"]


def test_a_method_missing_from_a_run_is_a_dash_not_an_error():
    runs = two_runs(same_images=False)
    del runs[1]["methods"]["pixel-rde"]
    del runs[1]["paired"]["methods"]["pixel-rde"]
    text, record = spread(runs, ["first", "next"])
    assert record["areas"]["pixel-rde"]["area_keep"]["runs"][1] is None
    assert "pixel-rde" not in record["pooled"]
    assert record["paired"]["pixel-rde"]["area_keep"]["runs_counted"] == 1


def test_the_command_line_reads_folders_and_refuses_incomparable_runs(tmp_path, capsys):
    for name, data in zip(("s0", "s1"), two_runs(same_images=True), strict=True):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(data))
    assert main([str(tmp_path / "s0"), str(tmp_path / "s1" / "summary.json"), "--json", str(tmp_path / "r.json")]) == 0
    assert "| s0 | s1 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["runs"] == ["s0", "s1"]

    other = json.loads((tmp_path / "s1" / "summary.json").read_text())
    other["rates"] = [0.0, 1.0]
    (tmp_path / "s1" / "summary.json").write_text(json.dumps(other))
    assert main([str(tmp_path / "s0"), str(tmp_path / "s1")]) == 2
    assert "another rates" in capsys.readouterr().err

    assert main([str(tmp_path / "s0"), str(tmp_path / "missing")]) == 2
    assert "no summary.json" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    assert main([str(tmp_path / "bad")]) == 2
    assert "not a readable summary.json" in capsys.readouterr().err
    assert main([str(tmp_path / "s0"), "--names", "a", "b"]) == 2
