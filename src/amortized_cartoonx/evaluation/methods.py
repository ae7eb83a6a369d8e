"""Building the evaluated methods: the full registry :data:`METHODS` (mask methods and baselines) and
:func:`build_methods`.

The shared types live in :mod:`.attribution`; :mod:`.mask_methods` and :mod:`.baselines` each register their
factories there, and this module imports both, so :data:`METHODS` imported from here is always complete. Its
names are the method table's (:data:`~amortized_cartoonx.methods.METHOD_TABLE`; ``tests/test_methods.py`` ties
them).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..methods import ALL_METHODS
from . import baselines, mask_methods  # noqa: F401 - each registers its factories in METHODS
from .attribution import (
    ATTRIBUTION,
    MASK,
    METHODS,
    Attribution,
    BaselineConfig,
    EvaluationMethod,
    MethodContext,
    MethodUnavailable,
)


def build_methods(names: Sequence[str], ctx: MethodContext) -> tuple[dict[str, EvaluationMethod], dict[str, str]]:
    """``(methods, skipped)``: the methods that can run, and ``name -> reason`` for those that cannot.

    Raises:
        ConfigError: an unknown name, or a method that needs input the user did not give.
    """
    for name in names:
        METHODS.get(name)  # unknown names fail before any work
    methods: dict[str, EvaluationMethod] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            methods[name] = METHODS.get(name)(ctx)
            methods[name].link = ctx.optimizer.link
        except MethodUnavailable as exc:
            skipped[name] = str(exc)
    return methods, skipped


def method_names() -> list[str]:
    """Every registered method name, in the method table's order (registration order depends on imports)."""
    order = {name: i for i, name in enumerate(ALL_METHODS)}
    return sorted(METHODS.names(), key=lambda name: order.get(name, len(order)))


__all__ = [
    "ATTRIBUTION",
    "MASK",
    "METHODS",
    "Attribution",
    "BaselineConfig",
    "EvaluationMethod",
    "MethodContext",
    "MethodUnavailable",
    "build_methods",
    "method_names",
]
