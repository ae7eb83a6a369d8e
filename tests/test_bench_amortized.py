"""scripts/bench_amortized.py: the summary (the median ratio's bootstrap interval, the per-row image counts), the
refusal of training images, one-line errors and the exact seconds, cached or not."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from amortized_cartoonx.amortized import AmortizedExplainer

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the classifier spec imports conftest.make_tiny_cnn
    sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent / "scripts"))
import bench_amortized as bench  # noqa: E402
from exact_cache import load_result  # noqa: E402


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


SPEC = "conftest:make_tiny_cnn"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint (an untrained tiny explainer, 32 px) whose recorded training folder holds 8 images, a quarter
    of them held out as its test split, and that folder."""
    from amortized_cartoonx.mask_predictor import MaskPredictorConfig
    from amortized_cartoonx.training import AmortizedCartoonXModule

    folder = tmp_path_factory.mktemp("train")
    gen = torch.Generator().manual_seed(5)
    for i in range(8):
        pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"im{i}.png")
    torch.manual_seed(0)
    network = MaskPredictorConfig(width=8, decoder_width=8, embed_dim=8)
    module = AmortizedCartoonXModule(SPEC, image_size=32, levels=2, num_samples=2, mask_predictor=network)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(state)
    state["cartoonx"]["data"] = {
        "images": str(folder.resolve()),
        "val_fraction": 0.25,
        "test_fraction": 0.25,
        "split_seed": 0,
        "teachers": None,
        "target_source": "auto",
    }
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save(state, path)
    return path, folder


def tiny(checkpoint: Path, images: Path, *options: str) -> list[str]:
    return [
        "--checkpoint",
        str(checkpoint),
        "--classifier",
        SPEC,
        "--images",
        str(images),
        "--exact-steps",
        "3",
        "--refine",
        "2",
        "--samples",
        "2",
        "--measure-samples",
        "2",
        "--batch-size",
        "2",
        "--limit",
        "2",
        "--smooth",
        "1",
        "--threads",
        "1",
        *options,
    ]


def test_the_training_folder_outside_its_test_split_is_refused(trained, capsys):
    """Images the explainer was trained on (train), or that picked its checkpoint (val), are not held out."""
    checkpoint, folder = trained
    for split in ("all", "train", "val"):
        assert bench.main(tiny(checkpoint, folder, "--split", split)) == 2, split
        err = capsys.readouterr().err
        assert "folder the explainer was trained on" in err and "--allow-training-images" in err, split
        assert len(err.strip().splitlines()) == 1


def test_held_out_images_are_measured_and_training_images_only_when_asked(trained, tmp_path, capsys):
    checkpoint, folder = trained
    args = bench.parse_args(tiny(checkpoint, folder))
    amortized = AmortizedExplainer.from_checkpoint(checkpoint, SPEC)
    files, split = bench.select_images(args, amortized)  # auto: the test split
    assert split == "test" and files and args.held_out
    other = tmp_path / "copy"
    shutil.copytree(folder, other)  # not the recorded folder: all of it may be used
    args = bench.parse_args(tiny(checkpoint, other, "--split", "all"))
    assert len(bench.select_images(args, amortized)[0]) == 2 and args.held_out
    out = tmp_path / "b.json"
    assert bench.main(tiny(checkpoint, folder, "--split", "train", "--allow-training-images", "--json", str(out))) == 0
    assert "NOT held out" in capsys.readouterr().out
    assert json.loads(out.read_text())["settings"]["held_out"] is False


def test_a_start_past_the_split_is_a_one_line_error(trained, capsys):
    checkpoint, folder = trained
    assert bench.main(tiny(checkpoint, folder, "--start", "50")) == 2
    err = capsys.readouterr().err
    assert "--start 50 is past the last image" in err and len(err.strip().splitlines()) == 1


def test_the_exact_seconds_leave_out_the_computing_runs_measurement_cached_or_not(trained, tmp_path):
    """The cache keeps the whole call's seconds and the measurement's apart; a run that reads them back reports
    what the computing run did: its seconds less its own measurement."""
    checkpoint, folder = trained
    cache = tmp_path / "cache"
    runs = []
    for name in ("first", "second"):
        out = tmp_path / f"{name}.json"
        assert bench.main(tiny(checkpoint, folder, "--exact-cache", str(cache), "--json", str(out))) == 0
        runs.append(json.loads(out.read_text()))
    first, second = ({r["image"]: r for r in run["images"]} for run in runs)
    assert first.keys() == second.keys() and len(first) == 2
    for image, record in first.items():
        (stored,) = (load_result(p) for p in cache.glob(f"{Path(image).stem}.*.safetensors"))
        assert stored["seconds"] - stored["measure_seconds"] == pytest.approx(record["exact"]["seconds"])
        assert stored["measure_seconds"] == pytest.approx(record["measure_seconds"])
        assert not record["exact"]["seconds_cached"] and second[image]["exact"]["seconds_cached"]
        assert second[image]["exact"]["seconds"] == pytest.approx(record["exact"]["seconds"])
