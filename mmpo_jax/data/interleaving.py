"""Batches of several pipelines in one stream, each in proportion to its epoch's batches.

A batch's shapes must hold for all its rows (an SFT batch of two-image prompts holds twice the
images of one-image rows), so records that differ in shape go through pipelines of their own and
``Interleaved`` takes the next batch from the pipeline furthest behind its share: at step ``s``
(0-based) the part ``i`` that maximises ``(s + 1) c_i / C - taken_i``, ``c_i`` its batches per
epoch, ``C`` their sum and ``taken_i`` the batches it has yielded (ties to the first). Each part
keeps its own schedule, so every process takes the same part at every step, and the stream's
position is its parts' positions.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain

from mmpo_jax.data.pipeline import DropStats, PipelineIterator


class Interleaved(grain.DatasetIterator):
    """The batches of ``parts``, interleaved (module docstring); resumable like each part."""

    def __init__(self, parts: Sequence[PipelineIterator]):
        if not parts:
            raise ValueError("interleaving needs at least one pipeline")
        super().__init__(list(parts))
        self.parts = tuple(parts)
        self._shares = [part.schedule.batches_per_epoch for part in self.parts]

    @property
    def num_batches(self) -> int | None:
        """Batches in the whole run, None when a part repeats forever."""
        counts = [part.num_batches for part in self.parts]
        return None if None in counts else sum(counts)

    @property
    def stats(self) -> DropStats:
        """The parts' drop counts, summed."""
        return sum((part.stats for part in self.parts), DropStats())

    def next_part(self) -> int:
        """Which part the next batch comes from."""
        taken = [part.batches_read for part in self.parts]
        step, total = sum(taken), sum(self._shares)
        deficits = [(step + 1) * share / total - read for share, read in zip(self._shares, taken)]
        return deficits.index(max(deficits))

    def __next__(self) -> Any:
        first = self.next_part()
        for index in [first] + [i for i in range(len(self.parts)) if i != first]:
            try:  # a finished part leaves its turn to the others
                return next(self.parts[index])
            except StopIteration:
                continue
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"parts": [part.get_state() for part in self.parts]}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if len(state["parts"]) != len(self.parts):
            raise ValueError(f"the saved data position holds {len(state['parts'])} pipelines, this "
                             f"run interleaves {len(self.parts)}")
        for part, part_state in zip(self.parts, state["parts"]):
            part.set_state(part_state)
