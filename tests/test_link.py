"""The sigmoid link: multi-label classifiers and binary ones with a single logit, in every path."""

from __future__ import annotations

import json
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from amortized_cartoonx.cli import main
from amortized_cartoonx.errors import ClassifierError, ConfigError
from amortized_cartoonx.explanation import load_saved_explanation
from amortized_cartoonx.optimizer import CartoonX, OptimizerConfig, result_settings
from amortized_cartoonx.rde import DISTORTIONS, RDEObjective, check_logits, target_prob
from amortized_cartoonx.teacher_masks.files import manifest_differences
from amortized_cartoonx.wavelets import WaveletRepresentation

from .conftest import tiny_fit_command

SIZE = 32
#: Two multi-label models on RGB images: label 0 rises with the top-left quadrant's brightness, label 1 with the
#: bottom-right one's; ``one_logit`` is a binary classifier with label 1's logit alone.
MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Quadrants(nn.Module):
        def __init__(self, labels=(0, 1)):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(20.0))
            self.labels = labels

        def forward(self, x):
            h, w = x.shape[-2] // 2, x.shape[-1] // 2
            grey = x.mean(1)
            z = [grey[:, :h, :w].mean((1, 2)), grey[:, h:, w:].mean((1, 2))]
            return torch.stack([self.scale * (z[k] - 0.4) for k in self.labels], dim=1)

    def two_labels():
        return Quadrants()

    def one_logit():
        return Quadrants(labels=(1,))
    """
)


@pytest.fixture
def spec(tmp_path, monkeypatch):
    (tmp_path / "cx_link_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cx_link_models"


@pytest.fixture
def pictures(tmp_path):
    """Four RGB files, bright in the top-left and bottom-right quadrants, dark and noisy elsewhere."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "pictures"
    folder.mkdir()
    half = SIZE // 2
    for k in range(4):
        pixels = rng.random((SIZE, SIZE, 3)) * 0.3
        pixels[:half, :half] = 0.9
        pixels[half:, half:] = 0.9
        Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"p{k}.png")
    return folder


def test_the_distortions_with_the_sigmoid_link_read_each_label_on_its_own():
    torch.manual_seed(0)
    zx, zy, target = torch.randn(3, 4), torch.randn(3, 5, 4), torch.tensor([0, 3, 1])
    px, py = zx.sigmoid(), zy.sigmoid()
    picked_x, picked_y = px[torch.arange(3), target], py[torch.arange(3), :, target.tolist()]
    picked_y = torch.stack([py[n, :, c] for n, c in enumerate(target.tolist())])
    assert torch.allclose(target_prob(zy, target, "sigmoid"), picked_y)
    label = DISTORTIONS.get("label")(zx, zy, target, "sigmoid")
    assert torch.allclose(label, (picked_x[:, None] - picked_y) ** 2)
    assert torch.allclose(DISTORTIONS.get("maximize-target")(zx, zy, target, "sigmoid"), (1 - picked_y) ** 2)
    assert torch.allclose(DISTORTIONS.get("l2")(zx, zy, target, "sigmoid"), (px[:, None] - py).norm(dim=-1))
    p, q = py, px[:, None]  # KL(Bernoulli(p) || Bernoulli(q)) per label, summed
    bernoulli = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1)
    assert torch.allclose(DISTORTIONS.get("kl")(zx, zy, target, "sigmoid"), bernoulli, atol=1e-6)
    # the softmax link, the default, is the paper's
    assert torch.allclose(
        DISTORTIONS.get("l2")(zx, zy, target), (zx.softmax(-1)[:, None] - zy.softmax(-1)).norm(dim=-1)
    )


def test_the_sigmoid_kl_stays_finite_for_saturated_logits():
    zx, zy = torch.tensor([[60.0, -60.0]]), torch.tensor([[[-60.0, 60.0]]])
    assert torch.isfinite(DISTORTIONS.get("kl")(zx, zy, torch.tensor([0]), "sigmoid")).all()


def test_one_logit_needs_the_sigmoid_link_and_an_unknown_link_is_named():
    with pytest.raises(ClassifierError, match="--link sigmoid"):
        check_logits(torch.randn(2, 1), 2)
    check_logits(torch.randn(2, 1), 2, link="sigmoid")
    with pytest.warns(UserWarning, match="every output in .0, 1."):
        check_logits(torch.tensor([[0.01, 0.99], [0.97, 0.5], [0.2, 0.02], [0.6, 0.99]]), 4, link="sigmoid")
    with pytest.raises(ConfigError, match="unknown link 'logistic'; choose from: softmax, sigmoid"):
        OptimizerConfig(link="logistic").validate()
    with pytest.raises(ConfigError, match="unknown link"):
        RDEObjective(nn.Identity(), WaveletRepresentation(levels=2), link="probit")


