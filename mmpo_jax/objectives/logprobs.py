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
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 128
REDUCTIONS = ("sum", "mean")

ChunkFn = Callable[..., jax.Array]
"""``fn(*chunks, mask_chunk) -> [B, c]``, each chunk ``[B, c, ...]``."""


def _map_sequence_chunks(
    chunk_fn: ChunkFn, arrays: tuple[jax.Array, ...], mask: jax.Array, chunk_size: int | None
) -> jax.Array:
    """Apply ``chunk_fn`` to consecutive ``[B, chunk_size, ...]`` slices of ``arrays`` and ``mask``.

    Returns the ``[B, T]`` concatenation of the per-chunk results.
    """
    seq_len = mask.shape[1]
    if chunk_size is None or chunk_size >= seq_len:
        return chunk_fn(*arrays, mask)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive int or None (no chunking)")
    fn = jax.checkpoint(chunk_fn)
    num_full = seq_len // chunk_size
    full_len = num_full * chunk_size

    def one_chunk(index: jax.Array) -> jax.Array:
        start = index * chunk_size
        sliced = [jax.lax.dynamic_slice_in_dim(a, start, chunk_size, axis=1) for a in arrays]
        return fn(*sliced, jax.lax.dynamic_slice_in_dim(mask, start, chunk_size, axis=1))

    stacked = jax.lax.map(one_chunk, jnp.arange(num_full))  # [num_full, B, c]
    head = jnp.moveaxis(stacked, 0, 1).reshape(mask.shape[0], full_len)
    if full_len == seq_len:
        return head
    tail = fn(*[a[:, full_len:] for a in arrays], mask[:, full_len:])
    return jnp.concatenate([head, tail], axis=1)


def _safe_log_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """float32 log-softmax over the last axis; rows where ``valid`` is false see zeros instead."""
    logits = jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)
    return jax.nn.log_softmax(logits, axis=-1)


def token_logprobs(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """``log softmax(logits)[label]`` per position, float32, 0 where ``mask`` is false.

    Args:
      logits: ``[B, T, V]`` any float dtype, aligned with ``labels`` (caller shifts).
      labels: ``[B, T]`` int token ids; any value at masked positions.
      mask: ``[B, T]`` bool or 0/1, true on response tokens.
      chunk_size: positions per chunk; None computes all positions at once.

    Returns:
      ``[B, T]`` float32 per-token log-probs.
    """
    if logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(
            f"logits {logits.shape} must be [B, T, V] with labels {labels.shape} and "
            f"mask {mask.shape} both [B, T]"
        )
    valid = jnp.asarray(mask) > 0
    safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)

    def chunk(logits_c: jax.Array, labels_c: jax.Array, valid_c: jax.Array) -> jax.Array:
        log_probs = _safe_log_softmax(logits_c, valid_c)
        picked = jnp.take_along_axis(log_probs, labels_c[..., None], axis=-1)[..., 0]
        return jnp.where(valid_c, picked, 0.0)

    return _map_sequence_chunks(chunk, (logits, safe_labels), valid, chunk_size)


def token_kl(
    policy_logits: jax.Array,
    ref_logits: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
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
      chunk_size: positions per chunk; None computes all positions at once.

    Returns:
      ``[B, T]`` float32, >= 0 (up to rounding).
    """
    if policy_logits.shape != ref_logits.shape or policy_logits.shape[:2] != mask.shape:
        raise ValueError(
            f"policy_logits {policy_logits.shape} and ref_logits {ref_logits.shape} must both "
            f"be [B, T, V] matching mask {mask.shape} [B, T]"
        )
    valid = jnp.asarray(mask) > 0
    ref_logits = jax.lax.stop_gradient(ref_logits)

    def chunk(policy_c: jax.Array, ref_c: jax.Array, valid_c: jax.Array) -> jax.Array:
        policy_logp = _safe_log_softmax(policy_c, valid_c)
        ref_logp = _safe_log_softmax(ref_c, valid_c)
        policy_p, ref_p = jnp.exp(policy_logp), jnp.exp(ref_logp)
        log_ratio = policy_logp - ref_logp
        # where() on the factors, not the products: keeps 0 * inf out of values and gradients.
        cross = jnp.sum(policy_p * jnp.where(policy_p > 0, log_ratio, 0.0), axis=-1)
        moderate = (ref_p > 0) & (log_ratio <= 80.0)
        ref_mass_change = jnp.where(
            moderate,
            ref_p * jnp.expm1(jnp.where(moderate, log_ratio, 0.0)),
            jnp.where(ref_p > 0, policy_p - ref_p, 0.0),
        )
        kl = cross - jnp.log1p(jnp.sum(ref_mass_change, axis=-1))
        return jnp.where(valid_c, kl, 0.0)

    return _map_sequence_chunks(chunk, (policy_logits, ref_logits), valid, chunk_size)


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
