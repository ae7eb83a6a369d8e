"""Single-channel (greyscale) classifiers: the images' conversion, the channel probe, ``explain`` and ``evaluate``."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from amortized_cartoonx.classifiers import Classifier, input_channels
from amortized_cartoonx.cli import main
from amortized_cartoonx.errors import ClassifierError, InputError
from amortized_cartoonx.explanation import load_saved_explanation
from amortized_cartoonx.images import LUMA, load_image, to_channels
from amortized_cartoonx.rde import original_logits

from .conftest import make_tiny_cnn, tiny_fit_command

SIZE = 32
#: A greyscale classifier that reads only the top-left quadrant: class 1's logit rises with its brightness.
MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    class TopLeft(nn.Module):
        def __init__(self):
            super().__init__()
            self.read = nn.Conv2d(1, 1, 1)  # refuses RGB images, as a single-channel network does
            with torch.no_grad():
                self.read.weight.fill_(1.0)
                self.read.bias.zero_()

        def forward(self, x):
            h, w = x.shape[-2] // 2, x.shape[-1] // 2
            z = 20 * (self.read(x)[:, 0, :h, :w].mean((1, 2)) - 0.4)
            return torch.stack([torch.zeros_like(z), z], dim=1)

    def top_left():
        return TopLeft()
    """
)


