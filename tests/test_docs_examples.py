"""The Python examples of the README and the guides run as written, with small settings swapped in.

Each example is read from its document, the named substitutions are applied (a model without a download, a few
steps, a file written here), and it runs; then the test checks what the example's comments say. A substitution
that no longer matches fails the test: an edited example must be run again here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from amortized_cartoonx.optimizer import CartoonX, OptimizerConfig

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:  # the classifier spec conftest:make_tiny_cnn
    sys.path.insert(0, str(TESTS))

# Every Python example of the docs, and the test that runs it: a new example needs a test here.
EXAMPLES = {
    "README.md": 2,
    "docs/amortized.md": 1,
    "docs/evaluation.md": 1,
    "docs/synthetic.md": 3,
    "docs/targets.md": 1,
}
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_examples(doc: str) -> list[str]:
    """The ```python blocks of ``doc`` (a path relative to the repository root), in order."""
    return _BLOCK.findall((ROOT / doc).read_text(encoding="utf-8"))


def run_example(doc: str, index: int, substitutions: dict[str, str], namespace: dict | None = None) -> dict:
    """Run example ``index`` of ``doc`` after the substitutions (each must match); return its namespace."""
    code = python_examples(doc)[index]
    for old, new in substitutions.items():
        assert old in code, f"{doc}, example {index}: no longer contains {old!r}; update this test"
        code = code.replace(old, new)
    namespace = {} if namespace is None else namespace
    exec(compile(code, f"{doc} example {index}", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def write_photo(path: Path, size: tuple[int, int] = (300, 260), seed: int = 0) -> Path:
    """A smooth RGB JPEG of ``size`` (width, height)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 6, generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=size[::-1], mode="bilinear", align_corners=False)[0]
    Image.fromarray((x.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(path)
    return path


def test_every_example_has_a_test():
    found = {
        doc: len(python_examples(doc))
        for doc in ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
    }
    assert {doc: n for doc, n in found.items() if n} == EXAMPLES


def test_readme_multi_label_example():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    images = torch.rand(2, 3, 32, 32)
    namespace = {"CartoonX": CartoonX, "multi_label_model": model, "images": images}
    substitutions = {'link="sigmoid")': 'link="sigmoid", levels=2, steps=2, num_samples=2)'}
    explanation = run_example("README.md", 1, substitutions, namespace)["explanation"]
    assert explanation.target.tolist() == [3, 3]
    with torch.no_grad():
        assert torch.allclose(explanation.prob_original, model(images)[:, 3].sigmoid())


def test_readme_example(tmp_path):
    ns = run_example(
        "README.md",
        0,
        {
            '"torchvision:mobilenet_v3_small"': '"torchvision:mobilenet_v3_small:none"',  # no download
            '"cat.jpg"': repr(str(write_photo(tmp_path / "cat.jpg"))),
            "steps=2000, num_samples=64": "steps=2, num_samples=2",
        },
    )
    explanation = ns["explanation"]
    assert explanation.image.shape == (1, 1, 256, 256)
    assert 0 <= explanation.image.min() and explanation.image.max() <= 1
    mask = explanation.mask
    assert mask.lowpass.shape == (1, 1, 12, 12) and mask.levels == 5  # the comment's shapes
    assert all(d.shape[:3] == (1, 1, 3) for d in mask.details)
    assert all(0 <= b.min() and b.max() <= 1 for b in mask.bands)
    assert explanation.prob_obfuscated.shape == (1,)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as ``cartoonx fit`` writes it, of an untrained tiny network for the tiny CNN at 32 px."""
    from amortized_cartoonx.checkpoint import META_KEY
    from amortized_cartoonx.mask_predictor import MaskPredictorConfig
    from amortized_cartoonx.training import AmortizedCartoonXModule

    torch.manual_seed(0)
    network = MaskPredictorConfig(width=8, decoder_width=8, embed_dim=8, init_bias=1.0)
    module = AmortizedCartoonXModule(
        "conftest:make_tiny_cnn", image_size=32, levels=3, num_samples=2, mask_predictor=network
    )
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(state)
    state[META_KEY]["data"] = {"val_fraction": 0.25, "test_fraction": 0.25, "split_seed": 0}  # as a fit records it
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    torch.save(state, path)
    return path


def test_amortized_example(tiny_checkpoint):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = [f"{i:03d}.jpg" for i in range(8)]
    ns = run_example(
        "docs/amortized.md",
        0,
        {
            '"checkpoints/RUN/best.ckpt"': repr(str(tiny_checkpoint)),
            '"torchvision:mobilenet_v3_small"  #': '"conftest:make_tiny_cnn"  #',
            'device="auto"': 'device="cpu"',
            "target=207": "target=3",  # the tiny CNN has 5 classes
            "calibration_samples=8": "calibration_samples=2",
            '"torchvision:mobilenet_v3_small", image_size=256)': "CLASSIFIER, image_size=32)",
            "WarmStartExplainer(amortized)": "WarmStartExplainer(amortized, refine_steps=2)",
        },
        {"images": images, "ids": ids},
    )
    assert ns["explanation"].method == "amortized" and ns["explanation"].steps.tolist() == [0, 0]
    mask = ns["mask"]
    assert mask.lowpass.shape[:2] == (2, 1) and all(0 <= b.min() and b.max() <= 1 for b in mask.bands)
    assert ns["calibrated"].mask.lowpass.shape == mask.lowpass.shape
    assert ns["refined"].method == "warm" and ns["refined"].steps.tolist() == [2, 2]
    split = ns["amortized"].split(ids)
    assert sorted(sum(split.values(), [])) == ids and set(split) == {"train", "val", "test"}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated", "ignore:`torch.jit.save` is deprecated")
def test_evaluation_example(tmp_path, monkeypatch):
    from conftest import make_tiny_cnn

    monkeypatch.chdir(tmp_path)
    torch.jit.save(torch.jit.script(make_tiny_cnn()), "model.pt")
    Path("images").mkdir()
    for i in range(2):
        write_photo(Path(f"images/{i}.png"), size=(40, 40), seed=i)
    ns = run_example(
        "docs/evaluation.md",
        0,
        {
            "image_size=256)": "image_size=32, levels=3, optimizer=OptimizerConfig(steps=2, num_samples=2))",
            "EvaluationConfig(limit=10, lambdas={})": (
                'EvaluationConfig(limit=2, lambdas={}, methods=("cartoonx", "pixel-rde", "random-pixel"), rates=5, '
                "noise_draws=2, progress=False)"
            ),
        },
        {"OptimizerConfig": OptimizerConfig},
    )
    assert {"curves.csv", "summary.json", "rate_distortion.png"} <= {p.name for p in Path("out").iterdir()}
    summary = ns["summary"]
    assert set(summary["methods"]) == {"cartoonx", "pixel-rde", "random-pixel"} and len(summary["images"]) == 2


def test_synthetic_examples(tmp_path):
    ns = run_example("docs/synthetic.md", 0, {"SyntheticCartoons(1000,": "SyntheticCartoons(8,"})
    item = ns["item"]
    assert item["image"].shape == (3, 64, 64) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert {"image", "label", "object_mask", "distractor_mask", "id", "index"} <= set(item)
    assert item["label"] < len(ns["CLASS_NAMES"])

    ns = run_example("docs/synthetic.md", 1, {})
    assert ns["item"]["id"] == "stream-1-123456" and set(ns["item"]) == set(item)

    out = tmp_path / "synthetic"
    ns = run_example(
        "docs/synthetic.md",
        2,
        {
            '"checkpoints/synthetic", TrainConfig()': (
                f"{str(out)!r}, TrainConfig(size=32, train_size=16, max_steps=2, batch_size=8, val_size=8, "
                "held_out=8, widths=(4, 8))"
            ),
            'load_classifier("synthetic")': f"load_classifier('synthetic:{out}/classifier.safetensors')",
        },
    )
    assert not ns["result"].reused and Path(ns["result"].weights).is_file()
    assert ns["classifier"](torch.rand(2, 3, 32, 32)).shape[0] == 2


def test_targets_example(tmp_path, monkeypatch):
    pytest.importorskip("pytorch_lightning")
    from amortized_cartoonx.teacher_masks.generate import generate_teacher_masks

    (tmp_path / "images").mkdir()
    name = "000_n01440764.jpg"
    write_photo(tmp_path / "images" / name, size=(40, 40))
    generate_teacher_masks(
        tmp_path / "images",
        tmp_path / "teachers",
        "conftest:make_tiny_cnn",
        size=32,
        steps=2,
        num_samples=2,
        batch_size=1,
        accelerator="cpu",
        devices=1,
        progress=False,
    )
    monkeypatch.chdir(tmp_path)
    ns = run_example("docs/targets.md", 0, {})
    record, store = ns["record"], ns["store"]
    assert len(store) == 1 and record.mask.shape == (store.manifest["mask_length"],)
    assert record.mask.dtype == torch.float32
    assert {"target", "loss", "distortion", "mask_mean", "seed"} <= set(vars(record))


def test_every_public_name_resolves_without_lightning():
    """``from amortized_cartoonx import X`` works for every name of ``__all__`` (the lazy table points at real
    objects), and none of them pulls in Lightning."""
    code = (
        "import sys, amortized_cartoonx as a\n"
        "missing = [n for n in a.__all__ if getattr(a, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules, 'Lightning imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
