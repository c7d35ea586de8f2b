"""Integer metric counts that add field by field, so metrics merge across batches, passes or shards."""

from __future__ import annotations

import dataclasses
from typing import Self


class AddableCounts:
    """Mixin for frozen dataclasses of int counts: `a + b` adds every field."""

    def __add__(self, other: Self) -> Self:
        if type(other) is not type(self):
            return NotImplemented
        return type(self)(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def ratio(numerator: int, denominator: int) -> float:
    """`numerator / denominator`, 0 for an empty denominator (as `objectives.metrics.finalize`)."""
    return numerator / denominator if denominator else 0.0
