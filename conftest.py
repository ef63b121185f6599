"""Keeps each test process under the kernel's limit on memory mappings (tests and doctests).

Every program XLA:CPU compiles (each jitted function, each shape, each eager op) keeps its
machine code in a few memory mappings until its executable is freed; a test process that runs
hundreds of tests holds thousands of programs in JAX's caches. Past ``vm.max_map_count``
(65,530 by default) the next compile cannot map its code and the process aborts ("Fatal Python
error: Aborted" inside ``backend_compile_and_load``, reported by xdist as a crashed worker).
So at each change of test file, when the process holds more than half the limit, JAX's caches
are cleared (the programs of later files compile afresh; nothing else changes).
"""

from __future__ import annotations

import gc


def _map_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):  # not Linux: nothing to guard
        return 0


def _num_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


_LIMIT = _map_limit()


def pytest_runtest_teardown(item, nextitem):
    if not _LIMIT or (nextitem is not None and nextitem.path == item.path):
        return
    if _num_maps() > _LIMIT // 2:
        import jax

        jax.clear_caches()
        gc.collect()


def pytest_runtest_logreport(report):
    """``FEDJAX_LAB_TEST_TIMES=FILE``: each phase's duration appended to FILE as it ends
    (``nodeid<TAB>phase<TAB>seconds``), so a run cut short still tells where its time went."""
    import os

    path = os.environ.get("FEDJAX_LAB_TEST_TIMES")
    if path:
        with open(path, "a") as f:
            f.write(f"{report.nodeid}\t{report.when}\t{report.duration:.2f}\n")
