"""The fused autograd functions equal the plain torch expressions they replace, in values and gradients."""

from __future__ import annotations

import pytest
import torch

from amortized_cartoonx.fused_ops import clamp_unit, interleave_unit_clamp, mix
from amortized_cartoonx.rde import band_statistics, gaussian_adaptive_noise, make_generators, obfuscate
from amortized_cartoonx.wavelets import WaveletRepresentation, interleave_phases


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
