"""Hostile and careless input: one line on stderr and exit code 2, no traceback, nothing written outside
``--out``, no input overwritten, no code run from a file, no NaN passed off as a result.

(The teacher-mask store's own corrupt-shard and manifest cases live in ``test_teacher_masks.py``.)
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amortized_cartoonx.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KIND, STATE_PREFIX
from amortized_cartoonx.cli import main
from amortized_cartoonx.errors import InputError
from amortized_cartoonx.explanation import load_saved_explanation
from amortized_cartoonx.images import load_image
from amortized_cartoonx.mask_predictor import MaskPredictor, MaskPredictorConfig

SIZE = 32
MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(16, 5))

    class _NaN(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 5), float("nan"))

    def nan():
        return _NaN()

    class _OneAtATime(nn.Module):  # as a model exported with static shapes for one image
        def __init__(self):
            super().__init__()
            self.net = tiny()

        def forward(self, x):
            assert x.shape[0] == 1, "Guard failed: x.size()[0] == 1"
            return self.net(x)

    def one_at_a_time():
        return _OneAtATime()

    def tiny_again():  # the same weights under another spec
        return tiny()

    def other():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(16, 5))
    """
)


@pytest.fixture
def spec(tmp_path, monkeypatch):
    (tmp_path / "cx_hostile_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cx_hostile_models:tiny"


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse refuses bad option values itself
        code = exc.code
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def explain_args(images: list[Path | str], spec: str, out: Path, *extra: str) -> list[str]:
    steps = [] if "amortized" in extra else ["--steps", "1"]  # the amortized method runs no steps (refused)
    return [
        "explain",
        *map(str, images),
        "--classifier",
        spec,
        "--out",
        str(out),
        "--size",
        str(SIZE),
        *steps,
        "--samples",
        "2",
        "--levels",
        "2",
        *extra,
    ]


# ---- checkpoints: never run code, validated settings ---------------------------------------------------------------
def checkpoint_dict(spec: str, **network) -> dict:
    config = MaskPredictorConfig(num_classes=5, levels=2, width=8, decoder_width=8, embed_dim=8, **network)
    net = MaskPredictor(config)
    meta = {
        "format_version": CHECKPOINT_FORMAT,
        "kind": CHECKPOINT_KIND,
        "classifier": spec,
        "normalize": "none",
        "image_size": SIZE,
        "wave": "db3",
        "levels": 2,
        "mode": "zero",
        "l1_lambda": 20.0,
        "distortion": "label",
        "obfuscation": "gaussian-adaptive",
        "mask_predictor": net.settings(),
    }
    state = {STATE_PREFIX + k: v for k, v in net.state_dict().items()}
    return {"state_dict": state, "cartoonx": meta}


class _Payload:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_in_a_checkpoint_never_runs(tmp_path, spec, inputs, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"cartoonx": _Payload(marker)}))
    before = snapshot(inputs)
    code, err = cli(
        explain_args([inputs / "a.png"], spec, tmp_path / "out", "--method", "amortized", "--checkpoint", str(evil)),
        capsys,
    )
    assert_refused(code, err, "evil.ckpt")
    assert not marker.exists() and snapshot(inputs) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c["cartoonx"]["mask_predictor"].update(extra=1), "unknown network setting"),
        (lambda c: c["cartoonx"].pop("wave"), "lack 'wave'"),
        (lambda c: c["cartoonx"]["mask_predictor"].update(width=100000), "above the cap"),
        (lambda c: c["cartoonx"].update(image_size=100000), "image_size 100000"),
        (lambda c: c["cartoonx"].update(image_size="32"), "wrong type"),
        (lambda c: c["cartoonx"].update(format_version=99), "format 99"),
        (lambda c: c["cartoonx"].update(l1_lambda=float("nan")), "l1_lambda"),
        (lambda c: next(iter(c["state_dict"].values())).fill_(float("nan")), "NaN"),
        (lambda c: c.update(state_dict=[1, 2]), "state_dict"),
        (lambda c: c["cartoonx"]["mask_predictor"].update(init_bias=["x", 1.0, 1.0]), "'init_bias' is not a list"),
        (lambda c: c["cartoonx"]["mask_predictor"].update(init_bias=[1.0] * 1000), "'init_bias' is not a list"),
        (lambda c: c["cartoonx"]["mask_predictor"].update(init_bias=[1.0, 2.0]), "init_bias must be one finite"),
        # within every cap, yet gigabytes: refused from the shapes, before any network is allocated
        (lambda c: c["cartoonx"]["mask_predictor"].update(width=4096, decoder_width=4096), "tensors differ"),
    ],
)
def test_hand_made_checkpoint_settings_are_refused(tmp_path, spec, inputs, capsys, edit, needle):
    checkpoint = checkpoint_dict(spec)
    edit(checkpoint)
    path = tmp_path / "hand.ckpt"
    torch.save(checkpoint, path)
    code, err = cli(
        explain_args([inputs / "a.png"], spec, tmp_path / "out", "--method", "amortized", "--checkpoint", str(path)),
        capsys,
    )
    assert_refused(code, err, needle)


