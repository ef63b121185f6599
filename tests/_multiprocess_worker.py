"""One process of tests/test_multiprocess.py: runs experiments/multihost/run.py, dumps JSON.

Usage: ``python tests/_multiprocess_worker.py OUT.json [run.py arguments...]``. Every process
writes its own file (run.py itself writes from process 0 only), with what this process sees,
so the test can check that each process holds the same replicated server state.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

RUN_PY = Path(__file__).resolve().parents[1] / "experiments" / "multihost" / "run.py"


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    spec = importlib.util.spec_from_file_location("multihost_run", RUN_PY)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    result = run.main(argv)  # imports JAX (after run.py has set XLA_FLAGS if asked)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import fedjax_lab as fl
    from fedjax_lab import distributed

    result["process_index"] = jax.process_index()
    result["local_device_count"] = jax.local_device_count()
    # The map's stacked outputs (split over the processes' devices inside) are readable here.
    summed, stacked = jax.jit(
        lambda xs: fl.maps.sharded().apply(lambda sh, x: (x * sh, x * x), 2.0, xs)
    )(jnp.arange(5.0))
    result["map_outputs"] = [float(summed), np.asarray(stacked).tolist()]
    # Processes that hold different host values must be told so, not silently mixed.
    try:
        distributed.check_same_everywhere(np.array([jax.process_index()]), name="probe")
        result["mismatch_detected"] = False
    except ValueError as e:
        result["mismatch_detected"] = str(e)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
