"""The fused autograd functions equal the plain torch expressions they replace, in values and gradients."""

from __future__ import annotations

import pytest
import torch

from amortized_cartoonx.fused_ops import clamp_unit, interleave_unit_clamp, mix, mix_into_bands
from amortized_cartoonx.rde import band_statistics, gaussian_adaptive_noise, make_generators, obfuscate
from amortized_cartoonx.wavelets import PixelRepresentation, WaveletRepresentation, interleave_phases


def _noise_view(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A non-contiguous ``shape`` view (a slice of a wider buffer), as the noise sampler hands out."""
    wide = torch.randn(*shape[:2], 2 * int(torch.tensor(shape[2:]).prod()), dtype=torch.float64, generator=generator)
    return wide[..., : wide.shape[-1] // 2].reshape(shape)


@pytest.mark.parametrize("mask_channels", [1, 3])
def test_mix_equals_the_plain_expression_and_its_mask_gradient(mask_channels):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 3, 5, 4, dtype=torch.float64, generator=gen)
    v = _noise_view((2, 4, 3, 3, 5, 4), gen)
    assert not v.is_contiguous()
    s = torch.rand(2, mask_channels, 3, 5, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    s_ref = s.detach().clone().requires_grad_(True)
    g = torch.randn(2, 4, 3, 3, 5, 4, dtype=torch.float64, generator=gen)

    y = mix(s, h, v)
    expected = v + s_ref.unsqueeze(1) * (h.unsqueeze(1) - v)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    assert y.is_contiguous()  # flatten(0, 1) stays a view
    (y * g).sum().backward()
    (expected * g).sum().backward()
    assert s.grad.shape == s.shape
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=0, atol=1e-12)


def test_mix_passes_gradients_to_the_coefficients_when_they_need_them():
    h = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 2, 6, dtype=torch.float64)
    s = torch.rand(1, 1, 6, dtype=torch.float64, requires_grad=True)
    mix(s, h, v).sum().backward()
    torch.testing.assert_close(h.grad, s.detach().expand(1, 2, 6) * 3)
    assert s.grad is not None


def test_interleave_unit_clamp_equals_clamp_of_the_interleave():
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(6, 4, 5, 7, dtype=torch.float64, generator=gen) * 0.8 + 0.5).requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    y = interleave_unit_clamp(z)
    expected = clamp_unit(interleave_phases(z_ref))
    assert torch.equal(y, expected)
    assert 0 < float((expected == 0).double().mean()) < 0.5  # both clamp edges are exercised
    assert float((expected == 1).double().mean()) > 0
    g = torch.randn(6, 1, 14, 10, dtype=torch.float64, generator=gen).transpose(-1, -2)  # a non-contiguous gradient
    y.backward(g)
    expected.backward(g)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(64, 64), (63, 50)])  # fused finest level; a crop between it and the clamp
def test_decode_with_unit_clamp_equals_the_clamped_decode(size):
    rep = WaveletRepresentation("db3", 3)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, *size, dtype=torch.float64, generator=gen)
    coeffs = rep.encode(x).map(lambda b: (b * 1.3).requires_grad_(True))  # pushes pixels past 0 and 1
    plain = clamp_unit(rep.decode(coeffs))
    fused = rep.decode(coeffs, unit_clamp=True)
    assert torch.equal(fused, plain)
    assert float((plain == 1).double().mean()) > 0
    g = torch.randn(plain.shape, dtype=torch.float64, generator=gen)
    fused_grads = torch.autograd.grad(fused, coeffs.bands, g)
    plain_grads = torch.autograd.grad(plain, coeffs.bands, g)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_obfuscate_equals_the_rde_formula_with_its_mask_gradient():
    rep = WaveletRepresentation("db3", 3)
    gen = torch.Generator().manual_seed(3)
    coeffs = rep.encode(torch.rand(2, 3, 48, 48, dtype=torch.float64, generator=gen))
    noise = gaussian_adaptive_noise(coeffs, band_statistics(coeffs), 4, make_generators([0, 1], "cpu"))
    mask = coeffs.mask_like().map(lambda b: torch.rand(b.shape, dtype=b.dtype, generator=gen).requires_grad_(True))
    mask_ref = mask.map(lambda b: b.detach().clone().requires_grad_(True))

    y = obfuscate(rep, coeffs, mask, noise)  # the CPU's fused path
    mixed = [
        (v + s.unsqueeze(1) * (h.unsqueeze(1) - v)).flatten(0, 1)
        for h, s, v in zip(coeffs.bands, mask_ref.bands, noise.bands)
    ]
    expected = rep.decode(coeffs.with_bands(mixed)).clamp(0.0, 1.0)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(y, mask.bands, g), torch.autograd.grad(expected, mask_ref.bands, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("coefficients_need_grad", [False, True])  # the fused function; the plain fallback
def test_mix_into_bands_equals_the_low_pass_beside_the_mixed_details(coefficients_need_grad):
    gen = torch.Generator().manual_seed(4)
    n, samples, channels = 2, 3, 3
    h = torch.randn(n, channels, 3, 5, 4, dtype=torch.float64, generator=gen).requires_grad_(coefficients_need_grad)
    v = _noise_view((n, samples, channels, 3, 5, 4), gen)
    s = torch.rand(n, 1, 3, 5, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    wide = torch.randn(n * samples, channels, 6, 5, dtype=torch.float64, generator=gen).requires_grad_(True)
    x = wide[..., :5, :4]  # cropped, as an odd level's low-pass is: not contiguous
    s_ref, wide_ref = s.detach().clone().requires_grad_(True), wide.detach().clone().requires_grad_(True)

    bands = mix_into_bands(x, s, h, v)
    details = (v + s_ref.unsqueeze(1) * (h.detach().unsqueeze(1) - v)).flatten(0, 1)  # (N*L, C, 3, H, W)
    expected = torch.cat([wide_ref[..., :5, :4].unsqueeze(2), details], dim=2).reshape(-1, 4, 5, 4)
    torch.testing.assert_close(bands, expected, rtol=0, atol=1e-12)
    g = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    (bands * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(wide.grad, wide_ref.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "representation",
    [WaveletRepresentation("db3", 3), WaveletRepresentation("haar", 2, "periodization"), PixelRepresentation()],
    ids=["zero", "periodization", "pixel"],
)
def test_decode_mixed_equals_decoding_the_mixed_coefficients(representation):
    gen = torch.Generator().manual_seed(5)
    coeffs = representation.encode(torch.rand(2, 3, 33, 32, dtype=torch.float64, generator=gen))
    noise = gaussian_adaptive_noise(coeffs, band_statistics(coeffs), 3, make_generators([0, 1], "cpu"))
    mask = coeffs.mask_like().map(lambda b: torch.rand(b.shape, dtype=b.dtype, generator=gen).requires_grad_(True))
    mask_ref = mask.map(lambda b: b.detach().clone().requires_grad_(True))

    got = representation.decode_mixed(coeffs, mask, noise, unit_clamp=True)
    mixed = [
        (v + s.unsqueeze(1) * (h.unsqueeze(1) - v)).flatten(0, 1)
        for h, s, v in zip(coeffs.bands, mask_ref.bands, noise.bands)
    ]
    expected = clamp_unit(representation.decode(coeffs.with_bands(mixed)))
    assert got.shape == (6, 3, 33, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    g = torch.randn(got.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(got, mask.bands, g), torch.autograd.grad(expected, mask_ref.bands, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_a_representation_with_the_older_decode_signature_still_obfuscates():
    class OldStyle(PixelRepresentation):  # decode(coeffs) without unit_clamp, as a user's subclass may have it
        def decode(self, coeffs):
            return coeffs.lowpass * 2.0

    rep = OldStyle()
    coeffs = rep.encode(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(6)))
    noise = gaussian_adaptive_noise(coeffs, band_statistics(coeffs), 2, make_generators([0], "cpu"))
    mask = coeffs.mask_like(0.5)
    expected = ((0.5 * coeffs.lowpass.unsqueeze(1) + 0.5 * noise.lowpass).flatten(0, 1) * 2.0).clamp(0.0, 1.0)
    torch.testing.assert_close(obfuscate(rep, coeffs, mask, noise), expected)


def test_off_the_cpu_the_mixing_takes_the_plain_expression():
    h = torch.randn(1, 3, 4, device="meta")
    v = torch.randn(1, 2, 3, 4, device="meta")
    s = torch.rand(1, 1, 4, device="meta", requires_grad=True)
    y = mix(s, h, v)
    assert y.shape == (1, 2, 3, 4)
    assert "_Mix" not in type(y.grad_fn).__name__  # autograd's ops (as measured on GPUs), not the CPU's fused form
    s_cpu = torch.rand(1, 1, 4, requires_grad=True)
    assert "_Mix" in type(mix(s_cpu, torch.randn(1, 3, 4), torch.randn(1, 2, 3, 4)).grad_fn).__name__
