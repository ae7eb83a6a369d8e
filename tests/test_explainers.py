"""Every explainer answers the one verb of :class:`~amortized_cartoonx.explainers.Explainer`."""

from __future__ import annotations

import pytest

from amortized_cartoonx.classifiers import wrap_classifier
from amortized_cartoonx.explainers import check_explainer
from amortized_cartoonx.optimizer import CartoonX, PixelRDE


def test_exact_optimizers_are_explainers(tiny_cnn):
    classifier = wrap_classifier(tiny_cnn)
    for explainer in (CartoonX(classifier, steps=1), PixelRDE(classifier, steps=1)):
        check_explainer(explainer)
        assert explainer.method in ("cartoonx", "pixel-rde") and isinstance(explainer.settings(), dict)


def test_the_check_refuses_a_different_verb():
    class Positional:
        method = "x"

        def settings(self) -> dict:
            return {}

        def explain(self, images, target=None, seeds=None, progress=False):
            raise NotImplementedError

    class Missing:
        method = "x"

        def explain(self, images, target=None, *, seeds=None, progress=False):
            raise NotImplementedError

    with pytest.raises(TypeError, match="keyword-only option seeds"):
        check_explainer(Positional())
    with pytest.raises(TypeError, match="lacks"):
        check_explainer(Missing())
