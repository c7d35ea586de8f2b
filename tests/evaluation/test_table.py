"""The before/after table."""

from __future__ import annotations

import pytest

from mmpo_jax.evaluation.table import format_table


def test_rows_columns_spread_and_missing_cells():
    rows = {
        "base": {"chair_s": 0.5, "chair_i": 0.25, "pope_f1": 0.8},
        "control": {"chair_s": 0.125, "chair_s_std": 0.0125, "chair_i": 0.1, "pope_f1": 0.9},
        "catpo": {"chair_i": 0.05, "unlisted": 3.0},
    }
    assert format_table(rows, digits=2) == "\n".join([
        "        |     CHAIR_s | CHAIR_i | POPE F1",
        "--------+-------------+---------+--------",
        "base    |        0.50 |    0.25 |    0.80",
        "control | 0.12 ± 0.01 |    0.10 |    0.90",
        "catpo   |           - |    0.05 |       -",
    ])


def test_custom_columns_and_errors():
    table = format_table({"m": {"x": 1.0}}, columns=[("x", "the x")])
    assert table.splitlines() == ["  | the x", "--+------", "m | 1.000"]
    with pytest.raises(ValueError, match="at least one row"):
        format_table({})
    with pytest.raises(ValueError, match=r"the rows hold \['x'\]"):
        format_table({"m": {"x": 1.0}})
