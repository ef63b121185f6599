"""The algorithm registry: short name -> ``factory(loss_fn, client_optimizer=..., **hp)``."""

from __future__ import annotations

from collections.abc import Callable

from fedjax_lab._types import FederatedAlgorithm

REGISTRY: dict[str, Callable[..., FederatedAlgorithm]] = {}



Factory = Callable[..., FederatedAlgorithm]


def register(name: str) -> Callable[[Factory], Factory]:
    """Registers a factory under ``name`` (lower case, no spaces); returns it unchanged."""

    def decorate(factory: Factory) -> Factory:
        if name in REGISTRY:
            raise ValueError(f"name: an algorithm is already registered as {name!r}.")
        REGISTRY[name] = factory
        return factory

    return decorate
