"""``cartoonx demo`` in a tiny configuration, end to end, and its reuse of what exists."""

from __future__ import annotations

import json

from amortized_cartoonx.demo import DemoConfig, run_demo


def test_tiny_demo_runs_end_to_end_and_reuses_its_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DemoConfig.tiny(tmp_path / "demo")
    figures = run_demo(cfg)
    out = tmp_path / "demo" / "outputs"
    report = (out / "report.md").read_text()
    assert "loss ratio to exact" in report and "pointing game" in report
    assert (out / "evaluation" / "rate_distortion.png").stat().st_size > 0
    assert set(figures["fast_paths"]) == {"amortized", "warm"}
    for f in figures["fast_paths"].values():
        assert f["loss_ratio_median"] > 0 and f["exact_loss_median"] > 0
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert "ground_truth" in summary["methods"]["cartoonx"]
    assert cfg.explainer_checkpoint.is_file()

    again = run_demo(cfg)  # everything exists: every stage is reused
    assert all(again["stages"]["reused"].values()), again["stages"]
