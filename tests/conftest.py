"""Test-wide settings.

Eight fake CPU devices so that sharding tests can build real meshes; float32 matmuls at full
precision so that parity tests against PyTorch can use tight tolerances. Both must be set before
JAX initialises its backend, hence at import time of the conftest.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
