"""``cartoonx demo`` in a tiny configuration, end to end, and its reuse of what exists."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from amortized_cartoonx.demo import DemoConfig, run_demo
from amortized_cartoonx.errors import ConfigError
from amortized_cartoonx.teacher_masks.store import TeacherMaskStore


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
    store = TeacherMaskStore(cfg.teachers_dir)  # teachers for the first teacher_images training images only
    assert sorted(store.ids()) == sorted(p.name for p in cfg.train_dir.glob("*.png"))[: cfg.teacher_images]
    assert f"{cfg.teacher_images} of them with exact CartoonX teacher masks" in report

    again = run_demo(cfg)  # everything exists: every stage is reused
    assert all(again["stages"]["reused"].values()), again["stages"]

    # an explainer trained with other settings, or on other images or teachers, is never silently reused
    for other in (replace(cfg, fit_steps=3), replace(cfg, teacher_images=cfg.teacher_images - 1)):
        with pytest.raises(ConfigError, match="trained with other settings"):
            run_demo(other)
