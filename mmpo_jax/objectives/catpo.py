"""Cat-PO objective (METHODS.md §3): token-weighted DPO plus a weighted token-level KL.

``logp^w(y) = sum_t w_t log pi(y_t)`` with the same weights ``w`` (``rewards.catpo``) applied to
the policy and the reference, ``L_wdpo = -log sigma(beta (h^w(y_w) - h^w(y_l)))``, and
``L_kl = lambda_kl * (sum_t w_t KL_t(y_w) + sum_t w_t KL_t(y_l))`` per example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmpo_jax.objectives.dpo import Term, combine_terms, dpo_loss
from mmpo_jax.objectives.logprobs import sequence_logps
from mmpo_jax.objectives.metrics import mean_metric


def weighted_token_sum(
    token_values: jax.Array,
    token_weights: jax.Array,
    mask: jax.Array,
    *,
    reduction: str = "sum",
) -> jax.Array:
    """``sum_t w_t * x_t`` over the valid tokens, ``[B, T] -> [B]`` (``logp^w`` for log-probs).

    The weights are constants (``stop_gradient``); masked positions contribute exactly 0 even if
    ``x_t`` or ``w_t`` is inf/NaN there.

    Args:
      token_values: ``[B, T]`` per-token log-probs, per-token KL, or any per-token value.
      token_weights: ``[B, T]``.
      mask: ``[B, T]`` bool or 0/1.
      reduction: ``"sum"`` (Cat-PO) or ``"mean"`` (divided by the number of valid tokens).
    """
    valid = jnp.asarray(mask) > 0
    weights = jnp.where(valid, jax.lax.stop_gradient(jnp.asarray(token_weights, jnp.float32)), 0.0)
    values = jnp.where(valid, jnp.asarray(token_values, jnp.float32), 0.0)
    return sequence_logps(weights * values, valid, reduction=reduction)


def weighted_token_kl_loss(
    chosen_token_kl: jax.Array,
    rejected_token_kl: jax.Array,
    chosen_token_weights: jax.Array,
    rejected_token_weights: jax.Array,
    chosen_mask: jax.Array,
    rejected_mask: jax.Array,
) -> Term:
    """``sum_t w_t KL_t`` over the chosen plus the rejected tokens of each example (no lambda).

    Args:
      chosen_token_kl, rejected_token_kl: ``[B, T]`` per-position ``KL(pi_theta || pi_ref)``
        (``logprobs.token_kl``).
      chosen_token_weights, rejected_token_weights: ``[B, T]``.
      chosen_mask, rejected_mask: ``[B, T]``.

    Returns:
      ``(losses [B], {"loss/token_kl"})``.
    """
    losses = weighted_token_sum(
        chosen_token_kl, chosen_token_weights, chosen_mask
    ) + weighted_token_sum(rejected_token_kl, rejected_token_weights, rejected_mask)
    return losses, {"loss/token_kl": mean_metric(jax.lax.stop_gradient(losses))}


def weighted_dpo_loss(
    policy_chosen_token_logps: jax.Array,
    policy_rejected_token_logps: jax.Array,
    ref_chosen_token_logps: jax.Array,
    ref_rejected_token_logps: jax.Array,
    chosen_token_weights: jax.Array,
    rejected_token_weights: jax.Array,
    chosen_mask: jax.Array,
    rejected_mask: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> Term:
    """DPO on ``logp^w`` (same weights for policy and reference); all inputs ``[B, T]``.

    Returns:
      ``(losses [B], metrics)`` as ``dpo.dpo_loss`` (``loss/dpo``, ``rewards/*`` = ``beta h^w``).
    """
    return dpo_loss(
        weighted_token_sum(policy_chosen_token_logps, chosen_token_weights, chosen_mask),
        weighted_token_sum(policy_rejected_token_logps, rejected_token_weights, rejected_mask),
        weighted_token_sum(ref_chosen_token_logps, chosen_token_weights, chosen_mask),
        weighted_token_sum(ref_rejected_token_logps, rejected_token_weights, rejected_mask),
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
    )


def catpo_loss(
    policy_chosen_token_logps: jax.Array,
    policy_rejected_token_logps: jax.Array,
    ref_chosen_token_logps: jax.Array,
    ref_rejected_token_logps: jax.Array,
    chosen_token_weights: jax.Array,
    rejected_token_weights: jax.Array,
    chosen_mask: jax.Array,
    rejected_mask: jax.Array,
    chosen_token_kl: jax.Array | None = None,
    rejected_token_kl: jax.Array | None = None,
    *,
    beta: float = 0.1,
    lambda_kl: float = 0.03,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> Term:
    """``L_catpo = L_wdpo + lambda_kl * sum_t w_t KL_t`` per example.

    Args:
      policy_chosen_token_logps, policy_rejected_token_logps: ``[B, T]`` policy per-token
        log-probs of the chosen / rejected response.
      ref_chosen_token_logps, ref_rejected_token_logps: ``[B, T]`` the same for the reference.
      chosen_token_weights, rejected_token_weights: ``[B, T]`` (``rewards.catpo.token_weights``).
      chosen_mask, rejected_mask: ``[B, T]`` response masks.
      chosen_token_kl, rejected_token_kl: ``[B, T]`` per-position KL; may be None only when
        ``lambda_kl == 0`` (the no-KL ablation).
      beta, label_smoothing, loss_type: of the weighted DPO term.
      lambda_kl: weight of the token KL (0.03).

    Returns:
      ``(losses [B] float32, metrics)``: ``loss/dpo`` (weighted DPO), ``loss/token_kl`` (before
      ``lambda_kl``), ``rewards/*``.
    """
    terms = {
        "dpo": (
            1.0,
            weighted_dpo_loss(
                policy_chosen_token_logps,
                policy_rejected_token_logps,
                ref_chosen_token_logps,
                ref_rejected_token_logps,
                chosen_token_weights,
                rejected_token_weights,
                chosen_mask,
                rejected_mask,
                beta=beta,
                label_smoothing=label_smoothing,
                loss_type=loss_type,
            ),
        )
    }
    if chosen_token_kl is None or rejected_token_kl is None:
        if lambda_kl != 0.0:
            raise ValueError(
                f"lambda_kl={lambda_kl} needs chosen_token_kl and rejected_token_kl; pass them or "
                f"set lambda_kl=0.0"
            )
    else:
        terms["token_kl"] = (
            lambda_kl,
            weighted_token_kl_loss(
                chosen_token_kl,
                rejected_token_kl,
                chosen_token_weights,
                rejected_token_weights,
                chosen_mask,
                rejected_mask,
            ),
        )
    return combine_terms(terms)
