"""Noise, obfuscation, distortions and the RDE loss."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from amortized_cartoonx.classifiers import wrap_classifier
from amortized_cartoonx.errors import ConfigError, InputError
from amortized_cartoonx.rde import (
    DISTORTIONS,
    OBFUSCATIONS,
    RDEObjective,
    band_statistics,
    clamp_unit,
    make_generators,
    obfuscate,
    rde_loss,
    target_prob,
)
from amortized_cartoonx.wavelets import PixelRepresentation, WaveletRepresentation


def test_band_statistics_pool_orientations_and_channels():
    coeffs = WaveletRepresentation("db3", 3).encode(torch.rand(2, 3, 48, 48))
    stats = band_statistics(coeffs)
    assert stats.mean.shape == (2, 4) and stats.std.shape == (2, 4)
    for n in range(2):
        for g, band in enumerate(coeffs.bands):
            torch.testing.assert_close(stats.mean[n, g], band[n].mean())
            torch.testing.assert_close(stats.std[n, g], band[n].std())  # unbiased, as torch.std


def test_pixel_statistics_are_global():
    x = torch.rand(2, 3, 16, 16)
    stats = band_statistics(PixelRepresentation().encode(x))
    torch.testing.assert_close(stats.mean[:, 0], x.flatten(1).mean(1))
    torch.testing.assert_close(stats.std[:, 0], x.flatten(1).std(1))


def test_adaptive_noise_has_the_band_statistics():
    coeffs = WaveletRepresentation("db3", 2).encode(torch.rand(2, 3, 40, 40))
    stats = band_statistics(coeffs)
    noise = OBFUSCATIONS.get("gaussian-adaptive")(coeffs, stats, 400, make_generators([0, 1], "cpu"))
    for g, band in enumerate(noise.bands):
        assert band.shape == (2, 400, *coeffs.bands[g].shape[1:])
        flat = band.flatten(1)
        torch.testing.assert_close(flat.mean(1), stats.mean[:, g], atol=0.02 * stats.std[:, g].max().item(), rtol=0)
        torch.testing.assert_close(flat.std(1), stats.std[:, g], rtol=0.02, atol=1e-6)


def test_uniform_and_zero_noise():
    coeffs = WaveletRepresentation("db3", 2).encode(torch.rand(1, 3, 40, 40))
    stats = band_statistics(coeffs)
    gens = make_generators([3], "cpu")
    uni = OBFUSCATIONS.get("uniform")(coeffs, stats, 50, gens)
    for g, band in enumerate(uni.bands):
        assert band.min() >= stats.mean[0, g] - stats.std[0, g] - 1e-6
        assert band.max() <= stats.mean[0, g] + stats.std[0, g] + 1e-6
    zero = OBFUSCATIONS.get("zero")(coeffs, stats, 5, gens)
    assert all(torch.count_nonzero(b) == 0 for b in zero.bands)


def test_noise_of_an_image_depends_on_its_seed_only():
    rep = WaveletRepresentation("db3", 2)
    x = torch.rand(3, 3, 40, 40)
    sample = OBFUSCATIONS.get("gaussian-adaptive")
    batch = rep.encode(x)
    together = sample(batch, band_statistics(batch), 4, make_generators([10, 11, 12], "cpu"))
    alone_coeffs = batch.select(1)
    alone = sample(alone_coeffs, band_statistics(alone_coeffs), 4, make_generators([11], "cpu"))
    for a, b in zip(together.bands, alone.bands):
        torch.testing.assert_close(a[1:2], b)


def test_large_cpu_draws_come_in_lanes_that_do_not_depend_on_the_thread_count():
    """A large CPU draw is split into parts with their own generators, drawn on threads: the same numbers on one
    thread and on two, image n's from its seed alone, and standard normal in every part."""
    from amortized_cartoonx.rde import LANE_MIN_NUMEL, NOISE_LANES, _standard_draws
    from amortized_cartoonx.runtime import torch_threads

    batch = WaveletRepresentation("db3", 2).encode(torch.rand(3, 3, 64, 64))
    samples = LANE_MIN_NUMEL // batch.numel_per_channel() // 3 + 8  # a row of more than LANE_MIN_NUMEL numbers
    with torch_threads(1):
        one = _standard_draws(batch, samples, make_generators([10, 11, 12], "cpu"), "normal")
    with torch_threads(2):
        two = _standard_draws(batch, samples, make_generators([10, 11, 12], "cpu"), "normal")
        alone = _standard_draws(batch.select(1), samples, make_generators([11], "cpu"), "normal")
    for a, b, c in zip(one, two, alone):
        assert torch.equal(a, b)
        assert torch.equal(a[1:2], c)
    flat = torch.cat([b[0].flatten(1) for b in one], 1).flatten()  # image 0's row (L, bands...), in drawing order
    assert flat.numel() >= LANE_MIN_NUMEL
    parts = torch.tensor_split(flat, NOISE_LANES)
    for part in parts:
        assert abs(float(part.mean())) < 0.02 and abs(float(part.std()) - 1) < 0.02
    gen = torch.Generator().manual_seed(10)  # the second lane's generator is seeded from the image's own
    second = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    assert torch.equal(parts[1], torch.empty_like(parts[1]).normal_(generator=second))
    small = _standard_draws(batch, 1, make_generators([10, 11, 12], "cpu"), "normal")  # below the lane size
    reference = torch.empty(3 * batch.numel_per_channel()).normal_(generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(torch.cat([b[0].flatten() for b in small]), reference, rtol=0, atol=0)


def test_a_full_mask_reproduces_the_image():
    rep = WaveletRepresentation("db3", 3)
    x = torch.rand(2, 3, 48, 48)
    coeffs = rep.encode(x)
    noise = OBFUSCATIONS.get("gaussian-adaptive")(coeffs, band_statistics(coeffs), 3, make_generators([0, 1], "cpu"))
    y = obfuscate(rep, coeffs, coeffs.mask_like(1.0), noise)
    assert y.shape == (6, 3, 48, 48)
    torch.testing.assert_close(y, x.repeat_interleave(3, 0), atol=1e-5, rtol=0)
    empty = obfuscate(rep, coeffs, coeffs.mask_like(0.0), noise)
    assert empty.min() >= 0 and empty.max() <= 1  # clamped
    assert not torch.allclose(empty, x.repeat_interleave(3, 0), atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_clamp_has_the_values_of_clamp_and_passes_the_gradient_strictly_inside(dtype):
    x = torch.tensor([-0.5, -0.0, 0.0, 1e-30, 0.25, 1.0 - 1e-6, 1.0, 1.5], dtype=dtype, requires_grad=True)
    y = clamp_unit(x)
    assert torch.equal(y, x.detach().clamp(0.0, 1.0))
    y.backward(torch.arange(1.0, 9.0, dtype=dtype))
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 0.0, 0.0]
    assert not clamp_unit(x.detach()).requires_grad


@pytest.mark.parametrize("name", ["label", "l2", "kl"])
def test_distortion_is_zero_when_the_obfuscation_equals_the_input(name):
    logits_x = torch.randn(4, 7)
    logits_y = logits_x[:, None].expand(4, 3, 7)
    d = DISTORTIONS.get(name)(logits_x, logits_y, logits_x.argmax(1))
    assert d.shape == (4, 3)
    torch.testing.assert_close(d, torch.zeros(4, 3), atol=1e-6, rtol=0)


def test_maximize_target_is_zero_when_the_input_is_certain_and_positive_otherwise():
    certain = torch.tensor([[50.0, 0.0, 0.0]])
    d = DISTORTIONS.get("maximize-target")(certain, certain[:, None], torch.tensor([0]))
    torch.testing.assert_close(d, torch.zeros(1, 1), atol=1e-6, rtol=0)
    unsure = torch.tensor([[1.0, 0.5, 0.0]])
    d = DISTORTIONS.get("maximize-target")(unsure, unsure[:, None], torch.tensor([0]))
    expected = (1 - unsure.softmax(-1)[0, 0]) ** 2
    torch.testing.assert_close(d[0, 0], expected)


def test_distortion_values():
    logits_x = torch.tensor([[2.0, 0.0, -1.0]])
    logits_y = torch.tensor([[[0.0, 1.0, 0.0]]])
    px, py = logits_x.softmax(-1), logits_y.softmax(-1)[:, 0]
    target = torch.tensor([0])
    torch.testing.assert_close(DISTORTIONS.get("label")(logits_x, logits_y, target)[0, 0], (px[0, 0] - py[0, 0]) ** 2)
    torch.testing.assert_close(DISTORTIONS.get("l2")(logits_x, logits_y, target)[0, 0], (px - py).norm())
    kl = (py * (py.log() - px.log())).sum()
    torch.testing.assert_close(DISTORTIONS.get("kl")(logits_x, logits_y, target)[0, 0], kl)
    # kl stays finite where softmax underflows
    extreme = DISTORTIONS.get("kl")(torch.tensor([[500.0, -500.0]]), torch.tensor([[[-500.0, 500.0]]]), target)
    assert torch.isfinite(extreme).all()


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="choose from: label, maximize-target, l2, label-l2, kl"):
        DISTORTIONS.get("l3")
    with pytest.raises(ConfigError, match="unknown obfuscation"):
        RDEObjective(lambda x: x, PixelRepresentation(), obfuscation="blur")


