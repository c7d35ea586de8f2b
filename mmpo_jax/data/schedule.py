"""The schedule of a data pipeline: which record every slot of the run reads, on one process.

Records are sharded by process, strided (process ``k`` of ``P`` reads records ``k, k+P, ...``),
and every process gets the same number of slots per epoch, ``ceil(N / P)`` rounded up to a
multiple of ``batch_size`` (down, with ``drop_remainder``), so all processes take the same number
of steps and none waits in a collective for a batch that never comes. Each epoch is a fresh
permutation of the shard drawn from ``(seed, epoch)``; batches never straddle epochs (a slot past
the shard's end is a padding slot).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which record every slot of the run reads, for one process.

    Attributes:
      num_records: ``N``, the source's length.
      shard_index, shard_count: this process ``k`` and the number of processes ``P``.
      batch_size: ``B``.
      seed: the run's seed.
      shuffle: permute each epoch (else records in shard order every epoch).
      drop_remainder: drop an epoch's final partial batch instead of padding it.
      drop_shard_remainder: give every process ``N // P`` records (drops up to ``P-1``) instead
        of ``ceil(N / P)`` slots with one padding slot on the shorter shards.
    """

    num_records: int
    shard_index: int
    shard_count: int
    batch_size: int
    seed: int
    shuffle: bool = True
    drop_remainder: bool = False
    drop_shard_remainder: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed}")
        if self.epoch_slots == 0:
            raise ValueError(
                f"no full batch of {self.batch_size} in a shard of {self.shard_length} records "
                f"({self.num_records} records over {self.shard_count} processes) with "
                f"drop_remainder=True; use a smaller batch or drop_remainder=False")

    @property
    def shard_length(self) -> int:
        """Records this process reads per epoch."""
        if self.drop_shard_remainder:
            return self.num_records // self.shard_count
        return len(range(self.shard_index, self.num_records, self.shard_count))

    @property
    def epoch_slots(self) -> int:
        """Slots per epoch, equal on every process and a multiple of ``batch_size``."""
        per_process = (self.num_records // self.shard_count if self.drop_shard_remainder
                       else -(-self.num_records // self.shard_count))
        rounding = math.floor if self.drop_remainder else math.ceil
        return rounding(per_process / self.batch_size) * self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_slots // self.batch_size

    def slot(self, slot: int) -> tuple[int, int]:
        """``(epoch, record index)`` of a slot; the record index is -1 for a padding slot."""
        epoch, position = divmod(slot, self.epoch_slots)
        if position >= self.shard_length:
            return epoch, -1
        if self.shuffle:
            position = int(_permutation(self.seed, epoch, self.shard_length)[position])
        return epoch, self.shard_index + position * self.shard_count


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, length: int) -> np.ndarray:
    """The shard order of one epoch, from a generator keyed by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(length)
