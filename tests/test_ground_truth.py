"""Ground-truth localisation metrics on constructed relevance maps, and reading ground-truth folders."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from amortized_cartoonx.errors import InputError
from amortized_cartoonx.ground_truth import (
    energy_share,
    masks_for,
    pointing_game,
    read_ground_truth,
    resize_mask,
)


def _masks(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    obj = torch.zeros(size, size, dtype=torch.bool)
    obj[4:12, 4:12] = True  # 64 px
    dis = torch.zeros(size, size, dtype=torch.bool)
    dis[20:26, 20:26] = True  # 36 px
    return obj, dis


def test_relevance_on_the_object():
    obj, dis = _masks()
    relevance = obj.float()[None] * torch.rand(1, 32, 32).add(0.1)
    share = energy_share(relevance, obj, dis)
    assert torch.allclose(share["object"], torch.ones(1))
    assert torch.allclose(share["distractors"], torch.zeros(1)) and torch.allclose(share["background"], torch.zeros(1))
    assert pointing_game(relevance, obj).tolist() == [True]


def test_relevance_on_a_distractor_misses():
    obj, dis = _masks()
    relevance = dis.float()[None].repeat(2, 1, 1)
    share = energy_share(relevance, obj, dis)
    assert torch.allclose(share["distractors"], torch.ones(2)) and torch.allclose(share["object"], torch.zeros(2))
    assert pointing_game(relevance, obj).tolist() == [False, False]


def test_shares_sum_to_one_and_match_areas():
    obj, dis = _masks()
    relevance = torch.rand(4, 32, 32)
    share = energy_share(relevance, obj[None].expand(4, -1, -1), dis)
    total = share["object"] + share["distractors"] + share["background"]
    assert torch.allclose(total, torch.ones(4), atol=1e-6)
    uniform = energy_share(torch.ones(1, 32, 32), obj, dis)
    assert torch.allclose(uniform["object"], torch.tensor([64 / 1024]))
    assert torch.allclose(uniform["distractors"], torch.tensor([36 / 1024]))


def test_zero_map_is_chance_level_and_a_miss():
    obj, dis = _masks()
    share = energy_share(torch.zeros(1, 32, 32), obj, dis)
    assert torch.allclose(share["object"], torch.tensor([64 / 1024]))
    assert pointing_game(torch.zeros(1, 32, 32), obj).tolist() == [False]


def test_pointing_tolerance_and_smoothing():
    obj, _ = _masks()
    near = torch.zeros(1, 32, 32)
    near[0, 8, 13] = 1.0  # one pixel right of the object (its last column is 11): within 2 px
    far = torch.zeros(1, 32, 32)
    far[0, 8, 16] = 1.0  # 5 px away
    assert pointing_game(near, obj).tolist() == [True]
    assert pointing_game(near, obj, tolerance=0).tolist() == [False]
    assert pointing_game(far, obj).tolist() == [False]
    # a lone hot pixel loses to a broad mass after smoothing, not before
    spike = 0.3 * obj.float()[None]
    spike[0, 28, 28] = 1.0
    assert pointing_game(spike, obj, smoothing=3).tolist() == [True]
    assert pointing_game(spike, obj, smoothing=1).tolist() == [False]
    # ... and a lone pixel at the border no more than inside (the box average counted only the pixels inside)
    corner = 0.5 * obj.float()[None]
    corner[0, 0, 0] = 2.0  # 2/4 per window at the corner before; now 2/9, under the object's 0.5
    assert pointing_game(corner, obj, smoothing=3).tolist() == [True]
    # a lone peak 3 px off the object (rows and columns 4-11) is a 3 x 3 plateau after smoothing, a third of it
    # within the tolerance: the same miss on every side (the first maximum in row-major order made right and
    # below hits, left and above misses)
    sides = torch.zeros(4, 32, 32)
    for i, (row, col) in enumerate([(8, 14), (14, 8), (8, 1), (1, 8)]):  # right, below, left, above
        sides[i, row, col] = 1.0
    assert pointing_game(sides, obj).tolist() == [False] * 4
    sides = torch.zeros(4, 32, 32)  # 2 px off: two thirds within, a hit on every side
    for i, (row, col) in enumerate([(8, 13), (13, 8), (8, 2), (2, 8)]):
        sides[i, row, col] = 1.0
    assert pointing_game(sides, obj).tolist() == [True] * 4


def test_bad_maps_are_refused():
    obj, dis = _masks()
    with pytest.raises(InputError, match="non-negative"):
        energy_share(-torch.ones(1, 32, 32), obj, dis)
    with pytest.raises(InputError, match="does not match"):
        pointing_game(torch.ones(1, 16, 16), obj)
    with pytest.raises(InputError, match="NaN"):
        pointing_game(torch.full((1, 32, 32), float("nan")), obj)
    with pytest.raises(InputError, match="odd"):
        pointing_game(torch.ones(1, 32, 32), obj, smoothing=2)


def test_read_ground_truth(tmp_path):
    assert read_ground_truth(tmp_path) is None
    obj, dis = _masks()
    save_file(
        {"object/a.png": obj.to(torch.uint8), "distractors/a.png": dis.to(torch.uint8)},
        str(tmp_path / "ground_truth.safetensors"),
    )
    truth = read_ground_truth(tmp_path)
    assert set(truth) == {"a.png"}
    assert torch.equal(truth["a.png"][0], obj) and truth["a.png"][1].dtype == torch.bool
    objects, distractors = masks_for(truth, ["a.png", "a.png"], size=64)
    assert objects.shape == (2, 64, 64) and objects.sum() == 2 * 4 * 64
    assert torch.equal(resize_mask(obj, 32), obj)
    with pytest.raises(InputError, match="no ground-truth"):
        masks_for(truth, ["b.png"])
    save_file({"object/a.png": obj.to(torch.uint8)}, str(tmp_path / "ground_truth.safetensors"))
    with pytest.raises(InputError, match="only one"):
        read_ground_truth(tmp_path)
