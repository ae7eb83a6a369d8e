"""scripts/torchscript_taps.py: a frozen TorchScript classifier whose convolution outputs the classifier encoder
can read, with the file's logits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from torchscript_taps import TappedScript  # noqa: E402

from amortized_cartoonx.feature_taps import find_taps, read_taps  # noqa: E402

from .conftest import make_tiny_cnn  # noqa: E402


@pytest.fixture
def frozen_file(tmp_path) -> Path:
    model = make_tiny_cnn().eval()
    path = tmp_path / "frozen.pt"
    torch.jit.freeze(torch.jit.trace(model, torch.rand(1, 3, 32, 32))).save(str(path))
    return path


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TorchScript is deprecated in torch >= 2.9; files still load
def test_the_taps_give_the_files_logits_and_its_feature_maps(frozen_file):
    scripted = torch.jit.load(str(frozen_file))
    tapped = TappedScript(frozen_file)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(tapped(images), scripted(images))
    taps = find_taps(tapped, 32, 2)
    assert [t.name.startswith("taps.") for t in taps] == [True, True]
    maps = read_taps(tapped, images, [t.name for t in taps])
    assert [m.shape[1] for m in maps] == [t.channels for t in taps]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_file_whose_weights_are_attributes_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(make_tiny_cnn()).save(str(path))
    with pytest.raises(ValueError, match="torch.jit.freeze"):
        TappedScript(path)
