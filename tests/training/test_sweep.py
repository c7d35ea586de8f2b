"""Sweep axes and get_sweep() overrides (the runs themselves are the main job's code)."""

from __future__ import annotations

import pytest

from mmpo_jax.config.loading import load_config
from mmpo_jax.training.sweep import file_overrides, grid_overrides


def test_grid_is_the_cartesian_product_in_order():
    assert grid_overrides(["optimizer.learning_rate=1e-5|5e-5", "method.beta=0.1|0.5"]) == [
        ("optimizer.learning_rate=1e-5", "method.beta=0.1"),
        ("optimizer.learning_rate=1e-5", "method.beta=0.5"),
        ("optimizer.learning_rate=5e-5", "method.beta=0.1"),
        ("optimizer.learning_rate=5e-5", "method.beta=0.5")]
    with pytest.raises(ValueError, match="key=v1"):
        grid_overrides(["method.beta"])


def test_file_sweep_overrides_load(tmp_path):
    path = tmp_path / "swept.py"
    path.write_text(
        "import pathlib\n"
        f"from mmpo_jax.config.loading import config_module\n"
        f"_dpo = config_module('{pathlib_path()}')\n"
        "def get_config(arg=None):\n    return _dpo.get_config()\n"
        "def get_sweep():\n"
        "    return [{'method.beta': 0.5}, {'optimizer.schedule': 'constant'}]\n")
    sweep = file_overrides(str(path))
    assert sweep == [("method.beta=0.5",), ("optimizer.schedule=constant",)]
    configs = [load_config(str(path), overrides) for overrides in sweep]
    assert configs[0].method.beta == 0.5 and configs[1].optimizer.schedule == "constant"


def pathlib_path() -> str:
    import pathlib

    return str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "dpo.py")
