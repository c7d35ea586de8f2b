"""Batches of several pipelines in one stream, each in proportion to its epoch's batches.

A batch's shapes must hold for all its rows (an SFT batch of two-image prompts holds twice the
images of one-image rows), so records that differ in shape go through pipelines of their own and
``Interleaved`` takes the next batch from the pipeline furthest behind its share: at step ``s``
(0-based) the part ``i`` that maximises ``(s + 1) c_i / C - taken_i``, ``c_i`` its batches per
epoch and ``C`` their sum (ties to the first). Each part keeps its own schedule, so every process
takes the same part at every step, and the stream's position is its parts' positions.
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
        self._taken = [0] * len(self.parts)

    @property
    def num_batches(self) -> int | None:
        """Batches in the whole run, None when a part repeats forever."""
        counts = [part.num_batches for part in self.parts]
        return None if None in counts else sum(counts)

    @property
    def stats(self) -> DropStats:
        """The parts' drop counts, summed."""
        total = DropStats()
        for part in self.parts:
            total = total + part.stats
        return total

    def next_part(self) -> int:
        """Which part the next batch comes from."""
        step, total = sum(self._taken), sum(self._shares)
        deficits = [(step + 1) * share / total - taken
                    for share, taken in zip(self._shares, self._taken)]
        return deficits.index(max(deficits))

    def __next__(self) -> Any:
        first = self.next_part()
        for index in [first] + [i for i in range(len(self.parts)) if i != first]:
            try:  # a finished part leaves its turn to the others
                batch = next(self.parts[index])
            except StopIteration:
                continue
            self._taken[index] += 1
            return batch
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"parts": [part.get_state() for part in self.parts], "taken": list(self._taken)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if len(state["parts"]) != len(self.parts):
            raise ValueError(f"the saved data position holds {len(state['parts'])} pipelines, this "
                             f"run interleaves {len(self.parts)}")
        for part, part_state in zip(self.parts, state["parts"]):
            part.set_state(part_state)
        self._taken = [int(t) for t in state["taken"]]
