"""The batches a training step consumes, their padding to length buckets, and the label shift.

A preference example's chosen and rejected responses share ONE image: the step encodes
``pixel_values`` once and reuses the visual tokens for chosen, rejected, policy and reference.
Chosen and rejected (and every other token group of a batch) are right-padded with the pad id to
one common length, the smallest configured *bucket* that fits the batch's longest sequence, so
they concatenate into one ``[2B, T]`` forward and a jitted step compiles at most once per bucket.

Shift convention (one place, used by every trainer and objective)::

    position t:      0     1     2   ...  T-2     T-1
    inputs[t]      = ids[0] ids[1] ...            ids[T-1]
    labels[t]      = ids[1] ids[2] ...   ids[T-1]  0 (unused)
    mask[t]        = loss_mask[t+1]                0

``logits[:, t]`` of a forward over ``inputs`` predicts ``labels[:, t]``; ``mask`` is the loss mask
aligned with the *predicted* position, so ``sum(token_logps * mask)`` is log p(response | image,
prompt). The forward runs over all ``T`` positions (not ``T-1``) so shapes stay on the bucket.

Padding rows (``example_mask == 0``: the tail of a short final batch, or an example the pipeline
dropped) hold a well-formed *filler* sequence (template with empty prompt and response, so it has
the model's image placeholders and nothing fully masked) with ``loss_mask`` all zero; a loss must
still weight examples by ``example_mask``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

TOKEN_SUFFIXES = ("input_ids", "loss_mask", "attention_mask")
"""Every token group ``g`` of a batch has the fields ``{g}_input_ids``, ``{g}_loss_mask`` and
``{g}_attention_mask``, all int32 ``[B, T]`` with the same ``T``."""


def token_field(group: str, suffix: str) -> str:
    """The field name of ``suffix`` in token group ``group`` (``""`` is the unnamed SFT group)."""
    return f"{group}_{suffix}" if group else suffix


class _BatchShape:
    """``B`` and ``T`` of a batch whose first token group is ``token_groups[0]``."""

    token_groups: ClassVar[tuple[str, ...]]

    @property
    def batch_size(self) -> int:
        return self.example_mask.shape[0]

    @property
    def sequence_length(self) -> int:
        """``T``, the bucket length every token field of this batch is padded to."""
        return getattr(self, token_field(self.token_groups[0], "input_ids")).shape[1]


@struct.dataclass
class Batch(_BatchShape):
    """One preference-training batch; NumPy leaves from the pipeline, jax arrays on device.

    Always present:
      pixel_values: float32 ``[B, H, W, 3]`` normalised, channel-last; shared by chosen/rejected.
      chosen_input_ids, chosen_loss_mask, chosen_attention_mask: int32 ``[B, T]``.
      rejected_input_ids, rejected_loss_mask, rejected_attention_mask: int32 ``[B, T]``.
      example_mask: int32 ``[B]``, 1 for real examples, 0 for padding/dropped rows.
      example_index: int32 ``[B]``, the record's index in the source, -1 on padding rows.

    Per-method extras, ``None`` unless the pipeline was asked for them:
      corrupt_pixel_values: float32 ``[B, H, W, 3]`` mDPO's corrupted image ``I'`` (random resized
        crop), scored with the chosen tokens.
      noise_pixel_values: float32 ``[B, H, W, 3]`` diffusion-noised image ``I_noise``, drawn per
        epoch (ADAPT's guidance, TPO weights).
      focus_aug_pixel_values / focus_deg_pixel_values: float32 ``[B, H, W, 3]`` P2-DPO's
        focus-enhanced ``I_aug`` (stitch mode) and degraded ``I_deg`` images, scored with the
        chosen tokens for ``L_calib``.
      robust_chosen_* / robust_rejected_*: int32 ``[B, T]`` P2-DPO's visual-robustness pair,
        scored on ``robust_noise_pixel_values``.
      robust_noise_pixel_values: float32 ``[B, H, W, 3]`` the ``I_noise`` the robustness pair
        was generated on (rebuilt from the record's ``noise_key``).
      focus_pair_pixel_values: float32 ``[B, 2, H, W, 3]`` P2-DPO's two-image ``I_aug`` (the
        image, then its crop), read with ``focus_aug_chosen_*`` / ``focus_aug_rejected_*`` (int32
        ``[B, T]``: the focus pair's replies after the enhanced prompt with two images).
      ddw_clip_crop / ddw_clip_full: float32 ``[B]`` CLIPScore(prompt, crop) and
        CLIPScore(prompt, image) for P2-DPO's dynamic weights.
      ref_chosen_logps / ref_rejected_logps: float32 ``[B]`` precomputed reference log-probs
        (sums over response tokens, METHODS' convention).
    """

    pixel_values: jax.Array
    chosen_input_ids: jax.Array
    chosen_loss_mask: jax.Array
    chosen_attention_mask: jax.Array
    rejected_input_ids: jax.Array
    rejected_loss_mask: jax.Array
    rejected_attention_mask: jax.Array
    example_mask: jax.Array
    example_index: jax.Array
    corrupt_pixel_values: jax.Array | None = None
    noise_pixel_values: jax.Array | None = None
    focus_aug_pixel_values: jax.Array | None = None
    focus_deg_pixel_values: jax.Array | None = None
    robust_chosen_input_ids: jax.Array | None = None
    robust_chosen_loss_mask: jax.Array | None = None
    robust_chosen_attention_mask: jax.Array | None = None
    robust_rejected_input_ids: jax.Array | None = None
    robust_rejected_loss_mask: jax.Array | None = None
    robust_rejected_attention_mask: jax.Array | None = None
    robust_noise_pixel_values: jax.Array | None = None
    focus_pair_pixel_values: jax.Array | None = None
    focus_aug_chosen_input_ids: jax.Array | None = None
    focus_aug_chosen_loss_mask: jax.Array | None = None
    focus_aug_chosen_attention_mask: jax.Array | None = None
    focus_aug_rejected_input_ids: jax.Array | None = None
    focus_aug_rejected_loss_mask: jax.Array | None = None
    focus_aug_rejected_attention_mask: jax.Array | None = None
    ddw_clip_crop: jax.Array | None = None
    ddw_clip_full: jax.Array | None = None
    ref_chosen_logps: jax.Array | None = None
    ref_rejected_logps: jax.Array | None = None

    token_groups: ClassVar[tuple[str, ...]] = (
        "chosen", "rejected", "robust_chosen", "robust_rejected", "focus_aug_chosen",
        "focus_aug_rejected")

    def concatenated_responses(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Chosen rows then rejected rows, for one forward over both.

        Returns:
          ``(input_ids, loss_mask, attention_mask)``, each int32 ``[2B, T]``; rows ``[:B]`` are
          the chosen responses, rows ``[B:]`` the rejected ones (their image is
          ``pixel_values[i % B]``).
        """
        return tuple(
            jnp.concatenate([getattr(self, f"chosen_{s}"), getattr(self, f"rejected_{s}")], axis=0)
            for s in TOKEN_SUFFIXES)


@struct.dataclass
class SftBatch(_BatchShape):
    """One supervised fine-tuning batch.

    Attributes:
      pixel_values: float32 ``[B, H, W, 3]``, or ``[B, K, H, W, 3]`` for prompts of K images
        each (their placeholders read them in order).
      input_ids, loss_mask, attention_mask: int32 ``[B, T]`` (``loss_mask`` 1 on response + EOS).
      example_mask: int32 ``[B]``; example_index: int32 ``[B]`` (-1 on padding rows).
    """

    pixel_values: jax.Array
    input_ids: jax.Array
    loss_mask: jax.Array
    attention_mask: jax.Array
    example_mask: jax.Array
    example_index: jax.Array

    token_groups: ClassVar[tuple[str, ...]] = ("",)


AnyBatch = TypeVar("AnyBatch", Batch, SftBatch)


def shift_for_next_token(
    input_ids: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inputs, labels and loss mask of a next-token forward (see the module docstring).

    Works on NumPy or jax arrays, inside or outside ``jit``.

    Args:
      input_ids: int ``[B, T]``.
      loss_mask: int/bool ``[B, T]``, 1 on the tokens to be predicted (response + EOS).

    Returns:
      ``(inputs [B, T], labels [B, T], mask [B, T])``: ``inputs`` is ``input_ids``;
      ``labels[:, t] = input_ids[:, t + 1]`` (0 at ``t = T-1``); ``mask[:, t] = loss_mask[:, t+1]``
      (0 at ``t = T-1``), int32.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    loss_mask = jnp.asarray(loss_mask, jnp.int32)
    tail = jnp.zeros_like(input_ids[:, :1])
    labels = jnp.concatenate([input_ids[:, 1:], tail], axis=1)
    mask = jnp.concatenate([loss_mask[:, 1:], tail], axis=1)
    return input_ids, labels, mask


def validate_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """``buckets`` as a strictly increasing tuple of positive ints, or a ValueError naming them."""
    result = tuple(int(b) for b in buckets)
    if not result or any(b <= 0 for b in result) or list(result) != sorted(set(result)):
        raise ValueError(
            f"buckets must be a non-empty, strictly increasing sequence of positive lengths, "
            f"e.g. (64, 128, 256); got {tuple(buckets)!r}")
    return result


def choose_bucket(length: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket ``>= length``, or None when ``length`` exceeds the largest one."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    return None


def _pad_rows(rows: Sequence[np.ndarray], length: int, pad_value: int) -> np.ndarray:
    """Right-pads 1-D int rows to ``[len(rows), length]`` int32 with ``pad_value``."""
    out = np.full((len(rows), length), pad_value, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate(
    batch_type: type[AnyBatch],
    rows: Sequence[Mapping[str, np.ndarray]],
    *,
    example_mask: Sequence[bool],
    buckets: Sequence[int],
    pad_id: int,
) -> AnyBatch:
    """Stacks per-example rows into a ``Batch``/``SftBatch`` padded to one length bucket.

    Args:
      batch_type: ``Batch`` or ``SftBatch``.
      rows: ``B`` dicts keyed by the batch's field names. A token group ``g`` present in a row
        gives ``{g}_input_ids`` and ``{g}_loss_mask`` as 1-D int arrays ``[T_i]`` (attention masks
        are derived: 1 on the ``T_i`` tokens); every other field is an array of the same shape in
        every row (e.g. ``pixel_values`` ``[H, W, 3]``, ``ddw_clip_crop`` ``[]``), plus
        ``example_index``. Padding rows must be complete filler rows.
      example_mask: ``B`` booleans, False for padding/dropped rows.
      buckets: strictly increasing allowed lengths; the batch gets the smallest that fits.
      pad_id: the tokenizer's pad id.

    Returns:
      A ``batch_type`` of NumPy arrays; fields absent from the rows are None.
    """
    if len(rows) != len(example_mask) or not rows:
        raise ValueError(
            f"need one example_mask entry per row and at least one row; got {len(rows)} rows "
            f"and {len(example_mask)} mask entries")
    keys = set(rows[0])
    for i, row in enumerate(rows):
        if set(row) != keys:
            raise ValueError(f"row {i} has fields {sorted(row)}, row 0 has {sorted(keys)}")
    groups = [g for g in batch_type.token_groups if token_field(g, "input_ids") in keys]
    lengths = [len(row[token_field(g, "input_ids")]) for row in rows for g in groups]
    longest = max(lengths, default=0)
    length = choose_bucket(longest, validate_buckets(buckets))
    if length is None:
        raise ValueError(
            f"a sequence of {longest} tokens exceeds the largest bucket {max(buckets)}; the "
            f"pipeline drops such examples before collating")

    fields: dict[str, np.ndarray] = {}
    for g in groups:
        ids = [np.asarray(row[token_field(g, "input_ids")]) for row in rows]
        fields[token_field(g, "input_ids")] = _pad_rows(ids, length, pad_id)
        fields[token_field(g, "loss_mask")] = _pad_rows(
            [np.asarray(row[token_field(g, "loss_mask")]) for row in rows], length, 0)
        fields[token_field(g, "attention_mask")] = _pad_rows(
            [np.ones(len(i), np.int32) for i in ids], length, 0)
    token_keys = {token_field(g, s) for g in groups for s in TOKEN_SUFFIXES}
    for key in sorted(keys - token_keys):
        fields[key] = np.stack([np.asarray(row[key]) for row in rows])
    fields["example_mask"] = np.asarray(example_mask, np.int32)
    fields["example_index"] = fields["example_index"].astype(np.int32)

    names = {f.name for f in dataclasses.fields(batch_type)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"{batch_type.__name__} has no fields {unknown}; valid: {sorted(names)}")
    return batch_type(**fields)


def pad_to_length(batch: AnyBatch, length: int, pad_id: int) -> AnyBatch:
    """``batch`` with every token group right-padded from ``T`` to ``length >= T`` (ids with
    ``pad_id``, masks with 0), as a batch collated into that longer bucket would be.

    The processes of a multi-process job each collate their own rows; they pad to the longest
    one's length so that the rows form one global array. NumPy leaves.
    """
    current = batch.sequence_length
    if length < current:
        raise ValueError(f"cannot pad a batch of length {current} to the shorter {length}")
    if length == current:
        return batch
    padded = {}
    for group in batch.token_groups:
        for suffix in TOKEN_SUFFIXES:
            name = token_field(group, suffix)
            value = getattr(batch, name)
            if value is not None:
                fill = pad_id if suffix == "input_ids" else 0
                padded[name] = np.pad(np.asarray(value), ((0, 0), (0, length - current)),
                                      constant_values=fill)
    return batch.replace(**padded)
