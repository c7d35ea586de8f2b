"""FiSAO's on-policy PPO with token rewards and a group baseline (METHODS.md §6, [our choice]).

Per sampled response (``n`` samples per prompt, sharing a ``group_id``):

1. ``kl_penalised_rewards``: ``r_t - beta_kl (log pi_old - log pi_ref)(y_t)``; ``pi_old`` is the
   policy that sampled the batch, fixed over the PPO epochs on it [our choice, as InstructGPT-style
   PPO: the penalty is part of the reward, not differentiated].
2. ``returns_to_go``: ``R_t = sum_{s >= t} gamma^(s - t) r_s``.
3. ``group_baseline_advantages``: ``A_t = R_t - b``, ``b`` = mean of ``R`` over the group's
   tokens at the same normalised position, then ``A / std(A)`` over the batch's response tokens.
   Normalised position [our choice]: the ``j``-th of ``L`` response tokens has position
   ``u = (j + 0.5) / L`` in (0, 1) and falls in bin ``floor(u * num_position_bins)``; the baseline
   of a (group, bin) cell is the token mean over the group's samples, so advantages sum to zero in
   every cell and hence in every group.
4. ``ppo_surrogate``: ``min(rho A, clip(rho, 1 - eps, 1 + eps) A)``, ``rho = exp(log pi_new -
   log pi_old)``; the per-example loss is minus its mean over response tokens [our choice].

Masked tokens contribute exactly 0 whatever their inputs (``jnp.where``, never products with inf).

``DECLARATIONS``: the ``fisao_ppo`` term (it reads the rollouts of the on-policy loop: the
``sample`` response under the policy, the sampling policy and the reference, its token rewards and
group ids; its group baseline couples the samples of a batch) and the ``fisao`` method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmpo_jax.objectives import terms
from mmpo_jax.objectives.logprobs import sequence_logps
from mmpo_jax.objectives.metrics import Metric, mean_metric
from mmpo_jax.objectives.terms import (POLICY, REFERENCE, SAMPLER, Inputs, Method, Option, Response,
                                       Term, TermResult)

SAMPLE = Response("sample", tokens="sample")
"""A response sampled from the policy (rollouts)."""
PPO_READS = (terms.token_logps(POLICY, SAMPLE), terms.token_logps(SAMPLER, SAMPLE),
             terms.token_logps(REFERENCE, SAMPLE), terms.token_value("token_rewards", SAMPLE),
             terms.mask(SAMPLE), terms.example_value("group_ids"))
"""What ``fisao_ppo_loss`` reads, in its argument order."""

MAX_LOG_RATIO = 20.0
"""``|log pi_new - log pi_old|`` is clamped here so that the ratio stays finite [our choice]."""


def _valid(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask) > 0


def kl_penalised_rewards(
    token_rewards: jax.Array,
    policy_token_logps: jax.Array,
    ref_token_logps: jax.Array,
    mask: jax.Array,
    *,
    beta_kl: float = 0.05,
) -> jax.Array:
    """``r_t - beta_kl (log pi - log pi_ref)(y_t)`` on response tokens, 0 elsewhere: ``[B, T]``.

    Args:
      token_rewards: ``[B, T]`` verifier rewards (``rewards.fisao.place_word_rewards``).
      policy_token_logps: ``[B, T]`` log-probs of the sampling policy.
      ref_token_logps: ``[B, T]`` log-probs of the reference.
      mask: ``[B, T]`` response tokens.
    """
    valid = _valid(mask)
    log_ratio = jnp.where(
        valid,
        jnp.asarray(policy_token_logps, jnp.float32) - jnp.asarray(ref_token_logps, jnp.float32),
        0.0,
    )
    return jnp.where(valid, jnp.asarray(token_rewards, jnp.float32) - beta_kl * log_ratio, 0.0)


def returns_to_go(rewards: jax.Array, mask: jax.Array, *, gamma: float = 1.0) -> jax.Array:
    """``R_t = r_t + gamma R_{t+1}`` (discount by position distance), 0 outside the mask: ``[B, T]``."""
    valid = _valid(mask)
    rewards = jnp.where(valid, jnp.asarray(rewards, jnp.float32), 0.0)

    def step(carry: jax.Array, reward: jax.Array) -> tuple[jax.Array, jax.Array]:
        carry = reward + gamma * carry
        return carry, carry

    _, returns = jax.lax.scan(step, jnp.zeros(rewards.shape[:1], jnp.float32), rewards.T, reverse=True)
    return jnp.where(valid, returns.T, 0.0)


def position_bins(mask: jax.Array, num_position_bins: int) -> jax.Array:
    """The normalised-position bin of each response token (see module doc); -1 outside: ``[B, T]``."""
    if num_position_bins < 1:
        raise ValueError(f"num_position_bins={num_position_bins} must be >= 1")
    valid = _valid(mask)
    index = jnp.cumsum(valid, axis=-1) - 1
    length = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1)
    position = (index.astype(jnp.float32) + 0.5) / length.astype(jnp.float32)
    bins = jnp.clip(jnp.floor(position * num_position_bins), 0, num_position_bins - 1)
    return jnp.where(valid, bins.astype(jnp.int32), -1)


def group_baseline_advantages(
    returns: jax.Array,
    mask: jax.Array,
    group_ids: jax.Array,
    *,
    num_position_bins: int = 10,
    normalize: bool = True,
    eps: float = 1e-8,
) -> jax.Array:
    """Returns minus the group's mean return at the same normalised position: ``[B, T]``.

    Args:
      returns: ``[B, T]`` returns-to-go.
      mask: ``[B, T]`` response tokens.
      group_ids: ``[B]`` int, equal for the samples of one prompt.
      num_position_bins: bins of the normalised position (1: one baseline per group).
      normalize: divide by the std of the advantages over all response tokens of the batch
        (``+ eps``).

    Returns:
      ``[B, T]`` float32 advantages, 0 outside the mask, under ``stop_gradient``.
    """
    valid = _valid(mask)
    returns = jnp.where(valid, jnp.asarray(returns, jnp.float32), 0.0)
    bins = position_bins(valid, num_position_bins)
    one_hot = jax.nn.one_hot(bins, num_position_bins, dtype=jnp.float32)  # [B, T, K]; -1 -> zeros
    sums = jnp.einsum("bt,btk->bk", returns, one_hot)
    counts = jnp.sum(one_hot, axis=1)
    group_ids = jnp.asarray(group_ids)
    same_group = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)  # [B, B]
    group_sums = same_group @ sums
    group_counts = same_group @ counts
    cell = jnp.clip(bins, 0, num_position_bins - 1)
    baseline = jnp.take_along_axis(group_sums, cell, axis=-1) / jnp.maximum(
        jnp.take_along_axis(group_counts, cell, axis=-1), 1.0
    )
    advantages = jnp.where(valid, returns - baseline, 0.0)
    if normalize:
        count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
        mean = jnp.sum(advantages) / count
        std = jnp.sqrt(jnp.sum(jnp.where(valid, (advantages - mean) ** 2, 0.0)) / count)
        advantages = advantages / (std + eps)
    return jax.lax.stop_gradient(advantages)


def ppo_surrogate(
    new_token_logps: jax.Array,
    old_token_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
) -> tuple[jax.Array, jax.Array]:
    """Per-token clipped surrogate ``min(rho A, clip(rho, 1-eps, 1+eps) A)``, 0 outside the mask.

    ``log rho`` is clamped to ``+-MAX_LOG_RATIO``; ``old_token_logps`` and ``advantages`` are under
    ``stop_gradient``.

    Returns:
      ``(surrogate [B, T], clipped [B, T] bool)`` where ``clipped`` marks tokens whose clipped branch
      is the minimum and differs from the unclipped one (zero gradient there).
    """
    valid = _valid(mask)
    old = jax.lax.stop_gradient(jnp.asarray(old_token_logps, jnp.float32))
    advantages = jax.lax.stop_gradient(jnp.where(valid, jnp.asarray(advantages, jnp.float32), 0.0))
    log_ratio = jnp.where(valid, jnp.asarray(new_token_logps, jnp.float32) - old, 0.0)
    ratio = jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = ratio * advantages
    clipped_value = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    surrogate = jnp.minimum(unclipped, clipped_value)
    return jnp.where(valid, surrogate, 0.0), valid & (clipped_value < unclipped)


def fisao_ppo_loss(
    new_token_logps: jax.Array,
    old_token_logps: jax.Array,
    ref_token_logps: jax.Array,
    token_rewards: jax.Array,
    mask: jax.Array,
    group_ids: jax.Array,
    *,
    beta_kl: float = 0.05,
    gamma: float = 1.0,
    clip_eps: float = 0.2,
    num_position_bins: int = 10,
) -> tuple[jax.Array, dict[str, Metric]]:
    """FiSAO's PPO loss for one optimisation epoch over a batch of sampled responses.

    Args:
      new_token_logps: ``[B, T]`` log-probs of the sampled tokens under the policy being optimised
        (the only differentiated input).
      old_token_logps: ``[B, T]`` the same under the policy that sampled them (fixed over epochs).
      ref_token_logps: ``[B, T]`` the same under the reference.
      token_rewards: ``[B, T]`` verifier token rewards.
      mask: ``[B, T]`` response tokens.
      group_ids: ``[B]`` int prompt id of each sample.
      beta_kl, gamma, clip_eps, num_position_bins: see the module doc (0.05, 1.0, 0.2, 10).

    Returns:
      ``(losses [B] float32, metrics)``: ``loss/ppo``, ``ppo/clip_fraction``, ``ppo/approx_kl``
      (mean ``log pi_old - log pi_new``), ``kl/ref`` (mean ``log pi_old - log pi_ref``),
      ``rewards/token`` (mean verifier reward per token), ``advantages/abs_mean``.
    """
    valid = _valid(mask)
    rewards = kl_penalised_rewards(
        jax.lax.stop_gradient(jnp.asarray(token_rewards, jnp.float32)),
        jax.lax.stop_gradient(jnp.asarray(old_token_logps, jnp.float32)),
        jax.lax.stop_gradient(jnp.asarray(ref_token_logps, jnp.float32)),
        valid,
        beta_kl=beta_kl,
    )
    advantages = group_baseline_advantages(
        returns_to_go(rewards, valid, gamma=gamma),
        valid,
        group_ids,
        num_position_bins=num_position_bins,
    )
    surrogate, clipped = ppo_surrogate(
        new_token_logps, old_token_logps, advantages, valid, clip_eps=clip_eps
    )
    losses = -sequence_logps(surrogate, valid, reduction="mean")

    def token_metric(values: jax.Array) -> Metric:
        return mean_metric(jax.lax.stop_gradient(values), valid)

    new = jnp.asarray(new_token_logps, jnp.float32)
    old = jnp.asarray(old_token_logps, jnp.float32)
    ref = jnp.asarray(ref_token_logps, jnp.float32)
    metrics = {
        "loss/ppo": mean_metric(jax.lax.stop_gradient(losses)),
        "ppo/clip_fraction": token_metric(clipped.astype(jnp.float32)),
        "ppo/approx_kl": token_metric(old - new),
        "kl/ref": token_metric(old - ref),
        "rewards/token": token_metric(jnp.asarray(token_rewards, jnp.float32)),
        "advantages/abs_mean": token_metric(jnp.abs(advantages)),
    }
    return losses, metrics


def _ppo_term(inputs: Inputs) -> TermResult:
    options = inputs.options
    return fisao_ppo_loss(*(inputs[score] for score in PPO_READS), **{
        key: options[key] for key in ("beta_kl", "gamma", "clip_eps", "num_position_bins")})


DECLARATIONS = (
    Term("fisao_ppo", _ppo_term, {
        "beta_kl": Option(0.05, bounds=(0.0, None)),
        "gamma": Option(1.0, bounds=(0.0, 1.0)),
        "clip_eps": Option(0.2, positive=True),
        "num_position_bins": Option(10, positive=True),
    }, reads=lambda options: PPO_READS, weighted=False, couples_examples=True),
    Method("fisao", {"fisao_ppo": 1.0}),
)
