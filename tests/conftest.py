"""Test-wide settings.

Eight fake CPU devices so that sharding tests can build real meshes; float32 matmuls at full
precision so that parity tests against PyTorch can use tight tolerances. Both must be set before
JAX initialises its backend, hence at import time of the conftest.

XLA:CPU compiles at LLVM optimisation level 0 (``--xla_backend_optimization_level=0``; the HLO
passes still run): the tests' programs are tiny and compiled far more often than they run long,
and the suite's CPU time is mostly compilation. Measured on 2 cores (tests/models and
tests/engine/test_scoring.py, 108 tests, serial, load ~9): 225 s of user CPU against 322 s at
the default level. Subprocesses inherit the flag through the environment.

One persistent XLA compilation cache per test run, shared by the xdist workers and the
subprocesses tests start (through the environment): many tests compile the same tiny programs
(a resumed run recompiles its step, a multi-process phase its whole program, an export is
evaluated like its checkpoint). It starts empty every run (its folder is named by the run, and
removed at the end), so no run is faster because of an earlier one.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Made by the first process that loads this file (xdist's controller, or a serial run) and
# inherited through the environment by the workers and the subprocesses tests start.
_MIN_COMPILE_SECONDS = 0.2  # programs that compile faster are not worth a cache file
_CREATED_HERE = "MMPO_JAX_TEST_XLA_CACHE" not in os.environ
if _CREATED_HERE:
    os.environ["MMPO_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="mmpo_jax_test_xla_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["MMPO_JAX_TEST_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(_MIN_COMPILE_SECONDS)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)


def pytest_sessionfinish(session):
    if _CREATED_HERE:  # the controller, after every worker ended
        shutil.rmtree(os.environ["MMPO_JAX_TEST_XLA_CACHE"], ignore_errors=True)
