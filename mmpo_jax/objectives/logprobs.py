"""Per-token log-probabilities and KL from logits, chunked over the sequence.

Alignment convention: ``logits[:, t]`` is the distribution that predicts ``labels[:, t]``; the
*caller* shifts (``logits = model_logits[:, :-1]``, ``labels = input_ids[:, 1:]``,
``mask = loss_mask[:, 1:]``). Nothing here shifts.

Memory: the log-softmax is computed in float32 one chunk of ``chunk_size`` positions at a time
(``lax.map`` over static-size slices, plus one static tail), each chunk under ``jax.checkpoint`` so
that neither the forward nor the backward pass holds a second full-size ``[B, T, V]`` float32 copy
of the logits: for float32 logits the forward's scratch memory is two chunks (checked by a test
through XLA's memory analysis); the gradient with respect to the logits is full size, as it must
be. (On XLA:CPU, which has no native bfloat16 arithmetic, bfloat16 logits are converted to float32
once up front by the backend; GPU and TPU keep them in bfloat16.)

Masked positions are exactly 0 and never NaN, whatever the logits or labels hold there (labels
may be -100 or any out-of-range id at masked positions).

Logits only where a loss reads them: ``hidden_token_logprobs`` and ``hidden_token_logprobs_and_kl``
take final hidden states gathered at the scored positions (``Llava(..., output_positions=positions,
return_logits=False).last_hidden_state``) and the ``[D, V]`` LM head, and apply the head inside each
chunk, so the ``[B, P, V]`` logits never exist whole, in the forward or the backward pass.
``response_positions`` (with a static bucket from ``position_bucket``), ``gather_positions`` and
``scatter_positions`` build and undo the gathering; padding slots are masked out and change nothing.
[our choice] Chunks run over positions, not over the vocabulary: a chunk holds ``B x c x V`` floats,
which ``chunk_size`` sets down to one position (``B x V``: 1 MB at B 8, V 32k); splitting the
vocabulary would matter only where one position's ``B x V`` logits do not fit, which no preset nears,
and would cost a second pass over the LM head for the KL's normalisers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmpo_jax.models.layers import head_logits

DEFAULT_CHUNK_SIZE = 128
"""Positions per chunk where the LM head runs inside the chunk (the ``hidden_*`` functions: each
chunk re-reads the ``[D, V]`` head, so chunks must hold enough rows to amortise it), and for
logits off the CPU."""
AUTO = "auto"
"""``chunk_size`` of the logits-level functions: ``CPU_CHUNK_BYTES`` of float32 logits per chunk on
XLA:CPU, ``DEFAULT_CHUNK_SIZE`` positions elsewhere (``chunk_positions``)."""
CPU_CHUNK_BYTES = 2 * 2**20
"""[measured] On XLA:CPU the per-chunk log-softmax, label pick and KL over given logits are bound by
memory traffic once a chunk's ``[B, c, V]`` float32 intermediates leave the cache: at B 8, T 700,
V 32,000 (`scripts/bench_rewards.py`' shapes) ``token_logprobs_and_kl`` took 1.8 CPU-s with
128-position chunks (131 MB each), 1.5 s with 32, 1.2 s with 8 and 0.94 s with 2 (2 MiB; L2 is
1 MiB per core, L3 32 MiB on the machine measured)."""
REDUCTIONS = ("sum", "mean")

ChunkFn = Callable[..., Any]
"""``fn(*chunks, mask_chunk) -> [B, c]`` (or a tuple of them), each chunk ``[B, c, ...]``."""


def _map_sequence_chunks(
    chunk_fn: ChunkFn, arrays: tuple[jax.Array, ...], mask: jax.Array, chunk_size: int | None
) -> Any:
    """Apply ``chunk_fn`` to consecutive ``[B, chunk_size, ...]`` slices of ``arrays`` and ``mask``.

    Returns the ``[B, T]`` concatenation of the per-chunk results (per result, for a tuple).
    """
    seq_len = mask.shape[1]
    if chunk_size is None or chunk_size >= seq_len:
        return chunk_fn(*arrays, mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive int or None (no chunking)")
    fn = jax.checkpoint(chunk_fn)
    num_full = seq_len // chunk_size
    full_len = num_full * chunk_size

    def one_chunk(index: jax.Array) -> Any:
        start = index * chunk_size
        sliced = [jax.lax.dynamic_slice_in_dim(a, start, chunk_size, axis=1) for a in arrays]
        return fn(*sliced, jax.lax.dynamic_slice_in_dim(mask, start, chunk_size, axis=1))

    stacked = jax.lax.map(one_chunk, jnp.arange(num_full))  # leaves [num_full, B, c]
    head = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(mask.shape[0], full_len), stacked)
    if full_len == seq_len:
        return head
    tail = fn(*[a[:, full_len:] for a in arrays], mask[:, full_len:])
    return jax.tree.map(lambda h, t: jnp.concatenate([h, t], axis=1), head, tail)


def chunk_positions(chunk_size: int | str | None, batch: int, vocab: int) -> int | None:
    """Positions per chunk for ``[batch, T, vocab]`` logits: ``chunk_size`` itself unless it is
    ``AUTO``, which is ``CPU_CHUNK_BYTES`` of float32 logits (at least one position) on XLA:CPU and
    ``DEFAULT_CHUNK_SIZE`` on other backends."""
    if chunk_size != AUTO:
        return chunk_size
    if jax.default_backend() != "cpu":
        return DEFAULT_CHUNK_SIZE
    return max(1, CPU_CHUNK_BYTES // (4 * batch * vocab))


def _label_logprobs(log_probs: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """``log_probs [B, c, V]`` at ``labels [B, c]`` (in range), 0 where not ``valid``: ``[B, c]``."""
    picked = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked, 0.0)


def _safe_log_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """float32 log-softmax over the last axis; rows where ``valid`` is false see zeros instead."""
    return _safe_log_softmax_and_probs(logits, valid)[0]  # XLA drops the unread softmax


def _safe_log_softmax_and_probs(logits: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(log_softmax, softmax)`` over the last axis, float32, from one ``exp`` per entry; rows
    where ``valid`` is false see zeros instead.

    The KL reads both; ``exp(log_softmax)`` would be a second exponential per vocabulary entry
    (XLA does not see that ``exp(x - m - log s) = exp(x - m) / s``), the costliest op of the pass.
    """
    logits = jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnormalised = jnp.exp(shifted)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    return shifted - jnp.log(total), unnormalised / total


def token_logprobs(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int | str | None = AUTO,
) -> jax.Array:
    """``log softmax(logits)[label]`` per position, float32, 0 where ``mask`` is false.

    Args:
      logits: ``[B, T, V]`` any float dtype, aligned with ``labels`` (caller shifts).
      labels: ``[B, T]`` int token ids; any value at masked positions.
      mask: ``[B, T]`` bool or 0/1, true on response tokens.
      chunk_size: positions per chunk, ``AUTO`` (``chunk_positions``) or None (all at once).

    Returns:
      ``[B, T]`` float32 per-token log-probs.
    """
    if logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(
            f"logits {logits.shape} must be [B, T, V] with labels {labels.shape} and "
            f"mask {mask.shape} both [B, T]"
        )
    chunk_size = chunk_positions(chunk_size, logits.shape[0], logits.shape[-1])
    return _chunked_label_logprobs(logits, lambda x: x, labels, mask, chunk_size)


def _chunked_label_logprobs(source: jax.Array, to_logits: Callable[[jax.Array], jax.Array], labels: jax.Array,
                            mask: jax.Array, chunk_size: int | None) -> jax.Array:
    """Label log-probs ``[B, T]`` of ``to_logits(source chunk [B, c, ...]) -> [B, c, V]``, chunk by chunk."""
    valid, safe_labels = _valid_and_safe_labels(labels, mask)

    def chunk(source_c: jax.Array, labels_c: jax.Array, valid_c: jax.Array) -> jax.Array:
        return _label_logprobs(_safe_log_softmax(to_logits(source_c), valid_c), labels_c, valid_c)

    return _map_sequence_chunks(chunk, (source, safe_labels), valid, chunk_size)


def _valid_and_safe_labels(labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(valid [B, T] bool, labels [B, T] int32 with 0 where not valid)``: any id may sit at masked positions."""
    valid = jnp.asarray(mask) > 0
    return valid, jnp.where(valid, labels, 0).astype(jnp.int32)


def token_kl(
    policy_logits: jax.Array,
    ref_logits: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int | str | None = AUTO,
) -> jax.Array:
    """Full-vocabulary ``KL(pi_theta(.|h_t) || pi_ref(.|h_t))`` per position, 0 where masked.

    ``KL_t = sum_v p_v r_v`` with ``r = log p - log q``, ``p = softmax(policy_logits[:, t])``,
    ``q = softmax(ref_logits[:, t])``; the reference is under ``stop_gradient``. Vocabulary entries
    with ``p_v = 0`` contribute 0 (also when ``q_v = 0``).

    Precision: when the policy is close to the reference (the usual case in preference training)
    the KL is far smaller than the rounding error of the two log-normalisers (``~eps * |lse|``),
    which a plain float32 ``sum p (log p - log q)`` adds in full. We subtract
    ``log sum_{q_v > 0} q_v exp(r_v)``, which is exactly 0 in exact arithmetic and carries the
    same normaliser error, computed as ``log1p(sum q expm1(r))`` so it stays accurate (entries with
    ``r > 80`` use the exact ``q (e^r - 1) = p - q`` to avoid overflow). Identical logits give
    exactly 0.

    Args:
      policy_logits: ``[B, T, V]``.
      ref_logits: ``[B, T, V]`` (same positions as the policy's).
      mask: ``[B, T]`` bool or 0/1.
      chunk_size: positions per chunk, ``AUTO`` (``chunk_positions``) or None (all at once).

    Returns:
      ``[B, T]`` float32, >= 0 (up to rounding).
    """
    if policy_logits.shape != ref_logits.shape or policy_logits.shape[:2] != mask.shape:
        raise ValueError(
            f"policy_logits {policy_logits.shape} and ref_logits {ref_logits.shape} must both "
            f"be [B, T, V] matching mask {mask.shape} [B, T]"
        )
    chunk_size = chunk_positions(chunk_size, policy_logits.shape[0], policy_logits.shape[-1])
    valid = jnp.asarray(mask) > 0
    ref_logits = jax.lax.stop_gradient(ref_logits)

    def chunk(policy_c: jax.Array, ref_c: jax.Array, valid_c: jax.Array) -> jax.Array:
        policy = _safe_log_softmax_and_probs(policy_c, valid_c)
        ref = _safe_log_softmax_and_probs(ref_c, valid_c)
        return jnp.where(valid_c, _kl_of_log_probs(*policy, *ref), 0.0)

    return _map_sequence_chunks(chunk, (policy_logits, ref_logits), valid, chunk_size)


def token_logprobs_and_kl(
    policy_logits: jax.Array,
    ref_logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int | str | None = AUTO,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``token_logprobs`` of both logits and ``token_kl`` between them in one pass over each chunk.

    What Cat-PO's scoring reads; one log-softmax per chunk and model instead of the two that
    separate ``token_logprobs`` and ``token_kl`` calls compute (XLA does not merge work across
    their chunk loops). Shapes as in ``token_kl`` plus ``labels [B, T]``.

    Returns:
      ``(policy_logps, ref_logps, kl)``, each ``[B, T]`` float32, 0 where masked.
    """
    if policy_logits.shape != ref_logits.shape or policy_logits.shape[:2] != mask.shape or labels.shape != mask.shape:
        raise ValueError(
            f"policy_logits {policy_logits.shape} and ref_logits {ref_logits.shape} must both be [B, T, V] "
            f"matching labels {labels.shape} and mask {mask.shape} [B, T]"
        )
    chunk_size = chunk_positions(chunk_size, policy_logits.shape[0], policy_logits.shape[-1])
    return _chunked_logprobs_and_kl(policy_logits, ref_logits, lambda x: x, lambda x: x, labels, mask, chunk_size)


def _chunked_logprobs_and_kl(policy_source, ref_source, to_policy_logits, to_ref_logits, labels, mask,
                             chunk_size) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(policy_logps, ref_logps, kl)`` ``[B, T]`` of logits made from each chunk of the sources; the
    reference under ``stop_gradient``."""
    valid, safe_labels = _valid_and_safe_labels(labels, mask)

    def chunk(policy_c, ref_c, labels_c, valid_c):
        # the scopes name each part in a profile, as separate calls would
        with jax.named_scope("policy_logprobs"):
            policy_logp, policy_p = _safe_log_softmax_and_probs(to_policy_logits(policy_c), valid_c)
            policy_picked = _label_logprobs(policy_logp, labels_c, valid_c)
        with jax.named_scope("reference_logprobs"):
            ref_logp, ref_p = _safe_log_softmax_and_probs(jax.lax.stop_gradient(to_ref_logits(ref_c)), valid_c)
            ref_picked = _label_logprobs(ref_logp, labels_c, valid_c)
        with jax.named_scope("token_kl"):
            kl = jnp.where(valid_c, _kl_of_log_probs(policy_logp, policy_p, ref_logp, ref_p), 0.0)
        return policy_picked, ref_picked, kl

    return _map_sequence_chunks(chunk, (policy_source, ref_source, safe_labels), valid, chunk_size)


def _kl_of_log_probs(policy_logp: jax.Array, policy_p: jax.Array, ref_logp: jax.Array,
                     ref_p: jax.Array) -> jax.Array:
    """``KL(p || q)`` over the last axis from float32 log-probabilities and probabilities
    ``[..., V] -> [...]`` (see ``token_kl``)."""
    log_ratio = policy_logp - ref_logp
    # where() on the factors, not the products: keeps 0 * inf out of values and gradients.
    cross = jnp.sum(policy_p * jnp.where(policy_p > 0, log_ratio, 0.0), axis=-1)
    moderate = (ref_p > 0) & (log_ratio <= 80.0)
    ref_mass_change = jnp.where(
        moderate,
        ref_p * jnp.expm1(jnp.where(moderate, log_ratio, 0.0)),
        jnp.where(ref_p > 0, policy_p - ref_p, 0.0),
    )
    return cross - jnp.log1p(jnp.sum(ref_mass_change, axis=-1))


def sequence_logps(
    token_logps: jax.Array, mask: jax.Array, *, reduction: str = "sum"
) -> jax.Array:
    """Reduce per-token values over the response: ``[B, T] -> [B]``.

    Args:
      token_logps: ``[B, T]`` per-token log-probs (or any per-token value).
      mask: ``[B, T]`` bool or 0/1.
      reduction: ``"sum"`` (default, what every reference implementation does) or ``"mean"``
        (length-normalised; an empty response gives 0).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    valid = jnp.asarray(mask) > 0
    total = jnp.sum(jnp.where(valid, jnp.asarray(token_logps, jnp.float32), 0.0), axis=-1)
    if reduction == "sum":
        return total
    return total / jnp.maximum(jnp.sum(valid, axis=-1).astype(jnp.float32), 1.0)


# --- Scoring at gathered positions, from final hidden states -------------------------------------


def response_positions(mask: jax.Array, num_positions: int) -> tuple[jax.Array, jax.Array]:
    """The positions of each row's true ``mask`` entries, in order, padded to ``num_positions``.

    Args:
      mask: ``[B, T]`` bool or 0/1 (e.g. the shifted response mask).
      num_positions: ``P``, static; at least the largest count of true entries in a row (see
        ``position_bucket``). With concrete ``mask`` a row holding more raises; under ``jit`` it
        cannot be checked and the row's later positions would be dropped.

    Returns:
      ``(positions [B, P] int32, valid [B, P] bool)``: padding slots hold position 0 and
      ``valid = False``, so whatever is computed there never enters a result.
    """
    valid_mask = jnp.asarray(mask) > 0
    if not isinstance(valid_mask, jax.core.Tracer):
        longest = int(jnp.max(jnp.sum(valid_mask, axis=-1), initial=0))
        if longest > num_positions:
            raise ValueError(f"num_positions={num_positions} is less than a row's {longest} masked-in positions")
    positions = jax.vmap(lambda row: jnp.nonzero(row, size=num_positions, fill_value=0)[0])(valid_mask)
    valid = jnp.arange(num_positions)[None, :] < jnp.sum(valid_mask, axis=-1, keepdims=True)
    return positions.astype(jnp.int32), valid


def position_bucket(mask, buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)) -> int:
    """The smallest of ``buckets`` holding the longest row's true entries of a concrete ``[B, T]`` mask.

    Host-side (it picks a static shape): one compilation per bucket used, not per batch. A row
    longer than every bucket raises, naming the largest bucket.
    """
    longest = int(np.max(np.sum(np.asarray(mask) > 0, axis=-1), initial=0))
    for bucket in sorted(buckets):
        if bucket >= longest:
            return bucket
    raise ValueError(f"a row holds {longest} positions, more than the largest bucket {max(buckets)}")


def gather_positions(values: jax.Array, positions: jax.Array) -> jax.Array:
    """``values [B, T, ...]`` at ``positions [B, P]`` -> ``[B, P, ...]``."""
    index = positions.reshape(positions.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)


def scatter_positions(values: jax.Array, positions: jax.Array, valid: jax.Array, length: int) -> jax.Array:
    """Inverse of ``gather_positions`` for per-token values: ``[B, P]`` -> ``[B, T]``, 0 off the valid slots."""
    rows = jnp.arange(values.shape[0])[:, None]
    target = jnp.where(valid, positions, length)  # out of range: dropped
    return jnp.zeros((values.shape[0], length), values.dtype).at[rows, target].set(values, mode="drop")


def hidden_token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    banned_token_ids: jax.Array | None = None,
) -> jax.Array:
    """``token_logprobs`` of the logits ``hidden @ lm_head``, the LM head applied chunk by chunk.

    Neither the forward nor the backward pass holds more than one chunk's ``[B, c, V]`` logits
    (each chunk is rematerialised in the backward pass): with ``hidden`` gathered at the response
    positions (``Llava(..., output_positions=..., return_logits=False).last_hidden_state``) the LM
    head and the log-softmax run on response tokens only.

    Args:
      hidden: ``[B, P, D]`` final hidden states (after the final norm), in the compute dtype.
      lm_head: ``[D, V]`` (``Llava.language_model.lm_head_table()``).
      labels: ``[B, P]`` token ids each position predicts; any value where ``mask`` is false.
      mask: ``[B, P]`` bool or 0/1.
      chunk_size: positions per chunk; None computes all at once.
      banned_token_ids: ``[K]`` int token ids whose logits are set to ``-inf`` in each chunk before
        the log-softmax (tokens a sampler never draws, e.g. FiSAO's image placeholder), as
        ``logits.at[..., banned].set(-inf)`` on the full logits would; None bans nothing.

    Returns:
      ``[B, P]`` float32, 0 where masked.
    """
    _check_hidden(hidden, lm_head, mask, labels=labels)

    def to_logits(h: jax.Array) -> jax.Array:
        logits = head_logits(h, lm_head)
        return logits if banned_token_ids is None else logits.at[..., banned_token_ids].set(-jnp.inf)

    return _chunked_label_logprobs(hidden, to_logits, labels, mask, chunk_size)


def hidden_label_logits(hidden: jax.Array, lm_head: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """The logit of each label token, ``(hidden @ lm_head)[b, p, labels[b, p]]``, without the other
    ``V - 1``: each position's hidden state times its label's LM-head column.

    Args:
      hidden: ``[B, P, D]`` final hidden states; lm_head: ``[D, V]``.
      labels: ``[B, P]`` token ids; any value where ``mask`` is false.
      mask: ``[B, P]`` bool or 0/1.

    Returns:
      ``[B, P]`` float32 (``head_logits``' precision), 0 where masked.
    """
    _check_hidden(hidden, lm_head, mask, labels=labels)
    valid, safe_labels = _valid_and_safe_labels(labels, mask)
    columns = jnp.take(lm_head.T, safe_labels, axis=0).astype(hidden.dtype)  # [B, P, D]
    picked = jnp.einsum("bpd,bpd->bp", hidden, columns, preferred_element_type=jnp.float32)
    return jnp.where(valid, picked, 0.0)


def hidden_token_logprobs_and_kl(
    policy_hidden: jax.Array,
    policy_lm_head: jax.Array,
    ref_hidden: jax.Array,
    ref_lm_head: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Policy and reference per-token log-probs and ``KL(policy || reference)`` at the same positions,
    each chunk's two ``[B, c, V]`` logits computed once for all three (as ``token_logprobs`` and
    ``token_kl`` of the full logits; the reference under ``stop_gradient``).

    Args:
      policy_hidden, ref_hidden: ``[B, P, D]`` final hidden states at the same positions.
      policy_lm_head, ref_lm_head: ``[D, V]``.
      labels, mask, chunk_size: as in ``hidden_token_logprobs``.

    Returns:
      ``(policy_logps, ref_logps, kl)``, each ``[B, P]`` float32, 0 where masked.
    """
    _check_hidden(policy_hidden, policy_lm_head, mask, labels=labels)
    _check_hidden(ref_hidden, ref_lm_head, mask)
    return _chunked_logprobs_and_kl(policy_hidden, ref_hidden, lambda h: head_logits(h, policy_lm_head),
                                    lambda h: head_logits(h, ref_lm_head), labels, mask, chunk_size)


def _check_hidden(hidden: jax.Array, lm_head: jax.Array, mask: jax.Array, labels: jax.Array | None = None) -> None:
    if hidden.ndim != 3 or lm_head.ndim != 2 or hidden.shape[-1] != lm_head.shape[0]:
        raise ValueError(f"hidden {hidden.shape} must be [B, P, D] and lm_head {lm_head.shape} [D, V] with the same D")
    if hidden.shape[:2] != jnp.shape(mask) or (labels is not None and jnp.shape(labels) != jnp.shape(mask)):
        raise ValueError(
            f"hidden {hidden.shape} [B, P, D], mask {jnp.shape(mask)} and labels "
            f"{None if labels is None else jnp.shape(labels)} must share [B, P]"
        )
