"""The DPO core: the one place the preference loss on a margin is written (METHODS.md §1).

Every method reuses these functions:

- ``preference_loss(z)`` turns an already-formed, beta-scaled margin ``z`` into a per-example loss
  (``sigmoid`` with optional label smoothing, ``ipo``, ``hinge``);
- ``dpo_loss`` forms ``z = beta * (h(y_w) - h(y_l))`` from four summed log-probs and calls it;
- ``reward_metrics`` reports the implicit rewards ``beta * h(y)`` as TRL does;
- ``implicit_reward`` forms ``h(y)`` (reference under ``stop_gradient``) and ``combine_terms`` adds
  weighted loss terms (the registry);
- ``PREFERENCE_OPTIONS`` are the options of every preference term; ``DECLARATIONS`` the ``dpo``
  term and method.

Naming: ``h(y) = logp_theta(y) - logp_ref(y)``; the rewards in the metrics are ``beta * h(y)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmpo_jax.objectives.logprobs import REDUCTIONS
from mmpo_jax.objectives.metrics import Metric, mean_metric
from mmpo_jax.objectives.terms import (CHOSEN, POLICY, REFERENCE, REJECTED, Inputs, Method, Option,
                                       Options, Term, TermResult,
                                       pairs)

LOSS_TYPES = ("sigmoid", "ipo", "hinge")

PREFERENCE_OPTIONS = {
    "beta": Option(0.1, positive=True),
    "label_smoothing": Option(0.0, bounds=(0.0, 0.5)),
    "loss_type": Option("sigmoid", choices=LOSS_TYPES),
    # how a response's per-token log-probs become one number: METHODS.md's sum, or the mean
    "reduction": Option("sum", choices=REDUCTIONS),
}
"""The options every preference term reads (METHODS.md §1 defaults)."""



def implicit_reward(policy_logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """``h(y) = logp_theta(y) - stop_gradient(logp_ref(y))`` in float32.

    Args:
      policy_logps: ``[B]`` summed (or weighted-summed) response log-probs of the policy.
      ref_logps: ``[B]`` the same for the frozen reference.
    """
    return jnp.asarray(policy_logps, jnp.float32) - jax.lax.stop_gradient(
        jnp.asarray(ref_logps, jnp.float32)
    )


def preference_loss(
    logits_z: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> jax.Array:
    """Per-example preference loss of a beta-scaled margin ``z``.

    Args:
      logits_z: ``[B]`` the margin already scaled by beta, e.g. ``z = beta * (h_w - h_l)`` for DPO
        or ``z = beta * h_w - delta`` for mDPO's anchor.
      beta: the scale used to form ``z``; only ``ipo`` needs it (to undo the scaling).
      label_smoothing: ``eps`` of the conservative sigmoid loss
        ``(1 - eps) * softplus(-z) + eps * softplus(z)``; only valid with ``loss_type="sigmoid"``.
      loss_type: ``"sigmoid"`` (``-log sigma(z)``), ``"ipo"`` (``(z/beta - 1/(2 beta))^2``, i.e. on
        the un-scaled log-ratio difference) or ``"hinge"`` (``relu(1 - z)``).

    Returns:
      ``[B]`` float32 losses.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if (
        isinstance(label_smoothing, (int, float))
        and label_smoothing != 0.0
        and loss_type != "sigmoid"
    ):
        raise ValueError(
            f"label_smoothing={label_smoothing} only applies to loss_type='sigmoid', "
            f"got loss_type={loss_type!r}; set label_smoothing=0.0"
        )
    z = jnp.asarray(logits_z, jnp.float32)
    if loss_type == "sigmoid":
        return (1.0 - label_smoothing) * jax.nn.softplus(-z) + label_smoothing * jax.nn.softplus(z)
    if loss_type == "ipo":
        return jnp.square(z / beta - 1.0 / (2.0 * beta))
    return jax.nn.relu(1.0 - z)


