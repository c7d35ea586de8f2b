"""Choosing a row's learning rate (and beta) on the validation split.

Rule: among the grid's settings whose validation sampled recall is at least the SFT base's
minus ``recall_tolerance``, the one with the lowest validation sampled CHAIR_i (ties: the first
in grid order). [our choice] When no setting keeps the recall, the one with the highest recall
is taken and the choice is flagged ``eligible=False`` in the tables. Without sampled metrics
(``eval.num_samples=0``) the greedy ones are read.

Only validation evaluations reach this module: `choose` refuses any evaluation whose splits are
not the validation role, and `study.select_settings` builds nothing but validation splits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from mmpo_jax.evidence.protocol import VALIDATION

CRITERION = "chair_i"
CONSTRAINT = "recall"


class SelectionError(ValueError):
    """An evaluation of another split than validation was offered to the selection."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """A row's chosen settings and every candidate's validation numbers."""

    settings: dict[str, float]
    eligible: bool
    recall_floor: float
    candidates: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _metric(metrics: Mapping[str, float], name: str) -> float:
    return float(metrics[f"sampled/{name}"] if f"sampled/{name}" in metrics else metrics[name])


def _validation_metrics(evaluation: Mapping[str, Any]) -> Mapping[str, float]:
    role = evaluation["splits"]["role"]
    if role != VALIDATION:
        raise SelectionError(f"the selection read an evaluation on the {role!r} splits "
                             f"({evaluation['splits']['caption']}); it takes {VALIDATION!r} only")
    return evaluation["metrics"]


def choose(candidates: Sequence[tuple[Mapping[str, float], Mapping[str, Any]]],
           base: Mapping[str, Any], *, recall_tolerance: float) -> Choice:
    """The rule of the module doc.

    Args:
      candidates: ``(settings, validation evaluation)`` per grid point, in grid order.
      base: the SFT base's validation evaluation.
      recall_tolerance: how far below the base's recall a setting may fall.
    """
    if not candidates:
        raise ValueError("no candidate settings to choose from")
    floor = _metric(_validation_metrics(base), CONSTRAINT) - recall_tolerance
    table = []
    for settings, evaluation in candidates:
        metrics = _validation_metrics(evaluation)
        table.append({"settings": dict(settings), CRITERION: _metric(metrics, CRITERION),
                      CONSTRAINT: _metric(metrics, CONSTRAINT)})
    eligible = [entry for entry in table if entry[CONSTRAINT] >= floor]
    if eligible:
        best = min(eligible, key=lambda entry: entry[CRITERION])
    else:
        best = max(table, key=lambda entry: entry[CONSTRAINT])
    return Choice(dict(best["settings"]), bool(eligible), floor, tuple(table))
