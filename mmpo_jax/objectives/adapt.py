"""ADAPT's Visual Attention Guidance DPO (METHODS.md §4).

DPO in which the chosen response is scored on the visually-enhanced image
``I_VE = I * m + white * (1 - m)`` (``m``: the reference model's refined anchor mask, upsampled
bicubically; see ``mmpo_jax.rewards.adapt``) and the rejected response on a noise-injected image
``I_noise``, for both the policy and the reference:

``L = -log sigma(beta * ((logp_theta(y_w|I_VE) - logp_ref(y_w|I_VE))
                        - (logp_theta(y_l|I_noise) - logp_ref(y_l|I_noise))))``.

Only the inputs differ from DPO, so the loss is ``dpo_loss`` on them (one DPO formula in the
package); given the original-image log-probs it is exactly DPO.
"""

from __future__ import annotations

import jax

from mmpo_jax.objectives.dpo import dpo_loss
from mmpo_jax.objectives.metrics import Metric


def vag_dpo_loss(
    policy_chosen_ve_logps: jax.Array,
    policy_rejected_noise_logps: jax.Array,
    ref_chosen_ve_logps: jax.Array,
    ref_rejected_noise_logps: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[jax.Array, dict[str, Metric]]:
    """VAG-DPO on summed response log-probs.

    Args:
      policy_chosen_ve_logps: ``[B]`` ``logp_theta(y_w | I_VE, x)``.
      policy_rejected_noise_logps: ``[B]`` ``logp_theta(y_l | I_noise, x)``.
      ref_chosen_ve_logps: ``[B]`` ``logp_ref(y_w | I_VE, x)`` (under ``stop_gradient``).
      ref_rejected_noise_logps: ``[B]`` ``logp_ref(y_l | I_noise, x)`` (under ``stop_gradient``).
      beta, label_smoothing, loss_type: as ``mmpo_jax.objectives.dpo.preference_loss``.

    Returns:
      ``(losses [B] float32, metrics)`` with ``loss/dpo`` and ``rewards/*`` (``beta * h``).
    """
    return dpo_loss(
        policy_chosen_ve_logps,
        policy_rejected_noise_logps,
        ref_chosen_ve_logps,
        ref_rejected_noise_logps,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
    )
