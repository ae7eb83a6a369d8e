"""``cartoonx demo``: its method list, its classifier settings, its explainer training (the same as
``cartoonx fit``'s) and, in the tiny configuration, the whole pipeline end to end and its reuse of what exists."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from amortized_cartoonx.demo import DEMO_COMPARISONS, DEMO_METHODS, DemoConfig, classifier_config, run_demo, stage_data
from amortized_cartoonx.errors import ConfigError
from amortized_cartoonx.methods import METHOD_TABLE, method_info
from amortized_cartoonx.teacher_masks.store import TeacherMaskStore


def test_the_demo_methods_come_from_the_method_table():
    for name in DEMO_COMPARISONS:
        method_info(name)  # a row of the table (KeyError otherwise)
    table_order = [m.name for m in METHOD_TABLE]
    assert list(DEMO_METHODS) == sorted(DEMO_METHODS, key=table_order.index)  # in display order
    assert set(DEMO_METHODS) == {
        "cartoonx",
        "pixel-rde",
        "amortized",
        "warm",
        "integrated-gradients",
        "grad-cam",
        "random-wavelet",
    }
    assert DemoConfig().methods == DEMO_METHODS


def test_the_demo_classifier_is_train_classifiers_default():
    from amortized_cartoonx.synthetic.classifier_training import TrainConfig

    # the demo and cartoonx train-classifier share checkpoints/synthetic: the same settings, or one refuses the other
    assert classifier_config(DemoConfig()) == TrainConfig()
    tiny = classifier_config(DemoConfig.tiny("x"))
    assert (tiny.train_size, tiny.val_size, tiny.held_out, tiny.batch_size) == (64, 16, 32, 16)


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")
def test_the_demo_trains_its_explainer_as_cartoonx_fit_would(tmp_path, monkeypatch):
    from amortized_cartoonx.cli import main
    from amortized_cartoonx.demo_fit import stage_fit
    from amortized_cartoonx.synthetic.classifier import CartoonCNN, save_synthetic_classifier

    monkeypatch.chdir(tmp_path)
    cfg = replace(DemoConfig.tiny(tmp_path), teacher_images=0)
    save_synthetic_classifier(CartoonCNN(), cfg.classifier_dir, {})  # untrained: the training is what counts here
    stage_data(cfg)
    assert stage_fit(cfg) is False
    assert cfg.explainer_checkpoint.is_file()
    record = json.loads(cfg.explainer_checkpoint.with_name("demo-fit.json").read_text())
    assert record["fit"]["model"]["lr"] == cfg.fit_lr and record["fit"]["model"]["mask_predictor"]["width"] == cfg.width
    assert record["fit"]["trainer"]["max_steps"] == cfg.fit_steps and record["train_images"] == cfg.train_images
    assert (tmp_path / "outputs" / "logs" / "explainer" / "metrics.csv").is_file()

    assert stage_fit(cfg) is True  # the same settings: reused
    with pytest.raises(ConfigError, match="trained with other settings"):
        stage_fit(replace(cfg, fit_lr=0.01))

    # the config the demo saved is a cartoonx fit config that trains exactly the same explainer
    config = tmp_path / "outputs" / "logs" / "explainer" / "config.yaml"
    assert main(["fit", "--config", str(config), "--run_name", "again"]) == 0
    mine, again = (
        _state(cfg.explainer_checkpoint.with_name("last.ckpt")),
        _state(tmp_path / "checkpoints" / "again" / "last.ckpt"),
    )
    assert mine.keys() == again.keys() and all(torch.equal(mine[k], again[k]) for k in mine)


@pytest.mark.slow
def test_tiny_demo_runs_end_to_end_and_reuses_its_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = DemoConfig.tiny(tmp_path / "demo")
    figures = run_demo(cfg)
    out = tmp_path / "demo" / "outputs"
    report = (out / "report.md").read_text()
    assert "loss ratio to exact" in report and "pointing game" in report
    assert (out / "evaluation" / "rate_distortion.png").stat().st_size > 0
    assert set(figures["results"]["fast_paths"]) == {"amortized", "warm"}
    for f in figures["results"]["fast_paths"].values():
        assert f["loss_ratio_median"] > 0 and f["exact_loss_median"] > 0
    assert set(figures["results"]["methods"]) == set(cfg.methods)
    assert (out / "demo.json").read_text() == json.dumps(figures, indent=2) + "\n"
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert "ground_truth" in summary["methods"]["cartoonx"]
    assert cfg.explainer_checkpoint.is_file()
    store = TeacherMaskStore(cfg.teachers_dir)  # teachers for the first teacher_images training images only
    assert sorted(store.ids()) == sorted(p.name for p in cfg.train_dir.glob("*.png"))[: cfg.teacher_images]
    assert f"{cfg.teacher_images} of them with exact CartoonX teacher masks" in report

    again = run_demo(cfg)  # everything exists: every stage is reused
    assert all(again["run"]["stages"]["reused"].values()), again["run"]["stages"]

    # an explainer trained with other settings, or on other images or teachers, is never silently reused
    for other in (replace(cfg, fit_steps=3), replace(cfg, teacher_images=cfg.teacher_images - 1)):
        with pytest.raises(ConfigError, match="trained with other settings"):
            run_demo(other)

