"""mDPO (METHODS.md §2): DPO + conditional preference (CoPO) + reward anchor (AncPO).

- CoPO prefers the chosen response under the original image ``I`` to the same response under a
  corrupted image ``I'``: ``z = beta * ((pi(y_w|I) - pi(y_w|I')) - (ref(y_w|I) - ref(y_w|I')))``.
- AncPO keeps the chosen reward positive: ``z = beta * h(y_w) - delta``.
Both go through ``dpo.preference_loss`` with the sigmoid loss. Label smoothing applies to the DPO
term only, as in the released code (its CoPO and anchor terms are plain ``-log sigma``).
``DECLARATIONS``: the ``copo`` and ``anchor`` terms and the ``mdpo`` method (DPO + both, weight 1).
"""

from __future__ import annotations

import jax

from mmpo_jax.data.fields import CORRUPTED
from mmpo_jax.objectives.dpo import PREFERENCE_OPTIONS, implicit_reward, preference_loss
from mmpo_jax.objectives.metrics import mean_metric
from mmpo_jax.objectives.terms import (CHOSEN, POLICY, REFERENCE, Inputs, Method, Option, Response,
                                       Term, TermResult, pairs)

CHOSEN_CORRUPT = Response("chosen_corrupt", tokens="chosen", image=CORRUPTED)
"""``y_w`` on the corrupted image ``I'``."""


def copo_loss(
    policy_chosen_logps: jax.Array,
    policy_chosen_corrupt_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_chosen_corrupt_logps: jax.Array,
    *,
    beta: float = 0.1,
) -> TermResult:
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
) -> TermResult:
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


def _copo_term(inputs: Inputs) -> TermResult:
    seq = inputs.sequence
    return copo_loss(seq(POLICY, CHOSEN), seq(POLICY, CHOSEN_CORRUPT), seq(REFERENCE, CHOSEN),
                     seq(REFERENCE, CHOSEN_CORRUPT), beta=inputs.options["beta"])


def _anchor_term(inputs: Inputs) -> TermResult:
    seq = inputs.sequence
    return anchor_loss(seq(POLICY, CHOSEN), seq(REFERENCE, CHOSEN), beta=inputs.options["beta"],
                       delta=inputs.options["anchor_delta"])


_COPO_OPTIONS = {key: PREFERENCE_OPTIONS[key] for key in ("beta", "reduction")}
DECLARATIONS = (
    Term("copo", _copo_term, _COPO_OPTIONS, pairs(CHOSEN, CHOSEN_CORRUPT)),
    Term("anchor", _anchor_term, {**_COPO_OPTIONS, "anchor_delta": Option(0.0)}, pairs(CHOSEN)),
    Method("mdpo", {"dpo": 1.0, "copo": 1.0, "anchor": 1.0}),
)
