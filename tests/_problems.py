"""Tiny shared problems for the engine tests (kept small: compiles are slow on 2 cores)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_lab as fl

NUM_FEATURES, NUM_CLASSES = 4, 3


def init_params(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w": 0.1 * jax.random.normal(k1, (NUM_FEATURES, NUM_CLASSES)),
        "b": 0.1 * jax.random.normal(k2, (NUM_CLASSES,)),
    }


def loss_fn(params, batch, key):
    """Masked mean softmax cross-entropy of a linear model (key unused: deterministic)."""
    del key
    logits = batch["x"] @ params["w"] + params["b"][None, :]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]
    mask = batch["mask"]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def population(sizes=(3, 5, 4, 7, 2, 6, 5, 4, 3, 8), seed: int = 0) -> fl.FederatedData:
    rng = np.random.default_rng(seed)
    clients = []
    for n in sizes:
        x = rng.normal(size=(n, NUM_FEATURES)).astype(np.float32)
        y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
        clients.append({"x": x, "y": y})
    return fl.FederatedData.from_client_arrays(clients)


def cohort(num_clients=4, steps=2, batch=3, seed=0) -> fl.Cohort:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_clients, steps, batch, NUM_FEATURES)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=(num_clients, steps, batch)).astype(np.int32)
    mask = np.ones((num_clients, steps, batch), np.float32)
    return fl.Cohort(
        {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(mask)},
        jnp.full((num_clients,), float(steps * batch)),
        jnp.arange(num_clients, dtype=jnp.int32),
    )


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_on_host_devices(
    script: str, tmp_path, num_devices: int = 2, *args: str, timeout: int = 300
) -> str:
    """Runs ``script`` in a fresh Python whose host is split into ``num_devices`` XLA devices.

    The device count is fixed when JAX starts, so multi-device checks run in a subprocess.
    Returns its stdout; fails the test with the tail of its stderr if it exits non-zero.
    """
    import os
    import subprocess
    import sys

    path = tmp_path / "on_host_devices.py"
    path.write_text(script)
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()  # e.g. the tests' opt level
            if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, XLA_FLAGS=" ".join(
        [*kept, f"--xla_force_host_platform_device_count={num_devices}"]))
    res = subprocess.run(
        [sys.executable, str(path), *args], env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout
