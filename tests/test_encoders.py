"""The mask predictor's encoders (``classifier``: feature taps found by stride, temporary hooks) and inputs
(``coefficient_input``), through checkpoints."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from amortized_cartoonx.amortized import AmortizedExplainer
from amortized_cartoonx.classifiers import wrap_classifier
from amortized_cartoonx.errors import ConfigError, InputError
from amortized_cartoonx.feature_taps import find_taps, read_taps
from amortized_cartoonx.mask_predictor import MaskPredictor, MaskPredictorConfig

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # the classifier spec imports conftest.make_tiny_cnn
    sys.path.insert(0, str(TESTS))
SPEC = "conftest:make_tiny_cnn"
SIZE = 32


class Strided(nn.Module):
    """A classifier with feature maps at strides 2, 4 and 8 (and a stride-1 stem)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.s2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.s4 = nn.Sequential(nn.Conv2d(6, 10, 3, stride=2, padding=1), nn.ReLU())
        self.s8 = nn.Sequential(nn.Conv2d(10, 12, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.s8(self.s4(self.s2(self.stem(x)))).mean((2, 3)))


def tiny_config(**fields) -> MaskPredictorConfig:
    return MaskPredictorConfig(num_classes=5, levels=3, width=8, decoder_width=8, embed_dim=8, **fields)


def test_taps_are_found_by_stride_and_hooks_are_removed():
    torch.manual_seed(0)
    classifier = wrap_classifier(Strided())
    taps = find_taps(classifier, SIZE, 3)
    # the last module to finish at each stride: the stage itself (its output is its closing ReLU's)
    assert [t.name for t in taps] == ["model.s2", "model.s4", "model.s8"]
    assert [t.channels for t in taps] == [6, 10, 12] and [t.stride for t in taps] == [2, 4, 8]
    # a level beyond the coarsest map reads the coarsest one
    assert find_taps(classifier, SIZE, 4)[-1].name == "model.s8"
    maps = read_taps(classifier, torch.rand(2, 3, SIZE, SIZE), [t.name for t in taps])
    assert [tuple(m.shape) for m in maps] == [(2, 6, 16, 16), (2, 10, 8, 8), (2, 12, 4, 4)]
    assert all(not m.requires_grad for m in maps)
    assert not any(m._forward_hooks for m in classifier.modules())


class ChannelsLast(Strided):
    """:class:`Strided` that also makes a channels-last ``(N, h, w, C)`` activation (as ConvNeXt and Swin keep
    inside their blocks) last, and edits its input in place."""

    def __init__(self) -> None:
        super().__init__()
        self.to_last = Permute()

    def forward(self, x):
        x.mul_(1.0).sub_(0.5)  # in place: the caller's images must not change
        stem = self.stem(x)
        s8 = self.s8(self.s4(self.s2(stem)))
        self.to_last(stem)  # (N, 32, 32, 4): read as NCHW, 32 channels at stride 32 / 4 = 8, after model.s8
        return self.head(s8.mean((2, 3)))


class Permute(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def test_taps_skip_channels_last_maps_copy_the_input_and_follow_the_classifiers_dtype(caplog):
    torch.manual_seed(0)
    classifier = wrap_classifier(ChannelsLast())
    taps = find_taps(classifier, SIZE, 4)
    assert [t.name for t in taps] == ["model.s2", "model.s4", "model.s8", "model.s8"]  # not model.to_last
    assert "no feature map" not in caplog.text  # level 4 is beyond the coarsest map: it reads that one, quietly
    gapped = wrap_classifier(Strided())
    gapped.model.s4 = nn.Identity()  # maps at strides 1, 2 and 8: stride 4 is missing inside the range
    gapped.model.s8 = nn.Sequential(nn.Conv2d(6, 12, 5, stride=4, padding=2), nn.ReLU())
    assert [t.stride for t in find_taps(gapped, SIZE, 3)] == [2, 8, 8]  # of two an octave off, the deeper
    assert "no feature map near stride 4 for DWT level 2: reading 'model.s8' (stride 8)" in caplog.text
    images = torch.rand(2, 3, SIZE, SIZE)
    kept = images.clone()
    maps = read_taps(classifier, images, [t.name for t in taps[:3]])
    assert torch.equal(images, kept)  # the classifier edited its copy
    # a float64 classifier reads float64 copies of float32 images (it failed: "Input type (float) and bias type
    # (double)"); the maps come back float32
    double = wrap_classifier(ChannelsLast().double())
    double.model.load_state_dict(classifier.model.state_dict())
    assert [t.name for t in find_taps(double, SIZE, 3)] == [t.name for t in taps[:3]]
    maps64 = read_taps(double, images, [t.name for t in taps[:3]])
    assert all(m.dtype == torch.float32 for m in maps64)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(maps, maps64))


def test_a_network_that_fails_on_the_probe_or_returns_no_logits_is_one_line():
    from amortized_cartoonx.errors import ClassifierError
    from amortized_cartoonx.training import AmortizedCartoonXModule

    class SizeBound(Strided):
        def forward(self, x):
            assert x.shape[-1] == 224, "Wrong image height!"
            return super().forward(x)

    probe = r"the backbone failed on images of shape \(1, 3, 32, 32\).*a probe image: does the network take 3-channel"
    with pytest.raises(ClassifierError, match=probe):
        find_taps(wrap_classifier(SizeBound()), SIZE, 3, "the backbone")
    with pytest.raises(ClassifierError, match="returned tuple"):
        AmortizedCartoonXModule("conftest:make_tuple_cnn", image_size=SIZE, levels=3, num_samples=1)


def test_classifier_encoder_trains_its_projections_not_the_classifier():
    torch.manual_seed(0)
    model = Strided()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classifier = wrap_classifier(model)
    classifier.train()
    config = tiny_config(encoder="classifier").with_taps(classifier, SIZE)
    network = MaskPredictor(config, features=classifier)
    assert network.feature_source is classifier
    # the classifier is not part of the network: not trained, saved or moved with it
    assert not any(k.startswith("_features") or "s2" in k for k in network.state_dict())
    logits = network(torch.rand(2, 3, SIZE, SIZE), torch.tensor([0, 3]))
    (logits.lowpass.sum() + sum(d.sum() for d in logits.details)).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in network.tap_projections.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert classifier.training  # flags restored
    # the features matter: another image changes the taps' contribution
    with torch.no_grad():
        for proj in network.tap_projections:
            proj[1].weight.mul_(100)
        a = network(torch.rand(1, 3, SIZE, SIZE), torch.tensor([1])).flatten()
        b = network(torch.rand(1, 3, SIZE, SIZE), torch.tensor([1])).flatten()
    assert not torch.allclose(a, b)


def test_tapping_records_the_taps_during_the_callers_own_pass():
    torch.manual_seed(0)
    calls = []
    model = Strided()
    model.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape[0]))
    classifier = wrap_classifier(model)
    network = MaskPredictor(tiny_config(encoder="classifier").with_taps(classifier, SIZE), features=classifier)
    images = torch.rand(2, 3, SIZE, SIZE)
    calls.clear()
    with torch.no_grad():
        with network.tapping(classifier) as taps:
            logits = classifier(images)  # the caller's pass (e.g. the RDE problem's clean logits)
        shared = network(images, logits.argmax(1), taps=taps())
        assert calls == [2]  # one pass of the classifier for both
        separate = network(images, logits.argmax(1))
    assert calls == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(shared.bands, separate.bands))
    assert not any(m._forward_hooks for m in model.modules() if m is not model)  # hooks removed
    other = wrap_classifier(Strided())  # not the attached network: nothing recorded, the network reads its own
    with network.tapping(other) as taps:
        other(images)
    assert taps() is None
    with network.tapping(classifier) as taps:  # no pass inside the block: a clear error, not stale maps
        pass
    with pytest.raises(ConfigError, match="no layer"):
        taps()


