"""``cartoonx explain`` end to end, and its handling of bad input."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amortized_cartoonx.cli import main
from amortized_cartoonx.explanation import load_saved_explanation
from amortized_cartoonx.seeding import item_seed

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                              nn.Linear(16, 5))
        with torch.no_grad():
            model[-1].weight.mul_(10)
        return model

    class _Spatial(nn.Module):
        def forward(self, x):
            return x.mean(1)

    def spatial():
        return _Spatial()
    """
)


@pytest.fixture
def spec(tmp_path, monkeypatch):
    (tmp_path / "cx_cli_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cx_cli_models:tiny"


@pytest.fixture
def pictures(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "pics"
    folder.mkdir()
    paths = []
    for name, mode in (("rgb.png", "RGB"), ("grey.png", "L"), ("alpha.png", "RGBA")):
        img = Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8)).convert(mode)
        img.save(folder / name)
        paths.append(str(folder / name))
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(folder / "deep.png")
    paths.append(str(folder / "deep.png"))
    return paths


def run(args, capsys):
    try:
        code = main(["explain", *args])
    except SystemExit as exc:  # argparse refuses option values itself
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_writes_figures_tensors_and_summary(tmp_path, spec, pictures, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(
        [
            *pictures,
            "--classifier",
            spec,
            "--out",
            str(out),
            "--size",
            "32",
            "--steps",
            "4",
            "--samples",
            "2",
            "--batch-size",
            "3",
            "--device",
            "cpu",
            "--target",
            "1",
        ],
        capsys,
    )
    assert code == 0, stdout
    lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == pictures
    required = {
        "image",
        "method",
        "target",
        "target_name",
        "prob_original",
        "prob_masked",
        "prob_obfuscated",
        "distortion",
        "mask_mean",
        "loss_first",
        "loss_final",
        "steps",
        "seconds",
    }
    for line in lines:
        assert required <= set(line) and line["target"] == 1 and line["steps"] == 4
        # enough to rebuild it: the noise's seed (from the file name), the batch size, the explainer's settings
        assert line["seed_used"] == item_seed(Path(line["image"]).name, 0) and line["batch_size"] == 3
        assert line["settings"]["steps"] == 4 and line["settings"]["num_samples"] == 2
    for stem in ("rgb", "grey", "alpha", "deep"):
        assert (out / f"{stem}.png").stat().st_size > 0
        saved = load_saved_explanation(out / f"{stem}.safetensors")
        assert saved["explanation"].shape == (1, 32, 32)
        assert saved["mask"].ndim == 1 and saved["metadata"]["method"] == "cartoonx"
        assert Path(saved["metadata"]["image"]).stem == stem and saved["metadata"]["target"] == 1
        # what changes the result is recorded (normalize changed prob_original and was in no output)
        assert {k: saved["metadata"][k] for k in ("normalize", "size", "device")} == {
            "normalize": "none",
            "size": 32,
            "device": "cpu",
        }
        assert sum(band.numel() for band in saved["mask_bands"]) == saved["mask"].numel()
        assert saved["mask_bands"][0].shape[0] == 1  # the low-pass band, one channel
    assert not list(out.glob(".*"))  # no temporary files left


def test_pixel_rde_and_labels(tmp_path, spec, pictures, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\ntwo\nthree\nfour\n")
    out = tmp_path / "out"
    code, _, _ = run(
        [
            pictures[0],
            "--classifier",
            spec,
            "--out",
            str(out),
            "--size",
            "32",
            "--steps",
            "2",
            "--samples",
            "2",
            "--method",
            "pixel-rde",
            "--labels",
            str(labels),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0
    line = json.loads((out / "summary.jsonl").read_text())
    assert (
        line["method"] == "pixel-rde" and line["target_name"] == ["zero", "one", "two", "three", "four"][line["target"]]
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--wavelet", "db99"], "unknown wavelet"),
        (["--target", "7"], "out of range"),
        (["--target", "1,2"], "2 classes for 1 images"),
        (["--size", "4"], "too small"),
        (["--classifier", "cx_cli_models:spatial"], "expected logits"),
        (["--classifier", "/nope/model.pt"], "not found"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        (["--samples", "0"], "argument --samples: expected a positive integer"),
        (["--lr", "nan"], "argument --lr: expected a finite number"),
        (["--l1-lambda", "inf"], "argument --l1-lambda: expected a finite number"),
        (["--size", "100000"], "at most 8192"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "device"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, spec, pictures, capsys, extra, message):
    out = tmp_path / "out"
    args = [pictures[0], "--classifier", spec, "--out", str(out), "--size", "32", "--steps", "1", "--samples", "2"]
    code, _, err = run([*args, *extra], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("bad", ["missing", "corrupt", "directory"])
def test_bad_image_files(tmp_path, spec, pictures, capsys, bad):
    path = tmp_path / "bad.png"
    if bad == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif bad == "directory":
        path.mkdir()
    out = tmp_path / "out"
    code, _, err = run([pictures[0], str(path), "--classifier", spec, "--out", str(out), "--size", "32"], capsys)
    assert code == 2 and "bad.png" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"), [(["--method", "magic"], "invalid choice"), (["--distortion", "l3"], "invalid choice")]
)
def test_unknown_choices_exit_2(spec, pictures, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["explain", pictures[0], "--classifier", spec, "--out", "x", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_help_does_not_import_torch_or_lightning():
    code = (
        "import sys\n"
        "from amortized_cartoonx.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = [m for m in ('torch', 'pytorch_lightning', 'lightning', 'wandb') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


@pytest.mark.shared
def test_explain_with_a_real_classifier_and_photo(tmp_path, shared, capsys):
    photo = sorted((shared / "data" / "imagenet-samples").glob("*.jpg"))[0]
    out = tmp_path / "out"
    code, _, _ = run(
        [
            str(photo),
            "--classifier",
            str(shared / "models" / "mobilenet_v1_025_imagenet.pt"),
            "--out",
            str(out),
            "--size",
            "96",
            "--steps",
            "4",
            "--samples",
            "2",
            "--device",
            "cpu",
            "--labels",
            str(shared / "models" / "imagenet_classes.txt"),
        ],
        capsys,
    )
    assert code == 0
    line = json.loads((out / "summary.jsonl").read_text())
    assert line["target_name"] and 0 < line["prob_original"] <= 1
    assert (out / f"{photo.stem}.png").is_file()


def test_a_synthetic_classifier_is_explained_at_its_training_size(tmp_path, pictures, capsys):
    from amortized_cartoonx.synthetic.classifier import CartoonCNN, CNNConfig, save_synthetic_classifier
    from amortized_cartoonx.synthetic.dataset import CartoonConfig

    torch.manual_seed(0)
    model = CartoonCNN(CNNConfig(num_classes=8, widths=(4, 8)))
    save_synthetic_classifier(model, tmp_path / "clf", {"dataset": CartoonConfig(size=32).to_dict()})
    out = tmp_path / "out"
    spec = f"synthetic:{tmp_path / 'clf' / 'classifier.json'}"
    code, _, err = run(
        [pictures[0], "--classifier", spec, "--out", str(out), "--steps", "1", "--samples", "2", "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    assert load_saved_explanation(out / "rgb.safetensors")["explanation"].shape == (1, 32, 32)
    code, _, err = run(  # an explicit --size still wins
        [pictures[0], "--classifier", spec, "--out", str(tmp_path / "o2"), "--size", "40", "--steps", "1"]
        + ["--samples", "2", "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    assert load_saved_explanation(tmp_path / "o2" / "rgb.safetensors")["explanation"].shape == (1, 40, 40)


def test_a_labels_file_for_another_number_of_classes_is_warned_about(tmp_path, spec, pictures, capsys, caplog):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(1000)))
    args = [pictures[0], "--classifier", spec, "--out", str(tmp_path / "out"), "--size", "32", "--steps", "1"]
    with caplog.at_level(logging.WARNING):
        code, _, err = run([*args, "--samples", "2", "--device", "cpu", "--labels", str(labels)], capsys)
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--labels" in r.getMessage()]
    assert len(warned) == 1 and "1000" in warned[0] and "5 classes" in warned[0], warned


def test_no_progress_hides_the_progress_bars(tmp_path, spec, pictures, capsys):
    args = [pictures[0], "--classifier", spec, "--size", "32", "--steps", "2", "--samples", "2", "--device", "cpu"]
    code, _, err = run([*args, "--out", str(tmp_path / "quiet"), "--no-progress"], capsys)
    assert code == 0, err
    assert "explain (cartoonx)" not in err and "steps" not in err, err


@pytest.mark.parametrize("command", ["explain", "targets", "evaluate", "train-classifier", "demo"])
def test_help_descriptions_are_plain_text(command):
    from amortized_cartoonx.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    description = sub.choices[command].format_help()
    assert "``" not in description and ":func:" not in description and ":class:" not in description, description
    assert f"cartoonx {command}" in description


def test_fit_help_describes_what_it_trains(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cartoonx"])  # LightningCLI compares its args with the command line
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    head = " ".join(capsys.readouterr().out.split()).split(" options:")[0]  # usage and description
    assert "Runs the full optimization routine" not in head  # Trainer.fit's docstring (still a group's title)
    assert "cartoonx fit: train the amortized CartoonX explainer (the mask predictor network)" in head


def test_keep_aspect_explains_each_image_at_its_own_shape(tmp_path, spec, pictures, capsys):
    out = tmp_path / "out"
    mixed = [pictures[0], pictures[3], pictures[1], pictures[2]]  # 40x50, 40x40, 40x50, 40x50
    args = [*mixed, "--classifier", spec, "--out", str(out), "--size", "32", "--steps", "2", "--samples", "2"]
    code, stdout, _ = run([*args, "--keep-aspect", "--batch-size", "2", "--no-progress"], capsys)
    assert code == 0, stdout
    lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == mixed  # the input order, though rgb and grey ran together
    shapes = {"rgb": (1, 32, 40), "grey": (1, 32, 40), "alpha": (1, 32, 40), "deep": (1, 32, 32)}  # 40x50, 40x40
    for stem, shape in shapes.items():
        saved = load_saved_explanation(out / f"{stem}.safetensors")
        assert saved["explanation"].shape == shape and saved["metadata"]["keep_aspect"] is True
    code, _, err = run([*args[:-4], "--method", "amortized", "--checkpoint", "x.ckpt", "--keep-aspect"], capsys)
    assert code == 2 and "--keep-aspect is for --method cartoonx or pixel-rde" in err


def test_batches_gather_the_images_of_one_shape():
    from amortized_cartoonx.cli.explain import shape_batches

    images = [torch.zeros(3, 4, w) for w in (4, 6, 4, 6, 4, 4, 8)]
    assert shape_batches(images, 2) == [[0, 2], [4, 5], [1, 3], [6]]
    assert shape_batches(images, 8) == [[0, 2, 4, 5], [1, 3], [6]]
    assert shape_batches(images[:1] * 5, 2) == [[0, 1], [2, 3], [4]]  # one size: consecutive runs, as before
    assert shape_batches([], 2) == []


def test_a_folder_stands_for_its_images_in_name_order(tmp_path, spec, pictures, capsys):
    folder = Path(pictures[0]).parent  # alpha, deep, grey, rgb (sorted), beside a file given by its path
    out = tmp_path / "out"
    args = [str(folder), pictures[0], "--classifier", spec, "--out", str(out), "--size", "32", "--steps", "1"]
    code, stdout, _ = run([*args, "--samples", "2", "--no-progress"], capsys)
    assert code == 0, stdout
    lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["alpha.png", "deep.png", "grey.png", "rgb.png", "rgb.png"]
    assert lines[-1]["png"] == "rgb_1.png"
    code, _, err = run([str(folder), "--classifier", spec, "--out", str(folder), "--steps", "1"], capsys)
    assert code == 2 and "is an input folder" in err


def test_a_target_may_be_a_class_name_of_the_labels_file(tmp_path, spec, pictures, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("tench, Tinca tinca\ngoldfish, Carassius auratus\ncrane\ncrane\nmaillot, tank suit\n")
    common = ["--classifier", spec, "--size", "32", "--steps", "1", "--samples", "2", "--labels", str(labels)]
    out = tmp_path / "named"
    code, stdout, _ = run(
        [*pictures[:2], "--out", str(out), *common, "--target", "Goldfish, tench, Tinca tinca"], capsys
    )
    assert code == 2  # three classes for two images: a whole line first, then names and indices by commas
    code, stdout, _ = run([*pictures[:2], "--out", str(out), *common, "--target", " goldfish,4"], capsys)
    assert code == 0, stdout
    assert [json.loads(line)["target"] for line in (out / "summary.jsonl").read_text().splitlines()] == [1, 4]
    code, stdout, _ = run(
        [pictures[0], "--out", str(tmp_path / "w"), *common, "--target", "tench, Tinca tinca"], capsys
    )
    assert code == 0 and json.loads((tmp_path / "w" / "summary.jsonl").read_text())["target"] == 0
    from amortized_cartoonx.cli.common import parse_targets

    assert parse_targets("1", 2, ["7", "3", "1"]) == [1, 1]  # a number is an index, even when a line reads it
    for target, needle in (("crane", "names 2 classes (2, 3)"), ("carp", "'carp' is neither")):
        code, _, err = run([pictures[0], "--out", str(tmp_path / "x"), *common, "--target", target], capsys)
        assert code == 2 and needle in err


def test_a_target_file_gives_each_image_its_class_by_file_name(tmp_path, spec, pictures, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("tench, Tinca tinca\ngoldfish\nshark\nhen\nostrich\n")
    common = ["--classifier", spec, "--size", "32", "--steps", "1", "--samples", "2", "--labels", str(labels)]
    names = [Path(p).name for p in pictures[:2]]
    targets = tmp_path / "targets.csv"
    targets.write_text(f"{names[1]},hen\n{names[0]},tench, Tinca tinca\nunused.png,2\n")
    out = tmp_path / "out"
    code, stdout, _ = run([*pictures[:2], "--out", str(out), *common, "--target-file", str(targets)], capsys)
    assert code == 0, stdout
    assert [json.loads(line)["target"] for line in (out / "summary.jsonl").read_text().splitlines()] == [0, 3]
    targets.write_text(f"{names[1]},hen\n")
    code, _, err = run([*pictures[:2], "--out", str(tmp_path / "x"), *common, "--target-file", str(targets)], capsys)
    assert code == 2 and f"names no class for 1 of the 2 images: {names[0]}" in err
