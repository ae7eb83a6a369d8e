"""The DWT representation and the coefficients type."""

from __future__ import annotations

import logging

import pytest
import torch

from amortized_cartoonx.errors import ConfigError, InputError
from amortized_cartoonx.wavelets import (
    Coefficients,
    PixelRepresentation,
    WaveletRepresentation,
    band_sizes,
    grey,
    max_levels,
)


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (64, 64), (65, 65), (100, 80), (37, 53)])
@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_exact(size, channels):
    rep = WaveletRepresentation()
    x = torch.rand(2, channels, *size, generator=torch.Generator().manual_seed(0))
    coeffs = rep.encode(x)
    assert coeffs.image_size == size
    torch.testing.assert_close(rep.decode(coeffs), x, atol=1e-5, rtol=0)


def test_paper_shapes_at_256():
    coeffs = WaveletRepresentation("db3", 5, "zero").encode(torch.zeros(1, 3, 256, 256))
    assert coeffs.levels == 5
    assert tuple(coeffs.lowpass.shape) == (1, 3, 12, 12)
    assert [d.shape[-1] for d in coeffs.details] == [130, 67, 36, 20, 12]
    assert all(d.shape[2] == 3 for d in coeffs.details)
    assert coeffs.numel_per_channel() == 69_831
    mask = coeffs.mask_like()
    assert mask.num_channels == 1 and mask.flatten().shape == (1, 69_831)


@pytest.mark.parametrize(("wave", "levels", "size"), [("db3", 3, 64), ("haar", 4, 64), ("sym4", 2, 48), ("db3", 5, 64)])
def test_shapes_follow_band_sizes(wave, levels, size):
    coeffs = WaveletRepresentation(wave, levels).encode(torch.rand(2, 3, size, size))
    expected = band_sizes(size, wave, coeffs.levels)
    assert [d.shape[-1] for d in coeffs.details] == expected
    assert coeffs.lowpass.shape[-1] == expected[-1]
    assert coeffs.levels == min(levels, max_levels(size, size, wave))


def test_levels_are_capped_for_small_images_with_a_warning(caplog):
    rep = WaveletRepresentation("db3", 5)
    with caplog.at_level(logging.WARNING, logger="amortized_cartoonx.wavelets"):
        coeffs = rep.encode(torch.rand(1, 3, 32, 32))
    assert coeffs.levels == 4  # 32 px: level 5 would be 5x5, shorter than the 6-tap db3 filter
    assert min(coeffs.lowpass.shape[-2:]) >= 6
    assert "J=4" in caplog.text
    torch.testing.assert_close(rep.decode(coeffs), rep.decode(coeffs))


def test_too_small_image_is_refused():
    with pytest.raises(InputError, match="too small"):
        WaveletRepresentation().encode(torch.rand(1, 3, 5, 5))


def test_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="unknown wavelet 'db99'"):
        WaveletRepresentation("db99")
    with pytest.raises(ConfigError, match="padding mode"):
        WaveletRepresentation(mode="wrap")


def test_flatten_round_trip_and_channel_shared_mask():
    coeffs = WaveletRepresentation("db3", 3).encode(torch.rand(2, 3, 40, 40))
    flat = coeffs.flatten()
    assert flat.shape == (2, 3 * coeffs.numel_per_channel())
    back = coeffs.unflatten(flat)
    for a, b in zip(back.bands, coeffs.bands):
        assert torch.equal(a, b)
    mask = coeffs.mask_like(0.5)
    masked = coeffs * mask
    for a, b in zip(masked.bands, coeffs.bands):
        torch.testing.assert_close(a, 0.5 * b)
    assert torch.allclose(mask.mean_per_image(), torch.full((2,), 0.5))
    # a flat mask vector unflattens against colour coefficients with one channel
    assert coeffs.unflatten(mask.flatten()).num_channels == 1
    with pytest.raises(InputError):
        coeffs.unflatten(torch.zeros(2, 7))


def test_select_and_cat():
    coeffs = WaveletRepresentation("db3", 2).encode(torch.rand(3, 3, 32, 32))
    parts = [coeffs.select(i) for i in range(3)]
    assert parts[0].num_images == 1
    joined = Coefficients.cat(parts)
    assert torch.equal(joined.flatten(), coeffs.flatten())