def test_classifier_encoder_needs_taps_and_a_classifier():
    with pytest.raises(ConfigError, match="with_taps"):
        MaskPredictor(tiny_config(encoder="classifier"))
    config = tiny_config(encoder="classifier").with_taps(wrap_classifier(Strided()), SIZE)
    network = MaskPredictor(config)
    with pytest.raises(ConfigError, match="attach"):
        network(torch.rand(1, 3, SIZE, SIZE), torch.tensor([0]))
    with pytest.raises(ConfigError, match="unknown encoder"):
        tiny_config(encoder="imagenet").validate()
    with pytest.raises(ConfigError, match="reads no classifier"):
        MaskPredictor(tiny_config()).attach(Strided())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_classifier_gets_a_clear_error():
    scripted = torch.jit.script(Strided())
    with pytest.raises(ConfigError, match="TorchScript.*'scratch'.*'backbone'"):
        tiny_config(encoder="classifier").with_taps(wrap_classifier(scripted), SIZE)


def test_exported_program_is_refused_flat_and_read_unflattened(tmp_path):
    """A '.pt2' file loads as the program's module(): every layer inlined, so no hook can read it and the error
    says so; torch.export.unflatten (the workaround the error names) keeps the layers, and the taps work."""
    from amortized_cartoonx.classifiers import load_classifier

    torch.manual_seed(0)
    x = torch.rand(2, 3, SIZE, SIZE)
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(Strided().eval(), (x,), dynamic_shapes=({0: batch},)), tmp_path / "s.pt2")
    flat = load_classifier(str(tmp_path / "s.pt2"))
    with pytest.raises(ConfigError, match=r"flattened torch\.fx graph.*unflatten.*'scratch'.*'backbone'"):
        tiny_config(encoder="classifier").with_taps(flat, SIZE)
    unflat = wrap_classifier(torch.export.unflatten(torch.export.load(tmp_path / "s.pt2")))
    taps = find_taps(unflat, SIZE, 3)
    assert [t.name for t in taps] == ["model.s2", "model.s4", "model.s8"] and [t.stride for t in taps] == [2, 4, 8]
    assert torch.allclose(unflat(x), flat(x), atol=1e-6)
    traced = wrap_classifier(torch.fx.symbolic_trace(Strided()))  # an fx graph that calls its layers: readable
    assert [t.name for t in find_taps(traced, SIZE, 3)] == ["model.s2.1", "model.s4.1", "model.s8.1"]


