"""Small name -> function registries for the variants chosen by name (obfuscation, distortion, ...)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A mapping from names to plain functions, with an error that lists the valid names.

    Example::

        DISTORTIONS = Registry("distortion")

        @DISTORTIONS.register("label")
        def label_distortion(...): ...

        DISTORTIONS.get("labell")  # ConfigError: unknown distortion 'labell'; choose from: label
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
