"""The test environment the rest of the suite relies on."""

import jax

import mmpo_jax


def test_package_imports_with_version():
    assert mmpo_jax.__version__.count(".") == 2


def test_eight_fake_cpu_devices_for_sharding_tests():
    assert jax.device_count() == 8
    assert {d.platform for d in jax.devices()} == {"cpu"}