def test_rde_loss_is_mean_distortion_plus_lambda_mean_mask():
    coeffs = WaveletRepresentation("db3", 2).encode(torch.rand(2, 3, 32, 32))
    mask = coeffs.mask_like(0.25)
    distortion = torch.tensor([[0.1, 0.3], [0.0, 0.2]])
    loss = rde_loss(distortion, mask, 20.0)
    torch.testing.assert_close(loss.distortion, torch.tensor([0.2, 0.1]))
    torch.testing.assert_close(loss.sparsity, torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(loss.total, torch.tensor([0.2 + 5.0, 0.1 + 5.0]))


def test_objective_prepare_checks_inputs(tiny_cnn, images):
    objective = RDEObjective(wrap_classifier(tiny_cnn), WaveletRepresentation("db3", 3))
    problem = objective.prepare(images)
    assert torch.equal(problem.target, tiny_cnn(images).argmax(1))
    torch.testing.assert_close(problem.prob_original(), target_prob(problem.logits, problem.target))
    assert objective.prepare(images, target=2).target.tolist() == [2, 2, 2]
    with pytest.raises(InputError, match="out of range"):
        objective.prepare(images, target=[0, 1, 9])
    with pytest.raises(InputError, match="2 targets for 3 images"):
        objective.prepare(images, target=[0, 1])
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        objective.prepare(bad)
    with pytest.raises(InputError, match="shape"):
        objective.prepare(images[0])


def test_objective_refuses_a_classifier_without_2d_logits(images):
    from amortized_cartoonx.errors import ClassifierError

    class Spatial(nn.Module):
        def forward(self, x):
            return x.mean(1)  # (N, H, W)

    objective = RDEObjective(Spatial(), PixelRepresentation())
    with pytest.raises(ClassifierError, match=r"expected logits of shape \(N, classes\)"):
        objective.prepare(images)


def test_careless_tensors_get_a_clear_error_or_a_warning(tiny_cnn, images):
    """8-bit pixels, float targets, a classifier that fails on the images, normalised images, probabilities."""
    from amortized_cartoonx.errors import ClassifierError

    objective = RDEObjective(tiny_cnn, WaveletRepresentation("db3", 3))
    with pytest.raises(InputError, match=r"floating point in \[0, 1\], got torch.uint8 \(images.float\(\) / 255"):
        objective.prepare((images * 255).to(torch.uint8))
    with pytest.raises(InputError, match="class indices"):
        objective.prepare(images, target=torch.tensor([0.0, 1.5, 2.0]))
    with pytest.raises(InputError, match="class indices"):
        objective.prepare(images, target=True)
    assert objective.prepare(images, target=torch.tensor([0.0, 1.0, 2.0])).target.tolist() == [0, 1, 2]
    with pytest.raises(ClassifierError, match=r"TinyCNN failed on images of shape \(3, 1, 48, 48\).*channels"):
        objective.prepare(images[:, :1])
    with pytest.warns(UserWarning, match=r"images range over \[-2.*not \[0, 1\].*normalise them"):
        objective.prepare((images - 0.5) / 0.2)
    probabilities = RDEObjective(nn.Sequential(tiny_cnn, nn.Softmax(-1)), WaveletRepresentation("db3", 3))
    with pytest.warns(UserWarning, match="seems to return probabilities"):
        probabilities.prepare(images)
    # a bf16 softmax's rows miss 1 by more than 1e-3 (it was not warned about)
    from amortized_cartoonx.rde import _look_like_probabilities

    rows = torch.softmax(torch.randn(64, 7, generator=torch.Generator().manual_seed(0)), -1).bfloat16()
    assert float((rows.float().sum(1) - 1).abs().max()) > 1e-3 and _look_like_probabilities(rows)
    assert not _look_like_probabilities(torch.randn(64, 7, generator=torch.Generator().manual_seed(0)).bfloat16())
    log_probabilities = RDEObjective(nn.Sequential(tiny_cnn, nn.LogSoftmax(-1)), WaveletRepresentation("db3", 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # log-probabilities are logits up to a constant: no warning
        log_probabilities.prepare(images)
        objective.prepare(images.clamp(0.0005, 0.9995))


def test_meta_images_and_targets_that_are_no_numbers_get_an_input_error(tiny_cnn, images):
    """Meta tensors failed in torch's isfinite ("Tensor.item() cannot be called on meta tensors"), a string or
    ragged target in torch.as_tensor."""
    objective = RDEObjective(tiny_cnn, WaveletRepresentation("db3", 3))
    with pytest.raises(InputError, match="images are on the meta device"):
        objective.prepare(images.to("meta"))
    for target in ("1", [0, [1, 2], 3], [0, None, 1]):
        with pytest.raises(InputError, match="target must be class indices"):
            objective.prepare(images, target=target)


def test_a_classifier_that_edits_its_input_in_place_leaves_the_images_alone(tiny_cnn, images):
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn

        def forward(self, x):
            return self.net(x.sub_(0.5))

    before = images.clone()
    problem = RDEObjective(InPlace(), WaveletRepresentation("db3", 3)).prepare(images)
    assert torch.equal(images, before) and torch.equal(problem.images, before)
    torch.testing.assert_close(problem.logits, tiny_cnn(before - 0.5))


def test_a_classifier_without_an_input_gradient_is_named(tiny_cnn, images):
    """A forward under torch.no_grad would leave the optimizer without a gradient (and training with the
    sparsity term alone): refused on the first obfuscation."""
    from amortized_cartoonx.errors import ClassifierError

    class Detached(nn.Module):
        def forward(self, x):
            return tiny_cnn(x).detach()

    objective = RDEObjective(Detached(), WaveletRepresentation("db3", 3))
    problem = objective.prepare(images)  # no gradient needed here
    mask = problem.coeffs.mask_like(0.5, requires_grad=True)
    noise = objective.sample_noise(problem, 2, make_generators([0, 1, 2], "cpu"))
    with pytest.raises(ClassifierError, match="without a gradient to its input"):
        objective.loss(problem, mask, noise)
    with torch.no_grad():  # measuring a mask needs no gradient
        objective.loss(problem, mask.map(lambda b: b.detach()), noise)


@pytest.mark.parametrize("image_dtype, model_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float16)])
def test_images_reach_the_classifier_in_its_own_dtype(tiny_cnn, images, image_dtype, model_dtype):
    """float64 images (numpy's default) and a float16 model: the input is cast to the model's dtype."""
    model = copy.deepcopy(tiny_cnn).to(model_dtype)
    objective = RDEObjective(model, WaveletRepresentation("db3", 3))
    problem = objective.prepare(images.to(image_dtype))
    assert problem.logits.dtype == torch.float32 and problem.coeffs.lowpass.dtype == image_dtype
    expected = tiny_cnn(images).argmax(1)
    assert torch.equal(problem.target, expected) or model_dtype == torch.float16  # fp16 may flip a near tie
    assert next(model.parameters()).dtype == model_dtype  # the caller's model is left as it was


def test_representation_noise_mixing_and_decoding_run_in_float32_under_autocast(tiny_cnn, images):
    """bf16-mixed training turns autocast on: the DWT, the noise, the mixing and the IDWT must not follow it."""
    objective = RDEObjective(wrap_classifier(tiny_cnn), WaveletRepresentation("db3", 3))
    target = torch.zeros(images.shape[0], dtype=torch.long)
    gen = torch.Generator().manual_seed(1)

    def prepare():
        problem = objective.prepare(images, target)
        return problem, objective.sample_noise(problem, 4, make_generators([3, 4, 5], "cpu"))

    problem, noise = prepare()
    # a network's mask under autocast comes out in bf16: the reference mixes the same (rounded) values in float32
    mask16 = problem.coeffs.mask_like().map(lambda b: torch.rand(b.shape, generator=gen).bfloat16().requires_grad_())
    mask = mask16.map(lambda b: b.detach().float())
    reference = obfuscate(objective.representation, problem.coeffs, mask, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert objective.representation.encode(images).lowpass.dtype == torch.bfloat16  # autocast is really on
        problem_ac, noise_ac = prepare()
        mixed = obfuscate(objective.representation, problem_ac.coeffs, mask16, noise_ac)
        loss = objective.loss(problem_ac, mask16, noise_ac)
        masked = objective.masked_target_prob(problem_ac, mask16)
    for ours, theirs in zip(problem_ac.coeffs.bands + noise_ac.bands, problem.coeffs.bands + noise.bands):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert problem_ac.logits.dtype == torch.float32  # the classifier itself ran in bf16
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=0, atol=1e-6)
    assert loss.total.dtype == loss.distortion.dtype == loss.sparsity.dtype == torch.float32
    torch.testing.assert_close(loss.sparsity, mask.mean_per_image(), rtol=0, atol=1e-6)
    assert masked.dtype == torch.float32
    loss.total.sum().backward()  # the gradient reaches the bf16 mask through the float32 mixing
    assert all(b.grad is not None and b.grad.dtype == torch.bfloat16 for b in mask16.bands)
