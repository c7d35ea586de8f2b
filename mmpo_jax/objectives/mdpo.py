"""mDPO (METHODS.md §2): DPO + conditional preference (CoPO) + reward anchor (AncPO).

- CoPO prefers the chosen response under the original image ``I`` to the same response under a
  corrupted image ``I'``: ``z = beta * ((pi(y_w|I) - pi(y_w|I')) - (ref(y_w|I) - ref(y_w|I')))``.
- AncPO keeps the chosen reward positive: ``z = beta * h(y_w) - delta``.
Both go through ``dpo.preference_loss`` with the sigmoid loss. Label smoothing applies to the DPO
term only, as in the released code (its CoPO and anchor terms are plain ``-log sigma``).
"""

from __future__ import annotations

import jax

from mmpo_jax.objectives.dpo import (
    Term,
    combine_terms,
    dpo_loss,
    implicit_reward,
    preference_loss,
)
from mmpo_jax.objectives.metrics import mean_metric


def copo_loss(
    policy_chosen_logps: jax.Array,
    policy_chosen_corrupt_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_chosen_corrupt_logps: jax.Array,
    *,
    beta: float = 0.1,
) -> Term:
    """Conditional preference: the chosen response under ``I`` versus under the corrupted ``I'``.

    Args:
      policy_chosen_logps: ``[B]`` ``logp_theta(y_w | I)``.
      policy_chosen_corrupt_logps: ``[B]`` ``logp_theta(y_w | I')``.
      ref_chosen_logps: ``[B]`` ``logp_ref(y_w | I)``.
      ref_chosen_corrupt_logps: ``[B]`` ``logp_ref(y_w | I')``.
      beta: DPO temperature.

    Returns:
      ``(losses [B], {"loss/copo", "rewards/copo_margins"})``; the margin metric is
      ``beta * (h(y_w|I) - h(y_w|I'))``, log 2 loss when it is 0.
    """
    margin = beta * (
        implicit_reward(policy_chosen_logps, ref_chosen_logps)
        - implicit_reward(policy_chosen_corrupt_logps, ref_chosen_corrupt_logps)
    )
    losses = preference_loss(margin, beta=beta)
    return losses, {
        "loss/copo": mean_metric(jax.lax.stop_gradient(losses)),
        "rewards/copo_margins": mean_metric(jax.lax.stop_gradient(margin)),
    }


def anchor_loss(
    policy_chosen_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    *,
    beta: float = 0.1,
    delta: float = 0.0,
) -> Term:
    """Reward anchor ``-log sigma(beta * h(y_w) - delta)``.

    Args:
      policy_chosen_logps: ``[B]`` ``logp_theta(y_w | I)``.
      ref_chosen_logps: ``[B]`` ``logp_ref(y_w | I)``.
      beta: DPO temperature.
      delta: the anchor value (0 in mDPO).

    Returns:
      ``(losses [B], {"loss/anchor"})``.
    """
    losses = preference_loss(
        beta * implicit_reward(policy_chosen_logps, ref_chosen_logps) - delta, beta=beta
    )
    return losses, {"loss/anchor": mean_metric(jax.lax.stop_gradient(losses))}


def mdpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    policy_chosen_corrupt_logps: jax.Array,
    ref_chosen_corrupt_logps: jax.Array,
    *,
    beta: float = 0.1,
    dpo_weight: float = 1.0,
    copo_weight: float = 1.0,
    anchor_weight: float = 1.0,
    anchor_delta: float = 0.0,
    label_smoothing: float = 0.0,
) -> Term:
    """``dpo_weight * L_dpo + copo_weight * L_copo + anchor_weight * L_anc`` per example.

    All inputs are ``[B]`` summed response log-probs (see ``copo_loss`` for the corrupted ones).

    Returns:
      ``(losses [B] float32, metrics)`` with ``loss/{dpo,copo,anchor}`` (each before its weight),
      ``rewards/*`` of the DPO pair and ``rewards/copo_margins``.
    """
    return combine_terms(
        {
            "dpo": (
                dpo_weight,
                dpo_loss(
                    policy_chosen_logps,
                    policy_rejected_logps,
                    ref_chosen_logps,
                    ref_rejected_logps,
                    beta=beta,
                    label_smoothing=label_smoothing,
                ),
            ),
            "copo": (
                copo_weight,
                copo_loss(
                    policy_chosen_logps,
                    policy_chosen_corrupt_logps,
                    ref_chosen_logps,
                    ref_chosen_corrupt_logps,
                    beta=beta,
                ),
            ),
            "anchor": (
                anchor_weight,
                anchor_loss(policy_chosen_logps, ref_chosen_logps, beta=beta, delta=anchor_delta),
            ),
        }
    )
