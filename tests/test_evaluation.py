"""The evaluation: rate-distortion curves, methods and baselines, cache, phases, report, command line."""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from amortized_cartoonx.classifiers import load_classifier, wrap_classifier
from amortized_cartoonx.cli import main
from amortized_cartoonx.errors import ConfigError, InputError
from amortized_cartoonx.evaluation import curves as curves_mod
from amortized_cartoonx.evaluation import lambdas as lambdas_mod
from amortized_cartoonx.evaluation.attribution import EvaluationMethod
from amortized_cartoonx.evaluation.cache import JsonStore, ResultCache, cached_map
from amortized_cartoonx.evaluation.curves import (
    DEFAULT_RATES,
    area,
    binary_masks,
    rank_positions,
    rate_counts,
    rate_distortion_curves,
    rate_grid,
)
from amortized_cartoonx.evaluation.localisation import localisation_metrics
from amortized_cartoonx.evaluation.maps import mask_energy_map, pixel_relevance
from amortized_cartoonx.evaluation.methods import (
    METHODS,
    BaselineConfig,
    MethodContext,
    MethodUnavailable,
    build_methods,
    method_names,
)
from amortized_cartoonx.evaluation.report import rate_distortion_figure, write_report
from amortized_cartoonx.evaluation.runner import Evaluation, EvaluationConfig
from amortized_cartoonx.io import file_sha256
from amortized_cartoonx.methods import ALL_METHODS, DEFAULT_METHODS, method_info
from amortized_cartoonx.optimizer import OptimizerConfig
from amortized_cartoonx.rde import RDEObjective, make_generators
from amortized_cartoonx.synthetic.export import write_synthetic_folder
from amortized_cartoonx.wavelets import PixelRepresentation, WaveletRepresentation

from .conftest import make_tiny_cnn

SIZE = 32
FAST_OPT = OptimizerConfig(steps=3, num_samples=2)
FAST_BASE = BaselineConfig(ig_steps=4, ig_internal_batch=16, smoothgrad_samples=2)


def smooth_images(count: int, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 5, 5, generator=gen)
    x = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.rand(count, 3, size, size, generator=gen)).clamp(0, 1)


def write_folder(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(smooth_images(count)):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / f"im{i}.png")
    return folder


