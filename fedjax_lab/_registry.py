"""One registry style for every configurable part: a name -> factory table with a decorator."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry(dict):
    """A table of factories by short name (lower case), filled by :meth:`register`.

    It is a ``dict`` (``REGISTRY[name](...)``, ``set(REGISTRY)``) with a ``kind`` used in error
    messages, a decorator and :meth:`build`, which checks every keyword against the factory's
    signature before calling it.

    Example:
      >>> shapes = Registry("shape")
      >>> @shapes.register("square")
      ... def square(side: float = 1.0):
      ...     return side * side
      >>> shapes.build("square", {"side": 3.0}, where="shape")
      9.0
      >>> try:
      ...     shapes.build("square", {"sides": 3.0}, where="shape")
      ... except ValueError as e:
      ...     print(e)
      shape.sides: not an option of shape 'square'; allowed: 'side'.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        """Registers a factory under ``name``; returns it unchanged."""

        def decorate(factory: F) -> F:
            if name in self:
                raise ValueError(f"name: {name!r} is already registered (a {self.kind}).")
            self[name] = factory
            return factory

        return decorate

    def options(self, name: str, *, skip: tuple[str, ...] = ()) -> dict[str, inspect.Parameter]:
        """The keyword options of factory ``name`` (its named parameters, minus ``skip``)."""
        params = inspect.signature(self[name]).parameters
        return {
            k: p for k, p in params.items()
            if k not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def check(self, name: Any, options: dict[str, Any], *, where: str,
              skip: tuple[str, ...] = ()) -> None:
        """Raises ``ValueError`` naming the first unknown name, unknown or missing option."""
        if name not in self:
            allowed = ", ".join(repr(k) for k in sorted(self))
            raise ValueError(f"{where}.name: got {name!r}; allowed: {allowed}.")
        allowed_opts = self.options(name, skip=skip)
        for key in options:
            if key not in allowed_opts:
                listed = ", ".join(repr(k) for k in sorted(allowed_opts)) or "none"
                raise ValueError(
                    f"{where}.{key}: not an option of {self.kind} {name!r}; allowed: {listed}."
                )
        for key, p in allowed_opts.items():
            if p.default is inspect.Parameter.empty and key not in options:
                raise ValueError(f"{where}.{key}: required by {self.kind} {name!r}.")

    def build(self, name: str, options: dict[str, Any], *, where: str, **fixed: Any) -> Any:
        """Checks ``options`` (see :meth:`check`) and calls the factory with them and ``fixed``."""
        self.check(name, options, where=where, skip=tuple(fixed))
        return self[name](**fixed, **options)