def test_a_single_logit_with_the_sigmoid_link_explains_as_the_two_logit_softmax_wrapper(spec):
    """``softmax([0, z])_1 = sigmoid(z)``: the README's wrapper and the sigmoid link optimise the same loss."""
    import cx_link_models

    single = cx_link_models.one_logit()

    def wrapper(x):
        z = single(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)

    images = torch.rand(2, 3, SIZE, SIZE)
    config = OptimizerConfig(schedule="fast", steps=10, num_samples=4)
    linked = CartoonX(single, levels=2, config=config, link="sigmoid").explain(images, target=0)
    wrapped = CartoonX(wrapper, levels=2, config=config).explain(images, target=1)
    assert torch.allclose(linked.loss, wrapped.loss, rtol=1e-4)
    assert torch.allclose(linked.prob_original, wrapped.prob_original)
    assert torch.allclose(linked.mask.flatten(), wrapped.mask.flatten(), atol=1e-4)


def test_the_link_is_keyed_only_when_not_the_default():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    softmax, sigmoid = CartoonX(model, levels=2).settings(), CartoonX(model, levels=2, link="sigmoid").settings()
    assert "link" not in result_settings(softmax)  # caches and manifests of earlier versions stay valid
    assert result_settings(sigmoid)["link"] == "sigmoid"
    old = {k: v for k, v in softmax.items() if k != "link"}  # a manifest written before the link existed
    assert manifest_differences(old, softmax) == [] and manifest_differences(old, sigmoid) == ["link"]


def test_explain_with_the_sigmoid_link_explains_each_label_where_it_looks(tmp_path, spec, pictures, capsys):
    half = SIZE // 2
    common = [
        "--size",
        str(SIZE),
        "--levels",
        "2",
        "--schedule",
        "fast",
        "--steps",
        "80",
        "--samples",
        "8",
        "--no-progress",
    ]
    top_left, bottom_right = (slice(0, half), slice(0, half)), (slice(half, None), slice(half, None))
    for label, (mine, theirs) in ((0, (top_left, bottom_right)), (1, (bottom_right, top_left))):
        out = tmp_path / f"label{label}"
        args = ["explain", str(pictures / "p0.png"), "--classifier", f"{spec}:two_labels", "--out", str(out)]
        assert main([*args, "--link", "sigmoid", "--target", str(label), *common]) == 0, capsys.readouterr().err
        saved = load_saved_explanation(out / "p0.safetensors")
        assert json.loads((out / "summary.jsonl").read_text())["settings"]["link"] == "sigmoid"
        # both quadrants are bright; the label's own is kept, the other label's dropped
        explanation = saved["explanation"][0]
        kept, dropped = float(explanation[mine].mean()), float(explanation[theirs].abs().mean())
        assert kept > 0.2 and kept > 5 * dropped, (label, kept, dropped)  # measured: 0.34-0.36, under 0.001
    # a single logit without the link: refused, with the way out
    args = ["explain", str(pictures / "p0.png"), "--classifier", f"{spec}:one_logit", "--out", str(tmp_path / "one")]
    assert main([*args, "--steps", "1", "--no-progress"]) == 2
    assert "--link sigmoid" in capsys.readouterr().err
    assert main([*args, "--steps", "2", "--samples", "2", "--link", "sigmoid", "--no-progress"]) == 0


def test_fit_explain_and_evaluate_a_binary_single_logit_classifier(tmp_path, spec, pictures, capsys, monkeypatch):
    """fit with --model.link sigmoid; explain and evaluate take the link from the checkpoint; another link is
    refused by it, and by the teacher masks of another link."""
    classifier = f"{spec}:one_logit"
    fit = tiny_fit_command(pictures, classifier, monkeypatch, tmp_path)
    assert main(fit) == 2  # one logit, softmax link: refused before any training
    assert "--link sigmoid" in capsys.readouterr().err
    assert main([*fit, "--model.link", "sigmoid"]) == 0, capsys.readouterr().err
    (checkpoint,) = (tmp_path / "checkpoints").rglob("last.ckpt")
    assert torch.load(checkpoint, weights_only=True)["cartoonx"]["link"] == "sigmoid"
    # a resume names the checkpoint's link, as it names its classifier
    resume = [*fit, "--trainer.max_steps", "3", "--ckpt_path", str(checkpoint)]  # the last max_steps counts
    assert main(resume) == 2
    assert "was trained with the sigmoid link, but the config names 'softmax'" in capsys.readouterr().err
    assert main([*resume, "--model.link", "sigmoid"]) == 0, capsys.readouterr().err
    common = ["--classifier", classifier, "--checkpoint", str(checkpoint), "--no-progress"]
    out = tmp_path / "warm"
    explain = ["explain", str(pictures / "p0.png"), "--out", str(out), "--method", "warm", *common]
    assert main([*explain, "--refine-steps", "2", "--samples", "2"]) == 0, capsys.readouterr().err
    assert load_saved_explanation(out / "p0.safetensors")["explanation"].shape == (1, SIZE, SIZE)
    evaluate = ["evaluate", "--images", str(pictures), "--out", str(tmp_path / "eval"), "--rates", "3"]
    methods = "amortized,cartoonx,integrated-gradients,random-wavelet"
    args = [*evaluate, "--methods", methods, *common, "--steps", "2", "--samples", "2", "--lambdas", "none"]
    assert main(args) == 0, capsys.readouterr().err
    assert set(json.loads((tmp_path / "eval" / "summary.json").read_text())["methods"]) == set(methods.split(","))
    explain[explain.index(str(out))] = str(tmp_path / "softmax")
    assert main([*explain, "--link", "softmax"]) == 2
    needle = "the softmax link (trained with the sigmoid link: --link sigmoid; Python: link='sigmoid')"
    assert needle in capsys.readouterr().err


