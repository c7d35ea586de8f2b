"""The before/after table of evaluation metrics (rows like base / control / method)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# (metric key, column header), in display order; a column shows only when some row has the metric.
DEFAULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("chair_s", "CHAIR_s"),
    ("chair_i", "CHAIR_i"),
    ("recall", "recall"),
    ("chair_s_attr", "CHAIR_s attr"),
    ("chair_i_attr", "CHAIR_i attr"),
    ("recall_attr", "recall attr"),
    ("partner_rate", "partner"),
    ("continuation_prob", "P(continue)"),
    ("pope_accuracy", "POPE acc"),
    ("pope_f1", "POPE F1"),
    ("pope_yes_ratio", "POPE yes"),
    ("pope_adversarial_f1", "POPE adv F1"),
    ("heldout_chair_s", "held-out CHAIR_s"),
    ("heldout_chair_i", "held-out CHAIR_i"),
    ("heldout_recall", "held-out recall"),
    ("amber_chair", "AMBER CHAIR"),
    ("amber_cover", "AMBER Cover"),
    ("amber_hal", "AMBER Hal"),
    ("amber_cog", "AMBER Cog"),
    ("amber_accuracy", "AMBER acc"),
    ("amber_f1", "AMBER F1"),
)


def _cell(metrics: Mapping[str, float], key: str, digits: int) -> str:
    if key not in metrics:
        return "-"
    text = f"{metrics[key]:.{digits}f}"
    if f"{key}_std" in metrics:
        text += f" ± {metrics[f'{key}_std']:.{digits}f}"
    return text


def format_table(rows: Mapping[str, Mapping[str, float]],
                 columns: Sequence[tuple[str, str]] = DEFAULT_COLUMNS, *, digits: int = 3) -> str:
    """Renders metric dicts as an aligned text table, one row per name, in the order given.

    Args:
      rows: {row name (e.g. "base", "control", "catpo"): metrics as `runner.evaluate_model` returns}.
      columns: (metric key, header) pairs; columns no row has are left out. A metric with a
        "<key>_std" entry shows as "mean ± std".
      digits: decimals of every number.

    Returns:
      the table as lines joined by "\\n": header, a rule, one line per row; "-" where a row lacks a
      metric.
    """
    if not rows:
        raise ValueError("format_table needs at least one row; got none")
    shown = [(key, header) for key, header in columns if any(key in metrics for metrics in rows.values())]
    if not shown:
        known = sorted({key for metrics in rows.values() for key in metrics})
        raise ValueError(f"no row has any of the columns {[key for key, _ in columns]}; the rows hold {known}")
    table = [["", *(header for _, header in shown)]]
    table += [[name, *(_cell(metrics, key, digits) for key, _ in shown)] for name, metrics in rows.items()]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [" | ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(line, widths))).rstrip() for line in table]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)