def test_pixel_representation_is_the_identity():
    x = torch.rand(2, 3, 20, 30)
    rep = PixelRepresentation()
    coeffs = rep.encode(x)
    assert coeffs.levels == 0 and coeffs.mask_like().lowpass.shape == (2, 1, 20, 30)
    assert torch.equal(rep.decode(coeffs), x)


def test_grey_is_the_channel_mean():
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(grey(x), x.mean(1, keepdim=True))


@pytest.mark.parametrize("mode", ["zero", "symmetric", "reflect", "periodization"])
@pytest.mark.parametrize(("wave", "size"), [("db3", (64, 64)), ("haar", (33, 47)), ("sym4", (96, 80))])
def test_decode_matches_pytorch_wavelets_inverse(mode, wave, size):
    from pytorch_wavelets import DWTInverse

    rep = WaveletRepresentation(wave, 3, mode)
    coeffs = rep.encode(torch.rand(2, 3, *size)).map(lambda b: b + 0.1 * torch.randn_like(b))  # not a DWT image
    reference = DWTInverse(wave=wave, mode=mode)((coeffs.lowpass, list(coeffs.details)))[..., : size[0], : size[1]]
    torch.testing.assert_close(rep.decode(coeffs), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wave", ["db3", "haar", "sym4", "bior2.2"])
@pytest.mark.parametrize("size", [(9, 9), (16, 13)])
def test_polyphase_synthesis_equals_the_strided_transposed_convolution(wave, size):
    from amortized_cartoonx.wavelets import paired_kernels, polyphase_kernels, synthesis_step

    kernels = WaveletRepresentation(wave, 1).synthesis_kernels.double()  # (4, 1, L, L)
    length = kernels.shape[-1]
    bands = torch.randn(5, 4, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.conv_transpose2d(bands, kernels, stride=2, padding=length - 2)
    phases = polyphase_kernels(kernels)
    got = synthesis_step(bands, phases)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # two maps per convolution (the CPU path): the same for an even batch, and an odd one falls back
    pairs = paired_kernels(phases)
    torch.testing.assert_close(synthesis_step(bands[:2], phases, pairs), expected[:2], rtol=0, atol=1e-12)
    torch.testing.assert_close(synthesis_step(bands, phases, pairs), expected, rtol=0, atol=1e-12)
    # the input gradient (a forward convolution on the CPU, see valid_conv2d) equals the transposed convolution's
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaf = bands.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(
        torch.nn.functional.conv_transpose2d(leaf, kernels, stride=2, padding=length - 2), leaf, grad
    )
    for batch, with_pairs in ((3, None), (2, pairs), (3, pairs), (4, pairs), (5, pairs)):  # 4: two pairs at once
        leaf = bands[:batch].clone().requires_grad_(True)
        (got_grad,) = torch.autograd.grad(synthesis_step(leaf, phases, with_pairs), leaf, grad[:batch])
        torch.testing.assert_close(got_grad, reference[:batch], rtol=0, atol=1e-12)


@pytest.mark.parametrize("large", [False, True])  # True: every forward input counts as large (16 channels)
@pytest.mark.parametrize("batch, out_channels", [(3, 5), (4, 8), (3, 8)])  # (4, 8): two maps per pass
def test_valid_conv2d_has_conv2d_s_values_and_input_gradient(batch, out_channels, large, monkeypatch):
    from amortized_cartoonx import wavelets
    from amortized_cartoonx.wavelets import valid_conv2d

    if large:
        monkeypatch.setattr(wavelets, "QUAD_FORWARD_MIN_NUMEL", 0)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 8, 11, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(out_channels, 8, 3, 2, dtype=torch.float64, generator=gen)  # not square, not symmetric
    y = valid_conv2d(x, weight)
    expected = torch.nn.functional.conv2d(x, weight)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    (got,) = torch.autograd.grad(y, x, grad)
    (ref,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: valid_conv2d(t, weight), (x[:1, :, :5, :4].detach().requires_grad_(),))


def test_interleaved_phases_equal_pixel_shuffle_forward_and_backward():
    from amortized_cartoonx.wavelets import interleave_phases

    z = torch.randn(5, 4, 7, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ref = z.detach().clone().requires_grad_(True)
    grad = torch.randn(5, 1, 14, 12, generator=torch.Generator().manual_seed(1))
    got, expected = interleave_phases(z), torch.nn.functional.pixel_shuffle(ref, 2)
    assert torch.equal(got, expected)
    got.backward(grad)
    expected.backward(grad)
    assert torch.equal(z.grad, ref.grad)