@pytest.mark.parametrize("init_bias", [4.0, [4.0, -4.0, 4.0]])  # one bias, or one per band (low-pass, 1, 2)
def test_a_valid_hand_made_checkpoint_explains(tmp_path, spec, inputs, capsys, init_bias):
    path = tmp_path / "ok.ckpt"
    checkpoint = checkpoint_dict(spec)
    checkpoint["cartoonx"]["mask_predictor"]["init_bias"] = init_bias
    torch.save(checkpoint, path)
    code, err = cli(
        explain_args([inputs / "a.png"], spec, tmp_path / "out", "--method", "amortized", "--checkpoint", str(path)),
        capsys,
    )
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "summary.jsonl").read_text())
    assert np.isfinite(record["loss_final"])


def test_a_classifier_is_recognised_by_its_weights_not_its_spec_text(tmp_path, spec, inputs, capsys):
    from amortized_cartoonx.classifiers import classifier_identity, load_classifier

    checkpoint = checkpoint_dict(spec)
    checkpoint["cartoonx"].update(classifier_identity(spec, load_classifier(spec)))
    path = tmp_path / "ok.ckpt"
    torch.save(checkpoint, path)
    code, err = cli(
        explain_args(
            [inputs / "a.png"],
            "cx_hostile_models:tiny_again",
            tmp_path / "same",
            "--method",
            "amortized",
            "--checkpoint",
            str(path),
        ),
        capsys,
    )
    assert code == 0, err
    code, err = cli(
        explain_args(
            [inputs / "a.png"],
            "cx_hostile_models:other",
            tmp_path / "other",
            "--method",
            "amortized",
            "--checkpoint",
            str(path),
        ),
        capsys,
    )
    assert_refused(code, err, "was trained for classifier")


def test_the_checkpoint_settings_are_the_defaults_of_size_levels_and_padding(tmp_path, spec, inputs, capsys):
    """Without --size, --levels or --mode, explain uses the checkpoint's (it refused them at 256 px and J=5);
    explicit values that differ are still refused, naming the J actually used at that size."""
    path = tmp_path / "ok.ckpt"
    checkpoint = checkpoint_dict(spec, mode="periodization")
    checkpoint["cartoonx"]["mode"] = "periodization"
    torch.save(checkpoint, path)
    base = ["explain", str(inputs / "a.png"), "--classifier", spec, "--method", "amortized", "--checkpoint", str(path)]
    code, err = cli([*base, "--out", str(tmp_path / "out"), "--samples", "2"], capsys)
    assert code == 0, err
    saved = load_saved_explanation(tmp_path / "out" / "a.safetensors")
    assert saved["explanation"].shape == (1, SIZE, SIZE)
    code, err = cli([*base, "--out", str(tmp_path / "bad"), "--size", "64"], capsys)
    assert_refused(code, err, "image size 64x64", "use --size 32")
    code, err = cli([*base, "--out", str(tmp_path / "bad"), "--levels", "5", "--mode", "zero"], capsys)
    assert_refused(code, err, "J=4 levels", "padding zero")  # J=5 is capped to 4 at 32 px
    assert "J=5" not in err


def test_a_file_that_is_no_checkpoint_is_named_so(tmp_path, spec, inputs, capsys):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(photo)
    code, err = cli(
        explain_args([inputs / "a.png"], spec, tmp_path / "out", "--method", "warm", "--checkpoint", str(photo)),
        capsys,
    )
    assert_refused(code, err, "photo.jpg", "not a checkpoint file")
    assert "could run code" not in err


