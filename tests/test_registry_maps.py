"""Every registered algorithm gives the same result under every client map, sharded included.

Runs in a subprocess with 2 forced host devices so that ``sharded`` really splits the cohort
over a mesh. Each algorithm runs one jitted round (per-client state gathered and scattered) on
a cohort of 5 clients (not divisible by 2: the remainder path too) under ``sequential()`` and
``sharded(sequential())``; ``vmap`` and ``chunked`` are compared per algorithm family in the
algorithm test files.
"""

from __future__ import annotations

import json
import os
import textwrap

from _problems import run_on_host_devices

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np, optax
    sys.path.insert(0, sys.argv[1])
    from _problems import init_params, loss_fn, population
    import fedjax_lab as fl
    assert jax.local_device_count() == 2, jax.devices()
    from _problems import cohort
    c = cohort(num_clients=5, steps=2, batch=3)
    c = c._replace(client_ids=c.client_ids + 2)
    required = {"feddisco": {"num_classes": 3}, "qffl": {"lipschitz": 10.0}}
    maps = {"sequential": fl.maps.sequential(), "sharded": fl.maps.sharded(fl.maps.sequential())}
    out = {}
    for name, factory in sorted(fl.algorithms.REGISTRY.items()):
        alg = factory(loss_fn, client_optimizer=optax.sgd(0.1), **required.get(name, {}))
        for map_name, m in maps.items():
            state = alg.init(init_params(), num_clients=8)
            state, hist = fl.run_round(alg, state, c, jax.random.key(5), client_map=m)
            out[f"{name}/{map_name}"] = {
                "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
                "clients": [np.asarray(x).tolist() for x in jax.tree.leaves(state.client_states)],
                "loss": np.atleast_1d(np.asarray(hist["train_loss"])).tolist(),
            }
    print(json.dumps(out))
    """
)


def test_every_registered_algorithm_agrees_across_client_maps(tmp_path):
    import numpy as np

    import fedjax_lab as fl

    stdout = run_on_host_devices(SCRIPT, tmp_path, 2, os.path.dirname(__file__), timeout=900)
    out = json.loads(stdout.strip().splitlines()[-1])
    names = sorted(fl.algorithms.REGISTRY)
    assert {k.split("/")[0] for k in out} == set(names)
    for name in names:
        ref = out[f"{name}/sequential"]
        assert np.all(np.isfinite(ref["loss"])), name
        for map_name in ("sharded",):
            got = out[f"{name}/{map_name}"]
            for field in ("params", "clients", "loss"):
                for a, b in zip(got[field], ref[field], strict=True):
                    np.testing.assert_allclose(
                        a, b, rtol=2e-5, atol=2e-6, err_msg=f"{name} {map_name} {field}"
                    )