def tie_gens(count: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def noise_for(objective, problem, draws: int, seed: int = 5):
    return objective.sample_noise(
        problem, draws, make_generators([seed + i for i in range(len(problem.images))], "cpu")
    )


# ---- curves ------------------------------------------------------------------------------------------------------
def test_rate_counts_are_exact_at_both_ends():
    for k in (1, 7, 1000, 69831):
        counts = rate_counts(rate_grid(21), k)
        assert counts[0] == 0 and counts[-1] == k
        assert counts == sorted(counts)


def test_ties_are_broken_at_random_not_by_position():
    relevance = torch.zeros(2, 50)
    relevance[:, 10] = 1.0
    ranks = rank_positions(relevance, tie_gens(2))
    for n in range(2):
        assert sorted(ranks[n].tolist()) == list(range(50))
        assert ranks[n, 10] == 0  # the one relevant position first
    assert not torch.equal(ranks[0], ranks[1])  # the tied rest in a different random order per image
    keep = binary_masks(ranks, [1, 50], "keep")
    assert keep[:, 0].sum(1).tolist() == [1.0, 1.0] and keep[:, 0, 10].tolist() == [1.0, 1.0]
    assert torch.equal(binary_masks(ranks, [0], "randomise")[:, 0], torch.ones(2, 50))


@pytest.mark.parametrize("representation", [WaveletRepresentation(levels=3), PixelRepresentation()])
@pytest.mark.parametrize("pattern", ["random", "constant", "sparse"])
def test_curve_endpoints_are_exactly_zero(representation, pattern):
    classifier = wrap_classifier(make_tiny_cnn())
    images = smooth_images(2)
    objective = RDEObjective(classifier, representation, 0.0, "gaussian-adaptive", "l2")
    problem = objective.prepare(images)
    k = problem.coeffs.numel_per_channel()
    relevance = {
        "random": torch.rand(2, k, generator=torch.Generator().manual_seed(0)),
        "constant": torch.ones(2, k),  # every position tied
        "sparse": (torch.rand(2, k, generator=torch.Generator().manual_seed(1)) > 0.97).float(),
    }[pattern]
    result = rate_distortion_curves(
        objective, problem, relevance, noise_for(objective, problem, 3), rate_grid(6), tie_gens(2)
    )
    assert result.keep.shape == result.randomise.shape == (2, 6)
    assert torch.all(result.keep[:, -1] == 0.0)  # nothing randomised: exactly zero
    assert torch.all(result.randomise[:, 0] == 0.0)
    assert torch.all(result.keep[:, :-1] > 0) and torch.all(result.randomise[:, 1:] > 0)
    # everything randomised: the same obfuscations in both curves
    torch.testing.assert_close(result.keep[:, 0], result.randomise[:, -1], rtol=1e-4, atol=1e-6)


class WaveletProbe(nn.Module):
    """A two-class linear classifier on a few known DWT coefficients of the grey image."""

    def __init__(self, representation: WaveletRepresentation, positions: torch.Tensor, weights: torch.Tensor):
        super().__init__()
        self.representation = representation
        self.register_buffer("positions", positions)
        self.register_buffer("weights", weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.representation.encode(x.mean(1, keepdim=True)).flatten()  # (N, K): the mask's positions
        score = flat[:, self.positions] @ self.weights
        return torch.stack([score, -score], dim=1)


def test_perfect_knowledge_beats_a_random_ordering():
    # periodic padding and low contrast: the noise stays small, so the obfuscations are rarely clamped
    representation = WaveletRepresentation(levels=2, mode="periodization")
    images = 0.5 + 0.2 * (smooth_images(3) - 0.5)
    k = representation.encode(images[:1]).numel_per_channel()
    gen = torch.Generator().manual_seed(3)
    positions = torch.randperm(k, generator=gen)[:6]
    probe = WaveletProbe(representation, positions, torch.randn(6, generator=gen))
    objective = RDEObjective(probe, representation, 0.0, "gaussian-adaptive", "l2")
    problem = objective.prepare(images)
    noise = noise_for(objective, problem, 4)
    with torch.no_grad():  # scale the weights so that randomising everything moves the score by about 2
        spread = objective.obfuscated_logits(problem, problem.coeffs.mask_like(0.0), noise)[..., 0].std()
        probe.weights.mul_(2.0 / spread)
    problem = objective.prepare(images)
    perfect = torch.zeros(3, k)
    perfect[:, positions] = 1.0
    random = torch.rand(3, k, generator=torch.Generator().manual_seed(4))
    rates = rate_grid(6)
    good = rate_distortion_curves(objective, problem, perfect, noise, rates, tie_gens(3))
    bad = rate_distortion_curves(objective, problem, random, noise, rates, tie_gens(3))

    def areas(result, curve):
        return np.array([area(rates, v) for v in result.curve(curve).numpy()])

    assert np.all(areas(good, "keep") < areas(bad, "keep"))
    assert np.all(areas(good, "randomise") > areas(bad, "randomise"))
    assert torch.all(good.keep[:, 1] < bad.keep[:, 1])  # keeping 20 %: the known coefficients suffice


def test_area_is_the_trapezoid_rule_and_early_interpolates():
    rates = [0.0, 0.5, 1.0]
    assert area(rates, [1.0, 1.0, 0.0]) == pytest.approx(0.75)
    assert area(rates, [0.0, 1.0, 1.0], upto=0.25) == pytest.approx(0.25 * 0.5 / 2)
    # any spacing: the trapezoids follow the actual rates
    assert area([0.0, 0.01, 0.1, 1.0], [1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.005)
    assert area(rate_grid(), [1.0 - r for r in rate_grid()]) == pytest.approx(0.5)


def test_the_default_rate_grid_is_dense_at_low_rates_and_grids_are_checked():
    grid = rate_grid()
    assert grid == list(DEFAULT_RATES) and grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 21
    assert sum(r < 0.1 for r in grid) >= 10  # the old default (steps of 0.05) had 2 points below 0.1
    assert rate_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rate_grid((0, 0.01, 1)) == [0.0, 0.01, 1.0]
    for bad in (1, (0.0, 0.5), (0.1, 1.0), (0.0, 0.5, 0.5, 1.0), (0.0, float("nan"), 1.0), (0.0, 1.5, 1.0)):
        with pytest.raises(ConfigError):
            rate_grid(bad)
    with pytest.raises(ConfigError):
        EvaluationConfig(rates=(0.0, 0.2)).validate()


# ---- maps -------------------------------------------------------------------------------------------------------
def test_mask_energy_map():
    images = smooth_images(2)
    pixel = PixelRepresentation()
    mask = torch.rand(2, SIZE * SIZE, generator=torch.Generator().manual_seed(0))
    expected = mask.reshape(2, SIZE, SIZE) ** 2 * (images - images.flatten(1).mean(1).view(2, 1, 1, 1)).pow(2).sum(1)
    torch.testing.assert_close(mask_energy_map(pixel, images, mask), expected)
    wavelet = WaveletRepresentation(levels=2)
    k = wavelet.encode(images).numel_per_channel()
    assert torch.count_nonzero(mask_energy_map(wavelet, images, torch.zeros(2, k))) == 0
    full = mask_energy_map(wavelet, images, torch.ones(2, k))
    assert full.shape == (2, SIZE, SIZE) and bool((full >= 0).all()) and float(full.sum()) > 0


# ---- methods ------------------------------------------------------------------------------------------------------
def test_the_registry_follows_the_method_table():
    assert method_names() == list(ALL_METHODS)  # every method, in the table's order
    ctx = MethodContext(wrap_classifier(make_tiny_cnn()), image_size=SIZE, optimizer=FAST_OPT, levels=2)
    methods, skipped = build_methods(DEFAULT_METHODS, ctx)
    assert not skipped
    for name, method in methods.items():
        assert method.name == name and method.representation.name == method_info(name).representation, name


def test_one_verb_attribute_validates_its_inputs():
    method = METHODS.get("random-pixel")(MethodContext(wrap_classifier(make_tiny_cnn())))
    assert not hasattr(method, "explain")  # explain is the RDE explainers' verb (-> Explanation)
    images = smooth_images(2)
    with pytest.raises(InputError, match="1 seeds for 2 images"):
        method.attribute(images, seeds=[1])
    with pytest.raises(InputError, match="shape"):
        method.attribute(images[0], seeds=[1])
    with pytest.raises(TypeError):
        method.attribute(images, None, [1, 2])  # seeds are keyword-only


@pytest.mark.parametrize("name", ["integrated-gradients", "smoothgrad", "guided-backprop", "grad-cam", "random-pixel"])
def test_attribute_checks_targets_and_seeds_like_the_explainers(name):
    """A target out of range or of the wrong length failed inside captum (or was ignored by the random orderings),
    a fractional one was truncated; string or negative seeds failed in int() or numpy."""
    ctx = MethodContext(wrap_classifier(make_tiny_cnn()), image_size=SIZE, baselines=FAST_BASE)
    method = METHODS.get(name)(ctx)
    images = smooth_images(2)
    for target, needle in [
        (torch.tensor([9, 0]), "target class 9 is out of range: the classifier has 5 classes"),
        (torch.tensor([-1, 0]), "target class -1 is out of range"),
        (torch.tensor([0, 1, 2]), "got 3 targets for 2 images"),
        (torch.tensor([0.5, 1.0]), "class indices"),
    ]:
        with pytest.raises(InputError, match=needle):
            method.attribute(images, target, seeds=[1, 2])
    for seeds in (["a", "b"], [-1, 2]):
        with pytest.raises(InputError, match="seeds must be non-negative integers"):
            method.attribute(images, seeds=seeds)
    with pytest.raises(InputError, match="meta device"):
        method.attribute(images.to("meta"), seeds=[1, 2])
    one_class = method.attribute(images, 1, seeds=[1, 2])  # one class for every image
    assert one_class.target.tolist() == [1, 1]
    torch.testing.assert_close(
        one_class.relevance, method.attribute(images, torch.tensor([1, 1]), seeds=[1, 2]).relevance
    )


@pytest.mark.parametrize("name", ["integrated-gradients", "grad-cam"])
def test_attribute_takes_float64_images_like_float32_ones(name):
    """numpy's float64 images reach a captum baseline in the classifier's dtype."""
    method = METHODS.get(name)(MethodContext(wrap_classifier(make_tiny_cnn()), image_size=SIZE))
    images = smooth_images(2)
    single = method.attribute(images, seeds=[1, 2]).relevance
    torch.testing.assert_close(method.attribute(images.double(), seeds=[1, 2]).relevance, single)


@pytest.mark.parametrize("name", ["smoothgrad", "guided-backprop", "grad-cam", "random-pixel"])
def test_relevance_is_float32_for_a_half_precision_classifier(name):
    """The gradient baselines answered in bfloat16 for a bfloat16 classifier, the other methods in float32."""
    classifier = wrap_classifier(make_tiny_cnn().to(torch.bfloat16))
    relevance = METHODS.get(name)(MethodContext(classifier, image_size=SIZE)).attribute(smooth_images(2), seeds=[1, 2])
    assert relevance.relevance.dtype == torch.float32 and torch.isfinite(relevance.relevance).all()


@pytest.mark.parametrize("name", ["random-pixel", "random-wavelet", "integrated-gradients"])
def test_attribute_predicts_in_eval_mode_and_leaves_the_batch_statistics_alone(name):
    """The random orderings chose the target with the caller's model in train mode: BatchNorm used the batch's
    statistics (another class) and updated its running ones."""
    model = make_tiny_cnn()
    images = smooth_images(4)
    with torch.no_grad():
        predicted = model.eval()(images).argmax(1)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attribution = METHODS.get(name)(MethodContext(wrap_classifier(model), image_size=SIZE)).attribute(
        images, seeds=[1, 2, 3, 4]
    )
    assert attribution.target.tolist() == predicted.tolist()
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated; TorchScript files still load
def test_hook_methods_skip_a_torchscript_classifier(tmp_path, caplog):
    scripted = torch.jit.script(make_tiny_cnn())
    classifier = wrap_classifier(scripted)
    for name in ("grad-cam", "guided-backprop"):
        with pytest.raises(MethodUnavailable, match="TorchScript"):
            METHODS.get(name)(MethodContext(classifier))
    methods, skipped = build_methods(["grad-cam", "random-pixel"], MethodContext(classifier))
    assert list(methods) == ["random-pixel"] and "TorchScript" in skipped["grad-cam"]
    cam = METHODS.get("grad-cam")(MethodContext(wrap_classifier(make_tiny_cnn())))
    assert cam.settings()["layer"] == "model.features"  # its last feature map: the 4x4 pooled, rectified maps


def test_hook_methods_skip_an_exported_program_with_its_reason(tmp_path):
    model = make_tiny_cnn().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.rand(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "m.pt2")
    flat = load_classifier(str(tmp_path / "m.pt2"))
    for name in ("grad-cam", "guided-backprop"):
        with pytest.raises(MethodUnavailable, match=r"exported program.*inlined.*nn\.Module spec"):
            METHODS.get(name)(MethodContext(flat))
    methods, skipped = build_methods(["grad-cam", "random-pixel"], MethodContext(flat))
    assert list(methods) == ["random-pixel"] and "exported program" in skipped["grad-cam"]


def grad_cam_layer(model: nn.Module, size: int = SIZE) -> str:
    """The layer's name, with ``#k`` when its k-th run in a forward pass (k > 1) made the map."""
    settings = METHODS.get("grad-cam")(MethodContext(wrap_classifier(model), image_size=size)).settings()
    return settings["layer"] + (f"#{settings['call']}" if settings["call"] > 1 else "")


def test_grad_cam_hooks_the_rectified_maps_not_the_last_convolution():
    """Grad-CAM hooked the last nn.Conv2d's raw output, before its BatchNorm and ReLU; the probe that finds the
    layer leaves the model as it was (train mode, no hooks, parameter gradients on)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),  # 1x1: not a feature map
        nn.Flatten(),
        nn.Linear(8, 3),
    ).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert grad_cam_layer(model) == "model.5"  # the last ReLU, not the Conv2d model.3
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # no batch statistics updated


def test_grad_cam_hooks_a_resnets_last_stage_and_runs():
    """On a ResNet the outermost module that outputs the last feature map is layer4, not layer4.1.conv2 (before
    bn2, the residual add and the ReLU); the map is captum's LayerGradCam's on that layer."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    classifier = wrap_classifier(resnet18(weights=None, num_classes=3).eval())
    method = METHODS.get("grad-cam")(MethodContext(classifier, image_size=64))
    assert method.settings()["layer"] == "model.layer4" and method.layer is classifier.model.layer4
    images = smooth_images(2, size=64)
    inputs = images.clone().requires_grad_(True)
    cam = method._attribute(inputs, torch.tensor([0, 2]), seeds=[1, 2]).detach()
    assert cam.shape == (2, 1, 64, 64) and bool((cam >= 0).all()) and bool(torch.isfinite(cam).all())
    assert float(cam.amax()) > 0  # a 2x2 map upsampled, not all zero
    from captum.attr import LayerAttribution, LayerGradCam

    reference = LayerGradCam(classifier, classifier.model.layer4).attribute(
        images.clone().requires_grad_(True), target=torch.tensor([0, 2]), relu_attributions=True
    )
    reference = LayerAttribution.interpolate(reference, (64, 64), interpolate_mode="bilinear").detach()
    assert torch.allclose(cam, reference, atol=1e-6, rtol=1e-5)
    attribution = method.attribute(images, seeds=[1, 2])
    assert attribution.relevance.shape == (2, 64 * 64) and bool((attribution.relevance >= 0).all())


class _RegisteredOutOfOrder(nn.Module):
    """The block that runs last is registered first: named_modules() order is not execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.early = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.late(self.early(x)).mean(dim=(2, 3)))


class _SharedReLU(nn.Module):
    """The last feature map comes from a ReLU that also ran before (as in a ResNet block)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.head(self.relu(self.bn2(self.conv2(x))).mean(dim=(2, 3)))


def test_grad_cam_layer_follows_execution_order_and_hooks_a_shared_module_at_its_last_run():
    assert grad_cam_layer(_RegisteredOutOfOrder()) == "model.late"  # not model.early.0, the last registered Conv2d
    assert grad_cam_layer(_SharedReLU()) == "model.relu#2"  # the rectified maps, from the shared ReLU's second run
    torch.manual_seed(0)
    model = _SharedReLU().eval()
    method = METHODS.get("grad-cam")(MethodContext(wrap_classifier(model), image_size=SIZE))
    images = smooth_images(2)
    cam = method._attribute(images.clone().requires_grad_(True), torch.tensor([1, 2]), seeds=[1, 2]).detach()
    # by hand: the second ReLU's maps and the gradient of the target logits w.r.t. them
    maps = torch.relu(model.bn2(model.conv2(torch.relu(model.bn1(model.conv1(images)))))).detach().requires_grad_()
    logits = model.head(maps.mean(dim=(2, 3)))
    (grads,) = torch.autograd.grad(logits[[0, 1], [1, 2]].sum(), maps)
    expected = (grads.mean(dim=(2, 3), keepdim=True) * maps).sum(1, keepdim=True).clamp_min(0).detach()
    assert torch.allclose(cam, expected, atol=1e-6)  # SIZE x SIZE maps: no upsampling


def test_grad_cam_is_unavailable_without_a_feature_map_larger_than_one_pixel():
    model = nn.Sequential(nn.Conv2d(3, 4, 8), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))  # 8x8 -> 1x1
    with pytest.raises(MethodUnavailable, match="no layer that outputs a feature map larger than 1x1"):
        METHODS.get("grad-cam")(MethodContext(wrap_classifier(model), image_size=8))
    methods, skipped = build_methods(["grad-cam"], MethodContext(wrap_classifier(model), image_size=8))
    assert not methods and "larger than 1x1" in skipped["grad-cam"]
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))  # 8x8 images only
    with pytest.raises(MethodUnavailable, match="could not run the classifier.*16, 16"):
        METHODS.get("grad-cam")(MethodContext(wrap_classifier(fixed), image_size=16))