@pytest.mark.parametrize(
    ("method", "extra", "needle"),
    [
        ("cartoonx", ["--refine-steps", "3"], "--refine-steps is for --method warm, not cartoonx"),
        ("amortized", ["--refine-steps", "3"], "--refine-steps is for --method warm, not amortized"),
        ("amortized", ["--steps", "3"], "--steps is for --method cartoonx, pixel-rde or warm, not amortized"),
        ("amortized", ["--lr", "0.1", "--schedule", "fast"], "--schedule, --lr are for --method cartoonx, pixel-rde"),
        ("amortized", ["--precision", "bf16"], "--precision is for --method cartoonx, pixel-rde or warm"),
        ("amortized", ["--calibration", "top-k"], "--calibration chooses the candidates of --calibrate-samples"),
    ],
)
def test_options_the_method_ignores_are_refused(tmp_path, spec, inputs, capsys, method, extra, needle):
    path = tmp_path / "ok.ckpt"
    torch.save(checkpoint_dict(spec), path)
    checkpoint = ["--checkpoint", str(path)] if method != "cartoonx" else []
    args = ["explain", str(inputs / "a.png"), "--classifier", spec, "--out", str(tmp_path / "out"), "--samples", "2"]
    code, err = cli([*args, "--method", method, *checkpoint, *extra], capsys)
    assert_refused(code, err, needle)
    assert not (tmp_path / "out").exists()


# ---- outputs never overwrite inputs or each other --------------------------------------------------------------------
def test_out_in_the_input_folder_never_overwrites_an_input(tmp_path, spec, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "x.png")
    before = snapshot(folder)
    code, err = cli(explain_args([folder / "x.png"], spec, folder), capsys)
    assert_refused(code, err, "overwrite the input")
    assert snapshot(folder) == before


def test_colliding_names_get_distinct_outputs(tmp_path, spec, capsys):
    rng = np.random.default_rng(1)
    paths = []
    for sub, name in (("a", "x.png"), ("b", "x.png"), ("c", "x_1.png")):
        (tmp_path / sub).mkdir()
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / sub / name)
        paths.append(tmp_path / sub / name)
    out = tmp_path / "out"
    code, err = cli(explain_args(paths, spec, out), capsys)
    assert code == 0, err
    lines = (out / "summary.jsonl").read_text().splitlines()
    assert [json.loads(line)["image"] for line in lines] == [str(p) for p in paths]
    assert len(list(out.glob("*.safetensors"))) == 3 and len(list(out.glob("*.png"))) == 3


