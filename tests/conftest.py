"""Shared test settings: catch silent broadcasting across the client axis, keep compiles small.

Compiled programs are shared by the subprocesses the tests start (CLI runs, multi-process runs,
notebook kernels) through JAX's persistent compilation cache: one temporary directory per test
session, made by the first process that loads this file (the xdist controller) and inherited
through the environment, so a program one subprocess compiled is loaded, not compiled again, by
the next. The test processes themselves (controller and workers) import JAX with the variable
hidden, so they never use the cache and in-process compile counts (tests/test_no_recompile.py,
tests/test_validation.py) see every compile. The directory is removed when the session ends.
"""

import os
import shutil
import subprocess
import tempfile

_SHARED_CACHE = os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # hidden from this process

# The test processes compile at XLA:CPU's lowest backend (LLVM) optimisation level: the tests
# check results, not speed, and most of their time is compiling (measured: a file of 14
# compile-bound tests 170 s -> 118 s). LLVM's levels keep IEEE float semantics (no fast-math),
# so results do not change. XLA reads the flag once, when its CPU client starts (here, below);
# the variable is then restored, so subprocesses (CLI runs, which choose their devices through
# XLA_FLAGS) see the environment they were given.
_GIVEN_XLA_FLAGS = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = f"{_GIVEN_XLA_FLAGS or ''} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.block_until_ready(jnp.ones(2) + 1)  # the CPU client starts and has read XLA_FLAGS
if _GIVEN_XLA_FLAGS is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _GIVEN_XLA_FLAGS

if _SHARED_CACHE is None:  # the session's first process (the controller, or a lone pytest)
    _SHARED_CACHE = tempfile.mkdtemp(prefix="fedjax_lab_tests_jax_")
    os.environ["FEDJAX_LAB_TESTS_OWN_JAX_CACHE"] = str(os.getpid())
os.environ["JAX_COMPILATION_CACHE_DIR"] = _SHARED_CACHE  # for the subprocesses only
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

jax.config.update("jax_numpy_rank_promotion", "raise")

# Every subprocess a test starts (CLI runs, multi-process runs that are SIGKILLed mid-write)
# runs in its own session: a signal one of them, or a runtime inside it, sends to its process
# group can never reach the pytest controller or its xdist workers (a stray SIGINT there ends
# the worker and is reported as a crash of whichever test it was running).
_popen_init = subprocess.Popen.__init__


def _popen_in_own_session(self, *args, **kwargs):
    kwargs.setdefault("start_new_session", True)
    _popen_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _popen_in_own_session

import pytest  # noqa: E402

# The slow tier (measured with --durations on a 2-core machine: each ~15 s or more). The quick
# tier, `pytest -m "not slow"`, still runs at least one test of every file.
SLOW = {
    "test_robust_breadth.py::test_robustness_table_smoke_writes_the_backdoor_row",
    "test_registry_maps.py::test_every_registered_algorithm_agrees_across_client_maps",
    "test_faults.py::test_eight_sigkills_resume_to_the_uninterrupted_result",
    "test_examples.py::test_dataset_example_runs_short",
    "test_rounds.py::test_sharded_map_agrees_on_four_host_devices",
    "test_gather_in_map.py::test_a_recurrent_model_runs_sharded_over_two_devices",
    "test_algorithms_ii_tables.py::test_smoke_run_writes_three_tables_with_independently_"
    "checked_numbers",
    "test_dp_cli.py::test_run_writes_and_prints_the_epsilon_dp_accounting_computes",
    "test_notebooks.py::test_notebook_runs",
    "test_multiprocess.py::test_two_processes_equal_one_process_of_two_devices",
    "test_host_state.py::test_host_storage_equals_device_storage",
    "test_reddi_recipes.py::test_emnist_recipe_runs_end_to_end_on_a_tiny_tff_file",
    "test_benchmarks.py::test_suite_writes_every_field",
    "test_privacy.py::test_noise_multiplier_for_round_trips",
    "test_reddi_recipes.py::test_word_lstm_trains_on_stackoverflow_windows",
    "test_models.py::test_resnet_shapes_groupnorm_and_no_batchnorm",
    "test_faults.py::test_finite_blow_up_never_freezes_the_server_state",
    "test_rounds.py::test_client_maps_agree",
    "test_rounds.py::test_registry_builds_and_runs_every_algorithm",
    "test_algorithms_i_compare.py::test_smoke_json_structure_and_ranges",
    "test_no_recompile.py::test_run_rounds_second_call_compiles_nothing",
    "test_models.py::test_char_lstm_shapes_and_causality",
    "test_faults.py::test_one_poisoned_client_leaves_the_state_finite_and_training_going",
    "test_sweep.py::test_sweep_rows_equal_single_runs",
    "test_cli.py::test_sweep_command_writes_csv_and_heatmap",
    "test_drift_algorithms.py::test_every_client_map_gives_the_same_result",
    "test_models.py::test_cnn_shapes_and_formulations_agree",
    "test_gpu_readiness.py::test_gpu_benchmark_cpu_smoke_writes_every_field",
    "test_multiprocess_cli.py::test_two_processes_killed_and_resumed_equal_uninterrupted_runs",
    "test_streaming.py::test_streamed_runs_on_four_host_devices_equal_device_data",
    "test_streaming.py::test_scaffold_with_a_markov_sampler_streamed_equals_device_data",
    "test_benchmarks.py::test_scale_streaming_rows_report_device_bytes_and_overlap",
    "test_benchmarks.py::test_seeds_benchmark_smoke_reports_ratios_and_identity",
    "test_sampling_search.py::test_benchmark_smoke_writes_the_shares",
    "test_per_client.py::test_per_client_lambda_travels_with_its_client_under_every_client_map",
    "test_per_client.py::test_a_sweep_over_a_per_client_rate_equals_single_runs",
    "test_sweep_axes.py::test_dirichlet_axis_rows_equal_runs_on_each_partition",
    "test_sweep_axes.py::test_malicious_fraction_axis_and_mixed_attack_rows_equal_named_attacks",
    "test_sweep_axes.py::test_noise_axis_rows_equal_single_runs_and_report_epsilon",
    "test_mime_exact.py::test_every_client_map_gives_the_same_mime",
    "test_streaming_multiprocess.py::test_two_processes_load_only_their_clients_and_equal_"
    "device_data",
    "test_streaming_multiprocess.py::test_cli_two_processes_with_host_data_equal_one_process_"
    "with_device_data",
    "test_valuation.py::test_shapley_100_experiment_smoke",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        base = getattr(item, "originalname", None) or item.name
        if f"{item.path.name}::{base}" in SLOW:
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    """The process that made the session's compilation cache removes it."""
    if os.environ.get("FEDJAX_LAB_TESTS_OWN_JAX_CACHE") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