def reward_metrics(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    example_mask: jax.Array | None = None,
) -> dict[str, Metric]:
    """``rewards/{chosen,rejected,margins,accuracy}`` as (sum, count) pairs.

    Args:
      chosen_rewards: ``[B]`` implicit rewards ``beta * h(y_w)``.
      rejected_rewards: ``[B]`` implicit rewards ``beta * h(y_l)``.
      example_mask: optional ``[B]`` (bool or 0/1) marking real examples; padded examples
        are not counted.
    """
    chosen_rewards = jnp.asarray(chosen_rewards, jnp.float32)
    rejected_rewards = jnp.asarray(rejected_rewards, jnp.float32)
    return {
        "rewards/chosen": mean_metric(chosen_rewards, example_mask),
        "rewards/rejected": mean_metric(rejected_rewards, example_mask),
        "rewards/margins": mean_metric(chosen_rewards - rejected_rewards, example_mask),
        "rewards/accuracy": mean_metric(
            (chosen_rewards > rejected_rewards).astype(jnp.float32), example_mask
        ),
    }


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> TermResult:
    """DPO on summed (or weighted-summed) response log-probs.

    ``L = preference_loss(beta * ((pi_w - ref_w) - (pi_l - ref_l)))``. The reference log-probs are
    wrapped in ``stop_gradient``.

    Args:
      policy_chosen_logps: ``[B]`` ``logp_theta(y_w | I, x)``.
      policy_rejected_logps: ``[B]`` ``logp_theta(y_l | I, x)``.
      ref_chosen_logps: ``[B]`` ``logp_ref(y_w | I, x)``.
      ref_rejected_logps: ``[B]`` ``logp_ref(y_l | I, x)``.
      beta, label_smoothing, loss_type: see ``preference_loss``.

    Returns:
      ``(losses [B] float32, metrics)`` with ``loss/dpo`` and ``rewards/*``.
    """
    chosen_h = implicit_reward(policy_chosen_logps, ref_chosen_logps)
    rejected_h = implicit_reward(policy_rejected_logps, ref_rejected_logps)
    losses = preference_loss(
        beta * (chosen_h - rejected_h),
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
    )
    metrics = reward_metrics(
        jax.lax.stop_gradient(beta * chosen_h), jax.lax.stop_gradient(beta * rejected_h)
    )
    metrics["loss/dpo"] = mean_metric(jax.lax.stop_gradient(losses))
    return losses, metrics


def combine_terms(weighted_terms: dict[str, tuple[float, TermResult]]) -> TermResult:
    """Weighted sum of loss terms: ``sum_k weight_k * losses_k``, metrics merged.

    Each term's own metrics are kept as they are (``loss/<term>`` is the term *before* its weight).
    A metric key already reported by an earlier term is stored as ``<term name>/<key>`` instead,
    so nothing is silently overwritten.

    Args:
      weighted_terms: ordered ``{term name: (weight, (losses [B], metrics))}``; at least one.

    Returns:
      ``(losses [B] float32, metrics)``.
    """
    if not weighted_terms:
        raise ValueError("combine_terms needs at least one term, got none")
    total = None
    merged: dict[str, Metric] = {}
    for name, (weight, (losses, term_metrics)) in weighted_terms.items():
        scaled = weight * jnp.asarray(losses, jnp.float32)
        total = scaled if total is None else total + scaled
        for key, value in term_metrics.items():
            merged[f"{name}/{key}" if key in merged else key] = value
    return total, merged


def preference_options(options: Options) -> dict[str, Any]:
    """``beta``, ``label_smoothing``, ``loss_type`` of a method's options, for ``dpo_loss``."""
    return {key: options[key] for key in ("beta", "label_smoothing", "loss_type")}


def _dpo_term(inputs: Inputs) -> TermResult:
    seq = inputs.sequence
    return dpo_loss(seq(POLICY, CHOSEN), seq(POLICY, REJECTED), seq(REFERENCE, CHOSEN),
                    seq(REFERENCE, REJECTED), **preference_options(inputs.options))


DPO = Term("dpo", _dpo_term, PREFERENCE_OPTIONS, pairs(CHOSEN, REJECTED))

DECLARATIONS = (DPO, Method("dpo", {"dpo": 1.0}))
