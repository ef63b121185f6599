"""The algorithm registry: short name -> ``factory(loss_fn, client_optimizer=None, **hp)``."""

from __future__ import annotations

from fedjax_lab._registry import Registry

REGISTRY = Registry("algorithm")
"""Every registered algorithm factory by short name (the ``name`` of a config's algorithm)."""

register = REGISTRY.register
"""Registers an algorithm factory under a short name (lower case, no spaces)."""