def test_summary_lines_name_their_output_files(tmp_path, spec, capsys):
    rng = np.random.default_rng(2)
    paths = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / sub / "x.png")
        paths.append(tmp_path / sub / "x.png")
    out = tmp_path / "out"
    code, err = cli(explain_args(paths, spec, out), capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [(line["png"], line["safetensors"]) for line in lines] == [
        ("x.png", "x.safetensors"),
        ("x_1.png", "x_1.safetensors"),
    ]
    for line in lines:
        assert load_saved_explanation(out / line["safetensors"])["metadata"]["image"] == line["image"]
        assert (out / line["png"]).is_file()


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_an_unusable_out_is_refused_before_any_work(tmp_path, spec, inputs, capsys, kind):
    if kind == "file":
        out = tmp_path / "taken"
        out.write_text("a file")
        needle = "is a file"
    else:
        out = Path("/proc/cartoonx-out")  # not writable, even for root
        needle = "cannot write"
    code, err = cli(explain_args([inputs / "a.png"], spec, out), capsys)
    assert_refused(code, err, needle)


# ---- non-finite numbers are errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--l1-lambda", "nan"], "--l1-lambda"),
        (["--steps", "-2"], "--steps"),
        (["--size", "100000"], "--size"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_option_values_are_refused(tmp_path, spec, inputs, capsys, extra, needle):
    code, err = cli([*explain_args([inputs / "a.png"], spec, tmp_path / "out"), *extra], capsys)
    assert_refused(code, err, needle)


def test_a_classifier_for_one_image_at_a_time_is_refused_before_any_output(tmp_path, spec, inputs, capsys):
    """It passed the check on the first image, then failed on the first step's N x L copies: a traceback and an
    empty output folder."""
    code, err = cli(explain_args([inputs / "a.png"], "cx_hostile_models:one_at_a_time", tmp_path / "out"), capsys)
    assert_refused(code, err, "cx_hostile_models:one_at_a_time", "shape (2, 3, 32, 32)", "Guard failed")
    assert not (tmp_path / "out").exists()
    from cx_hostile_models import one_at_a_time

    from amortized_cartoonx import CartoonX
    from amortized_cartoonx.errors import ClassifierError

    with pytest.raises(ClassifierError, match="N x L noisy copies at once.*dynamic_shapes"):  # an AssertionError
        CartoonX(one_at_a_time(), levels=2, steps=1, num_samples=2).explain(torch.rand(1, 3, SIZE, SIZE))


def test_a_classifier_returning_nan_is_refused_with_its_name(tmp_path, spec, inputs, capsys):
    code, err = cli(explain_args([inputs / "a.png"], "cx_hostile_models:nan", tmp_path / "out"), capsys)
    assert_refused(code, err, "cx_hostile_models:nan", "NaN")
    assert not (tmp_path / "out").exists()


# ---- the Python API: the library's own errors, naming the parameter -------------------------------------------------
@pytest.mark.parametrize(
    ("call", "error", "needle"),
    [
        ("baseline_ig_steps", "ConfigError", "ig_steps must be an integer of at least 1, got 0"),
        ("baseline_std", "ConfigError", "smoothgrad_std must be a finite number of at least 0, got -1"),
        ("stop_tolerance", "ConfigError", "stop_tolerance must be in [0, 1)"),
        ("objective_lambda", "ConfigError", "l1_lambda must be a finite number of at least 0, got nan"),
        ("load_number", "ClassifierError", "a classifier spec is a string, got int"),
        ("init_mask_list", "InputError", "a mask must be Coefficients or a flat (N, K) tensor, got list"),
        ("init_mask_nan", "InputError", "the mask has NaN or infinite entries"),
        ("single_logit", "ClassifierError", "use the sigmoid link (--link sigmoid; Python: link='sigmoid')"),
        ("inference_mode", "ConfigError", "outside torch.inference_mode()"),
        ("nan_when_measured", "NonFiniteError", "the measured RDE loss of image 0 is nan"),
    ],
)
def test_python_api_mistakes_are_the_librarys_errors(call, error, needle):
    """Each failed deep inside (captum's AssertionError, an IndexError, an AttributeError) or was accepted."""
    from amortized_cartoonx import CartoonX, PixelRDE, errors, load_classifier, wrap_classifier
    from amortized_cartoonx.evaluation import MethodContext, baselines  # noqa: F401  (registers the baselines)
    from amortized_cartoonx.evaluation.attribution import METHODS, BaselineConfig
    from amortized_cartoonx.optimizer import OptimizerConfig
    from amortized_cartoonx.rde import RDEObjective
    from amortized_cartoonx.wavelets import WaveletRepresentation

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    image = torch.rand(1, 3, 32, 32)
    calls = {
        "baseline_ig_steps": lambda: METHODS.get("integrated-gradients")(
            MethodContext(wrap_classifier(model), baselines=BaselineConfig(ig_steps=0))
        ),
        "baseline_std": lambda: METHODS.get("smoothgrad")(
            MethodContext(wrap_classifier(model), baselines=BaselineConfig(smoothgrad_std=-1))
        ),
        "stop_tolerance": lambda: OptimizerConfig(stop_tolerance=-1).validate(),
        "objective_lambda": lambda: RDEObjective(model, WaveletRepresentation(levels=2), l1_lambda=float("nan")),
        "load_number": lambda: load_classifier(3),
        "init_mask_list": lambda: CartoonX(model, levels=2, steps=1, num_samples=2).explain(image, init_mask=[[1.0]]),
        "init_mask_nan": lambda: PixelRDE(model, steps=0, num_samples=2).explain(
            image, init_mask=torch.full((1, 32 * 32), float("nan"))
        ),
        "single_logit": lambda: CartoonX(torch.nn.Sequential(model, torch.nn.Linear(4, 1)), levels=2).explain(image),
        "inference_mode": lambda: _in_inference_mode(CartoonX(model, levels=2, steps=1, num_samples=2), image),
        "nan_when_measured": lambda: CartoonX(_NaNOnObfuscations(model), levels=2, steps=0, num_samples=2).explain(
            image
        ),
    }
    with pytest.raises(getattr(errors, error), match=re.escape(needle)):
        calls[call]()


class _NaNOnObfuscations(torch.nn.Module):
    """Finite logits on one image, NaN on a batch of obfuscations."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        return logits if x.shape[0] == 1 else logits * float("nan")


def _in_inference_mode(explainer, image):
    with torch.inference_mode():
        return explainer.explain(image)


def test_explain_under_no_grad_is_explain():
    """Evaluation code wraps calls in torch.no_grad(); the steps failed there with autograd's own error."""
    from amortized_cartoonx import CartoonX, PixelRDE

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    image = torch.rand(2, 3, 32, 32)
    for make in (lambda: CartoonX(model, levels=2, steps=3, num_samples=2), lambda: PixelRDE(model, steps=3)):
        plain = make().explain(image)
        with torch.no_grad():
            quiet = make().explain(image)
        assert torch.equal(plain.loss, quiet.loss) and plain.steps.tolist() == [3, 3]


def test_pixel_rde_leaves_the_callers_tensor_alone():
    """The pixel "coefficients" were the caller's tensor: every step's backward wrote into its .grad."""
    from amortized_cartoonx import PixelRDE

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    base = torch.rand(1, 3, 40, 40, requires_grad=True)
    PixelRDE(model, steps=2, num_samples=2).explain(base[:, :, 4:36, 4:36])
    assert base.grad is None
    with torch.inference_mode():
        frozen_images = torch.rand(1, 3, 32, 32)
    assert torch.isfinite(PixelRDE(model, steps=2, num_samples=2).explain(frozen_images).loss).all()


def test_bf16_steps_take_float64_images():
    """Autocast leaves float64 alone, so float64 obfuscations met a bf16 convolution: a raw dtype error."""
    from amortized_cartoonx import CartoonX, PixelRDE

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    image = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    for explainer in (CartoonX(model, levels=2, steps=2, num_samples=2, precision="bf16"),
                      PixelRDE(model, steps=2, num_samples=2, precision="bf16")):  # fmt: skip
        assert torch.isfinite(explainer.explain(image).loss).all()


def test_a_bound_forward_is_frozen_like_its_module():
    """``CartoonX(model.forward)`` ran a train-mode model as it was: BatchNorm statistics and .grad changed."""
    from amortized_cartoonx import CartoonX

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).train()
    before = model[1].running_mean.clone()
    CartoonX(model.forward, levels=2, steps=2, num_samples=2).explain(torch.rand(2, 3, 32, 32))
    assert torch.equal(model[1].running_mean, before) and int(model[1].num_batches_tracked) == 0
    assert all(p.grad is None for p in model.parameters()) and model.training


# ---- files: classifier specs, labels, images -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("classifier", "needle"), [("os:system", "calling os:system() failed"), ("os:getcwd", "not a torch.nn.Module")]
)
def test_classifier_specs_that_are_no_model(tmp_path, inputs, capsys, classifier, needle):
    code, err = cli(explain_args([inputs / "a.png"], classifier, tmp_path / "out"), capsys)
    assert_refused(code, err, needle)


