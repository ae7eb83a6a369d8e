"""scripts/bench_amortized.py's summary: the median ratio's bootstrap interval and the per-row image counts."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_amortized as bench  # noqa: E402


def test_the_median_interval_is_seeded_and_brackets_the_median():
    values = [0.9 + 0.02 * i for i in range(32)]
    low, high = bench.median_interval(values)
    assert low < bench.median(values) < high
    assert bench.median_interval(values) == (low, high)  # seeded: the same interval every run
    assert bench.median_interval(values, seed=1) != (low, high)
    assert bench.median_interval([1.2] * 10) == (1.2, 1.2)  # no spread, no width
    assert bench.median_interval([1.2]) is None


def _record(name: str, amortized: float, warm: float) -> dict:
    def result(loss: float) -> dict:
        return {
            "loss": loss,
            "distortion": loss / 2,
            "mask_mean": 0.01,
            "prob_obfuscated": 0.9,
            "seconds": 0.1,
            "cold_steps_to_reach": None,
        }

    return {
        "image": name,
        "amortized": result(amortized),
        "exact": result(1.0),
        "warm": {"40": result(warm)},
        "measure_seconds": 0.01,
        "warm_steps_to_exact": None,
        "spearman_amortized_exact": 0.5,
        "top10_overlap_amortized_exact": 0.5,
    }


def test_the_summary_counts_images_at_or_below_the_exact_loss():
    args = bench.parse_args(
        ["--checkpoint", "c.ckpt", "--images", "x", "--classifier", "synthetic:x", "--refine", "40"]
    )
    args.exact_steps, args.refine_samples_used = 2000, 64
    warm = [0.95, 1.0, 1.03, 1.2]
    records = [_record(f"{i}.png", 1.5, w) for i, w in enumerate(warm)]
    meta = dict(image_size=64, classifier="synthetic:x", wave="db3", levels=5, l1_lambda=20.0)
    meta.update(distortion="label", obfuscation="gaussian-adaptive")
    result = bench.summarise(args, records, [40], "all", torch.device("cpu"), meta)
    row = next(r for r in result["summary"] if r["method"] == "warm K=40")
    assert (row["at_or_below_exact"], row["within_5_percent"]) == (2, 3)
    assert row["loss_ratio_interval"][0] <= row["loss_ratio"] <= row["loss_ratio_interval"][1]
    table = bench.markdown(result)
    assert "| 2/4 (3/4) |" in table