def test_every_baseline_gives_a_relevance_per_position():
    classifier = wrap_classifier(make_tiny_cnn())
    images = smooth_images(2)
    ctx = MethodContext(classifier, image_size=SIZE, optimizer=FAST_OPT, levels=2, baselines=FAST_BASE)
    methods, skipped = build_methods(
        ["integrated-gradients", "smoothgrad", "guided-backprop", "grad-cam", "random-pixel", "random-wavelet"], ctx
    )
    assert not skipped
    for name, method in methods.items():
        att = method.attribute(images, None, seeds=[1, 2])
        k = method.representation.encode(images).numel_per_channel()
        assert att.relevance.shape == (2, k), name
        assert bool(torch.isfinite(att.relevance).all()) and bool((att.relevance >= 0).all()), name
        assert att.target.tolist() == classifier(images).argmax(1).tolist(), name
        again = method.attribute(images[1:], None, seeds=[2])  # seeded per image: independent of the batch
        torch.testing.assert_close(again.relevance[0], att.relevance[1], rtol=1e-4, atol=1e-6)


# ---- the run: files, cache, resume ---------------------------------------------------------------------------------
def make_run(images_dir, out_dir, methods, **overrides) -> Evaluation:
    classifier = wrap_classifier(make_tiny_cnn())
    ctx = MethodContext(classifier, "tiny", image_size=SIZE, optimizer=FAST_OPT, levels=2, baselines=FAST_BASE)
    settings = {
        "methods": tuple(methods),
        "rates": 5,
        "noise_draws": 2,
        "batch_size": 2,
        "lambdas": {"cartoonx": (5.0, 40.0)},
        "lambda_steps": 2,
        "lambda_limit": 1,
        "examples": 2,
        "progress": False,
        **overrides,
    }
    return Evaluation(classifier, images_dir, out_dir, EvaluationConfig(**settings), ctx)


@pytest.fixture
def count_explains(monkeypatch):
    """Images explained per method (every method's verb is the base class's ``attribute``)."""
    calls: dict[str, int] = {}
    original = EvaluationMethod.attribute

    def counted(self, images, target=None, *, seeds):
        calls[self.name] = calls.get(self.name, 0) + images.shape[0]
        return original(self, images, target, seeds=seeds)

    monkeypatch.setattr(EvaluationMethod, "attribute", counted)
    return calls