def test_a_binary_labels_file_is_refused(tmp_path, spec, inputs, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(bytes(range(256)) * 4)
    code, err = cli([*explain_args([inputs / "a.png"], spec, tmp_path / "out"), "--labels", str(labels)], capsys)
    assert_refused(code, err, "not UTF-8 text")


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file that declares ``width x height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (png_header_only(20000, 20000), "more pixels than the limit"),
        (png_header_only(9000, 9000), "more pixels than the limit"),
        (png_header_only(1, 1), "at least"),
    ],
)
def test_bomb_and_tiny_images_are_refused(tmp_path, spec, capsys, content, needle):
    path = tmp_path / "odd.png"
    path.write_bytes(content)
    code, err = cli(explain_args([path], spec, tmp_path / "out"), capsys)
    assert_refused(code, err, "odd.png", needle)


def test_a_fuzzed_image_either_loads_or_is_one_input_error(tmp_path):
    """A few hundred seeded mutations of a PNG and a JPEG: each loads as a finite (3, S, S) image in [0, 1]
    or raises InputError; nothing else escapes."""
    rng = np.random.default_rng(1234)
    picture = Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8))
    originals = []
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt)
        originals.append(buffer.getvalue())
    path = tmp_path / "fuzz.img"
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(300):
        data = bytearray(originals[trial % 2])
        how = trial % 3
        if how == 0:  # truncate
            data = data[: int(rng.integers(1, len(data)))]
        elif how == 1:  # flip a few bytes
            for _ in range(int(rng.integers(1, 6))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        else:  # overwrite a header byte (sizes, bit depth, colour type, markers)
            data[int(rng.integers(8, min(40, len(data))))] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            image = load_image(path, 16)
        except InputError:
            outcomes["refused"] += 1
            continue
        assert image.shape == (3, 16, 16) and bool(torch.isfinite(image).all())
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"file,class_index\na.png,-1\n", r"row 2: class_index must be a non-negative integer below 2\^31, got '-1'"),
        (
            b"file,class_index\na.png,1\nb.png\n",
            r"row 3: class_index must be a non-negative integer below 2\^31, got None",
        ),
        (b"file,class_index\na.png,\xff\n", "is not UTF-8 CSV text"),
        (b"file,class_index\na.png,1\na.png,2\n", r"row 3: 'a.png' is listed again with class 2, after class 1"),
        (b"file,class_index\na.png,99999999999999999999\n", "below 2\\^31"),
    ],
)
def test_a_bad_labels_csv_is_one_input_error_naming_the_row(tmp_path, content, needle):
    """A negative index read as "no label" (target_source=label then explained the prediction); a short row or
    bytes that are not UTF-8 gave a TypeError or UnicodeDecodeError."""
    from amortized_cartoonx.data import read_labels_csv

    path = tmp_path / "labels.csv"
    path.write_bytes(content)
    with pytest.raises(InputError, match=needle):
        read_labels_csv(path)
    path.write_bytes(b"file,class_index\na.png, 3\n")
    assert read_labels_csv(path) == {"a.png": 3}
    path.write_bytes(b"\xef\xbb\xbffile,class_index\na.png,3\na.png,3\n")  # a spreadsheet's BOM; a repeated row
    assert read_labels_csv(path) == {"a.png": 3}


