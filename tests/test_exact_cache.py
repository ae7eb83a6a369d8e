"""scripts/exact_cache.py: the benchmark scripts' shared cache of exact results is keyed by content."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from amortized_cartoonx.classifiers import load_classifier, weights_digest, wrap_classifier
from amortized_cartoonx.optimizer import CartoonX

from .conftest import make_tiny_cnn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from exact_cache import cache_path, classifier_key  # noqa: E402


def frozen_torchscript(path: Path) -> Path:
    """A tiny frozen TorchScript classifier: its weights are constants, its state dict is empty."""
    model = torch.jit.freeze(torch.jit.script(make_tiny_cnn().eval()))
    model.save(str(path))
    return path


def test_an_nn_module_is_keyed_by_its_weights():
    model = make_tiny_cnn()
    assert classifier_key(model, "package.module:anything") == weights_digest(model)


def test_a_frozen_torchscript_file_is_keyed_by_its_bytes_not_its_path(tmp_path):
    (tmp_path / "a").mkdir()
    first = frozen_torchscript(tmp_path / "a" / "m.pt")
    second = tmp_path / "b" / "copy.pt"
    second.parent.mkdir()
    shutil.copy(first, second)
    a = load_classifier(str(first), normalize="none")
    b = load_classifier(str(second), normalize="none")
    assert weights_digest(a) is None  # the case the file digest is for
    assert classifier_key(a, str(first)) == classifier_key(b, str(second))
    assert classifier_key(a, str(first)).startswith("file-sha256:")


def test_different_torchscript_files_get_different_keys(tmp_path):
    first = frozen_torchscript(tmp_path / "m.pt")
    other = torch.jit.freeze(torch.jit.script(make_tiny_cnn(seed=1).eval()))
    other.save(str(tmp_path / "n.pt"))
    a = load_classifier(str(first), normalize="none")
    b = load_classifier(str(tmp_path / "n.pt"), normalize="none")
    assert classifier_key(a, str(first)) != classifier_key(b, str(tmp_path / "n.pt"))


def test_the_normalisation_and_the_device_are_part_of_the_key(tmp_path):
    """--normalize none and imagenet shared one file; so did a CUDA result read on a CPU (other noise draws). A
    plain CPU run without normalisation keeps the file name of the earlier key."""
    image = tmp_path / "im.png"
    image.write_bytes(b"an image's bytes")
    model = make_tiny_cnn()
    plain = CartoonX(wrap_classifier(model), levels=2)
    imagenet = CartoonX(wrap_classifier(model, normalize="imagenet"), levels=2)
    key = classifier_key(model, "tiny")
    paths = {
        cache_path(str(tmp_path), image, plain, key, 32, 0),
        cache_path(str(tmp_path), image, imagenet, key, 32, 0),
        cache_path(str(tmp_path), image, plain, key, 32, 0, device="cuda"),
    }
    assert len(paths) == 3