def test_teacher_masks_of_another_link_are_refused_and_old_manifests_are_softmax():
    from amortized_cartoonx.training.data import check_teachers

    settings = {"classifier": "m:f", "normalize": "none", "image_size": 32, "wave": "db3", "mode": "zero"}
    settings.update(levels_used=2, l1_lambda=20.0, distortion="label", obfuscation="gaussian-adaptive")
    check_teachers({"classifier": "m:f", "size": 32}, settings, 100)  # written before the link: softmax
    check_teachers({"classifier": "m:f", "link": "sigmoid"}, {**settings, "link": "sigmoid"}, 100)
    with pytest.raises(ConfigError, match=r"link 'softmax' \(training: 'sigmoid'\)"):
        check_teachers({"classifier": "m:f"}, {**settings, "link": "sigmoid"}, 100)


def test_a_checkpoint_without_a_link_reads_as_softmax_and_a_bad_link_is_refused(tmp_path):
    from amortized_cartoonx.checkpoint import read_checkpoint
    from amortized_cartoonx.errors import InputError

    from .test_hostile import checkpoint_dict

    checkpoint = checkpoint_dict("m:f")  # written without a link, as every checkpoint before it
    assert "link" not in checkpoint["cartoonx"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert read_checkpoint(tmp_path / "old.ckpt").meta["link"] == "softmax"
    checkpoint["cartoonx"]["link"] = "probit"
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(InputError, match="link 'probit' is not one of softmax, sigmoid"):
        read_checkpoint(tmp_path / "bad.ckpt")


def test_the_evaluation_measures_the_explained_label_with_the_sigmoid_link():
    """l2 over every label mostly measured the labels not explained: two masks, one keeping the target label's
    evidence and one the other label's, were measured alike."""
    from amortized_cartoonx.evaluation.config import EvaluationConfig

    assert EvaluationConfig().for_link("softmax").distortion == "l2"  # Fig. 7's, as before
    assert EvaluationConfig().for_link("sigmoid").distortion == "label-l2"
    assert EvaluationConfig(distortion="kl").for_link("sigmoid").distortion == "kl"  # a choice stays
    zx = torch.tensor([[4.0, 4.0, -3.0]])
    own, other = torch.tensor([[[4.0, -2.0, -3.0]]]), torch.tensor([[[-2.0, 4.0, -3.0]]])  # label 0 kept / lost
    measure = DISTORTIONS.get("label-l2")
    assert float(measure(zx, own, torch.tensor([0]), "sigmoid")) < 1e-6
    assert float(measure(zx, other, torch.tensor([0]), "sigmoid")) > 0.8  # sigmoid(4) - sigmoid(-2) = 0.86
    l2 = DISTORTIONS.get("l2")
    assert torch.allclose(l2(zx, own, torch.tensor([0]), "sigmoid"), l2(zx, other, torch.tensor([0]), "sigmoid"))


def test_messages_for_single_logit_classifiers():
    from amortized_cartoonx.cli.common import check_class_names
    from amortized_cartoonx.errors import InputError
    from amortized_cartoonx.rde import resolve_target

    with pytest.raises(InputError, match=r"one output \(a single-logit classifier: target 0\)"):
        resolve_target(1, torch.zeros(2, 1))
    with pytest.raises(ConfigError, match="each output is one label"):  # ["negative", "positive"] for one logit
        check_class_names(["negative", "positive"], 1, "labels.txt", link="sigmoid")
    check_class_names(["positive"], 1, "labels.txt", link="sigmoid")
    # weak logits all in [0, 1] are not taken for probabilities; saturated ones are
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_logits(torch.full((8, 1), 0.6), 8, link="sigmoid")
    with pytest.warns(UserWarning, match="probabilities"):
        check_logits(torch.tensor([[0.99], [0.01], [0.6], [0.7], [0.98], [0.5], [0.4], [0.3]]), 8, link="sigmoid")


def test_figures_and_reports_call_a_sigmoid_output_a_label(spec):
    from amortized_cartoonx.evaluation.report import _target_text
    from amortized_cartoonx.plotting import explanation_figure

    classifier = __import__(spec).two_labels()
    image = torch.rand(1, 3, SIZE, SIZE)
    config = OptimizerConfig(steps=1, num_samples=2)
    explanation = CartoonX(classifier, levels=2, config=config, link="sigmoid").explain(image, target=1)
    for link, word in (("sigmoid", "label 1"), ("softmax", "class 1")):
        assert explanation_figure(image[0], explanation, 0, link=link).axes[0].get_title().startswith(word)
        assert _target_text(1, link) == f"{word}, in every image"
    assert explanation_figure(image[0], explanation, 0, "cars", "sigmoid").axes[0].get_title().startswith("cars (1)")
