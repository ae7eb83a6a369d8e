"""The synthetic cartoon benchmark: dataset determinism and masks, the classifier, training, export, CLI."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from amortized_cartoonx.errors import ClassifierError, ConfigError
from amortized_cartoonx.runtime import torch_threads
from amortized_cartoonx.synthetic.dataset import CLASS_NAMES, CartoonConfig, SyntheticCartoons, SyntheticStream
from amortized_cartoonx.synthetic.scenes import SHAPES, render_scene


def test_same_seed_same_image_and_different_seed_different_image():
    a, b = SyntheticCartoons(6, seed=3), SyntheticCartoons(6, seed=3)
    for i in range(6):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["label"] == y["label"]
        assert torch.equal(x["object_mask"], y["object_mask"])
    other = SyntheticCartoons(6, seed=4)
    assert not torch.equal(a[0]["image"], other[0]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], SyntheticCartoons(6, seed=3, split="test")[0]["image"])


def test_stream_items_depend_on_seed_and_index_alone():
    a, b = SyntheticStream(seed=3, size=32), SyntheticStream(seed=3, size=32)
    for k in (5, 0, 1000):  # any order, any index
        x, y = a[k], b[k]
        assert torch.equal(x["image"], y["image"]) and x["label"] == y["label"] and x["id"] == y["id"]
    assert a[5]["id"] == "stream-3-00005"
    assert not torch.equal(a[5]["image"], SyntheticStream(seed=4, size=32)[5]["image"])  # another seed
    assert not torch.equal(a[5]["image"], a[6]["image"])
    # never one of the benchmark's split images of the same seed and index
    for split in ("train", "val", "test"):
        assert not torch.equal(a[5]["image"], SyntheticCartoons(6, size=32, seed=3, split=split)[5]["image"])
    with pytest.raises(IndexError):
        a[-1]


def test_items_are_pinned():
    """The draws of the first items, recorded when the scene code moved to ``scenes.py``: a change here changes
    every synthetic image, the exported benchmark and the classifier trained on it, so it must be deliberate."""
    dataset = SyntheticCartoons(8, seed=0)
    assert [dataset.scene(i).label for i in range(8)] == [7, 7, 3, 2, 5, 0, 4, 1]
    scene = dataset.scene(0)
    assert (scene.object.cx, scene.object.cy, scene.object.radius) == pytest.approx(
        (0.3657428888265304, 0.5042362946627799, 0.1876842200756073), abs=1e-12
    )
    assert (len(scene.distractors), scene.noise_seed) == (3, 1977949629440191147)
    sums = [float(dataset[i]["image"].double().sum()) for i in range(3)]
    assert sums == pytest.approx([7378.357, 8642.523, 7797.876], abs=0.01)
    assert [int(dataset[i]["object_mask"].sum()) for i in range(3)] == [309, 356, 203]


def test_item_does_not_depend_on_access_order_or_length():
    forward = SyntheticCartoons(5, seed=1)
    first = [forward[i]["image"] for i in range(5)]
    backward = SyntheticCartoons(50, seed=1)  # another length, reverse order, a global RNG disturbed
    torch.manual_seed(123)
    torch.rand(10)
    for i in reversed(range(5)):
        assert torch.equal(backward[i]["image"], first[i])
    assert backward[2]["id"] == "train-1-00002"


def test_item_shapes_and_ranges():
    item = SyntheticCartoons(1, size=48)[0]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["object_mask"].shape == item["distractor_mask"].shape == (48, 48)
    assert item["object_mask"].dtype == torch.bool and 0 <= item["label"] < len(CLASS_NAMES)


def test_same_scene_at_another_size():
    small, large = SyntheticCartoons(3, size=64, seed=2), SyntheticCartoons(3, size=128, seed=2)
    for i in range(3):
        a, b = small[i], large[i]
        assert a["label"] == b["label"]
        down = F.avg_pool2d(b["object_mask"].float()[None, None], 2)[0, 0] >= 0.5
        iou = (down & a["object_mask"]).sum() / (down | a["object_mask"]).sum()
        assert iou > 0.85


def test_object_mask_covers_the_drawn_object():
    dataset = SyntheticCartoons(12, size=64, seed=5)
    for i in range(12):
        scene = dataset.scene(i)
        full, obj, dis = render_scene(scene, dataset.config, noise=False)
        without, obj2, _ = render_scene(scene, dataset.config, noise=False, draw_object=False)
        assert torch.equal(obj, obj2)  # masks describe the scene, not what was drawn
        changed = (full - without).abs().amax(0) > 1e-4  # (H, W)
        assert changed[obj].float().mean() > 0.97  # nearly every object pixel was painted
        # nothing changes away from the object (beyond its antialiased rim: thin tips below half coverage)
        rim = F.max_pool2d(obj.float()[None, None], 5, stride=1, padding=2)[0, 0] > 0
        assert not changed[~rim].any()
        # distractors: painted where their mask is, disjoint from the object
        no_distractors, _, _ = render_scene(scene, dataset.config, noise=False, draw_distractors=False)
        painted = (full - no_distractors).abs().amax(0) > 1e-4
        assert not (dis & obj).any()
        if dis.any():
            assert painted[dis].float().mean() > 0.97


def test_sizes_and_distractors_are_sensible():
    dataset = SyntheticCartoons(40, size=64, seed=0)
    config = dataset.config
    counts = []
    for i in range(40):
        scene = dataset.scene(i)
        item = dataset[i]
        area = item["object_mask"].float().mean()
        assert 0.025 < area < 0.2  # large (the thinnest shape at the smallest radius covers ~2.9%), never the image
        assert all(d.label != scene.label for d in scene.distractors)
        assert all(d.radius <= config.distractor_radius[1] for d in scene.distractors)
        assert all(d.outline is None for d in scene.distractors) and scene.object.outline is not None
        for d in scene.distractors:  # circumscribed discs do not touch
            assert math.hypot(d.cx - scene.object.cx, d.cy - scene.object.cy) >= d.radius + scene.object.radius
        counts.append(len(scene.distractors))
        if scene.distractors:
            assert item["distractor_mask"].any()
    assert min(counts) >= 0 and max(counts) <= config.distractors[1] and sum(counts) / len(counts) > 1.3


def test_every_class_appears():
    labels = {SyntheticCartoons(120, seed=0).scene(i).label for i in range(120)}
    assert labels == set(range(len(CLASS_NAMES)))


def test_shapes_fit_in_the_unit_disc():
    grid = torch.linspace(-1.5, 1.5, 301)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    outside = xx**2 + yy**2 > 1.0
    for name, inside in SHAPES.items():
        mask = inside(xx, yy)
        assert mask.any() and not (mask & outside).any(), name


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="split"):
        SyntheticCartoons(3, split="nope")
    with pytest.raises(ConfigError, match="at least 16"):
        SyntheticCartoons(3, size=8)
    with pytest.raises(ConfigError, match="classes"):
        CartoonConfig(classes=("disc", "blob")).validate()
    assert CartoonConfig.from_dict(CartoonConfig().to_dict()) == CartoonConfig()


# --------------------------------------------------------------------------------------------- classifier


def test_cnn_any_size_and_parameter_budget():
    from amortized_cartoonx.synthetic.classifier import CartoonCNN

    model = CartoonCNN().eval()
    assert sum(p.numel() for p in model.parameters()) < 400_000
    for size in (32, 64, 80):
        assert model(torch.rand(2, 3, size, size)).shape == (2, len(CLASS_NAMES))


def test_fit_lowers_the_loss():
    from amortized_cartoonx.synthetic.classifier import CartoonCNN
    from amortized_cartoonx.synthetic.classifier_training import TrainConfig, fit_classifier, materialize, to_float

    config = TrainConfig(size=32, train_size=64, batch_size=32, max_steps=40, val_size=0, lr=1e-2, augment=False)
    torch.manual_seed(0)
    model = CartoonCNN()
    before = copy.deepcopy(model).eval()
    data = materialize(SyntheticCartoons(64, size=32, seed=0, split="train"), progress=False)
    images, labels = to_float(data.images), data.labels

    with torch_threads(1):  # the test's speed on a shared machine (the CLI trains on one thread too)
        fit_classifier(config, model, progress=False)
    with torch.no_grad():
        loss_before = F.cross_entropy(before(images), labels)
        loss_after = F.cross_entropy(model.eval()(images), labels)
    assert loss_after < 0.5 * loss_before


def test_save_load_round_trip_through_load_classifier(tmp_path):
    from amortized_cartoonx.classifiers import load_classifier
    from amortized_cartoonx.synthetic.classifier import (
        CartoonCNN,
        CNNConfig,
        load_synthetic_classifier,
        save_synthetic_classifier,
    )

    torch.manual_seed(1)
    model = CartoonCNN(CNNConfig(widths=(8, 16))).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics must travel too
        model.features[1].running_mean.uniform_(-0.1, 0.1)
    save_synthetic_classifier(model, tmp_path / "clf", {"classes": list(CLASS_NAMES)})
    x = torch.rand(3, 3, 40, 40)
    for spec in (f"synthetic:{tmp_path / 'clf'}", f"synthetic:{tmp_path / 'clf' / 'classifier.safetensors'}"):
        loaded = load_classifier(spec)
        assert loaded.spec == spec
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(load_synthetic_classifier(tmp_path / "clf" / "classifier.json")(x), model(x))


def test_missing_classifier_says_how_to_train(tmp_path, monkeypatch):
    from amortized_cartoonx.classifiers import load_classifier

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ClassifierError, match="cartoonx train-classifier"):
        load_classifier("synthetic")
    with pytest.raises(ClassifierError, match="no synthetic classifier"):
        load_classifier(f"synthetic:{tmp_path / 'elsewhere'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "classifier.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "bad" / "classifier.json").write_text('{"format": "amortized-cartoonx/synthetic-classifier"}')
    with pytest.raises(ClassifierError, match="cannot load"):
        load_classifier(f"synthetic:{tmp_path / 'bad'}")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"architecture": {"widths": [50000, 50000]}}, "more than the 50,000,000"),
        ({"architecture": {"widths": "abc"}}, "widths must be a list of positive integers"),
        ({"architecture": {"num_classes": -1}}, "num_classes must be an integer of at least 2"),
        ({"architecture": {"dropout": "x"}}, "dropout must be in [0, 1)"),
        ({"architecture": [1, 2]}, "architecture must be a JSON object"),
        ({"format_version": "2"}, "format_version must be an integer"),
        (b"\xff\xfe{}", "cannot read"),
    ],
)
def test_a_hand_edited_record_is_one_error_before_any_network_is_built(tmp_path, edit, needle):
    """Each was a raw TypeError or RuntimeError, or a request for 270 GB, before the weights were compared."""
    from amortized_cartoonx.classifiers import load_classifier
    from amortized_cartoonx.synthetic.classifier import CartoonCNN, CNNConfig, save_synthetic_classifier

    _, meta = save_synthetic_classifier(CartoonCNN(CNNConfig(widths=(4,))), tmp_path, {})
    if isinstance(edit, bytes):
        meta.write_bytes(edit)
    else:
        record = json.loads(meta.read_text())
        for key, value in edit.items():
            record[key] = {**record[key], **value} if isinstance(value, dict) else value
        meta.write_text(json.dumps(record))
    with pytest.raises(ClassifierError, match=re.escape(needle)):
        load_classifier(f"synthetic:{tmp_path}")


def test_train_reuse_and_force(tmp_path, caplog):
    from amortized_cartoonx.synthetic.classifier import read_metadata
    from amortized_cartoonx.synthetic.classifier_training import TrainConfig, train_synthetic_classifier

    config = TrainConfig(size=32, train_size=32, batch_size=16, max_steps=2, val_size=0, held_out=16)
    first = train_synthetic_classifier(tmp_path, config, progress=False)
    assert not first.reused and first.weights.is_file() and 0.0 <= first.accuracy <= 1.0
    record = read_metadata(tmp_path)
    assert record["held_out"]["num_images"] == 16 and record["classes"] == list(CLASS_NAMES)
    assert record["training"]["config"]["train_size"] == 32
    again = train_synthetic_classifier(tmp_path, config, progress=False)
    assert again.reused and again.accuracy == first.accuracy
    with pytest.raises(ConfigError, match=r"other settings \(threads\)"):  # other threads: other weights
        train_synthetic_classifier(tmp_path, config, progress=False, threads=2)
    with pytest.raises(ConfigError, match=r"pass force=True to retrain") as refused:
        train_synthetic_classifier(tmp_path, dataclasses.replace(config, seed=1), progress=False)
    assert "--force" not in str(refused.value)
    forced = train_synthetic_classifier(tmp_path, dataclasses.replace(config, seed=1), force=True, progress=False)
    assert not forced.reused


# --------------------------------------------------------------------------------------------- export & CLI


def test_export_writes_readable_files(tmp_path):
    from amortized_cartoonx.data import ImageFolder
    from amortized_cartoonx.ground_truth import read_ground_truth
    from amortized_cartoonx.images import read_class_names
    from amortized_cartoonx.synthetic.export import write_synthetic_folder

    files = write_synthetic_folder(tmp_path, 5, size=32, seed=7, progress=False)
    assert files == [f"test-7-{i:05d}.png" for i in range(5)]
    dataset = SyntheticCartoons(5, size=32, seed=7, split="test")
    with (tmp_path / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == files
    assert [int(r["class_index"]) for r in rows] == [dataset[i]["label"] for i in range(5)]
    assert all(r["name"] == CLASS_NAMES[int(r["class_index"])] for r in rows)
    assert read_class_names(tmp_path / "class_names.txt") == list(CLASS_NAMES)

    folder = ImageFolder(tmp_path, size=32)
    assert folder.ids == files and folder[2]["label"] == dataset[2]["label"]
    assert (folder[2]["image"] - dataset[2]["image"]).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG

    truth = read_ground_truth(tmp_path)
    assert set(truth) == set(files)
    obj, dis = truth[files[2]]
    assert torch.equal(obj, dataset[2]["object_mask"]) and torch.equal(dis, dataset[2]["distractor_mask"])


def test_cli_defaults_match_train_config():
    from amortized_cartoonx.cli.train_classifier import _DEFAULTS
    from amortized_cartoonx.synthetic.classifier_training import TrainConfig

    config = TrainConfig()
    for key, value in _DEFAULTS.items():
        assert getattr(config, key) == value, key


def test_cli_help_and_tiny_run(tmp_path, capsys):
    from amortized_cartoonx.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train-classifier", "--help"])
    assert exc.value.code == 0
    assert "--force" in capsys.readouterr().out

    argv = ["train-classifier", "--out", str(tmp_path / "clf"), "--size", "32", "--train-size", "32"]
    argv += ["--max-steps", "2", "--batch-size", "16", "--held-out", "8", "--no-progress", "--device", "cpu"]
    argv += ["--export", str(tmp_path / "bench"), "--export-images", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and (tmp_path / "clf" / "classifier.json").is_file()
    assert len(list((tmp_path / "bench").glob("*.png"))) == 3
    assert main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    assert main([*argv, "--epochs", "0"]) == 2  # one-line error, exit code 2
    # refused before any training: images without a folder, a folder that is a file
    assert main(["train-classifier", "--out", str(tmp_path / "new"), "--export-images", "3", "--no-progress"]) == 2
    assert "--export-images is for --export" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["train-classifier", "--out", str(tmp_path / "new"), "--export", str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_the_command_line_names_its_own_force_option(tmp_path, capsys):
    from amortized_cartoonx.cli import main
    from amortized_cartoonx.synthetic.classifier import CartoonCNN, save_synthetic_classifier
    from amortized_cartoonx.synthetic.classifier_training import TrainConfig

    config = TrainConfig(seed=5).to_dict()  # another seed than the command's: refused before any training
    save_synthetic_classifier(CartoonCNN(), tmp_path / "clf", {"training": {"config": config}})
    assert main(["train-classifier", "--out", str(tmp_path / "clf"), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "(seed" in err and "pass --force to retrain" in err and "force=True" not in err, err
    assert len(err.splitlines()) == 1


def test_the_demo_names_its_own_way_out_of_another_classifier(tmp_path):
    """The demo has no --force: its message names --classifier-dir, not Python's force=True."""
    from amortized_cartoonx.demo import DemoConfig, stage_classifier
    from amortized_cartoonx.synthetic.classifier import CartoonCNN, save_synthetic_classifier
    from amortized_cartoonx.synthetic.classifier_training import ClassifierExistsError, TrainConfig

    save_synthetic_classifier(CartoonCNN(), tmp_path / "clf", {"training": {"config": TrainConfig(seed=5).to_dict()}})
    with pytest.raises(ClassifierExistsError, match="use another --classifier-dir") as refused:
        stage_classifier(DemoConfig(classifier_dir=tmp_path / "clf", progress=False))
    assert "force=True" not in str(refused.value)
