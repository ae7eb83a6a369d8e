"""CartoonX with an exact batched optimizer and an amortized explainer.

The public API is imported lazily, so ``import amortized_cartoonx`` (and the ``cartoonx --help`` command)
stays fast and never pulls in PyTorch Lightning::

    from amortized_cartoonx import CartoonX, PixelRDE, load_classifier
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CartoonX": "optimizer",
    "PixelRDE": "optimizer",
    "RDEOptimizer": "optimizer",
    "OptimizerConfig": "optimizer",
    "Explainer": "explainers",
    "check_explainer": "explainers",
    "AmortizedExplainer": "amortized",
    "WarmStartExplainer": "amortized",
    "Explanation": "explanation",
    "LossHistory": "explanation",
    "load_saved_explanation": "explanation",
    "Coefficients": "wavelets",
    "WaveletRepresentation": "wavelets",
    "PixelRepresentation": "wavelets",
    "RDEObjective": "rde",
    "load_classifier": "classifiers",
    "wrap_classifier": "classifiers",
    "Classifier": "classifiers",
    "load_image": "images",
    "CartoonXError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
