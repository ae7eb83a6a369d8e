"""Sanity checks by model randomisation: the randomised copy, the comparisons, a tiny run and the command line."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch

from amortized_cartoonx.classifiers import wrap_classifier
from amortized_cartoonx.cli import main
from amortized_cartoonx.errors import ConfigError
from amortized_cartoonx.evaluation.config import SanityConfig
from amortized_cartoonx.evaluation.methods import MethodContext
from amortized_cartoonx.evaluation.report import sanity_figure, write_report
from amortized_cartoonx.evaluation.runner import Evaluation, EvaluationConfig
from amortized_cartoonx.evaluation.sanity import (
    cascade_depths,
    randomised_copy,
    sanity_problem,
    spearman,
    ssim,
    weight_layers,
)

from .conftest import make_tiny_cnn
from .test_evaluation import FAST_BASE, FAST_OPT, SIZE, write_folder


def trained_cnn() -> torch.nn.Module:
    """The tiny CNN with every parameter and statistic moved off its initial value, as training would."""
    model = make_tiny_cnn()
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.add_(0.3)
    return model


def test_randomisation_really_changes_the_top_layers_only_and_is_seeded():
    model = trained_cnn()
    layers = [name for name, _ in weight_layers(model)]
    assert layers == ["features.0", "features.1", "features.3", "head"]  # bottom to top
    top = randomised_copy(model, 1, seed=0)
    full = randomised_copy(model, len(layers), seed=0)
    before, after_top, after_full = model.state_dict(), top.state_dict(), full.state_dict()
    for name, value in before.items():
        if not value.is_floating_point():
            continue
        assert not torch.equal(after_full[name], value), name  # every layer really changed
        assert torch.equal(after_top[name], value) != name.startswith("head."), name  # only the head
    again = randomised_copy(model, len(layers), seed=0).state_dict()
    other = randomised_copy(model, len(layers), seed=1).state_dict()
    assert all(torch.equal(again[k], v) for k, v in after_full.items())  # seeded
    assert not torch.equal(other["head.weight"], after_full["head.weight"])
    # the cascade: depth 2 randomises the head exactly as depth 1 does (same seed per layer)
    assert torch.equal(randomised_copy(model, 2, seed=0).state_dict()["head.weight"], after_top["head.weight"])


def test_statistics_without_parameters_count_as_a_layer():
    """A BatchNorm(affine=False) holds running statistics but no parameters: "all layers" left them trained."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, affine=False), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    model(torch.rand(2, 3, 8, 8))
    with torch.no_grad():
        model[1].running_mean.add_(5.0)
    assert [name for name, _ in weight_layers(model)] == ["0", "1", "3"]
    full = randomised_copy(model, 3, seed=0)
    assert not torch.equal(full[1].running_mean, model[1].running_mean)


def test_buffers_nothing_re_draws_are_no_layer():
    """A FrozenBatchNorm-like module (buffers, no reset_parameters) was counted as randomised, and left trained."""

    class FrozenNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.full((4, 1, 1), 2.0))

        def forward(self, x):
            return x * self.scale

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), FrozenNorm(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.rand(1, 3, 8, 8))
    assert [name for name, _ in weight_layers(model)] == ["0", "3"]


def test_a_randomised_copy_no_longer_claims_its_spec():
    """The copy kept the spec of the trained classifier, so an amortized checkpoint refused it: --sanity with the
    amortized or warm method failed after all the other work."""
    from amortized_cartoonx.classifiers import load_classifier

    classifier = load_classifier("tests.conftest:make_tiny_cnn")
    assert (
        randomised_copy(classifier, 1, seed=0).spec == "<module>" and classifier.spec == "tests.conftest:make_tiny_cnn"
    )


