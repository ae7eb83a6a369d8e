"""scripts/bench_synthetic_cues.py: each variant draws what it says, and the shares are counted per scene."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_synthetic_cues as bench  # noqa: E402

from amortized_cartoonx.synthetic.dataset import SyntheticCartoons  # noqa: E402
from amortized_cartoonx.synthetic.scenes import render_scene  # noqa: E402


def _outside(shape, size: int) -> torch.Tensor:
    """``(S, S)`` bool: the pixels outside the shape's circumscribed disc, widened by two pixels."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return ((xx - shape.cx) ** 2 + (yy - shape.cy) ** 2).sqrt() > shape.radius + 2 / size


def test_each_variant_changes_only_what_it_names():
    data = SyntheticCartoons(4, size=48, seed=3, split="test")
    for i in range(len(data)):
        scene = data.scene(i)
        original, object_mask, _ = render_scene(scene, data.config)
        away = _outside(scene.object, 48)
        first_away = _outside(scene.distractors[0], 48)
        removed = bench.render_variant(scene, data.config, "decisive object removed")
        assert torch.equal(removed[:, away], original[:, away])
        assert (removed[:, object_mask] - original[:, object_mask]).abs().amax() > 0.2  # the object is gone
        plain = bench.render_variant(scene, data.config, "object without its outline")
        assert torch.equal(plain[:, away], original[:, away]) and not torch.equal(plain, original)
        moved = bench.render_variant(scene, data.config, "outline moved to a distractor")
        assert not torch.equal(moved[:, ~first_away], plain[:, ~first_away])  # the distractor got the outline
        assert torch.equal(moved[:, away & first_away], original[:, away & first_away])
        assert torch.equal(bench.render_variant(scene, data.config, "as generated"), original)


class _Always(torch.nn.Module):
    """Names class ``k`` for every image."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 8)
        logits[:, self.k] = 5.0
        return logits


def test_the_shares_count_the_object_and_the_first_distractor_per_scene():
    data = SyntheticCartoons(12, size=32, seed=0, split="test")
    scenes = [data.scene(i) for i in range(len(data))]
    k = scenes[0].label
    results = bench.measure(_Always(k), data, batch=5)
    assert list(results) == list(bench.VARIANTS)
    expected = sum(s.label == k for s in scenes) / len(scenes)
    expected_distractor = sum(s.distractors[0].label == k for s in scenes) / len(scenes)
    p = torch.softmax(torch.tensor([5.0 if c == k else 0.0 for c in range(8)]), 0)
    for r in results.values():
        assert abs(r["accuracy"] - expected) < 1e-6 and abs(r["names_distractor"] - expected_distractor) < 1e-6
        assert abs(r["p_label"] - float(sum(p[s.label] for s in scenes) / len(scenes))) < 1e-6
    assert "| as generated |" in bench.table(results, 1 / 8)


class _FirstWithoutDistractors(SyntheticCartoons):
    """Scene 0 lost its distractors (as a scene whose distractors could not be placed)."""

    def scene(self, index: int):
        scene = super().scene(index)
        return dataclasses.replace(scene, distractors=[]) if index == 0 else scene


def test_a_scene_without_distractors_is_left_out_of_what_needs_one():
    data = _FirstWithoutDistractors(6, size=32, seed=0, split="test")
    k = data.scene(1).distractors[0].label
    results = bench.measure(_Always(k), data, batch=4)
    assert results["as generated"]["scenes"] == 6 and results["outline moved to a distractor"]["scenes"] == 5
    named = sum(data.scene(i).distractors[0].label == k for i in range(1, 6)) / 5
    assert math.isclose(results["as generated"]["names_distractor"], named, abs_tol=1e-6)
    assert math.isclose(results["outline moved to a distractor"]["names_distractor"], named, abs_tol=1e-6)
    assert bench.render_variant(data.scene(0), data.config, "as generated").shape == (3, 32, 32)
