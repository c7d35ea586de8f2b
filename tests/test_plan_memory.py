"""``scripts/plan_memory.py`` compiles a config's real train step on abstract inputs and reads
XLA's per-device memory; checked on the tiny DPO config over two of the test session's fake
devices."""

from __future__ import annotations

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).parents[1] / "scripts" / "plan_memory.py"


def _module():
    spec = importlib.util.spec_from_file_location("plan_memory", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_of_the_tiny_dpo_config_counts_its_sharded_state():
    plan_memory = _module()
    row = plan_memory.plan("configs/dpo.py", ("data.batch_size=4", "data.buckets=(64,)"),
                           devices=2)
    assert row["devices"] == 2 and row["mesh"]["data"] == 2
    assert row["length"] == 64 and row["rows"] == 4
    for key in ("trainable", "optimizer", "frozen", "batch", "argument", "output", "temp"):
        assert row[key] > 0, key
    # Adam keeps two moments per trainable parameter; the donated state aliases its inputs
    assert row["optimizer"] >= 2 * row["trainable"]
    assert row["alias"] >= row["trainable"] + 2 * row["trainable"] * 0.9
    assert plan_memory.peak(row) > row["argument"]
    assert "v5e (16 GB)" in plan_memory._table([row])


def test_device_count_fills_the_config_argument():
    """``--config=configs/llava_1_5_7b_tpu.py:catpo,{devices} --devices=4,8,16,32``: each child
    loads the preset for its own chip count."""
    plan_memory = _module()
    assert plan_memory.config_for("configs/llava_1_5_7b_tpu.py:catpo,{devices}", 16) == (
        "configs/llava_1_5_7b_tpu.py:catpo,16")
    assert plan_memory.config_for("configs/dpo.py", 16) == "configs/dpo.py"
