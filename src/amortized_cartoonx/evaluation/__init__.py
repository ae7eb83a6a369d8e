"""Evaluation: rate-distortion curves (the paper's Fig. 7) of CartoonX against Pixel RDE, the amortized
explainer and gradient baselines, with a cache, figures and a report (``cartoonx evaluate``).

Modules:

- the compared methods, behind one verb ``attribute(images, target, *, seeds) -> Attribution``: :mod:`.attribution`
  (the verb, its types and the registry), :mod:`.mask_methods` (the RDE explainers), :mod:`.baselines` (captum
  gradients, random orderings), :mod:`.methods` (the full registry, :func:`~.methods.build_methods`);
- the run: :mod:`.config` (settings), :mod:`.context` (what every phase reads), :mod:`.cache` (the per-image cache
  and :func:`~.cache.cached_map`), the phases :mod:`.explanations`, :mod:`.curves` (also the curves' maths),
  :mod:`.lambdas` (panel c), :mod:`.localisation` (ground truth), :mod:`.details` (the explanation's detail part,
  wavelet-aware), :mod:`.maps` (pixel maps and example pictures), :mod:`.sanity` (sanity checks by model
  randomisation), :mod:`.runner` (the phases in order), :mod:`.results`;
- :mod:`.report` (the output files); :mod:`.agreement` (mask agreement, for the amortized training).

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
    "EvaluationConfig": "config",
    "SanityConfig": "config",
    "EvaluationResults": "results",
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