def test_labels_of_files_the_folder_lacks_are_warned_about(tmp_path):
    from amortized_cartoonx.data import ImageFolder

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("file,class_index\nA.png,1\n")
    with pytest.warns(UserWarning, match=r"1 file\(s\) of the labels file are not images of .*'A.png'"):
        ImageFolder(tmp_path, size=16)
    with warnings.catch_warnings():  # once per folder: a fit builds its three splits from it
        warnings.simplefilter("error")
        ImageFolder(tmp_path, size=16, ids=["a.png"])


# ---- cartoonx fit --------------------------------------------------------------------------------------------------
def test_fit_refuses_typos_and_empty_runs_in_one_line(tmp_path, inputs, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints/ and logs/ of a run that must not start
    monkeypatch.setattr(sys, "argv", ["cartoonx"])  # LightningCLI compares its args with the command line
    config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    base = ["fit", "--config", config, "--data.images", str(inputs)]
    for extra, needle in (
        (["--model.widht", "3"], "unrecognized arguments: --model.widht"),
        (["--trainer.max_steps", "-2"], "max_steps must be -1 (no limit) or at least 1"),
        (["--trainer.max_steps", "0"], "max_steps must be -1 (no limit) or at least 1"),
    ):
        code, err = cli([*base, *extra], capsys)
        err = "\n".join(line for line in err.splitlines() if not line.startswith("cartoonx: "))  # info logs
        assert_refused(code, err, needle)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("tensors", "metadata", "needle"),
    [
        ({"explanation": (1, 4, 4), "mask_band_0": (2,)}, "{}", "missing or unreadable: mask)"),
        ({"mask": (3,), "explanation": (1, 4, 4), "mask_band_0": (2,)}, None, "missing or unreadable: metadata)"),
        ({"mask": (3,), "explanation": (1, 4, 4), "mask_band_0": (2,)}, "{oops", "unreadable: metadata)"),
        ({"mask": (3,), "explanation": (1, 4, 4), "mask_band_1": (2,)}, "{}", "unreadable: mask_band_0)"),
    ],
)
def test_an_incomplete_saved_explanation_is_one_input_error(tmp_path, tensors, metadata, needle):
    """Each was a KeyError or a JSONDecodeError."""
    from safetensors.torch import save_file

    from amortized_cartoonx.explanation import SAVED_FORMAT

    header = {"format": SAVED_FORMAT} | ({} if metadata is None else {"metadata": metadata})
    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, str(tmp_path / "x.safetensors"), header)
    with pytest.raises(InputError, match=re.escape(needle)):
        load_saved_explanation(tmp_path / "x.safetensors")


