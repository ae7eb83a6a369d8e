"""A TorchScript classifier as an ``nn.Module`` whose convolution outputs the ``classifier`` encoder can read.

An experiment helper, not part of the package: TorchScript modules take no Python forward hooks, so the mask
predictor's ``classifier`` encoder refuses them (``amortized_cartoonx.feature_taps.check_hookable``). This wraps a
TorchScript file: its graph is copied and inlined, every convolution's output is added to the graph's outputs
(private ``torch._C`` graph API; TorchScript only), and the wrapper passes each one through an ``nn.Identity``
layer (``taps.<i>``), where the encoder's hooks find them by stride. The logits are the file's, bit for bit.

Use it as a classifier spec (the file spec ``PATH.py:callable``), e.g. for the shared MobileNetV3-Small:

    cartoonx fit --config configs/shared-samples-mobilenetv3-cpu.yaml \\
        --model.classifier scripts/torchscript_taps.py:shared_mobilenet_v3_small \\
        --model.mask_predictor.encoder classifier

Measured with that command (2026-12-02, docs/results.md): MobileNetV3-Small's own feature maps did not make its
photo explainer keep the decision.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

#: The graph operators whose outputs become taps: a traced file holds ``aten::_convolution``, a scripted one
#: ``aten::conv2d``.
CONVOLUTIONS = ("aten::_convolution", "aten::conv2d")

SHARED_MOBILENET_V3 = Path(__file__).resolve().parents[2] / "shared" / "models" / "mobilenet_v3_small_imagenet.pt"


class TappedScript(nn.Module):
    """``forward(x) -> logits`` of the TorchScript file at ``path``; its convolution outputs pass through
    ``self.taps[i]`` (``nn.Identity``) on the way. The file's weights must be constants of its graph (a frozen
    module, as the shared classifiers are); they are loaded on the CPU."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
        with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(self.path, map_location="cpu")
        graph = scripted.forward.graph.copy()
        torch._C._jit_pass_inline(graph)
        torch._C._jit_pass_dce(graph)
        if any(node.kind() == "prim::GetAttr" for node in graph.nodes()):
            raise ValueError(
                f"{path}: the graph reads module attributes; save it with its weights as constants "
                "(torch.jit.freeze) first"
            )
        convolutions = [node for node in graph.nodes() if node.kind() in CONVOLUTIONS]
        if not convolutions:
            raise ValueError(f"{path}: no convolution in the graph")
        for node in convolutions:
            graph.registerOutput(node.output())
        graph.makeMultiOutputIntoTuple()
        graph.eraseInput(0)  # self: unused once every call is inlined and the weights are constants
        self._function = torch._C._create_function_from_graph("tapped_forward", graph)
        self.taps = nn.ModuleList(nn.Identity() for _ in convolutions)

    def forward(self, x: Tensor) -> Tensor:
        logits, *maps = self._function(x)
        for tap, feature_map in zip(self.taps, maps):
            tap(feature_map)
        return logits

    def __deepcopy__(self, memo: dict) -> TappedScript:  # the compiled function cannot be deep-copied
        return type(self)(self.path)


def shared_mobilenet_v3_small() -> TappedScript:
    """The shared MobileNetV3-Small (``../shared/models/mobilenet_v3_small_imagenet.pt``) with taps."""
    return TappedScript(SHARED_MOBILENET_V3).eval()