def test_run_writes_every_file_resumes_and_adds_methods(tmp_path, count_explains):
    images_dir = write_folder(tmp_path / "images", 3)
    out = tmp_path / "out"
    first = make_run(images_dir, out, ["cartoonx", "random-pixel"])
    results = first.run()
    data = write_report(results, out)
    assert count_explains == {"cartoonx": 3, "random-pixel": 3}
    for name in ("curves.csv", "summary.json", "rate_distortion.png", "examples.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(data))
    entry = summary["methods"]["cartoonx"]
    assert entry["representation"] == "wavelet" and entry["area_keep"]["n"] == 3
    assert {"mean", "se", "n"} <= set(entry["area_randomise"]) and entry["seconds_per_explanation"]["mean"] > 0
    assert [row["lambda"] for row in summary["lambda_panel"]["cartoonx"]] == [5.0, 40.0]
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert len(rows) == 2 * 3 * 2 * 5 + 2  # methods x images x curves x rates + panel (c)
    keep_end = [r for r in rows if r["curve"] == "keep" and float(r["r"]) == 1.0]
    assert keep_end and all(float(r["distortion"]) == 0.0 for r in keep_end)
    report = (out / "report.md").read_text()
    assert "| CartoonX | wavelet |" in report and "rate_distortion.png" in report
    figure = rate_distortion_figure(results)
    assert len(figure.axes) == 3  # with panel (c), which names its own image count (--lambda-limit's)
    panel_images = summary["lambda_panel"]["cartoonx"][0]["mask_mean"]["n"]
    assert figure.axes[2].get_title().endswith(f", {panel_images} images")
    assert figure.get_suptitle().startswith("3 images in (a) and (b);")

    count_explains.clear()
    again = make_run(images_dir, out, ["cartoonx", "random-pixel"]).run()
    assert count_explains == {}  # everything came from the cache
    assert again.computed == {
        "explanations": {"cartoonx": 0, "random-pixel": 0},
        "curves": {"cartoonx": 0, "random-pixel": 0},
        "lambda": {"cartoonx": 0},
    }
    np.testing.assert_array_equal(again.methods["cartoonx"].keep, results.methods["cartoonx"].keep)

    more = make_run(images_dir, out, ["cartoonx", "random-pixel", "smoothgrad"]).run()
    assert count_explains == {"smoothgrad": 3}  # only the new method ran
    assert more.computed["curves"] == {"cartoonx": 0, "random-pixel": 0, "smoothgrad": 3}


def test_shards_share_the_work_and_the_reports_run_reads_their_results(tmp_path, count_explains):
    """Two processes' shares (--shard 0/2 and 1/2) explain and measure every image once, into one cache; the run
    without a shard then computes nothing of it and reports what an unsharded run reports."""
    from amortized_cartoonx.cli.evaluate import parse_shard

    images_dir = write_folder(tmp_path / "images", 3)
    out, methods = tmp_path / "out", ["cartoonx", "random-pixel"]
    for k, share in ((0, 2), (1, 1)):  # images 0 and 2, then image 1
        computed = make_run(images_dir, out, methods, shard=(k, 2)).run_shard()
        assert computed["explanations"] == {"cartoonx": share, "random-pixel": share}
        assert computed["curves"] == {"cartoonx": share, "random-pixel": share}
        assert computed["lambda"] == {"cartoonx": 2 * (1 - k)}  # panel (c): the first image at 2 lambdas, shard 0
    assert count_explains == {"cartoonx": 3, "random-pixel": 3}
    assert not (out / "summary.json").exists()  # a shard writes no report
    count_explains.clear()
    reported = make_run(images_dir, out, methods).run()
    assert count_explains == {}
    assert reported.computed == {
        "explanations": {"cartoonx": 0, "random-pixel": 0},
        "curves": {"cartoonx": 0, "random-pixel": 0},
        "lambda": {"cartoonx": 0},
    }
    whole = make_run(images_dir, tmp_path / "whole", methods).run()  # another batch composition: float rounding
    for name in methods:
        np.testing.assert_allclose(reported.methods[name].keep, whole.methods[name].keep, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            reported.methods[name].randomise, whole.methods[name].randomise, rtol=1e-4, atol=1e-6
        )

    with pytest.raises(ConfigError, match="run_shard"):
        make_run(images_dir, out, methods, shard=(0, 2)).run()
    with pytest.raises(ConfigError, match="config.shard"):
        make_run(images_dir, out, methods).run_shard()
    with pytest.raises(ConfigError, match="keep the cache on"):
        make_run(images_dir, out, methods, shard=(0, 2), cache=False)
    for text in ("2/2", "1", "a/3", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(text)
    assert parse_shard("3/4") == (3, 4) and parse_shard(None) is None


def test_the_cache_never_serves_another_classifiers_or_another_images_results(tmp_path, count_explains):
    """The key held the spec's text and the file name only: a retrained classifier under the same spec, or another
    folder's image of the same name, was served the old results."""
    images_dir = write_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    make_run(images_dir, out, ["random-pixel"]).run()
    assert count_explains == {"random-pixel": 2}
    count_explains.clear()
    make_run(images_dir, out, ["random-pixel"]).run()
    assert count_explains == {}  # the same weights and images: all cached
    torch.manual_seed(1)
    retrained = wrap_classifier(make_tiny_cnn())  # other weights, the same spec "tiny"
    with torch.no_grad():
        for p in retrained.parameters():
            p.add_(torch.randn_like(p))
    run = make_run(images_dir, out, ["random-pixel"])
    run.classifier = run.context.classifier = retrained
    run.run()
    assert count_explains == {"random-pixel": 2}
    count_explains.clear()
    image = Image.open(images_dir / "im1.png")
    Image.fromarray(255 - np.asarray(image)).save(images_dir / "im1.png")  # the same name, other pixels
    make_run(images_dir, out, ["random-pixel"]).run()
    assert count_explains == {"random-pixel": 1}


def test_the_figure_names_the_distortion_it_plots(tmp_path):
    """Every panel was labelled ||p(x) - p(y)||_2 whatever the run's distortion."""
    images_dir = write_folder(tmp_path / "images", 1)
    results = make_run(images_dir, tmp_path / "out", ["random-pixel"], distortion="label", lambdas={}).run()
    assert [a.get_ylabel() for a in rate_distortion_figure(results).axes] == [r"distortion $(p_c(x) - p_c(y))^2$"] * 2


def test_the_panel_c_heading_says_what_ran(tmp_path):
    """It printed the optimizer's steps for lambda_steps=0 and a lambda_limit above the number of images."""
    images_dir = write_folder(tmp_path / "images", 2)
    results = make_run(images_dir, tmp_path / "out", ["cartoonx"], lambda_steps=0, lambda_limit=10).run()
    write_report(results, tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Steps: 0; images: 2 (the first ones)" in report
    assert f"schedule `{FAST_OPT.schedule}`: {FAST_OPT.steps} steps" in report and "clamp mask, fp32" in report


def test_cache_records_with_the_wrong_structure_are_recomputed(tmp_path, count_explains):
    """Cache files that parse but hold something else (hand-edited, foreign) are ignored and recomputed."""
    from safetensors.torch import save_file

    images_dir = write_folder(tmp_path / "images", 3)
    out = tmp_path / "out"
    first = make_run(images_dir, out, ["cartoonx"]).run()
    cache = out / "cache"
    curve, point, explanation = (
        sorted((cache / kind).rglob(pattern))[0]
        for kind, pattern in (("curves", "*.json"), ("lambda", "*.json"), ("explanations", "*.safetensors"))
    )
    curve.write_text(json.dumps({"rates": "all", "keep": [1, 2]}))
    point.write_text(json.dumps([1, 2, 3]))
    save_file({"relevance": torch.full((2, 2), float("nan"))}, str(explanation))
    count_explains.clear()
    again = make_run(images_dir, out, ["cartoonx"])
    results = again.run()
    assert count_explains == {"cartoonx": 1}
    assert again.computed["explanations"] == {"cartoonx": 1} and again.computed["curves"] == {"cartoonx": 1}
    assert again.computed["lambda"] == {"cartoonx": 1}
    np.testing.assert_allclose(results.methods["cartoonx"].keep, first.methods["cartoonx"].keep, rtol=1e-5, atol=1e-6)


def test_a_cached_relevance_of_another_length_is_recomputed(tmp_path, count_explains):
    """It was served as is, and the curves failed with torch.stack's size error."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    images_dir = write_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    make_run(images_dir, out, ["random-pixel"], lambdas={}, examples=0).run()
    cached = sorted((out / "cache").rglob("*.safetensors"))
    path = next(p for p in cached if "explanation" in str(p))
    tensors = load_file(path)
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    save_file({**tensors, "relevance": tensors["relevance"][:10].contiguous()}, str(path), header)
    count_explains.clear()
    make_run(images_dir, tmp_path / "out", ["random-pixel"], lambdas={}, examples=0).run()
    assert count_explains == {"random-pixel": 1}


def test_an_interrupted_run_resumes(tmp_path, count_explains, monkeypatch):
    images_dir = write_folder(tmp_path / "images", 3)
    out = tmp_path / "out"
    original = curves_mod.rate_distortion_curves
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(curves_mod, "rate_distortion_curves", failing)
    with pytest.raises(KeyboardInterrupt):
        make_run(images_dir, out, ["random-wavelet"], lambdas={}).run()
    monkeypatch.setattr(curves_mod, "rate_distortion_curves", original)
    count_explains.clear()
    run = make_run(images_dir, out, ["random-wavelet"], lambdas={})
    run.run()
    assert count_explains == {}  # the explanations were all cached before the interruption
    assert run.computed["curves"] == {"random-wavelet": 1}  # only the batch that did not finish


def test_cached_map_computes_only_what_is_missing(tmp_path):
    calls: list[list[int]] = []

    def compute(indices):
        calls.append(list(indices))
        return [{"value": 10 * i} for i in indices]

    ids = ["a.png", "b.png", "c.png"]
    store = JsonStore(ResultCache(tmp_path), "curves", "method", "key")
    first = cached_map(ids[:2], store, compute, batch_size=2, desc="test", progress=False)
    assert calls == [[0, 1]] and first.computed == 2
    calls.clear()
    second = cached_map(ids, store, compute, batch_size=2, desc="test", progress=False)
    assert calls == [[2]] and second.computed == 1  # only the new image
    assert second.records == {"a.png": {"value": 0}, "b.png": {"value": 10}, "c.png": {"value": 20}}
    assert list(second.records) == ids
    calls.clear()
    third = cached_map(ids, store, compute, batch_size=2, desc="test", progress=False)
    assert calls == [] and third.computed == 0 and third.records == second.records
    nothing = JsonStore(ResultCache(None), "curves", "method", "key")  # --no-cache
    assert cached_map(ids, nothing, compute, batch_size=2, desc="test", progress=False).computed == 3
    assert calls == [[0, 1], [2]]


def test_the_phases_run_twice_compute_nothing_and_use_no_global_randomness(tmp_path, count_explains, monkeypatch):
    images_dir = tmp_path / "cartoons"
    write_synthetic_folder(images_dir, 2, size=SIZE, progress=False)  # with ground truth: every phase runs
    out = tmp_path / "out"
    counts = {"curves": 0, "lambda": 0}

    def counting(module, name, phase):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            counts[phase] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    counting(curves_mod, "rate_distortion_curves", "curves")
    counting(lambdas_mod, "lambda_points", "lambda")
    methods = ["pixel-rde", "smoothgrad", "random-wavelet"]
    settings = {"lambdas": {"pixel-rde": (2.0,)}}
    torch.manual_seed(1)
    first = make_run(images_dir, out, methods, **settings).run()
    assert count_explains == {m: 2 for m in methods} and counts == {"curves": 3, "lambda": 1}
    assert first.computed["lambda"] == {"pixel-rde": 1} and first.has_ground_truth

    count_explains.clear()
    counts.update({"curves": 0, "lambda": 0})
    torch.manual_seed(2)
    second = make_run(images_dir, out, methods, **settings).run()
    assert count_explains == {} and counts == {"curves": 0, "lambda": 0}  # nothing computed
    assert second.computed == {
        "explanations": {m: 0 for m in methods},
        "curves": {m: 0 for m in methods},
        "lambda": {"pixel-rde": 0},
    }
    torch.manual_seed(3)
    fresh = make_run(images_dir, tmp_path / "fresh", methods, cache=False, **settings).run()
    for other in (second, fresh):  # the same results, whatever the global random state
        for name in methods:
            a, b = first.methods[name], other.methods[name]
            for field in ("keep", "randomise", "targets"):
                np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-7)
            assert set(b.ground_truth) == set(a.ground_truth) and set(b.scalars) == set(a.scalars)
            for k in a.ground_truth:
                np.testing.assert_allclose(b.ground_truth[k], a.ground_truth[k], rtol=1e-5, atol=1e-7)
            for k in a.scalars:
                np.testing.assert_allclose(b.scalars[k], a.scalars[k], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(other.examples[name], first.examples[name])
        a, b = first.lambda_points["pixel-rde"], other.lambda_points["pixel-rde"]
        assert [(p["image"], p["lambda"]) for p in b] == [(p["image"], p["lambda"]) for p in a]
        values = [[[p["mask_mean"], p["distortion"], p["optimizer_distortion"]] for p in r] for r in (a, b)]
        np.testing.assert_allclose(values[1], values[0], rtol=1e-5, atol=1e-7)


# ---- command line ----------------------------------------------------------------------------------------------------
@pytest.fixture
def scripted_classifier(tmp_path) -> Path:
    path = tmp_path / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.script(make_tiny_cnn()).save(str(path))
    return path


def test_cli_runs_and_skips_grad_cam_on_torchscript(tmp_path, scripted_classifier, caplog):
    images_dir = write_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    methods = ["--methods", "pixel-rde,grad-cam", "random-wavelet", "--steps", "2", "--rates", "0,0.01,0.5,1"]
    args = evaluate_args(scripted_classifier, images_dir, out, *methods)
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    assert "grad-cam" in caplog.text and "TorchScript" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rates"] == [0.0, 0.01, 0.5, 1.0] and len(summary["methods"]["pixel-rde"]["mean_curve"]["keep"]) == 4
    assert set(summary["methods"]) == {"pixel-rde", "random-wavelet"}
    assert "grad-cam" in summary["skipped"] and summary["lambda_panel"] == {}
    assert "grad-cam" in (out / "report.md").read_text() and "cartoonx evaluate" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "cartoonx,bogus"], "unknown method 'bogus'"),
        (["--methods", "amortized"], "need --checkpoint"),
        (["--methods", "warm", "--checkpoint", "missing.ckpt"], "checkpoint not found"),
        (["--lambdas", "vgg=1,2"], "panel (c)"),
        (["--rates", "1"], "rates must be at least 2"),
        (["--rates", "0,0.5"], "--rates: a rate grid must rise strictly from 0 to 1"),
        (["--rates", "fine"], "--rates: expected 'dense'"),
        (["--methods", "cartoonx", "--checkpoint", "x.ckpt"], "--checkpoint is for the methods amortized and warm"),
        (["--methods", "integrated-gradients", "--lr", "0.5"], "--lr: for the exact methods"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, scripted_classifier, capsys, extra, message):
    images_dir = write_folder(tmp_path / "images", 1)
    args = ["evaluate", "--classifier", str(scripted_classifier), "--images", str(images_dir), "--out", str(tmp_path)]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_the_levels_recorded_are_the_levels_used(tmp_path, scripted_classifier):
    """--levels 8 at 32 px ran J = 4 and was recorded as 8 in report.md and summary.json."""
    images_dir = write_folder(tmp_path / "images", 1)
    out = tmp_path / "out"
    args = evaluate_args(scripted_classifier, images_dir, out, "--methods", "random-wavelet")
    args[args.index("--levels") + 1] = "8"
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["dwt"]["levels"] == 4
    assert "db3, J=4" in (out / "report.md").read_text()


def test_empty_or_missing_folder_exits_2(tmp_path, scripted_classifier, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        args = ["evaluate", "--classifier", str(scripted_classifier), "--images", str(folder), "--out", str(tmp_path)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "error" in err and len(err.splitlines()) == 1


# ---- ground truth ----------------------------------------------------------------------------------------------
def test_a_pixel_mask_on_the_object_puts_all_its_energy_there():
    images = smooth_images(2)
    obj = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    obj[:, 4:14, 6:16] = True
    dis = torch.zeros_like(obj)
    dis[:, 20:28, 20:28] = True
    method = METHODS.get("pixel-rde")(MethodContext(wrap_classifier(make_tiny_cnn()), optimizer=FAST_OPT))
    metrics = localisation_metrics(pixel_relevance(method, images, obj.flatten(1).float()), obj, dis)
    torch.testing.assert_close(metrics["energy_object"], torch.ones(2))
    assert metrics["energy_distractors"].tolist() == [0.0, 0.0] and metrics["pointing_game"].tolist() == [1.0, 1.0]


def test_ground_truth_metrics_for_every_method(tmp_path):
    images_dir = tmp_path / "cartoons"
    write_synthetic_folder(images_dir, 2, size=SIZE, progress=False)
    out = tmp_path / "out"
    results = make_run(images_dir, out, ["random-wavelet", "integrated-gradients"], lambdas={}).run()
    assert results.has_ground_truth
    data = write_report(results, out)
    levels = [f"detail_{kind}_level{j}" for kind in ("fraction", "outline") for j in (1, 2)]  # levels=2
    for name in ("random-wavelet", "integrated-gradients"):
        gt = data["methods"][name]["ground_truth"]
        assert set(gt) == {
            "energy_object",
            "energy_distractors",
            "energy_background",
            "energy_outline",
            "pointing_game",
            "detail_object",
            "detail_distractors",
            "detail_outline",
            "detail_pointing_game",
            *levels,
        }
        assert all(0.0 <= gt[k]["mean"] <= 1.0 and gt[k]["n"] == 2 for k in gt)
    assert set(data["ground_truth_chance"]) == {"object", "distractors", "outline"}
    assert 0.0 < data["ground_truth_chance"]["outline"]["mean"] < 1.0
    report = (out / "report.md").read_text()
    assert "## Ground truth" in report and "**Detail part**" in report and "*chance (area share)*" in report
    assert len(rate_distortion_figure(results).axes) == 2  # no lambda grid: no empty third panel
    assert (out / "ground_truth.png").stat().st_size > 0 and "ground_truth.png" in report


# ---- amortized and warm start ------------------------------------------------------------------------------------
def write_checkpoint(path: Path, classifier_spec: str) -> Path:
    """An (untrained) amortized explainer checkpoint in the format ``cartoonx fit`` writes."""
    from amortized_cartoonx import training  # Lightning: imported only by the tests that need a checkpoint

    module = training.AmortizedCartoonXModule(classifier=classifier_spec, image_size=SIZE, levels=2)
    state = {f"mask_predictor.{k}": v for k, v in module.mask_predictor.state_dict().items()}
    torch.save({"state_dict": state, "cartoonx": module.settings()}, path)
    return path


def evaluate_args(classifier: Path, images_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "evaluate",
        "--classifier",
        str(classifier),
        "--images",
        str(images_dir),
        "--out",
        str(out),
        "--size",
        str(SIZE),
        "--levels",
        "2",
        "--samples",
        "2",
        "--rates",
        "3",
        "--noise-draws",
        "1",
        "--lambdas",
        "--examples",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def test_amortized_and_warm_methods(tmp_path, scripted_classifier, count_explains):
    checkpoint = write_checkpoint(tmp_path / "explainer.ckpt", str(scripted_classifier))
    images_dir = write_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    args = evaluate_args(scripted_classifier, images_dir, out, "--checkpoint", str(checkpoint), "--refine-steps", "2")
    assert main([*args, "--methods", "amortized", "warm"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"amortized", "warm"}
    assert all(e["representation"] == "wavelet" for e in summary["methods"].values())
    assert count_explains == {"amortized": 2, "warm": 2}


def test_the_amortized_method_measures_like_the_optimizer(tmp_path, scripted_classifier):
    checkpoint = write_checkpoint(tmp_path / "explainer.ckpt", str(scripted_classifier))
    spec = str(scripted_classifier)
    optimizer = OptimizerConfig(num_samples=3, seed=5)
    ctx = MethodContext(load_classifier(spec), spec, SIZE, optimizer, levels=2, checkpoint=str(checkpoint))
    method = METHODS.get("amortized")(ctx)
    assert method.explainer.measure_samples == 3 and method.explainer.seed == 5
    assert method.settings()["measure_samples"] == 3  # part of the cache key
    assert method.settings()["checkpoint_sha256"] == file_sha256(checkpoint)  # so is the file's content
    ctx.optimizer = OptimizerConfig(num_samples=3, measure_samples=7)
    assert METHODS.get("amortized")(ctx).explainer.measure_samples == 7


def test_a_checkpoint_for_another_classifier_exits_2(tmp_path, scripted_classifier, capsys):
    checkpoint = write_checkpoint(tmp_path / "explainer.ckpt", str(scripted_classifier))
    other = tmp_path / "other.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(make_tiny_cnn(seed=7)).save(str(other))
    images_dir = write_folder(tmp_path / "images", 1)
    args = evaluate_args(other, images_dir, tmp_path / "out", "--checkpoint", str(checkpoint), "--methods", "amortized")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "classifier" in err and len(err.splitlines()) == 1


def test_guided_backprop_matches_captum_on_relu_and_covers_relu6():
    from captum.attr import GuidedBackprop

    torch.manual_seed(0)
    classifier = wrap_classifier(make_tiny_cnn())
    images = smooth_images(2)
    target = classifier(images).argmax(1)
    method = METHODS.get("guided-backprop")(MethodContext(classifier))
    ours = method._attribute(images, target, [1, 2])
    torch.testing.assert_close(ours, GuidedBackprop(classifier).attribute(images, target=target))
    assert not any(m._forward_hooks for m in classifier.modules())  # the hooks are gone
    # ReLU6 (MobileNets, EfficientNet-Lite): rectified too, so it differs from the plain gradient
    relu6 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(inplace=True), nn.Conv2d(8, 8, 3), nn.ReLU6())
    model = wrap_classifier(nn.Sequential(relu6, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))
    guided = METHODS.get("guided-backprop")(MethodContext(model))._attribute(images, torch.tensor([0, 1]), [1, 2])
    x = images.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(x).gather(1, torch.tensor([[0], [1]])).sum(), x)
    assert guided.shape == images.shape and not torch.allclose(guided, plain)


def test_evaluate_takes_size_and_levels_from_the_checkpoint(tmp_path, scripted_classifier):
    checkpoint = write_checkpoint(tmp_path / "explainer.ckpt", str(scripted_classifier))
    images_dir = write_folder(tmp_path / "images", 1)
    out = tmp_path / "out"
    args = ["evaluate", "--classifier", str(scripted_classifier), "--images", str(images_dir), "--out", str(out)]
    args += ["--checkpoint", str(checkpoint), "--methods", "amortized", "--samples", "2", "--rates", "3"]
    args += ["--noise-draws", "1", "--lambdas", "--examples", "1", "--device", "cpu", "--no-progress"]
    assert main(args) == 0  # no --size and --levels: the checkpoint's 32 px and J = 2
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["image_size"] == SIZE and settings["dwt"]["levels"] == 2
    assert "--size" not in settings["command"]


def test_sanity_depths_and_a_refine_steps_without_warm_are_refused_before_any_work(tmp_path, count_explains, capsys):
    images = write_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    args = ["evaluate", "--classifier", "tests.conftest:make_tiny_cnn", "--images", str(images), "--out", str(out)]
    args += ["--size", str(SIZE), "--methods", "random-pixel", "--rates", "3", "--noise-draws", "1", "--lambdas"]
    assert main([*args, "--device", "cpu", "--sanity", "--sanity-depths", "1,99"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sanity depth 99 exceeds the classifier's 4 layers" in err and len(err.splitlines()) == 1, err
    assert count_explains == {} and not out.exists()
    assert main([*args, "--device", "cpu", "--refine-steps", "5"]) == 2  # no warm among the methods: refused
    assert "--refine-steps is for the method warm" in capsys.readouterr().err
    assert count_explains == {} and not out.exists()


def test_the_recorded_command_names_the_device_auto_chose(tmp_path):
    """--device auto (the default) was left out of report.md's command: rerun on a GPU machine, it moved there."""
    images_dir = write_folder(tmp_path / "images", 1)
    out = tmp_path / "out"
    args = ["evaluate", "--classifier", "tests.conftest:make_tiny_cnn", "--images", str(images_dir), "--out", str(out)]
    args += ["--size", str(SIZE), "--methods", "random-pixel", "--rates", "3", "--noise-draws", "1", "--lambdas"]
    assert main([*args, "--examples", "0", "--no-progress"]) == 0
    command = json.loads((out / "summary.json").read_text())["settings"]["command"]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert command.endswith(f" --device {expected}") and command in (out / "report.md").read_text()


# ---- the explained class: --target, --target-file ------------------------------------------------------------------
def test_given_targets_are_explained_measured_and_cached_apart_from_the_predicted_ones(tmp_path, count_explains):
    images_dir = write_folder(tmp_path / "images", 3)
    ids = sorted(p.name for p in images_dir.iterdir())
    out = tmp_path / "out"
    predicted = make_run(images_dir, out, ["cartoonx"]).run()
    chosen = {name: (int(t) + 1) % 5 for name, t in zip(ids, predicted.methods["cartoonx"].targets, strict=True)}
    count_explains.clear()
    given = make_run(images_dir, out, ["cartoonx"], target={**chosen, "not-in-the-run.png": 4}).run()
    assert count_explains == {"cartoonx": 3}  # another key: nothing served from the predicted classes' cache
    assert given.methods["cartoonx"].targets.tolist() == [chosen[i] for i in ids]
    assert given.computed["lambda"] == {"cartoonx": 2}  # panel (c) explains the given class too (2 lambdas)
    assert given.settings["evaluation"]["target"] == chosen  # the run's images only
    probability = given.methods["cartoonx"].scalars["prob_original"]  # of the explained class
    assert not np.allclose(probability, predicted.methods["cartoonx"].scalars["prob_original"])
    data = write_report(given, out)
    assert data["settings"]["evaluation"]["target"] == chosen
    assert "| explained class | given per image" in (out / "report.md").read_text()

    count_explains.clear()
    again = make_run(images_dir, out, ["cartoonx"], target=dict(chosen, **{"not-in-the-run.png": 4})).run()
    assert count_explains == {} and again.computed["curves"] == {"cartoonx": 0}
    one = make_run(images_dir, out, ["cartoonx"], target=2, limit=2).run()
    assert one.methods["cartoonx"].targets.tolist() == [2, 2] and count_explains == {"cartoonx": 2}
    assert "| explained class | class 2, in every image |" in write_report_text(one, tmp_path / "one")


def test_deterministic_methods_explain_once_for_every_seed_and_are_measured_per_seed(tmp_path, count_explains):
    images_dir = write_folder(tmp_path / "images", 3)
    out = tmp_path / "out"
    methods = ["integrated-gradients", "guided-backprop", "grad-cam", "smoothgrad"]
    first = make_run(images_dir, out, methods, lambdas={}).run()
    count_explains.clear()
    other = make_run(images_dir, out, methods, lambdas={}, seed=1).run()
    assert count_explains == {"smoothgrad": 3}  # the seeded method only
    assert other.computed["curves"] == dict.fromkeys(methods, 3)  # the curves' noise draws follow the seed
    assert not np.allclose(first.methods["grad-cam"].keep, other.methods["grad-cam"].keep)
    # the claim behind the shared key: with other seeds a deterministic method gives the same explanation
    built, _ = build_methods(methods, MethodContext(wrap_classifier(make_tiny_cnn()), image_size=SIZE))
    images = smooth_images(2)
    for name, method in built.items():
        a, b = method.attribute(images, seeds=[0, 1]), method.attribute(images, seeds=[7, 8])
        assert method.seeded == (name == "smoothgrad")
        assert torch.equal(a.relevance, b.relevance) != method.seeded, name


def write_report_text(results, out: Path) -> str:
    write_report(results, out)
    return (out / "report.md").read_text()


def test_targets_without_an_image_or_with_a_bad_class_are_refused_before_any_work(tmp_path, count_explains):
    images_dir = write_folder(tmp_path / "images", 3)
    with pytest.raises(InputError, match="no class for 2 of the 3 images"):
        make_run(images_dir, tmp_path / "out", ["random-pixel"], target={"im0.png": 1}).run()
    for bad in (-1, True, 1.5, {"im0.png": -2}, {"im0.png": "cat"}):
        with pytest.raises(ConfigError, match="target"):
            make_run(images_dir, tmp_path / "out", ["random-pixel"], target=bad)
    assert count_explains == {}


def test_the_command_line_reads_a_target_or_a_target_file(tmp_path, capsys):
    images_dir = write_folder(tmp_path / "images", 3)
    ids = sorted(p.name for p in images_dir.iterdir())
    labels = tmp_path / "labels.txt"
    labels.write_text("tench, Tinca tinca\ngoldfish\nshark\nhen\nostrich\n")
    base = ["evaluate", "--classifier", "tests.conftest:make_tiny_cnn", "--images", str(images_dir), "--size"]
    base += [str(SIZE), "--methods", "random-pixel", "--rates", "3", "--noise-draws", "1", "--lambdas", "--examples"]
    base += ["0", "--no-progress", "--device", "cpu", "--labels", str(labels)]

    def targets(out: Path, *extra: str) -> list[int]:
        assert main([*base, "--out", str(out), *extra]) == 0, capsys.readouterr().err
        return json.loads((out / "summary.json").read_text())["settings"]["evaluation"]["target"]

    assert targets(tmp_path / "a", "--target", "tench, Tinca tinca") == 0
    assert targets(tmp_path / "b", "--target", "3,goldfish,4") == dict(zip(ids, [3, 1, 4], strict=True))
    text = tmp_path / "targets.csv"
    text.write_text(f"# file,class\n{ids[0]},tench, Tinca tinca\n\nsub/{ids[1]}\t2\n{ids[2]},hen\n")
    assert targets(tmp_path / "c", "--target-file", str(text)) == dict(zip(ids, [0, 2, 3], strict=True))
    as_json = tmp_path / "targets.json"
    as_json.write_text(json.dumps({ids[0]: 4, ids[1]: "ostrich", ids[2]: "1"}))
    assert targets(tmp_path / "d", "--target-file", str(as_json)) == dict(zip(ids, [4, 4, 1], strict=True))

    refused = {
        ("--target", "1,2"): "--target gives 2 classes for 3 images",
        ("--target", "7"): "the classifier has 5 classes (0-4); the targets name 7",
        ("--target", "zebra"): "'zebra' is neither",
        ("--target-file", str(tmp_path / "none.csv")): "--target-file not found",
    }
    bad_lines = {"x.csv": (f"{ids[0]}\n", "line 1: expected NAME,CLASS"), "y.csv": (f"{ids[0]},zebra\n", "'zebra'")}
    bad_lines |= {"z.csv": (f"{ids[0]},1\n{ids[0]},2\n", "given twice"), "w.json": ("[1, 2]", "a JSON object")}
    bad_lines |= {"v.csv": (f"{ids[0]},1\n", "no class for 2 of the 3 images")}
    for name, (content, message) in bad_lines.items():
        (tmp_path / name).write_text(content)
        refused[("--target-file", str(tmp_path / name))] = message
    for extra, message in refused.items():
        assert main([*base, "--out", str(tmp_path / "refused"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
    with pytest.raises(SystemExit):  # one or the other
        main([*base, "--out", str(tmp_path / "e"), "--target", "1", "--target-file", str(text)])


def test_the_command_line_sets_the_curves_distortion_apart_from_the_optimizers(tmp_path, capsys):
    images_dir = write_folder(tmp_path / "images", 2)
    base = ["evaluate", "--classifier", "tests.conftest:make_tiny_cnn", "--images", str(images_dir), "--size"]
    base += [str(SIZE), "--methods", "random-pixel", "--rates", "3", "--noise-draws", "2", "--lambdas", "--examples"]
    base += ["0", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "out"), "--target", "1"]

    def run(*extra: str) -> tuple[dict, str]:
        assert main([*base, *extra]) == 0, capsys.readouterr().err
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        return summary, (tmp_path / "out" / "report.md").read_text()

    default, report = run()
    assert default["settings"]["evaluation"]["distortion"] == "l2" and "| distortion | `l2`" in report
    chosen, report = run("--curve-distortion", "label-l2")  # the same folder: the cache keys on the measure
    assert chosen["settings"]["evaluation"]["distortion"] == "label-l2" and "| distortion | `label-l2`" in report
    assert chosen["settings"]["optimizer"]["distortion"] == default["settings"]["optimizer"]["distortion"]
    area = chosen["methods"]["random-pixel"]["area_keep"]["mean"]
    assert area != pytest.approx(default["methods"]["random-pixel"]["area_keep"]["mean"])
    for name in ("hinge", "maximize-target"):  # unknown; not 0 for the image itself
        with pytest.raises(SystemExit):
            main([*base, "--curve-distortion", name])
    with pytest.raises(ConfigError, match="must be 0 when nothing is randomised"):
        EvaluationConfig(distortion="maximize-target").validate()


# ---- paired comparisons ----------------------------------------------------------------------------------------------
def test_the_sign_test_and_the_paired_difference():
    from amortized_cartoonx.evaluation.results import paired_difference, sign_test

    assert sign_test(0, 0) == 1.0 and sign_test(5, 5) == 1.0
    assert sign_test(0, 5) == pytest.approx(2 / 32) and sign_test(5, 0) == sign_test(0, 5)
    assert sign_test(1, 9) == pytest.approx(2 * 11 / 1024)
    lower = paired_difference([0.1, 0.2, 0.3, np.nan, 0.5], [0.2, 0.2, 0.1, 0.4, 0.6], lower_is_better=True)
    assert lower["n"] == 4 and lower["mean"] == pytest.approx((-0.1 + 0.0 + 0.2 - 0.1) / 4)
    assert (lower["better"], lower["worse"]) == (2, 1) and lower["p"] == pytest.approx(1.0)
    higher = paired_difference([0.1, 0.2, 0.3, 0.4, 0.5], [0.2, 0.2, 0.1, 0.4, 0.6], lower_is_better=False)
    assert (higher["better"], higher["worse"]) == (1, 2)
    with pytest.raises(ValueError, match="one per image"):
        paired_difference([0.1], [0.1, 0.2], True)


def test_holms_adjustment_steps_down_and_keeps_the_order():
    from amortized_cartoonx.evaluation.results import holm

    # sorted 0.01, 0.02, 0.04, 0.3 -> 4 * 0.01, 3 * 0.02, max(0.06, 2 * 0.04), max(0.08, 0.3)
    assert holm([0.04, 0.01, 0.3, 0.02]) == pytest.approx([0.08, 0.04, 0.3, 0.06])
    assert holm([0.03, 0.02]) == pytest.approx([0.04, 0.04])  # never below an earlier step's
    assert holm([0.5, 0.9, 0.7]) == [1.0, 1.0, 1.0] and holm([0.2]) == [0.2] and holm([]) == []


def test_the_report_pairs_every_method_with_cartoonx_on_the_same_images(tmp_path):
    from amortized_cartoonx.evaluation.report import paired_summary

    images_dir = write_folder(tmp_path / "images", 3)
    results = make_run(images_dir, tmp_path / "out", ["random-pixel", "cartoonx", "smoothgrad"], lambdas={}).run()
    data = write_report(results, tmp_path / "out")
    paired = data["paired"]
    assert paired["reference"] == "cartoonx" and list(paired["methods"]) == ["random-pixel", "smoothgrad"]
    areas = {n: r.areas(results.rates, 0.2) for n, r in results.methods.items()}
    for name, entry in paired["methods"].items():
        diff = areas[name]["area_keep"] - areas["cartoonx"]["area_keep"]
        assert entry["area_keep"]["mean"] == pytest.approx(diff.mean())
        assert entry["area_keep"]["better"] == int((diff < 0).sum())  # (a): lower is better
        diff_b = areas[name]["area_randomise"] - areas["cartoonx"]["area_randomise"]
        assert entry["area_randomise"]["better"] == int((diff_b > 0).sum())  # (b): higher is better
        assert entry["area_keep"]["p"] <= entry["area_keep"]["p_holm"] <= min(1.0, 2 * entry["area_keep"]["p"])
        assert entry["area_keep"]["n"] == 3 and set(entry) == {
            "area_keep",
            "area_keep_early",
            "area_randomise",
            "area_randomise_early",
        }
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Paired with CartoonX on the same images" in report and "| SmoothGrad | " in report
    alone = make_run(images_dir, tmp_path / "out", ["random-pixel", "smoothgrad"], lambdas={}).run()
    assert paired_summary(alone)["reference"] == "random-pixel"  # without cartoonx: the first method
    assert paired_summary(make_run(images_dir, tmp_path / "out", ["smoothgrad"], lambdas={}).run()) is None
    assert "## Paired" not in write_report_text(
        make_run(images_dir, tmp_path / "o", ["smoothgrad"]).run(), tmp_path / "o"
    )