def test_a_full_disk_is_one_line_and_the_writer_librarys_error_an_oserror(tmp_path, spec, inputs, capsys, monkeypatch):
    """A full or read-only disk gave 25-54 lines of traceback (safetensors' own error type, or OSError)."""
    from amortized_cartoonx.explanation import Explanation
    from amortized_cartoonx.io import atomic_write

    def full(tmp):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(OSError, match="cannot write .*x.safetensors: Error while serializing"):
        atomic_write(tmp_path / "x.safetensors", full)
    assert not list(tmp_path.glob(".x*"))  # no temporary file left

    def no_space(self, path, index, metadata=None):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Explanation, "save", no_space)
    code, err = cli(explain_args([inputs / "a.png"], spec, tmp_path / "out"), capsys)
    assert code == 1 and "cartoonx explain: error: No space left on device: " in err
    assert "Traceback" not in err

    def missing(self, path, index, metadata=None):  # not the disk: a bug keeps its traceback
        raise FileNotFoundError(2, "No such file or directory", "resources/x.txt")

    monkeypatch.setattr(Explanation, "save", missing)
    with pytest.raises(FileNotFoundError):
        main(explain_args([inputs / "a.png"], spec, tmp_path / "out2"))


def test_a_checkpoint_with_changed_tensor_bytes_is_refused(tmp_path):
    """torch.load checks no CRC: zeroed bytes inside a tensor loaded as other weights."""
    import zipfile

    from amortized_cartoonx.checkpoint import read_checkpoint

    path = tmp_path / "net.ckpt"
    torch.save(checkpoint_dict("tiny"), path)
    read_checkpoint(path)
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    middle = member.header_offset + 30 + name_length + extra_length + member.file_size // 2
    data[middle : middle + 16] = bytes(16) if any(data[middle : middle + 16]) else b"\xff" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"damaged \\(member '{member.filename}' fails its CRC-32 check\\)"):
        read_checkpoint(path)


