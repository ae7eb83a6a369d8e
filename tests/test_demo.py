"""``cartoonx demo``: its method list, its classifier settings, its explainer training (the same as
``cartoonx fit``'s) and, in the tiny configuration, the whole pipeline end to end and its reuse of what exists."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

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

    # a training stopped before its steps (Ctrl+C, SIGTERM) is an error, and nothing is recorded for reuse
    import pytorch_lightning as pl

    from amortized_cartoonx import training

    class StopAtOnce(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = True

    stopped = replace(cfg, checkpoints=str(tmp_path / "stopped"))
    build = training.build_trainer
    monkeypatch.setattr(training, "build_trainer", lambda *a, **k: build(*a, **k, callbacks=[StopAtOnce()]))
    with pytest.raises(ConfigError, match="stopped at step 1 of"):
        stage_fit(stopped)
    assert not stopped.explainer_checkpoint.with_name("demo-fit.json").exists()
    # the next run trains again (a checkpoint without its record was refused as 'other settings')
    monkeypatch.setattr(training, "build_trainer", build)
    assert stopped.explainer_checkpoint.with_name("last.ckpt").is_file()
    assert stage_fit(stopped) is False and stopped.explainer_checkpoint.with_name("demo-fit.json").is_file()


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
    assert "## Paired with CartoonX on the same images" in report and "| Warm-started CartoonX | " in report

    again = run_demo(cfg)  # everything exists: every stage is reused
    assert all(again["run"]["stages"]["reused"].values()), again["run"]["stages"]

    # an explainer trained with other settings, or on other images or teachers, is never silently reused
    for other in (replace(cfg, fit_steps=3), replace(cfg, teacher_images=cfg.teacher_images - 1)):
        with pytest.raises(ConfigError, match="trained with other settings"):
            run_demo(other)
    threads = torch.get_num_threads()
    try:  # another thread count trains another explainer
        torch.set_num_threads(threads + 1)
        with pytest.raises(ConfigError, match="trained with other settings"):
            run_demo(cfg)
    finally:
        torch.set_num_threads(threads)
    shards = sorted(cfg.teachers_dir.glob("shard-*.safetensors"))
    shards[0].write_bytes(shards[0].read_bytes())  # the same bytes: still the same teachers
    assert run_demo(cfg)["run"]["stages"]["reused"]["fit"]
    (cfg.teachers_dir / "extra.json").write_text("{}")  # the store changed: new teachers, another explainer
    with pytest.raises(ConfigError, match="trained with other settings"):
        run_demo(cfg)
    (cfg.teachers_dir / "extra.json").unlink()

    # a folder written for another stream (size or seed), or with images left over, is written again
    for stale in (cfg.test_dir / "left-over.png",):
        stale.write_bytes((cfg.test_dir / sorted(p.name for p in cfg.test_dir.glob("*.png"))[0]).read_bytes())
    assert not run_demo(cfg)["run"]["stages"]["reused"]["data"]
    assert not (cfg.test_dir / "left-over.png").exists()


def _results_text(out) -> str:
    """``demo.json``'s ``results`` as canonical JSON text (text, not floats: NaN != NaN, and every bit counts)."""
    return json.dumps(json.loads((out / "demo.json").read_text())["results"], sort_keys=True)


def _scramble_global_random_state(seed: int) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.mark.slow
def test_two_tiny_demo_runs_are_bit_identical(tmp_path, monkeypatch):
    """Same code, settings, machine and thread count: the same bits in ``demo.json``'s ``results`` (every loss,
    ratio, area, localisation measure and the classifier's accuracy), the same teacher masks, explainer and
    classifier weights.

    Only ``demo.json``'s ``run`` section may differ: seconds and speed-ups (wall clock), what was reused, the
    environment. Before every stage of the second run the global random state (torch, numpy, random) is set to
    another seed, so a stage that draws from it instead of its own seeded stream makes the runs differ (a stage
    of a later demo run may find the earlier stages reused, so nothing may rely on what they left in the global
    state). Both runs happen in one process, at one thread count.
    """
    import amortized_cartoonx.demo as demo

    monkeypatch.chdir(tmp_path)
    # every method of the full demo (the tiny configuration leaves the baselines out)
    first = replace(DemoConfig.tiny(tmp_path / "first"), methods=DEMO_METHODS)
    run_demo(first)

    for i, stage in enumerate(("stage_classifier", "stage_data", "stage_teachers", "stage_fit", "stage_evaluate")):
        original = getattr(demo, stage)

        def scrambled(cfg, original=original, seed=1000 + i):
            _scramble_global_random_state(seed)
            return original(cfg)

        monkeypatch.setattr(demo, stage, scrambled)
    other = DemoConfig.tiny(tmp_path / "second")
    second = replace(first, out=other.out, checkpoints=other.checkpoints, classifier_dir=other.classifier_dir)
    figures = run_demo(second)
    assert not any(figures["run"]["stages"]["reused"].values())  # the second run computed everything itself
    assert set(figures["results"]["methods"]) == set(DEMO_METHODS)

    assert _results_text(Path(first.out)) == _results_text(Path(second.out))
    stores = [TeacherMaskStore(first.teachers_dir), TeacherMaskStore(second.teachers_dir)]
    assert sorted(stores[0].ids()) == sorted(stores[1].ids())
    for image_id in stores[0].ids():
        a, b = stores[0].get(image_id), stores[1].get(image_id)
        assert a.target == b.target and torch.equal(a.mask, b.mask)
    mine, theirs = _state(first.explainer_checkpoint), _state(second.explainer_checkpoint)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    classifiers = [Path(cfg.classifier_dir) / "classifier.safetensors" for cfg in (first, second)]
    assert classifiers[0].read_bytes() == classifiers[1].read_bytes()


def test_the_console_line_says_slower_rather_than_0x_faster():
    from amortized_cartoonx.cli.demo import _speed

    assert [_speed(x) for x in (223.4, 2.96, 0.696)] == ["223x faster", "3.0x faster", "1.4x slower"]


def test_too_few_training_images_for_a_validation_split_are_refused_before_any_work(tmp_path):
    """8 images at the default val_fraction left the hashed validation split empty: the fit stopped minutes in."""
    with pytest.raises(ConfigError, match="0.0625 of 8 training images leaves the val split empty"):
        DemoConfig(out=str(tmp_path / "o"), train_images=8).validate()
    DemoConfig(out=str(tmp_path / "o"), train_images=8, val_fraction=0.4, teacher_images=4).validate()
    assert not (tmp_path / "o").exists()
