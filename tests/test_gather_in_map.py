"""run_rounds gathers each client's batches inside the client map; that is exactly run_round on
the cohort build_cohort gathers up front, whatever the map (a remainder chunk included)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import (
    assert_trees_close,
    init_params,
    loss_fn,
    population,
    run_on_host_devices,
)

import fedjax_lab as fl
from fedjax_lab import _scan
from fedjax_lab.data import sampling

DATA = population()  # 10 clients of 2 to 8 examples
KEY = jax.random.key(5)
ALG = fl.algorithms.fed_avg(loss_fn, client_optimizer=optax.sgd(0.3))


@pytest.mark.parametrize(
    "client_map",
    [fl.maps.sequential(), fl.maps.vmap(), fl.maps.chunked(3)],
    ids=["sequential", "vmap", "chunked3"],
)
@pytest.mark.parametrize("epochs", [1, None], ids=["epoch", "fixed_steps"])
def test_one_round_of_run_rounds_is_run_round_on_the_built_cohort(client_map, epochs):
    kw = dict(num_rounds=1, cohort_size=5, batch_size=2, client_map=client_map)
    kw.update(epochs=1) if epochs else kw.update(local_steps=3)
    state, hist = fl.run_rounds(ALG, ALG.init(init_params()), DATA, KEY, **kw)
    ids = hist["client_ids"][0]
    max_size = int(np.max(DATA.client_sizes))
    _, k_batches = jax.random.split(_scan.data_key(KEY, jnp.int32(0)))
    cohort = sampling.build_cohort(
        k_batches,
        {k: jnp.asarray(v) for k, v in DATA.examples.items()},
        jnp.asarray(DATA.offsets, jnp.int32),
        ids,
        jnp.ones((5,), jnp.float32),
        num_steps=sampling.num_local_steps(
            max_size, 2, local_steps=None if epochs else 3, epochs=epochs or 1
        ),
        batch_size=2,
        max_client_size=max_size,
        epochs=epochs,
        weighting="num_examples",
    )
    expected, metrics = fl.run_round(
        ALG, ALG.init(init_params()), cohort, KEY, client_map=fl.maps.sequential()
    )
    assert float(jnp.sum(cohort.batches["mask"])) > 0
    assert_trees_close(state.params, expected.params)
    np.testing.assert_allclose(hist["train_loss"][0], metrics["train_loss"], rtol=1e-5)


_RECURRENT_SHARDED = """
import jax, jax.numpy as jnp, numpy as np, optax, fedjax_lab as fl
m = fl.models.char_lstm(vocab_size=7, embed=2, hidden=4, num_layers=1)
rng = np.random.default_rng(0)
data = fl.FederatedData.from_client_arrays(
    [{"x": rng.integers(1, 7, (6, 5)).astype("i4"), "y": rng.integers(1, 7, (6, 5)).astype("i4")}
     for _ in range(5)])
alg = fl.algorithms.fed_avg(fl.models.classification_loss(m), optax.sgd(0.5))
out = {}
for name, cm in [("seq", fl.maps.sequential()), ("sharded", fl.maps.sharded())]:
    st, _ = fl.run_rounds(alg, alg.init(m.init(jax.random.key(0))), data, jax.random.key(1),
                          num_rounds=2, cohort_size=5, batch_size=2, client_map=cm)
    out[name] = st.params
moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(out["seq"]), jax.tree.leaves(m.init(jax.random.key(0)))))
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
           zip(jax.tree.leaves(out["seq"]), jax.tree.leaves(out["sharded"])))
print("MOVED", moved)
print("DIFF", diff)
"""


def test_a_recurrent_model_runs_sharded_over_two_devices(tmp_path):
    """flax's nn.RNN starts its scan from a constant carry; under shard_map that must not trip
    the varying-axes check (it did), and the result equals the sequential map's."""
    stdout = run_on_host_devices(_RECURRENT_SHARDED, tmp_path, 2)
    values = dict(line.split(" ", 1) for line in stdout.splitlines() if " " in line)
    assert float(values["MOVED"]) > 1e-3
    assert float(values["DIFF"]) < 1e-5
