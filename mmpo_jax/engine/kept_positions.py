"""A scoring forward kept at its rows' response positions, and the log-probs read from it.

``engine.scoring`` stacks the (token group, image) rows of a model's forward along the batch
(``[R*B, T]``) and asks the model for its outputs at each row's response positions only
(``Llava(..., output_positions=positions, return_logits=False)``): the final norm, the last
layer's queries and MLP and the probes run there, and the LM head and log-softmax run chunk by
chunk on the gathered hidden states (``objectives.logprobs.hidden_token_logprobs``), so no
``[R*B, T, V]`` logits exist, in the forward or the backward pass. A ``KeptRead`` holds such a
forward; its values are scattered back to ``[B, T]`` (0 off the response), the layout every score
has.

**[our choice]** the static number of kept positions per row is ``P = T - N_img``
(``num_kept_positions``): every row holds its image's ``N_img`` placeholder tokens, which are
never response tokens (their loss mask is 0), so no row has more response positions. It depends
on the batch's static shapes only (no recompilation per step, no host-side look at the masks). At
the 7B preset (576 image tokens, buckets 1024 / 2048) it keeps 448 of 1024 positions (1472 of
2048); a tighter bound would need a response-length bucket chosen by the pipeline and passed to
the step as a static shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mmpo_jax.objectives import logprobs

RowKey = tuple[str, str]
"""A forward row: (token group, image kind)."""


def num_kept_positions(length: int, num_image_tokens: int) -> int:
    """``P = T - N_img`` (at least 1): a bound on any row's response positions (module doc)."""
    return max(int(length) - int(num_image_tokens), 1)


@dataclasses.dataclass(frozen=True)
class KeptRead:
    """One forward over stacked rows, kept at their response positions.

    Attributes:
      rows: the stacked rows (``scoring``'s ``_Rows``: ``keys``, ``mask [R*B, T]``, ``split`` and
        ``of`` cutting ``[R*B, ...]`` arrays by row).
      positions, valid, labels: ``[R*B, P]`` int32 / bool / int32: each row's response positions
        in order, padded (``valid`` False) to ``P``, and the tokens they predict.
      hidden: ``[R*B, P, D]`` final hidden states there; probes: their query axis is ``P``.
      head: the model's ``[D, V]`` LM head.
    """

    rows: Any
    positions: jax.Array
    valid: jax.Array
    labels: jax.Array
    hidden: jax.Array
    probes: dict
    head: jax.Array

    def cut(self, array: jax.Array, keys: tuple[RowKey, ...]) -> jax.Array:
        """The ``[len(keys)*B, ...]`` rows of ``array [R*B, ...]`` for ``keys``, in that order."""
        if keys == self.rows.keys:
            return array
        parts = self.rows.split(array)
        return jnp.concatenate([parts[key] for key in keys], axis=0)

    def scatter(self, values: jax.Array, keys: tuple[RowKey, ...]) -> dict[RowKey, jax.Array]:
        """``values [len(keys)*B, P]`` back to ``{key: [B, T]}``, 0 off the response."""
        length = self.rows.mask.shape[1]
        full = logprobs.scatter_positions(values, self.cut(self.positions, keys),
                                          self.cut(self.valid, keys), length)
        return dict(zip(keys, jnp.split(full, len(keys), axis=0)))

    def of(self, array: jax.Array, responses: tuple) -> dict:
        """``array`` ``[R*B, P, ...]`` cut into each response's ``[B, P, ...]``."""
        return self.rows.of(array, responses)

    def unkeep(self, values: jax.Array, key: RowKey) -> jax.Array:
        """One row's ``values [B, P]`` back to ``[B, T]``, 0 off the response."""
        return self.scatter(values, (key,))[key]


def token_logprobs(read: KeptRead, keys: tuple[RowKey, ...],
                   chunk_size: int | None) -> dict[RowKey, jax.Array]:
    """``{key: [B, T]}`` token log-probs of the rows ``keys`` of ``read``."""
    if not keys:
        return {}
    logps = logprobs.hidden_token_logprobs(read.cut(read.hidden, keys), read.head,
                                           read.cut(read.labels, keys), read.cut(read.valid, keys),
                                           chunk_size=chunk_size)
    return read.scatter(logps, keys)


def token_logprobs_and_kl(policy: KeptRead, reference: KeptRead, keys: tuple[RowKey, ...],
                          chunk_size: int | None) -> tuple[dict, dict, dict]:
    """``({key: policy logps}, {key: reference logps}, {key: KL(policy || reference)})``, each
    ``[B, T]``, of the rows ``keys`` both reads hold (the same tokens, hence the same positions),
    in one pass over each chunk's two ``[B, c, V]`` logits."""
    if not keys:
        return {}, {}, {}
    outputs = logprobs.hidden_token_logprobs_and_kl(
        policy.cut(policy.hidden, keys), policy.head, reference.cut(reference.hidden, keys),
        reference.head, policy.cut(policy.labels, keys), policy.cut(policy.valid, keys),
        chunk_size=chunk_size)
    return tuple(policy.scatter(values, keys) for values in outputs)


def label_logits(read: KeptRead) -> jax.Array:
    """``[R*B, P]`` float32 logit of each kept position's label (0 off the response): the hidden
    state times the label's LM-head column, not the whole vocabulary."""
    return logprobs.hidden_label_logits(read.hidden, read.head, read.labels, read.valid)
