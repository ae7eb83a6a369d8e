"""Evaluation: rate-distortion curves (the paper's Fig. 7) of CartoonX against Pixel RDE, the amortized
explainer and gradient baselines, with a cache, figures and a report (``cartoonx evaluate``).

Modules: :mod:`.curves` (ranking, keep/randomise curves, areas), :mod:`.attribution` (the compared methods'
verb ``attribute``, its types and registry), :mod:`.mask_methods` and :mod:`.baselines` (the methods),
:mod:`.methods` (the full registry), :mod:`.maps` (pixel relevance maps and pictures),
:mod:`.lambdas` (panel c), :mod:`.localisation` (ground-truth metrics), :mod:`.cache`, :mod:`.runner` (the run),
:mod:`.report` (the output files).

Example::

    from amortized_cartoonx import load_classifier
    from amortized_cartoonx.evaluation import Evaluation, EvaluationConfig, MethodContext, write_report

    classifier = load_classifier("model.pt")
    run = Evaluation(classifier, "images/", "out/", EvaluationConfig(limit=10), MethodContext(classifier, "model.pt"))
    write_report(run.run(), "out/")

Imports are lazy, so ``import amortized_cartoonx.evaluation`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Evaluation": "runner",
    "EvaluationConfig": "runner",
    "EvaluationResults": "runner",
    "MethodContext": "attribution",
    "BaselineConfig": "attribution",
    "METHODS": "methods",
    "build_methods": "methods",
    "rate_distortion_curves": "curves",
    "area": "curves",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