def test_fit_resumes_never_import_what_a_checkpoint_names(tmp_path, inputs, capsys, monkeypatch):
    """LightningCLI copied a --ckpt_path file's hyper-parameters into the model's config, so a checkpoint naming
    ``payload.py:build`` had it imported and called; a URL was unpickled with weights_only=False."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cartoonx"])
    marker = tmp_path / "pwned"
    (tmp_path / "payload.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef build():\n    pass\n"
    )
    config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    checkpoint = checkpoint_dict(f"{tmp_path / 'payload.py'}:build")
    checkpoint["hyper_parameters"] = {"classifier": f"{tmp_path / 'payload.py'}:build", "mask_predictor": {}}
    torch.save(checkpoint, tmp_path / "downloaded.ckpt")
    torch.save({"payload": _Payload(marker)}, tmp_path / "pickle.ckpt")
    base = ["fit", "--config", config, "--data.images", str(inputs), "--trainer.max_steps", "1", "--ckpt_path"]
    for ckpt, extra, needle in (
        ("downloaded.ckpt", [], "was trained with classifier"),
        ("http://127.0.0.1:9/x.ckpt", [], "resume from a local file"),
        ("downloaded.ckpt", ["--weights_only", "false"], "--weights_only false is refused"),
        ("pickle.ckpt", [], "refused: unpickling them could run code"),
    ):
        code, err = cli([*base, str(tmp_path / ckpt) if "://" not in ckpt else ckpt, *extra], capsys)
        err = "\n".join(line for line in err.splitlines() if not line.startswith("cartoonx: "))  # info logs
        assert_refused(code, err, needle)
    assert not marker.exists() and not (tmp_path / "checkpoints").exists()


def test_ctrl_c_in_fit_is_interrupted_and_exit_130(tmp_path, capsys, monkeypatch):
    """Lightning turns Ctrl+C into exit(1) after its graceful stop: fit said nothing and exited 1."""
    import signal

    (tmp_path / "cx_interrupt.py").write_text(
        "import pytorch_lightning as pl\n\nclass Interrupt(pl.Callback):\n"
        "    def on_train_batch_end(self, *args):\n        raise KeyboardInterrupt\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cartoonx"])
    config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(16):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT from its graceful stop on
    try:
        args = ["fit", "--config", config, "--data.images", str(folder), "--trainer.callbacks+=cx_interrupt.Interrupt"]
        code, err = cli(args, capsys)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert code == 130 and err.strip().splitlines()[-1] == "cartoonx fit: interrupted", err[-600:]


def test_evaluate_checks_out_before_any_work(tmp_path, spec, inputs, capsys):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(inputs / "examples.png")  # a name the report uses
    before = snapshot(inputs)
    args = ["evaluate", "--classifier", spec, "--images", str(inputs), "--size", str(SIZE), "--methods", "random-pixel"]
    code, err = cli([*args, "--out", str(inputs)], capsys)
    assert_refused(code, err, "overwrite the input")
    (tmp_path / "taken").write_text("a file")
    code, err = cli([*args, "--out", str(tmp_path / "taken")], capsys)
    assert_refused(code, err, "is a file")
    code, err = cli([*args, "--out", str(tmp_path / "o"), "--rates", "0"], capsys)
    assert_refused(code, err, "--rates")
    assert snapshot(inputs) == before


def test_offline_torchvision_weights_name_the_way_out(monkeypatch):
    import urllib.error

    import torchvision

    from amortized_cartoonx.classifiers import load_classifier
    from amortized_cartoonx.errors import ClassifierError

    def offline(name, weights=None):
        if weights is None:
            raise AssertionError("not reached")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(ClassifierError, match=r"no network\?.*torchvision:resnet18:none"):
        load_classifier("torchvision:resnet18")


def test_a_peer_processs_failure_is_one_line_not_a_second_traceback(tmp_path):
    """Rank 0 printed a gloo traceback under rank 1's one-line error (an unreadable image in rank 1's share)."""
    import torch.distributed as dist

    from amortized_cartoonx.cli import _peer_failed

    closed = RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:53888. This is typically caused ...")
    assert not _peer_failed(closed)  # no process group: nothing to blame on a peer
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert _peer_failed(closed) and not _peer_failed(RuntimeError("shape mismatch"))
    finally:
        dist.destroy_process_group()


def test_a_killed_writers_temporary_files_are_removed_when_stale(tmp_path, spec, inputs, capsys):
    """SIGKILL leaves atomic_path's temporary files (no finally runs); explain and the evaluation cache kept them
    forever. Stale ones (over an hour old) go at the next run; a fresh one may be a live writer's and stays."""
    import tempfile
    import time

    from amortized_cartoonx.io import remove_stale_temporaries

    out = tmp_path / "out"
    (out / "cache" / "explanations").mkdir(parents=True)
    old = [
        tempfile.mkstemp(dir=d, prefix=".a.", suffix=".safetensors.tmp")[1]
        for d in (out, out / "cache" / "explanations")
    ]
    fresh = tempfile.mkstemp(dir=out, prefix=".b.", suffix=".png.tmp")[1]
    (out / ".notes.tmp").write_text("the user's own")  # not a name atomic_path makes
    hour_ago = time.time() - 7200
    for path in (*old, out / ".notes.tmp"):
        os.utime(path, (hour_ago, hour_ago))
    assert remove_stale_temporaries(out / "cache", recursive=True) == 1
    code, err = cli(explain_args([inputs / "a.png"], spec, out), capsys)
    assert code == 0, err
    assert not any(os.path.exists(p) for p in old) and os.path.exists(fresh) and (out / ".notes.tmp").exists()
