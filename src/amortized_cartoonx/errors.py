"""Exceptions the library raises for bad input.

The command-line tool turns every :class:`CartoonXError` into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import numbers


class CartoonXError(Exception):
    """Base class of the errors a user can cause (bad input, bad configuration)."""


class InputError(CartoonXError, ValueError):
    """An image, tensor or file that cannot be used as given."""


class ConfigError(CartoonXError, ValueError):
    """An unknown name or an invalid hyper-parameter."""


class ClassifierError(CartoonXError):
    """A classifier that cannot be loaded or whose output is not ``(N, classes)`` logits."""


class NonFiniteError(CartoonXError, ArithmeticError):
    """A loss or result became NaN or infinite (a classifier that overflows under noise, a learning rate too large)."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (at most 200 characters), for the one-line errors above."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer setting: a Python or numpy integer, not a bool (for the checks above)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a number setting: a Python or numpy real number (NaN and inf included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
