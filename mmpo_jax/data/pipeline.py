"""grain pipelines from a random-access source of records to resumable iterators of batches.

``preference_pipeline`` yields ``Batch`` es, ``sft_pipeline`` ``SftBatch`` es (NumPy leaves; the
trainer puts them on devices). The run is a fixed *schedule* of slots, ``batch_size`` per batch:

- records are sharded by process, strided (process ``k`` of ``P`` reads records ``k, k+P, ...``),
  and every process gets the same number of slots per epoch, ``ceil(N / P)`` rounded up to a
  multiple of ``batch_size`` (down, with ``drop_remainder``), so all processes take the same number
  of steps and none waits in a collective for a batch that never comes;
- each epoch is a fresh permutation of the shard drawn from ``(seed, epoch)``; batches never
  straddle epochs (the last batch of an epoch is padded instead);
- a slot past the shard's end, or holding an example that cannot be used (the template drops an
  over-long prompt, a response is longer than ``max_length`` under ``too_long="skip"``, or the
  example is longer than the largest bucket), becomes a *padding row* (``example_mask == 0``,
  filler tokens, no loss). The example is counted by reason in ``iterator.stats``; it is never
  replaced by another example, so the schedule, and with it every later batch, is independent of
  what was dropped.

Responses longer than ``max_length`` (which defaults to the largest bucket): ``too_long=
"truncate"`` (the default) keeps the example with the response cut from its end (the template's
rule: no EOS then) and counts it in ``stats.truncated``; ``"skip"`` makes it a padding row counted
in ``stats.dropped``; both under ``RESPONSE_TOO_LONG``. [our choice] truncate by default, as
LLaVA's and TRL's trainers do: a pair whose responses run past a 2048-token bucket still teaches
its first 2000 tokens, and the counts (logged at every epoch's end, with a warning past 1%) say
how often it happens.

Per-example randomness (mDPO's corrupted crop, the noise image) comes from a PRNG key folded from
``(seed, epoch, record index, extra name)``: a resumed run draws exactly the same corruptions.
P2-DPO's robustness pair is the exception: it is scored on the ``I_noise`` its ``y_l`` was sampled
from, which ``noise_image`` rebuilds from the pair's stored ``noise_key`` (``robust_pair``).

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
import json
import logging
import math
import zlib
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np

from mmpo_jax.data import interventions
from mmpo_jax.data import template as template_lib
from mmpo_jax.data.batch import AnyBatch, Batch, SftBatch, choose_bucket, collate, validate_buckets
from mmpo_jax.data.image_processing import ImageProcessorConfig

logger = logging.getLogger(__name__)

Source = Any
"""A random-access source: ``len(source)`` and ``source[i] -> dict`` in the data contract's
record format (``mmpo_jax.data.sources.load_split``, or a list of such dicts)."""

EXTRAS = ("corrupt_pixel_values", "noise_pixel_values", "focus_images", "focus_two_images",
          "robust_pair", "ddw_clip", "ref_logps")
"""Per-method extras ``preference_pipeline`` can add (see ``Batch`` for the fields they fill).
``robust_pair`` adds the robustness pair's tokens and the ``I_noise`` it was generated on
(``robust_noise_pixel_values``, from the record's ``noise_key``); ``focus_two_images`` the
two-image ``I_aug`` (image and crop) with the focus pair after the record's ``focus_aug_prompt``."""

LONGER_THAN_BUCKETS = "longer_than_largest_bucket"
RESPONSE_TOO_LONG = "response_longer_than_max_length"
TOO_LONG_POLICIES = ("truncate", "skip")
DROP_WARNING_FRACTION = 0.01
DROP_WARNING_MIN_EXAMPLES = 100


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


def example_key(seed: jax.Array, epoch: jax.Array, record_index: jax.Array, stream: str
                ) -> jax.Array:
    """The PRNG key of one example's randomness for ``stream`` (e.g. ``"corrupt_pixel_values"``).

    ``key(seed)`` folded with the epoch, the record index and ``crc32(stream)``, so it does not
    depend on the order, thread or process in which the example is prepared. Traceable.
    """
    key = jax.random.key(seed)
    for data in (epoch, record_index, zlib.crc32(stream.encode())):
        key = jax.random.fold_in(key, data)
    return key


_INTERVENTIONS = {"corrupt_pixel_values": interventions.random_resized_crop,
                  "noise_pixel_values": interventions.add_diffusion_noise}


# Interventions that need the image's normalisation constants (the noise is defined in CLIP units).
_NORMALISATION_AWARE = frozenset({"noise_pixel_values"})


@functools.cache
def _jitted_intervention(name: str, options: tuple[tuple[str, Any], ...]
                         ) -> Callable[..., jax.Array]:
    def apply(seed, epoch, record_index, image):
        return _INTERVENTIONS[name](example_key(seed, epoch, record_index, name), image,
                                    **dict(options))
    return jax.jit(apply)


def _intervene(name: str, image: np.ndarray, *, seed: int, epoch: int, record_index: int,
               image_config: ImageProcessorConfig, **options: Any) -> np.ndarray:
    """``_INTERVENTIONS[name]`` on one preprocessed image with its example key, on the host CPU.

    ``image_config`` gives the image's normalisation constants; ``options`` go to the
    intervention (e.g. the noise's ``step``). Jitted once per image shape and options; the
    arguments are committed to the CPU so that data workers never touch the accelerator the
    training step runs on, and so that the same inputs give the same bits wherever it is called.
    """
    if name in _NORMALISATION_AWARE:
        options.update(mean=tuple(image_config.mean), std=tuple(image_config.std))
    # the filler row's index -1 wraps to 2**32 - 1, an index no record has
    args = (np.uint32(seed), np.uint32(epoch), np.uint32(int(record_index) % 2**32), image)
    apply = _jitted_intervention(name, tuple(sorted(options.items())))
    return np.asarray(apply(*jax.device_put(args, jax.devices("cpu")[0])))


def noise_image(pixel_values: np.ndarray, *, seed: int, record_index: int, step: int,
                image_config: ImageProcessorConfig) -> np.ndarray:
    """P2-DPO's ``I_noise`` of one generated pair: diffusion noise at ``step`` with the key of
    ``(seed, epoch 0, record_index, "noise_pixel_values")``, on the host CPU.

    Pair generation (``pipelines.p2dpo``) samples the robustness pair's ``y_l`` on this image and
    stores ``noise_key(seed, record_index, step)`` with the pair; ``robust_pair`` rebuilds it from
    that key with the same function, inputs and device, so the trainer scores the pair on the
    bit-identical image [our choice: a key of three integers instead of the float32 image itself,
    ~200 KB a record at 128 px].

    Args:
      pixel_values: float32 ``[H, W, 3]``, the record's image through ``image_config``.
    """
    return _intervene("noise_pixel_values", pixel_values, seed=seed, epoch=0,
                      record_index=record_index, image_config=image_config, step=int(step))


def noise_key(seed: int, record_index: int, step: int) -> str:
    """The ``noise_key`` record field of a generated pair: JSON ``{"index", "seed", "step"}``."""
    return json.dumps({"index": int(record_index), "seed": int(seed), "step": int(step)},
                      sort_keys=True)


def _stored_noise(record: Mapping[str, Any], pixel_values: np.ndarray,
                  image_config: ImageProcessorConfig) -> np.ndarray:
    """``noise_image`` from a record's ``noise_key`` (a one-line error when it has none)."""
    try:
        key = json.loads(record["noise_key"])
        options = dict(seed=int(key["seed"]), record_index=int(key["index"]),
                       step=int(key["step"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"record {record.get('id', '?')!r}: the robustness pair needs noise_key, JSON "
            f"{{\"seed\", \"index\", \"step\"}} of the I_noise it was generated on (pair "
            f"generation writes it); got {record.get('noise_key')!r} ({error!r})") from None
    return noise_image(pixel_values, image_config=image_config, **options)


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


def _encode_texts(encode: Callable[[str, str], Any], prompt: str, responses: Mapping[str, str],
                  largest_bucket: int, too_long: str
                  ) -> tuple[dict[str, np.ndarray], str | None, bool]:
    """Token fields for each ``group -> response`` with one prompt, or the first drop reason; and
    whether a response was truncated to ``max_length`` (``too_long="truncate"``)."""
    fields, truncated = {}, False
    for group, response in responses.items():
        encoded = encode(prompt, response)
        if isinstance(encoded, template_lib.DropReason):
            return {}, encoded.name, False
        if len(encoded.input_ids) > largest_bucket:
            return {}, LONGER_THAN_BUCKETS, False
        if encoded.truncated and too_long == "skip":
            return {}, RESPONSE_TOO_LONG, False
        truncated = truncated or encoded.truncated
        prefix = f"{group}_" if group else ""
        fields[f"{prefix}input_ids"] = np.asarray(encoded.input_ids, np.int32)
        fields[f"{prefix}loss_mask"] = np.asarray(encoded.loss_mask, np.int32)
    return fields, None, truncated


def _preference_row(record: Mapping[str, Any], *, epoch: int, record_index: int, seed: int,
                    encode: Callable[[str, str], Any], image_config: ImageProcessorConfig,
                    extras: frozenset[str], largest_bucket: int, too_long: str
                    ) -> tuple[dict[str, np.ndarray], str | None, bool]:
    """The batch fields of one preference record, or the reason it is dropped; and whether a
    response was truncated."""
    responses = {"chosen": record["chosen"], "rejected": record["rejected"]}
    if "robust_pair" in extras:
        responses.update(robust_chosen=record["robust_chosen"],
                         robust_rejected=record["robust_rejected"])
    fields, reason, truncated = _encode_texts(encode, record["prompt"], responses, largest_bucket,
                                              too_long)
    if reason is None and "focus_two_images" in extras:  # the pair after P_enh, two images
        two_images, reason, also = _encode_texts(
            functools.partial(encode, num_images=2), record["focus_aug_prompt"],
            {"focus_aug_chosen": record["chosen"], "focus_aug_rejected": record["rejected"]},
            largest_bucket, too_long)
        fields.update(two_images)
        truncated = truncated or also
    if reason is not None:
        return fields, reason, False
    pixel_values = image_config(record["image"])
    fields["pixel_values"] = pixel_values
    fields["example_index"] = np.int32(record_index)
    for name in sorted(extras & _INTERVENTIONS.keys()):
        fields[name] = _intervene(name, pixel_values, seed=seed, epoch=epoch,
                                  record_index=record_index, image_config=image_config)
    if "robust_pair" in extras:
        fields["robust_noise_pixel_values"] = _stored_noise(record, pixel_values, image_config)
    if "focus_images" in extras:
        fields["focus_aug_pixel_values"] = image_config(record["focus_aug_image"])
        fields["focus_deg_pixel_values"] = image_config(record["focus_deg_image"])
    if "focus_two_images" in extras:
        fields["focus_pair_pixel_values"] = np.stack(
            [pixel_values, image_config(record["focus_aug_image"])])
    for extra, names in (("ddw_clip", ("ddw_clip_crop", "ddw_clip_full")),
                         ("ref_logps", ("ref_chosen_logps", "ref_rejected_logps"))):
        if extra in extras:
            fields.update({name: np.float32(record[name]) for name in names})
    return fields, None, truncated


def _sft_row(record: Mapping[str, Any], *, epoch: int, record_index: int,
             encode: Callable[[str, str], Any], image_config: ImageProcessorConfig,
             response_field: str, largest_bucket: int, too_long: str
             ) -> tuple[dict[str, np.ndarray], str | None, bool]:
    """The batch fields of one SFT record, or the reason it is dropped; and whether its response
    was truncated."""
    del epoch  # SFT rows have no per-example randomness
    fields, reason, truncated = _encode_texts(encode, record["prompt"],
                                              {"": record[response_field]}, largest_bucket,
                                              too_long)
    if reason is None:
        fields["pixel_values"] = image_config(record["image"])
        fields["example_index"] = np.int32(record_index)
    return fields, reason, truncated


def _filler_row(row_fn: Callable[..., tuple[dict[str, np.ndarray], str | None, bool]],
                image_config: ImageProcessorConfig, max_length: int) -> dict[str, np.ndarray]:
    """A padding row: an empty prompt and response through the same path, loss masks zeroed.

    It carries the template's image placeholders, so the model sees one well-formed sequence per
    image in every row, and no row is fully masked.
    """
    blank = np.zeros((image_config.crop_size, image_config.crop_size, 3), np.uint8)
    text_fields = ("prompt", "chosen", "rejected", "robust_chosen", "robust_rejected", "response",
                   "focus_aug_prompt")
    record = {name: "" for name in text_fields}
    record.update(image=blank, focus_aug_image=blank, focus_deg_image=blank, ddw_clip_crop=0.0,
                  ddw_clip_full=0.0, ref_chosen_logps=0.0, ref_rejected_logps=0.0,
                  noise_key=noise_key(0, -1, 600))
    fields, reason, _ = row_fn(record, epoch=0, record_index=-1)
    if reason is not None:
        raise ValueError(
            f"the template cannot encode even an empty example ({reason}) in max_length={max_length} "
            f"tokens: raise data.max_length and the largest of data.buckets to hold the prompt "
            f"template and its image tokens (twice the image's placeholders for a two-image prompt, "
            f"pairs.combine_mode='two_images')")
    return {name: (np.zeros_like(value) if name.endswith("loss_mask") else value)
            for name, value in fields.items()}


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
                    filler=_filler_row(row_fn, image_config, max_length), batch_type=batch_type,
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
    row_fn = functools.partial(_preference_row, seed=seed, extras=frozenset(extras))
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
) -> PipelineIterator:
    """Batches of (image, prompt, response) for supervised fine-tuning, as ``SftBatch``.

    Args: as ``preference_pipeline`` (without extras), plus
      response_field: the record field supervised: ``"response"`` for the shapes-world ``sft``
        split, ``"chosen"`` to fine-tune on a preference split's chosen answers (the control).

    Returns:
      A ``PipelineIterator`` of ``SftBatch`` (NumPy leaves).
    """
    row_fn = functools.partial(_sft_row, response_field=response_field)
    return _build(
        source, SftBatch, row_fn, tokenizer=tokenizer, image_config=image_config,
        num_image_tokens=num_image_tokens, batch_size=batch_size, buckets=buckets, seed=seed,
        num_epochs=num_epochs, shuffle=shuffle, shard_by_process=shard_by_process,
        shard_options=shard_options, max_length=max_length, drop_remainder=drop_remainder,
        template=template, read_options=read_options, too_long=too_long)
