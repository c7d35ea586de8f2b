"""ADAPT's Visual Attention Guidance DPO (METHODS.md §4).

DPO in which the chosen response is scored on the visually-enhanced image
``I_VE = I * m + white * (1 - m)`` (``m``: the reference model's refined anchor mask, upsampled
bicubically; see ``mmpo_jax.rewards.adapt``) and the rejected response on a noise-injected image
``I_noise``, for both the policy and the reference:

``L = -log sigma(beta * ((logp_theta(y_w|I_VE) - logp_ref(y_w|I_VE))
                        - (logp_theta(y_l|I_noise) - logp_ref(y_l|I_noise))))``.

Only the inputs differ from DPO, so the loss is ``dpo_loss`` on them (one DPO formula in the
package); given the original-image log-probs it is exactly DPO.

``DECLARATIONS``: the ``adapt_vag`` term (its ``anchor_steps`` and ``mask_threshold_percentile``
options say how the engine builds ``I_VE``: the anchor over the first K response tokens, and the
refined mask's quantile, 0 for METHODS.md's chain without one) and the ``adapt`` method.
"""

from __future__ import annotations

import jax

from mmpo_jax.data.fields import ENHANCED, NOISED
from mmpo_jax.objectives.dpo import PREFERENCE_OPTIONS, dpo_loss, preference_options
from mmpo_jax.objectives.metrics import Metric
from mmpo_jax.objectives.terms import (POLICY, REFERENCE, Inputs, Method, Option, Response, Term,
                                       TermResult, pairs)

CHOSEN_VE = Response("chosen_ve", tokens="chosen", image=ENHANCED)
"""``y_w`` on the visually enhanced ``I_VE``."""
REJECTED_NOISE = Response("rejected_noise", tokens="rejected", image=NOISED)
"""``y_l`` on ``I_noise``."""


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


def _vag_term(inputs: Inputs) -> TermResult:
    seq = inputs.sequence
    return vag_dpo_loss(seq(POLICY, CHOSEN_VE), seq(POLICY, REJECTED_NOISE),
                        seq(REFERENCE, CHOSEN_VE), seq(REFERENCE, REJECTED_NOISE),
                        **preference_options(inputs.options))


ADAPT_VAG = Term("adapt_vag", _vag_term, {
    **PREFERENCE_OPTIONS,
    "anchor_steps": Option(5, positive=True),
    "mask_threshold_percentile": Option(0.4, bounds=(0.0, 1.0)),
}, pairs(CHOSEN_VE, REJECTED_NOISE))

DECLARATIONS = (ADAPT_VAG, Method("adapt", {"adapt_vag": 1.0}))
