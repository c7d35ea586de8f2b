"""Cat-PO objective (METHODS.md §3): token-weighted DPO plus a weighted token-level KL.

``logp^w(y) = sum_t w_t log pi(y_t)`` with the same weights ``w`` (``rewards.catpo``) applied to
the policy and the reference, ``L_wdpo = -log sigma(beta (h^w(y_w) - h^w(y_l)))``, and
``L_kl = lambda_kl * (sum_t w_t KL_t(y_w) + sum_t w_t KL_t(y_l))`` per example.

``DECLARATIONS``: the ``catpo`` token weighting (its weights are computed by the engine from the
reference's own forward, ``rewards.catpo.token_weights``; any weighted term then reads
``logp^w``, so ``L_wdpo`` is the ``dpo`` term under this weighting), the ``token_kl`` term
(weighted by whatever weighting is configured, unweighted without one) and the ``catpo`` method
(``dpo`` + 0.03 ``token_kl`` with ``catpo`` weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmpo_jax.objectives.logprobs import sequence_logps
from mmpo_jax.objectives.metrics import mean_metric
from mmpo_jax.objectives import terms
from mmpo_jax.objectives.terms import (CHOSEN, REJECTED, Inputs, Method, Option, Options, Term,
                                       TermResult, Weighting)

NORMALIZATIONS = ("minmax", "none")
"""How each Cat-PO signal is normalised over a response's tokens (METHODS.md §3)."""


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
) -> TermResult:
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


def _token_kl_reads(options: Options) -> tuple[terms.Score, ...]:
    reads = tuple(f(r) for r in (CHOSEN, REJECTED) for f in (terms.token_kl, terms.mask))
    if options["token_weights"] is not None:
        reads += (terms.token_weights(CHOSEN), terms.token_weights(REJECTED))
    return reads


def _token_kl_term(inputs: Inputs) -> TermResult:
    def part(response):
        response_mask = inputs[terms.mask(response)]
        weights = (inputs[terms.token_weights(response)] if inputs.options["token_weights"]
                   else jnp.ones(jnp.shape(response_mask), jnp.float32))
        return inputs[terms.token_kl(response)], weights, response_mask

    (chosen_kl, chosen_w, chosen_mask), (rejected_kl, rejected_w, rejected_mask) = (
        part(CHOSEN), part(REJECTED))
    return weighted_token_kl_loss(chosen_kl, rejected_kl, chosen_w, rejected_w, chosen_mask,
                                  rejected_mask)


def _check_band(band) -> str | None:
    band = tuple(band)
    if len(band) == 2 and 0.0 <= band[0] <= band[1] <= 1.0:
        return None
    return f"must be (low, high) with 0 <= low <= high <= 1, got {band}"


CATPO_WEIGHTS = Weighting("catpo", {
    "alpha": Option(0.5, bounds=(0.0, 1.0)),
    "lambda_ref": Option(0.5),
    "normalize": Option("minmax", choices=NORMALIZATIONS),
    "top_k_percent": Option(0.0, bounds=(0.0, 100.0)),  # 0: off
    "layer_band": Option((0.6, 0.7), check=_check_band),  # fraction of the decoder's depth
})

DECLARATIONS = (
    CATPO_WEIGHTS,
    Term("token_kl", _token_kl_term, reads=_token_kl_reads, weighted=False),
    Method("catpo", {"dpo": 1.0, "token_kl": 0.03}, token_weights="catpo"),
)