def test_the_caller_s_model_and_the_global_random_state_are_untouched():
    model = wrap_classifier(trained_cnn())
    reference = copy.deepcopy(model.state_dict())
    params = [p for p in model.parameters()]
    flags = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    state = torch.get_rng_state()
    twin = randomised_copy(model, 4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert twin is not model and all(a is not b for a, b in zip(twin.parameters(), model.parameters()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.items())
    assert [p for p in model.parameters()] == params
    assert flags == [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    x = torch.rand(2, 3, SIZE, SIZE)
    assert not torch.allclose(twin(x), model(x))


def test_cascade_depths():
    assert cascade_depths(4) == [1, 2, 3, 4]
    assert cascade_depths(13) == [1, 4, 7, 10, 13]
    assert cascade_depths(13, (5, 1)) == [1, 5, 13]  # all layers always last
    with pytest.raises(ConfigError, match="exceeds"):
        cascade_depths(4, (6,))
    with pytest.raises(ConfigError):
        SanityConfig(depths=(0,)).validate()


def test_spearman_and_ssim():
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert spearman(a, 2 * a + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(5 / 6)  # ties share their average rank
    assert spearman([0, 0, 0], [1, 2, 3]) == 0.0  # a constant vector ranks nothing: a random ordering's 0
    assert math.isnan(spearman([0, 0, 0], [1, 1, 1]))
    gen = torch.Generator().manual_seed(0)
    picture = torch.rand(1, 32, 32, generator=gen)
    assert ssim(picture, picture) == pytest.approx(1.0)
    assert ssim(picture, torch.rand(1, 32, 32, generator=gen)) < 0.2
    assert ssim(picture[:, :6, :6], picture[:, :6, :6]) == pytest.approx(1.0)  # a window that fits


def test_torchscript_classifiers_are_refused_with_a_clear_message(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(make_tiny_cnn())
    assert "TorchScript" in sanity_problem(wrap_classifier(scripted))
    assert sanity_problem(make_tiny_cnn()) is None
    path = tmp_path / "tiny.pt"
    scripted.save(str(path))
    images = write_folder(tmp_path / "images", 1)
    args = ["evaluate", "--classifier", str(path), "--images", str(images), "--out", str(tmp_path / "out")]
    assert main([*args, "--size", str(SIZE), "--methods", "smoothgrad", "--sanity"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sanity checks need an nn.Module" in err and "TorchScript" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_tiny_run_writes_the_sanity_table_and_figure(tmp_path):
    images_dir = write_folder(tmp_path / "images", 3)
    out = tmp_path / "out"
    classifier = wrap_classifier(trained_cnn())
    reference = copy.deepcopy(classifier.state_dict())

    def run(folder=out):
        ctx = MethodContext(classifier, "tiny", image_size=SIZE, optimizer=FAST_OPT, levels=2, baselines=FAST_BASE)
        config = EvaluationConfig(
            methods=("cartoonx", "smoothgrad", "grad-cam", "random-pixel"),
            rates=3,
            noise_draws=1,
            lambdas={},
            examples=1,
            progress=False,
            sanity=SanityConfig(enabled=True, depths=(1,), limit=2),
        )
        evaluation = Evaluation(classifier, images_dir, folder, config, ctx)
        return evaluation, evaluation.run()

    evaluation, results = run()
    data = write_report(results, out)
    sanity = json.loads((out / "summary.json").read_text())["sanity"]
    assert [d["depth"] for d in sanity["depths"]] == [1, 4] and sanity["depths"][-1]["label"] == "all 4"
    assert set(sanity["methods"]) == {"cartoonx", "smoothgrad", "grad-cam"}  # random orderings are not checked
    for values in sanity["methods"].values():
        assert [len(values[c]) for c in ("spearman", "ssim", "constant")] == [2, 2, 2]
        assert all(v["n"] <= 2 and (v["n"] == 0 or -1.0 <= v["mean"] <= 1.0) for c in values for v in values[c])
    assert sanity["methods"]["smoothgrad"]["spearman"][-1]["mean"] < 0.9  # the gradient did change
    report = (out / "report.md").read_text()
    assert "## Sanity checks: model randomisation" in report and "| SmoothGrad |" in report
    assert "sanity.png" in report and (out / "sanity.png").stat().st_size > 0
    assert data["sanity"]["images"] == results.ids[:2]
    assert all(torch.equal(v, classifier.state_dict()[k]) for k, v in reference.items())  # the caller's model
    assert evaluation.computed["sanity"] == {"cartoonx": 4, "smoothgrad": 4, "grad-cam": 4}  # 2 depths x 2 images

    again, second = run()
    assert again.computed["sanity"] == {"cartoonx": 0, "smoothgrad": 0, "grad-cam": 0}  # from the cache
    np.testing.assert_array_equal(
        second.sanity.scores["cartoonx"]["spearman"], results.sanity.scores["cartoonx"]["spearman"]
    )
    _, fresh = run(tmp_path / "fresh")  # computed again from scratch: bit-identical
    for name, scores in results.sanity.scores.items():
        for comparison, values in scores.items():
            np.testing.assert_array_equal(fresh.sanity.scores[name][comparison], values)
    results.sanity.scores["smoothgrad"]["spearman"][:] = -0.9  # a negative correlation stays inside the axes
    figure = sanity_figure(results)
    curves = [ax for ax in figure.axes if ax.containers]  # the error-bar panels
    assert len(curves) == 3 and all(ax.get_ylim()[0] < -0.9 for ax in curves[1:2])


def test_the_command_line_runs_the_sanity_checks(tmp_path, capsys):
    images = write_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    args = ["evaluate", "--classifier", "tests.conftest:make_tiny_cnn", "--images", str(images), "--out", str(out)]
    args += ["--size", str(SIZE), "--methods", "smoothgrad,random-pixel", "--smoothgrad-samples", "2"]
    args += ["--rates", "3", "--noise-draws", "1", "--lambdas", "--examples", "1", "--device", "cpu"]
    assert main([*args, "--sanity", "--sanity-depths", "1,2", "--sanity-limit", "1"]) == 0
    printed = capsys.readouterr().out
    assert "sanity: all layers randomised" in printed and "sanity.png" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [d["depth"] for d in summary["sanity"]["depths"]] == [1, 2, 4]
    assert summary["settings"]["evaluation"]["sanity"] == {"enabled": True, "depths": [1, 2], "limit": 1}
    assert "--sanity" in summary["settings"]["command"]
    assert main([*args, "--sanity", "--sanity-depths", "0"]) == 2
    assert "--sanity-depths" in capsys.readouterr().err


def test_sanity_with_random_orderings_only_writes_no_figure_and_says_so(tmp_path, capsys):
    images = write_folder(tmp_path / "images", 1)
    out = tmp_path / "out"
    args = ["evaluate", "--classifier", "tests.conftest:make_tiny_cnn", "--images", str(images), "--out", str(out)]
    args += ["--size", str(SIZE), "--methods", "random-pixel", "--rates", "3", "--noise-draws", "1", "--lambdas"]
    assert main([*args, "--examples", "0", "--device", "cpu", "--sanity"]) == 0
    assert "sanity.png" not in capsys.readouterr().out and not (out / "sanity.png").exists()
    report = (out / "report.md").read_text()
    assert "No method to check" in report and "sanity.png" not in report


def test_sanity_checks_the_amortized_and_warm_methods(tmp_path, capsys):
    from .test_evaluation import write_checkpoint

    spec = "tests.conftest:make_tiny_cnn"
    checkpoint = write_checkpoint(tmp_path / "explainer.ckpt", spec)
    images = write_folder(tmp_path / "images", 1)
    out = tmp_path / "out"
    args = ["evaluate", "--classifier", spec, "--images", str(images), "--out", str(out), "--size", str(SIZE)]
    args += ["--levels", "2", "--samples", "2", "--rates", "3", "--noise-draws", "1", "--lambdas", "--examples", "0"]
    args += ["--methods", "amortized,warm", "--checkpoint", str(checkpoint), "--refine-steps", "1", "--device", "cpu"]
    assert main([*args, "--sanity", "--sanity-depths", "1"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sanity"]["methods"]) == {"amortized", "warm"} and "sanity.png" in summary["figures"]
