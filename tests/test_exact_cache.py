"""scripts/exact_cache.py: the benchmark scripts' shared cache of exact results is keyed by content."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from amortized_cartoonx.classifiers import load_classifier, weights_digest, wrap_classifier
from amortized_cartoonx.images import load_images
from amortized_cartoonx.optimizer import CartoonX, OptimizerConfig
from amortized_cartoonx.seeding import file_seeds

from .conftest import make_tiny_cnn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from exact_cache import cache_path, cached_results, classifier_key, load_result  # noqa: E402


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


def _image(path: Path) -> Path:
    gen = torch.Generator().manual_seed(2)
    pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_the_key_holds_each_images_own_seed_not_the_base_seed(tmp_path):
    """x.png and x.PNG with the same bytes are seeded apart by their names: they must not share a result, and a
    result computed with one seed must not be read back for another."""
    lower = _image(tmp_path / "x.png")
    upper = tmp_path / "x.PNG"
    upper.write_bytes(lower.read_bytes())
    model = make_tiny_cnn()
    optimizer = CartoonX(wrap_classifier(model), levels=2, config=OptimizerConfig(steps=2, num_samples=2))
    key = classifier_key(model, "tiny")
    seeds = file_seeds([lower.name, upper.name], 0)
    assert seeds[0] != seeds[1]
    assert cache_path(str(tmp_path), lower, optimizer, key, 32, seeds[0]) != cache_path(
        str(tmp_path), upper, optimizer, key, 32, seeds[1]
    )
    cache = str(tmp_path / "cache")
    batch = load_images([lower], 32)
    first = cached_results(cache, optimizer, key, 32, batch, [lower], [111])[0]
    other = cached_results(cache, optimizer, key, 32, batch, [lower], [222])[0]
    again = cached_results(cache, optimizer, key, 32, batch, [lower], [111])[0]
    assert not first["cached"] and not other["cached"] and again["cached"]
    assert again["loss"] == first["loss"]


def test_cached_seconds_are_the_whole_call_with_the_measurement_kept_apart(tmp_path):
    """``seconds`` is the explain() call with its measurement; ``measure_seconds`` the measurement's share when the
    caller timed it (None when it did not): each script subtracts what it needs, whoever wrote the file."""
    image = _image(tmp_path / "im.png")
    model = make_tiny_cnn()
    optimizer = CartoonX(wrap_classifier(model), levels=2, config=OptimizerConfig(steps=2, num_samples=2))
    key, batch, cache = classifier_key(model, "tiny"), load_images([image], 32), str(tmp_path / "cache")
    calls = []
    explain = optimizer.explain
    optimizer.explain = lambda *a, **k: calls.append(explain(*a, **k)) or calls[-1]
    fresh = cached_results(cache, optimizer, key, 32, batch, [image], [5], measure_seconds=0.25)[0]
    assert fresh["seconds"] == calls[0].seconds  # the whole call (one image), nothing taken off
    read = cached_results(cache, optimizer, key, 32, batch, [image], [5])[0]
    assert read["cached"] and read["seconds"] == fresh["seconds"] and read["measure_seconds"] == 0.25
    assert len(calls) == 1
    untimed = cached_results(str(tmp_path / "other"), optimizer, key, 32, batch, [image], [5])[0]
    assert untimed["measure_seconds"] is None and untimed["seconds"] > 0


def test_a_file_from_before_the_seconds_were_defined_loads_with_unknown_seconds(tmp_path):
    path = tmp_path / "old.safetensors"
    numbers = dict(loss=1.5, distortion=0.5, mask_mean=0.05, prob_obfuscated=0.5, seconds=3.0, target=1)
    save_file(
        {"mask": torch.zeros(4), "history": torch.ones(3, 1)},
        str(path),
        metadata={"numbers": json.dumps(numbers | {"prob_original": 0.9})},
    )
    old = load_result(path)
    assert old["loss"] == 1.5 and old["cached"]
    assert old["seconds"] is None and old["measure_seconds"] is None  # with or without the measurement: unknown