class _Grey(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


@pytest.fixture
def grey_spec(tmp_path, monkeypatch):
    (tmp_path / "cx_grey_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cx_grey_models:top_left"


@pytest.fixture
def grey_pictures(tmp_path):
    """Four greyscale files, bright in the top-left quadrant, noisy elsewhere."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "grey"
    folder.mkdir()
    for k in range(4):
        pixels = rng.random((SIZE, SIZE)) * 0.5
        pixels[: SIZE // 2, : SIZE // 2] = 0.9
        Image.fromarray((pixels * 255).astype(np.uint8), mode="L").save(folder / f"g{k}.png")
    return folder


def test_rgb_becomes_luma_and_greyscale_files_come_back_exactly(tmp_path):
    rgb = torch.rand(2, 3, 5, 5)
    grey = to_channels(rgb, 1)
    assert grey.shape == (2, 1, 5, 5)
    expected = sum(w * rgb[:, c] for c, w in enumerate(LUMA))
    torch.testing.assert_close(grey[:, 0], expected)
    assert to_channels(rgb, 3) is rgb and to_channels(grey, 1) is grey
    torch.testing.assert_close(to_channels(grey, 3), grey.expand(2, 3, 5, 5))
    assert to_channels(rgb[0], 1).shape == (1, 5, 5)  # one image (C, H, W)
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit level
    Image.fromarray(pixels, mode="L").save(tmp_path / "g.png")
    read = to_channels(load_image(tmp_path / "g.png", None), 1)
    assert torch.equal(read[0], torch.from_numpy(pixels).float() / 255)  # exactly (float32 sums were 1 ulp off)
    with pytest.raises(InputError, match="1 .greyscale. or 3"):
        to_channels(rgb, 2)
    with pytest.raises(InputError, match="expected images"):
        to_channels(torch.rand(2, 4, 5, 5), 1)


def test_the_probe_finds_the_channels_a_classifier_takes():
    assert input_channels(Classifier(_Grey()), SIZE) == 1
    assert input_channels(Classifier(make_tiny_cnn()), SIZE) == 3
    assert input_channels(Classifier(_Grey(), mean=0.5, std=0.25), SIZE) == 1  # one number serves one channel


class _BatchOfOne(_Grey):
    """A greyscale model exported for batch size 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise RuntimeError("expected batch size 1")
        return super().forward(x)


def test_the_probe_sees_a_greyscale_model_of_batch_size_one_as_greyscale():
    assert input_channels(Classifier(_BatchOfOne()), SIZE) == 1  # its batch size is the preflight's to refuse


def test_an_rgb_model_given_greyscale_images_says_what_to_do():
    with pytest.raises(ClassifierError, match="an RGB classifier takes images .N, 3, H, W.*--channels auto or 3"):
        original_logits(make_tiny_cnn(), torch.rand(2, 1, SIZE, SIZE))
    rgb = Classifier(make_tiny_cnn(), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with pytest.raises(ClassifierError, match="an RGB classifier takes RGB images .--channels auto or 3"):
        rgb(torch.rand(2, 1, SIZE, SIZE))


def test_an_rgb_normalisation_in_front_of_a_greyscale_model_is_named():
    grey = Classifier(_Grey(), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with pytest.raises(ClassifierError, match="normalisation .* has 3 channels .* images have 1"):
        input_channels(grey, SIZE)
    with pytest.raises(ClassifierError, match="images have 1"):  # it would broadcast grey images to 3 channels
        grey(torch.rand(2, 1, SIZE, SIZE))


def test_an_rgb_image_given_to_a_greyscale_model_says_what_to_do():
    with pytest.raises(ClassifierError, match="greyscale images .N, 1, H, W.: .*--channels auto or 1"):
        original_logits(_Grey(), torch.rand(2, 3, SIZE, SIZE))


def test_explain_gives_a_greyscale_classifier_greyscale_images(tmp_path, grey_spec, grey_pictures, capsys):
    image = grey_pictures / "g0.png"
    out = tmp_path / "out"
    args = ["explain", str(image), "--classifier", grey_spec, "--size", str(SIZE), "--out", str(out)]
    rc = main([*args, "--schedule", "fast", "--steps", "80", "--samples", "8", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    saved = load_saved_explanation(out / "g0.safetensors")
    assert saved["explanation"].shape == (1, SIZE, SIZE)
    assert saved["metadata"]["channels"] == 1
    record = json.loads((out / "summary.jsonl").read_text())
    assert record["channels"] == 1
    # the classifier reads the top-left quadrant only: the mask keeps it and drops the rest
    half = SIZE // 2
    explanation = saved["explanation"][0]
    kept, dropped = float(explanation[:half, :half].mean()), float(explanation[half:, half:].abs().mean())
    assert kept > 0.35 and dropped < 0.1 and kept > 5 * dropped, (kept, dropped)  # measured: 0.55, 0.04
    # forcing RGB images on it fails with a pointer to --channels
    rc = main([*args, "--steps", "1", "--channels", "3", "--no-progress"])
    assert rc == 2 and "--channels auto or 1" in capsys.readouterr().err


def test_evaluate_runs_every_method_that_can_take_greyscale_images(tmp_path, grey_spec, grey_pictures, capsys):
    out = tmp_path / "eval"
    methods = "cartoonx,pixel-rde,integrated-gradients,random-wavelet"
    common = ["--classifier", grey_spec, "--size", str(SIZE), "--steps", "5", "--samples", "4", "--no-progress"]
    rc = main(["evaluate", "--images", str(grey_pictures), "--out", str(out), "--methods", methods, *common])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["channels"] == 1
    assert set(summary["methods"]) == set(methods.split(","))
    assert (out / "examples.png").is_file() and (out / "rate_distortion.png").is_file()


def test_the_amortized_explainer_trains_and_explains_on_greyscale_images(
    tmp_path, grey_spec, grey_pictures, capsys, monkeypatch
):
    """fit (scratch encoder), explain --method warm and evaluate amortized for a single-channel classifier; an
    RGB classifier is refused by the greyscale checkpoint."""
    fit = tiny_fit_command(grey_pictures, grey_spec, monkeypatch, tmp_path)
    assert main(fit) == 0, capsys.readouterr().err
    (checkpoint,) = (tmp_path / "checkpoints").rglob("last.ckpt")
    common = ["--classifier", grey_spec, "--checkpoint", str(checkpoint), "--no-progress"]
    out = tmp_path / "warm"
    explain = ["explain", str(grey_pictures / "g0.png"), "--out", str(out), "--method", "warm", *common]
    assert main([*explain, "--refine-steps", "2", "--samples", "2"]) == 0, capsys.readouterr().err
    saved = load_saved_explanation(out / "g0.safetensors")
    assert saved["explanation"].shape == (1, SIZE, SIZE) and saved["metadata"]["channels"] == 1
    evaluate = ["evaluate", "--images", str(grey_pictures), "--out", str(tmp_path / "eval"), "--methods", "amortized"]
    assert main([*evaluate, *common, "--samples", "2", "--rates", "3", "--lambdas", "none"]) == 0
    # an RGB classifier does not fit a greyscale checkpoint
    rgb = ["explain", str(grey_pictures / "g0.png"), "--out", str(tmp_path / "rgb"), "--method", "amortized"]
    code = main([*rgb, "--classifier", grey_spec, "--checkpoint", str(checkpoint), "--channels", "3"])
    assert (
        code == 2
        and "3-channel images (trained on 1-channel ones: a classifier on greyscale images, --channels 1)"
        in (capsys.readouterr().err)
    )


def test_the_classifier_encoder_reads_a_greyscale_classifier():
    from amortized_cartoonx.mask_predictor import MaskPredictor, MaskPredictorConfig

    class Strided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)))

    classifier = Classifier(Strided())
    cfg = MaskPredictorConfig(num_classes=3, levels=2, width=8, decoder_width=8, embed_dim=8, encoder="classifier")
    cfg = dataclasses.replace(cfg, in_channels=1).with_taps(classifier, SIZE)
    assert cfg.taps == ["model.a", "model.b"]
    network = MaskPredictor(cfg, features=classifier)
    mask = network.mask(torch.rand(2, 1, SIZE, SIZE), torch.tensor([0, 2]))
    assert mask.lowpass.shape[:2] == (2, 1)
    with pytest.raises(InputError, match="greyscale images .N, 1, H, W."):
        network.mask(torch.rand(2, 3, SIZE, SIZE), torch.tensor([0, 2]))
