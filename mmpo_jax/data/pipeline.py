"""grain pipelines from a random-access source of records to resumable iterators of batches.

``preference_pipeline`` yields ``Batch`` es, ``sft_pipeline`` ``SftBatch`` es (NumPy leaves; the
trainer puts them on devices). A pipeline is three parts:

- the *schedule* (``data.schedule``): which record each of the run's slots reads on this process,
  ``batch_size`` slots per batch, the same number of batches on every process;
- the *row encoding* (``data.row_encoding``): a record to one row's tokens and images, with the
  per-example randomness of ``data.example_randomness`` (keyed by seed, epoch and record, so a
  resumed run draws the same corruptions);
- the grain graph here: slots -> rows -> batches, counting what was dropped.

A slot past the shard's end, or holding an example that cannot be used (the template drops an
over-long prompt, a response is longer than ``max_length`` under ``too_long="skip"``, or the
example is longer than the largest bucket), becomes a *padding row* (``example_mask == 0``,
filler tokens, no loss). The example is counted by reason in ``iterator.stats``; it is never
replaced by another example, so the schedule, and with it every later batch, is independent of
what was dropped. Responses longer than ``max_length`` (default: the largest bucket) are cut
under ``too_long="truncate"`` (the default) and counted in ``stats.truncated``; the counts are
logged at every epoch's end, with a warning past 1%.

Resuming: the iterator is a ``grain.DatasetIterator``. ``it.get_state()`` is a JSON-able dict
(grain's position plus the drop counts) and ``it.set_state(state)`` restores it. In an orbax
checkpoint use grain's handler, which writes one file per process::

    mngr = ocp.CheckpointManager(directory)
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data=grain.checkpoint.CheckpointSave(it)))
    ...
    it = preference_pipeline(...same arguments...)
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(it)))

(``ocp.args.JsonSave(it.get_state())`` also works on a single host, but orbax writes JSON items
from the primary process only, which loses the other processes' states on a pod.)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from mmpo_jax.data import template as template_lib
from mmpo_jax.data.batch import AnyBatch, Batch, SftBatch, choose_bucket, collate, validate_buckets
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.data.row_encoding import (EXTRAS, LONGER_THAN_BUCKETS, RESPONSE_TOO_LONG,
                                         TOO_LONG_POLICIES, filler_row, preference_row, sft_row)
from mmpo_jax.data.schedule import Schedule

logger = logging.getLogger(__name__)

Source = Any
"""A random-access source: ``len(source)`` and ``source[i] -> dict`` in the data contract's
record format (``mmpo_jax.data.sources.load_split``, or a list of such dicts)."""

DROP_WARNING_FRACTION = 0.01
DROP_WARNING_MIN_EXAMPLES = 100


@dataclasses.dataclass(frozen=True)
class DropStats:
    """Counts of what the pipeline has produced so far (on this process).

    Attributes:
      examples: records read (excluding padding slots).
      dropped: reason -> number of records turned into padding rows for that reason.
      padding_rows: rows with ``example_mask == 0`` (dropped examples and schedule padding).
      truncated: reason -> number of records kept with a truncated response (``RESPONSE_TOO_LONG``
        under ``too_long="truncate"``).
    """

    examples: int = 0
    dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    padding_rows: int = 0
    truncated: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __add__(self, other: "DropStats") -> "DropStats":
        return DropStats(self.examples + other.examples, _add_counts(self.dropped, other.dropped),
                         self.padding_rows + other.padding_rows,
                         _add_counts(self.truncated, other.truncated))

    def to_json(self) -> dict[str, Any]:
        return {"examples": self.examples, "dropped": dict(self.dropped),
                "padding_rows": self.padding_rows, "truncated": dict(self.truncated)}

    @classmethod
    def from_json(cls, state: Mapping[str, Any]) -> "DropStats":
        def counts(key):  # states saved before truncation was counted have no "truncated"
            return {k: int(v) for k, v in state.get(key, {}).items()}
        return cls(int(state["examples"]), counts("dropped"), int(state["padding_rows"]),
                   counts("truncated"))


def _add_counts(left: Mapping[str, int], right: Mapping[str, int]) -> dict[str, int]:
    total = dict(left)
    for reason, count in right.items():
        total[reason] = total.get(reason, 0) + count
    return total


@dataclasses.dataclass(frozen=True)
class _Row:
    """One slot after preprocessing: a batch row, whether it is real, and why not."""

    fields: Mapping[str, np.ndarray]
    valid: bool
    drop_reason: str | None  # None for real rows and schedule padding
    truncated: bool = False  # a real row whose response was cut to max_length


class PipelineIterator(grain.DatasetIterator):
    """Iterator of batches with checkpointable state and drop counts.

    Attributes:
      schedule: the slot schedule of this process.
      num_batches: batches in the whole run, None when it repeats forever.
      too_long: what happens to a response longer than max_length ("truncate" | "skip").
    """

    def __init__(self, parent: grain.DatasetIterator, *, schedule: Schedule,
                 num_batches: int | None, too_long: str = "truncate"):
        super().__init__(parent)
        self.schedule = schedule
        self.num_batches = num_batches
        self.too_long = too_long
        self._drop_stats = DropStats()
        self._warned: set[str] = set()
        self._batches = 0

    @property
    def stats(self) -> DropStats:
        """Examples read and dropped (by reason) so far; restored with the state."""
        return self._drop_stats

    @property
    def batches_read(self) -> int:
        """Batches this iterator has yielded; restored with the state."""
        return self._batches

    def __next__(self) -> Batch | SftBatch:
        batch, stats = next(self._parent)
        self._drop_stats = self._drop_stats + stats
        self._batches += 1
        self._warn_if_dropping_often()
        if self._batches % self.schedule.batches_per_epoch == 0:
            stats = self._drop_stats
            logger.info("data: epoch %d read; so far %d examples, dropped %s, truncated %s",
                        self._batches // self.schedule.batches_per_epoch, stats.examples,
                        dict(stats.dropped), dict(stats.truncated))
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._parent.get_state(), "stats": self._drop_stats.to_json(),
                "batches": self._batches}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["grain"])
        self._drop_stats = DropStats.from_json(state["stats"])
        self._batches = int(state.get("batches", 0))

    def _warn_if_dropping_often(self) -> None:
        stats = self._drop_stats
        if stats.examples < DROP_WARNING_MIN_EXAMPLES:
            return
        too_long = "dropped" if self.too_long == "skip" else "truncated"
        for reason, count, what in (
                (LONGER_THAN_BUCKETS, stats.dropped.get(LONGER_THAN_BUCKETS, 0),
                 "were longer than the largest bucket and dropped; raise the largest bucket to "
                 "max_length or lower max_length so the template truncates them"),
                (RESPONSE_TOO_LONG, (stats.dropped.get(RESPONSE_TOO_LONG, 0)
                                     + stats.truncated.get(RESPONSE_TOO_LONG, 0)),
                 f"had a response longer than max_length and were {too_long} "
                 f"(too_long={self.too_long!r}); raise max_length and the largest bucket to keep "
                 "them whole")):
            if reason not in self._warned and count > DROP_WARNING_FRACTION * stats.examples:
                self._warned.add(reason)
                logger.warning("%d of %d examples %s", count, stats.examples, what)

def _batches(source: Source, *, schedule: Schedule, num_epochs: int | None,
             row_fn: Callable[..., tuple[dict[str, np.ndarray], str | None, bool]],
             filler: Mapping[str, np.ndarray], batch_type: type[AnyBatch],
             buckets: tuple[int, ...], pad_id: int, read_options: grain.ReadOptions | None,
             too_long: str) -> PipelineIterator:
    """The grain graph shared by both pipelines: slots -> rows -> batches -> counted batches."""

    def load(slot: int, _: int) -> _Row:
        epoch, record_index = schedule.slot(slot)
        if record_index < 0:
            return _Row(filler, valid=False, drop_reason=None)
        fields, reason, truncated = row_fn(source[record_index], epoch=epoch,
                                           record_index=record_index)
        if reason is not None:
            return _Row(filler, valid=False, drop_reason=reason)
        return _Row(fields, valid=True, drop_reason=None, truncated=truncated)

    def to_batch(rows: Sequence[_Row]) -> tuple[AnyBatch, DropStats]:
        batch = collate(batch_type, [row.fields for row in rows],
                        example_mask=[row.valid for row in rows], buckets=buckets, pad_id=pad_id)
        dropped: dict[str, int] = {}
        for row in rows:
            if row.drop_reason is not None:
                dropped[row.drop_reason] = dropped.get(row.drop_reason, 0) + 1
        truncated = sum(row.truncated for row in rows)
        stats = DropStats(examples=sum(row.valid or row.drop_reason is not None for row in rows),
                          dropped=dropped, padding_rows=sum(not row.valid for row in rows),
                          truncated={RESPONSE_TOO_LONG: truncated} if truncated else {})
        return batch, stats

    if read_options is None:
        read_options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4 * schedule.batch_size)
    dataset = (grain.MapDataset.range(schedule.epoch_slots).repeat(num_epochs)
               .map_with_index(load)
               .to_iter_dataset(read_options)
               .batch(schedule.batch_size, batch_fn=to_batch))
    num_batches = None if num_epochs is None else num_epochs * schedule.batches_per_epoch
    return PipelineIterator(iter(dataset), schedule=schedule, num_batches=num_batches,
                            too_long=too_long)


def _build(source: Source, batch_type: type[AnyBatch], row_fn: Callable[..., Any], *,
           tokenizer: Any, image_config: ImageProcessorConfig, num_image_tokens: int,
           batch_size: int, buckets: Sequence[int], seed: int, num_epochs: int | None,
           shuffle: bool, shard_by_process: bool,
           shard_options: grain.sharding.ShardOptions | None, max_length: int | None,
           drop_remainder: bool, template: str, read_options: grain.ReadOptions | None,
           too_long: str) -> PipelineIterator:
    """The part both pipelines share: validation, encoder, schedule, filler row, grain graph."""
    buckets = validate_buckets(buckets)
    if too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"too_long={too_long!r}; valid: {TOO_LONG_POLICIES}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (repeat forever), got {num_epochs}")
    max_length = buckets[-1] if max_length is None else max_length
    if choose_bucket(max_length, buckets) is None:
        logger.warning(
            "max_length=%d exceeds the largest bucket %d: examples longer than %d tokens will be "
            "dropped rather than truncated", max_length, buckets[-1], buckets[-1])
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no pad token; set one (e.g. "
            f"tokenizer.pad_token = tokenizer.unk_token) before building a pipeline")
    encode = functools.partial(template_lib.encode_prompt_response, tokenizer,
                               num_image_tokens=num_image_tokens, max_length=max_length,
                               template=template)
    row_fn = functools.partial(row_fn, encode=encode, image_config=image_config,
                               largest_bucket=buckets[-1], too_long=too_long)
    if shard_options is None:
        shard_options = (grain.sharding.ShardByJaxProcess() if shard_by_process
                         else grain.sharding.NoSharding())
    schedule = Schedule(num_records=len(source), shard_index=shard_options.shard_index,
                        shard_count=shard_options.shard_count, batch_size=batch_size, seed=seed,
                        shuffle=shuffle, drop_remainder=drop_remainder,
                        drop_shard_remainder=shard_options.drop_remainder)
    return _batches(source, schedule=schedule, num_epochs=num_epochs, row_fn=row_fn,
                    filler=filler_row(row_fn, image_config, max_length), batch_type=batch_type,
                    buckets=buckets, pad_id=int(tokenizer.pad_token_id),
                    read_options=read_options, too_long=too_long)


def preference_pipeline(
    source: Source,
    *,
    tokenizer: Any,
    image_config: ImageProcessorConfig,
    num_image_tokens: int,
    batch_size: int,
    buckets: Sequence[int],
    seed: int,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    extras: Sequence[str] = (),
    shard_by_process: bool = True,
    shard_options: grain.sharding.ShardOptions | None = None,
    max_length: int | None = None,
    drop_remainder: bool = False,
    template: str = "llava_1_5",
    read_options: grain.ReadOptions | None = None,
    too_long: str = "truncate",
) -> PipelineIterator:
    """Batches of preference pairs sharing one image, as a resumable iterator of ``Batch``.

    Args:
      source: random-access preference records (``id, image, prompt, chosen, rejected, ...``;
        extras read ``robust_chosen``/``robust_rejected``/``noise_key``,
        ``focus_aug_image``/``focus_deg_image``,
        ``ddw_clip_crop``/``ddw_clip_full``, ``ref_chosen_logps``/``ref_rejected_logps``).
      tokenizer: a transformers tokenizer with BOS, EOS, pad and ``<image>``.
      image_config: the model's image preprocessing.
      num_image_tokens: visual tokens per image (the model config's).
      batch_size: rows per batch on this process.
      buckets: allowed padded lengths, increasing; each batch takes the smallest that fits.
      seed: shuffling and per-example randomness, in ``[0, 2**32)``.
      num_epochs: passes over the data, or None to repeat forever.
      shuffle: a new permutation per epoch; False reads the shard in order.
      extras: names from ``EXTRAS``; the matching ``Batch`` fields stay None unless asked for.
      shard_by_process: shard by ``jax.process_index()`` / ``jax.process_count()``.
      shard_options: explicit sharding, overriding ``shard_by_process``.
      max_length: the template's truncation length; defaults to the largest bucket.
      drop_remainder: drop each epoch's last partial batch instead of padding it.
      template: conversation template name (``template.TEMPLATES``).
      read_options: grain threading/prefetch; default 4 threads, 4 batches of prefetch.
      too_long: a response longer than ``max_length``: "truncate" (kept, cut from its end,
        counted in ``stats.truncated``) or "skip" (a padding row, counted in ``stats.dropped``),
        both under ``RESPONSE_TOO_LONG``.

    Returns:
      A ``PipelineIterator`` of ``Batch`` (NumPy leaves) with ``get_state``/``set_state`` and
      ``stats``.
    """
    unknown = sorted(set(extras) - set(EXTRAS))
    if unknown:
        raise ValueError(f"unknown extras {unknown}; valid: {EXTRAS}")
    row_fn = functools.partial(preference_row, seed=seed, extras=frozenset(extras))
    return _build(
        source, Batch, row_fn, tokenizer=tokenizer, image_config=image_config,
        num_image_tokens=num_image_tokens, batch_size=batch_size, buckets=buckets, seed=seed,
        num_epochs=num_epochs, shuffle=shuffle, shard_by_process=shard_by_process,
        shard_options=shard_options, max_length=max_length, drop_remainder=drop_remainder,
        template=template, read_options=read_options, too_long=too_long)


def sft_pipeline(
    source: Source,
    *,
    tokenizer: Any,
    image_config: ImageProcessorConfig,
    num_image_tokens: int,
    batch_size: int,
    buckets: Sequence[int],
    seed: int,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    response_field: str = "response",
    shard_by_process: bool = True,
    shard_options: grain.sharding.ShardOptions | None = None,
    max_length: int | None = None,
    drop_remainder: bool = False,
    template: str = "llava_1_5",
    read_options: grain.ReadOptions | None = None,
    too_long: str = "truncate",
    two_images: bool = False,
) -> PipelineIterator:
    """Batches of (image, prompt, response) for supervised fine-tuning, as ``SftBatch``.

    Args: as ``preference_pipeline`` (without extras), plus
      response_field: the record field supervised: ``"response"`` for the shapes-world ``sft``
        split, ``"chosen"`` to fine-tune on a preference split's chosen answers (the control).
      two_images: every prompt holds the record's ``image`` then its ``focus_image`` (the
        shapes world v2's ``sft_focus``); ``pixel_values`` ``[B, 2, H, W, 3]``. A mix with
        one-image records interleaves two pipelines (``data.interleaving``).

    Returns:
      A ``PipelineIterator`` of ``SftBatch`` (NumPy leaves).
    """
    row_fn = functools.partial(sft_row, response_field=response_field, two_images=two_images)
    return _build(
        source, SftBatch, row_fn, tokenizer=tokenizer, image_config=image_config,
        num_image_tokens=num_image_tokens, batch_size=batch_size, buckets=buckets, seed=seed,
        num_epochs=num_epochs, shuffle=shuffle, shard_by_process=shard_by_process,
        shard_options=shard_options, max_length=max_length, drop_remainder=drop_remainder,
        template=template, read_options=read_options, too_long=too_long)