def test_checkpoint_with_the_classifier_encoder_round_trips(tmp_path):
    from amortized_cartoonx.training import AmortizedCartoonXModule

    torch.manual_seed(0)
    network = MaskPredictorConfig(width=8, decoder_width=8, embed_dim=8, init_bias=1.0, encoder="classifier")
    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, levels=3, num_samples=2, mask_predictor=network)
    taps = module.mask_predictor.config.taps
    assert taps and all(name.startswith("model.features") for name in taps)
    with torch.no_grad():
        for proj in module.mask_predictor.tap_projections:
            proj[1].weight.normal_(std=0.5)
        for head in [*module.mask_predictor.detail_heads, module.mask_predictor.lowpass_head]:
            head[-1].weight.normal_(std=0.5)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(state)
    assert not any(k.startswith("classifier.") for k in state["state_dict"])
    path = tmp_path / "enc.ckpt"
    torch.save(state, path)

    images = torch.rand(2, 3, SIZE, SIZE)
    explainer = AmortizedExplainer.from_checkpoint(path, SPEC, measure_samples=4)
    target = torch.tensor([1, 2])
    with torch.no_grad():
        expected = module.mask_predictor.mask(images, target).flatten()
    assert torch.allclose(explainer.predict_mask(images, target).flatten(), expected, atol=1e-6)
    # another classifier architecture lacks the recorded layers
    with pytest.raises((ConfigError, InputError)):
        AmortizedExplainer.from_checkpoint(path, Strided())
    # the same architecture with other weights (another seed, a cast copy) is said: the projections learned its
    # features; the same weights as a bare module are not
    from conftest import make_tiny_cnn

    for other in (make_tiny_cnn(seed=7), make_tiny_cnn().double()):
        with pytest.warns(UserWarning, match="other weights than the one enc.ckpt was trained for"):
            AmortizedExplainer.from_checkpoint(path, other, measure_samples=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AmortizedExplainer.from_checkpoint(path, make_tiny_cnn(), measure_samples=4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated", "ignore:`torch.jit.save` is deprecated")
def test_backbone_encoder_gives_a_torchscript_classifier_pretrained_features(tmp_path):
    """A TorchScript classifier (no hooks) explained with the feature maps of an nn.Module backbone named by a
    spec; a checkpoint loads a non-built-in backbone only when the caller names it."""
    from amortized_cartoonx.training import AmortizedCartoonXModule

    torch.manual_seed(0)
    scripted = tmp_path / "strided.pt"
    torch.jit.save(torch.jit.script(Strided()), str(scripted))
    network = MaskPredictorConfig(width=8, decoder_width=8, embed_dim=8, encoder="backbone", backbone=SPEC)
    module = AmortizedCartoonXModule(str(scripted), image_size=SIZE, levels=3, num_samples=2, mask_predictor=network)
    assert module.mask_predictor.feature_source is module.backbone
    assert module.mask_predictor.config.taps and module.mask_predictor.config.backbone == SPEC
    with torch.no_grad():
        for proj in module.mask_predictor.tap_projections:
            proj[1].weight.normal_(std=0.5)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(state)
    assert not any(k.startswith("backbone.") for k in state["state_dict"])  # the backbone is not saved
    path = tmp_path / "backbone.ckpt"
    torch.save(state, path)

    with pytest.raises(ConfigError, match="name it"):  # a checkpoint never imports the caller's code by itself
        AmortizedExplainer.from_checkpoint(path, str(scripted))
    explainer = AmortizedExplainer.from_checkpoint(path, str(scripted), backbone=SPEC, measure_samples=2)
    images, target = torch.rand(2, 3, SIZE, SIZE), torch.tensor([1, 2])
    with torch.no_grad():
        expected = module.mask_predictor.mask(images, target).flatten()
    assert torch.allclose(explainer.predict_mask(images, target).flatten(), expected, atol=1e-6)
    from conftest import make_tiny_cnn

    # a bare module is wrapped as in training (it was refused: the recorded layers are the wrapper's) ...
    bare = AmortizedExplainer.from_checkpoint(path, str(scripted), backbone=make_tiny_cnn(), measure_samples=2)
    assert torch.allclose(bare.predict_mask(images, target).flatten(), expected, atol=1e-6)
    # ... and a backbone with other weights is refused (it was accepted: only layer names and channels were checked)
    with pytest.raises(ConfigError, match="backbone with other weights"):
        AmortizedExplainer.from_checkpoint(path, str(scripted), backbone=make_tiny_cnn(seed=7))
    # ... and so are the same weights behind another input normalisation (they gave other features)
    with pytest.raises(ConfigError, match="normalisation none, the backbone given now uses imagenet"):
        AmortizedExplainer.from_checkpoint(path, str(scripted), backbone=wrap_classifier(make_tiny_cnn(), "imagenet"))
    with pytest.raises(ConfigError, match="backbone"):
        MaskPredictorConfig(encoder="backbone").validate()


def _tiny_module_checkpoint(path: Path, coefficient_input: bool, edit=None):
    """A tiny module with ``coefficient_input`` saved as ``cartoonx fit`` saves it (``edit(settings)`` first), and
    a check that the loaded explainer predicts what the module predicts. Returns (module, explainer)."""
    from amortized_cartoonx.training import AmortizedCartoonXModule

    torch.manual_seed(0)
    network = MaskPredictorConfig(
        width=8, decoder_width=8, embed_dim=8, init_bias=1.0, coefficient_input=coefficient_input
    )
    module = AmortizedCartoonXModule(SPEC, image_size=SIZE, levels=3, num_samples=2, mask_predictor=network)
    with torch.no_grad():
        for branch in module.mask_predictor.coefficient_branches:
            branch[-1].weight.normal_(std=0.5)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(state)
    if edit is not None:
        edit(state["cartoonx"]["mask_predictor"])
    torch.save(state, path)
    explainer = AmortizedExplainer.from_checkpoint(path, SPEC, measure_samples=4)
    images, target = torch.rand(2, 3, SIZE, SIZE), torch.tensor([0, 1])
    with torch.no_grad():
        expected = module.mask_predictor.mask(images, target).flatten()
    assert torch.allclose(explainer.predict_mask(images, target).flatten(), expected, atol=1e-6)
    return module, explainer


def test_coefficient_input_checkpoint_round_trips(tmp_path):
    path = tmp_path / "coefficients.ckpt"
    _, explainer = _tiny_module_checkpoint(path, coefficient_input=True)
    assert explainer.mask_predictor.config.coefficient_input is True
    # a flag must be a bool in the file, and an integer setting no bool
    for name, value in (("coefficient_input", 1), ("width", True)):
        bad = torch.load(path, weights_only=True)
        bad["cartoonx"]["mask_predictor"][name] = value
        torch.save(bad, tmp_path / "bad.ckpt")
        with pytest.raises(InputError, match=f"{name}.*wrong type"):
            AmortizedExplainer.from_checkpoint(tmp_path / "bad.ckpt", SPEC)


def test_a_checkpoint_older_than_coefficient_input_loads_the_network_it_was(tmp_path):
    """Files written before the setting existed lack it: they are read as the network they were trained as
    (without the coefficient branches), whatever the current default."""
    _, explainer = _tiny_module_checkpoint(
        tmp_path / "older.ckpt", coefficient_input=False, edit=lambda settings: settings.pop("coefficient_input")
    )
    assert explainer.mask_predictor.config.coefficient_input is False
    _, explainer = _tiny_module_checkpoint(
        tmp_path / "before-alignment.ckpt", True, edit=lambda settings: settings.pop("aligned_upsampling")
    )
    assert explainer.mask_predictor.config.aligned_upsampling is False
