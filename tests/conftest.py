"""Shared test settings: catch silent broadcasting across the client axis, keep compiles small."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
