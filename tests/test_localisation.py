"""Wavelet-aware localisation: the coefficient footprint, the outline band, the detail metrics on constructed masks."""

from __future__ import annotations

import pytest
import torch

from amortized_cartoonx.evaluation.attribution import ATTRIBUTION, MASK, EvaluationMethod
from amortized_cartoonx.evaluation.details import DetailFootprint, DetailMaps
from amortized_cartoonx.evaluation.localisation import chance_levels, localisation_metrics
from amortized_cartoonx.evaluation.maps import pixel_relevance
from amortized_cartoonx.ground_truth import area_share, outline_band, region_share
from amortized_cartoonx.wavelets import Coefficients, PixelRepresentation, WaveletRepresentation

SIZE = 64


class Method(EvaluationMethod):
    """A stand-in for an evaluated method: only its kind and representation matter to the maps."""

    def __init__(self, kind: str, representation) -> None:
        self.name = kind
        self.kind = kind
        self.representation = representation


def cartoon() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A noise-free cartoon: a disc with a 2-px dark outline (the decisive object) and an outline-less square
    (a distractor) on a linear colour gradient. Returns image ``(1, 3, S, S)``, object, outline pixels and
    distractor ``(1, S, S)``."""
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    image = torch.stack([0.3 + 0.4 * xs / SIZE, 0.5 + 0.2 * ys / SIZE, 0.6 - 0.3 * xs / SIZE])
    radius = ((xs - 24) ** 2 + (ys - 30) ** 2).sqrt()
    obj = radius <= 11
    ring = obj & (radius > 9)
    distractor = (xs > 44) & (xs < 56) & (ys > 8) & (ys < 20)
    image[:, obj] = torch.tensor([0.9, 0.7, 0.2])[:, None]
    image[:, ring] = 0.05
    image[:, distractor] = torch.tensor([0.2, 0.8, 0.4])[:, None]
    return image[None], obj[None], ring[None], distractor[None]


def level_mask(coeffs: Coefficients, levels: set[int], lowpass: float = 0.0, where: Coefficients | None = None):
    """A wavelet mask ``(1, K)``: 1 on the detail levels ``levels`` (where ``where`` is non-zero, if given)."""
    bands = [torch.full((1, 1, *coeffs.lowpass.shape[2:]), lowpass)]
    for j, band in enumerate(coeffs.details, start=1):
        keep = torch.zeros(1, 1, *band.shape[2:])
        if j in levels:
            keep = torch.ones_like(keep) if where is None else (where.details[j - 1].abs() > 1e-4).float()
        bands.append(keep)
    return coeffs.mask_like(0.0).with_bands(bands).flatten()


def metrics_of(method, image, relevance, obj, distractor):
    maps = DetailMaps(WaveletRepresentation())
    detail = maps(method, image, relevance)
    return localisation_metrics(pixel_relevance(method, image, relevance), obj, distractor, detail)


# ---- the footprint ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, levels, mode", [(32, 3, "zero"), (40, 4, "symmetric")])
def test_the_footprint_is_each_basis_function_s_energy_exactly(size, levels, mode):
    """M = sum_k w_k psi_k^2, against the brute force (one inverse DWT per coefficient)."""
    wavelet = WaveletRepresentation("db3", levels, mode)
    coeffs = wavelet.encode(torch.rand(1, 1, size, size))
    gen = torch.Generator().manual_seed(0)
    zero = coeffs.map(torch.zeros_like)
    weights = zero.with_bands([zero.lowpass, *(torch.rand(b.shape, generator=gen) for b in zero.details)])
    expected = torch.zeros(size, size)
    for j, band in enumerate(weights.details):
        for o, p, q in torch.cartesian_prod(*(torch.arange(n) for n in band.shape[2:])).tolist():
            unit = zero.clone()
            unit.details[j][0, 0, o, p, q] = 1.0
            expected += band[0, 0, o, p, q] * wavelet.decode(unit)[0, 0] ** 2
    torch.testing.assert_close(DetailFootprint(wavelet)(weights)[0], expected, atol=1e-5, rtol=1e-5)


def test_an_interior_coefficient_spreads_exactly_its_weight():
    wavelet = WaveletRepresentation()
    zero = wavelet.encode(torch.zeros(1, 1, SIZE, SIZE))
    for level, position in ((1, 16), (2, 9), (3, 6)):
        unit = zero.clone()
        unit.details[level - 1][0, 0, 1, position, position] = 2.5
        spread = DetailFootprint(wavelet)(unit)
        assert float(spread.sum()) == pytest.approx(2.5, rel=1e-5)  # orthonormal: ||psi_k||^2 = 1
        assert bool((spread >= 0).all())


# ---- the outline band ----------------------------------------------------------------------------------------------
def test_outline_band_is_a_dilation_minus_an_erosion():
    obj = torch.zeros(32, 32, dtype=torch.bool)
    obj[10:20, 10:20] = True
    band = outline_band(obj, 2)
    assert band[8, 15] and band[11, 15] and not band[7, 15] and not band[12, 15] and not band[15, 15]
    assert band[15, 21] and not band[15, 22]
    assert region_share(band.float()[None], band).item() == 1.0
    assert area_share(band).item() == pytest.approx(band.float().mean().item())
    corner = torch.zeros(32, 32, dtype=torch.bool)
    corner[:8, :8] = True  # cut by the image border: the border is not a boundary
    assert not outline_band(corner, 2)[0, 3] and outline_band(corner, 2)[9, 3]
    assert not outline_band(torch.zeros(32, 32, dtype=torch.bool), 2).any()


# ---- the metrics on constructed explanations -------------------------------------------------------------------
def test_a_mask_keeping_only_the_object_s_fine_coefficients_scores_about_1_on_the_outline():
    image, obj, _, distractor = cartoon()
    wavelet = WaveletRepresentation()
    coeffs = wavelet.encode(image)
    on_object = wavelet.encode(obj[:, None].float())  # non-zero where a basis function meets the object's edge
    method = Method(MASK, wavelet)
    finest = metrics_of(method, image, level_mask(coeffs, {1}, where=on_object), obj, distractor)
    assert finest["detail_outline"].item() > 0.97
    assert finest["detail_pointing_game"].item() == 1.0 and finest["detail_distractors"].item() == 0.0
    assert finest["detail_fraction_level1"].item() == pytest.approx(1.0)
    fine = metrics_of(method, image, level_mask(coeffs, {1, 2}, where=on_object), obj, distractor)
    assert fine["detail_outline"].item() > 0.85  # level 2 is coarser than the band: a little spills over


def test_a_low_pass_only_mask_scores_chance_on_the_detail_metrics():
    image, obj, _, distractor = cartoon()
    wavelet = WaveletRepresentation()
    relevance = level_mask(wavelet.encode(image), set(), lowpass=1.0)
    metrics = metrics_of(Method(MASK, wavelet), image, relevance, obj, distractor)
    chance = chance_levels(obj, distractor)
    torch.testing.assert_close(metrics["detail_outline"], chance["outline"])  # no detail: a uniform map
    torch.testing.assert_close(metrics["detail_object"], chance["object"])
    assert metrics["detail_pointing_game"].item() == 0.0 and metrics["detail_fraction_level1"].isnan().all()
    assert metrics["pointing_game"].item() == 1.0  # while the pixel relevance of the blob still "points"


def test_coarse_levels_or_the_distractor_score_low():
    image, obj, _, distractor = cartoon()
    wavelet = WaveletRepresentation()
    coeffs = wavelet.encode(image)
    method = Method(MASK, wavelet)
    chance = chance_levels(obj, distractor)["outline"].item()
    coarse = metrics_of(method, image, level_mask(coeffs, {5}), obj, distractor)
    assert coarse["detail_outline"].item() < chance + 0.05
    on_distractor = wavelet.encode(distractor[:, None].float())
    wrong = metrics_of(method, image, level_mask(coeffs, {1, 2}, where=on_distractor), obj, distractor)
    assert wrong["detail_outline"].item() < 0.05 and wrong["detail_object"].item() < 0.05
    assert wrong["detail_distractors"].item() > 0.3  # its edges: about half their energy falls just outside it
    assert wrong["detail_pointing_game"].item() == 0.0


def test_pixel_methods_use_the_detail_part_of_their_own_map():
    image, obj, ring, distractor = cartoon()
    on_outline = metrics_of(Method(ATTRIBUTION, PixelRepresentation()), image, ring.flatten(1).float(), obj, distractor)
    chance = chance_levels(obj, distractor)["outline"].item()
    assert on_outline["energy_outline"].item() == 1.0 and on_outline["detail_outline"].item() > chance + 0.4
    assert on_outline["detail_outline_level1"].item() > 0.97  # a thin ring also has coarse-scale content
    assert on_outline["detail_pointing_game"].item() == 1.0
    # a pixel mask on the whole object: what it keeps has the outline's edges, so its detail part sits there
    kept = metrics_of(Method(MASK, PixelRepresentation()), image, obj.flatten(1).float(), obj, distractor)
    assert kept["detail_outline_level1"].item() > 0.97 and kept["energy_object"].item() == pytest.approx(1.0)
    # a smooth blob over the object (Grad-CAM-like): little fine structure, spread beyond the band
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    blob = torch.exp(-((xs - 24) ** 2 + (ys - 30) ** 2) / (2 * 8.0**2))
    smooth = metrics_of(Method(ATTRIBUTION, PixelRepresentation()), image, blob.flatten()[None], obj, distractor)
    assert smooth["detail_outline"].item() < on_outline["detail_outline"].item()
    assert smooth["detail_fraction_level1"].item() < 0.01 < on_outline["detail_fraction_level1"].item()


def test_the_demo_report_shows_the_detail_metrics_and_the_chance_row():
    from amortized_cartoonx.demo import DemoConfig, StageTimes
    from amortized_cartoonx.demo_report import report_markdown

    def stat(mean):
        return {"mean": mean, "se": 0.01, "n": 4}

    gt = {"energy_object": stat(0.1), "energy_distractors": stat(0.05), "pointing_game": stat(0.25)}
    gt |= {"detail_outline": stat(0.456), "detail_pointing_game": stat(0.875)}
    entry = {"ground_truth": gt, "area_keep": stat(0.2), "area_randomise": stat(0.9)}
    summary = {
        "methods": {"cartoonx": entry | {"seconds_per_explanation": stat(1.0)}},
        "ground_truth_chance": {"object": stat(0.06), "distractors": stat(0.05), "outline": stat(0.123)},
    }
    report = report_markdown(DemoConfig(), {"accuracy": 0.99}, {"done": 1, "skipped": 0}, {}, summary, StageTimes())
    assert "| detail on outline | detail pointing " in report
    assert "| cartoonx | 0.100 | 0.050 | 0.250 | 0.456 | 0.875 |" in report
    assert "| *chance (area share)* | 0.060 | 0.050 | - | 0.123 |" in report
