"""Scored inputs for the registry built from plain arrays: the tests' bridge to ``Score`` keys."""

import jax.numpy as jnp

from mmpo_jax.objectives import terms
from mmpo_jax.objectives.terms import CHOSEN, POLICY, REFERENCE, REJECTED


def as_tokens(sums):
    """``[B]`` summed log-probs as one-token responses: ``([B, 1] values, [B, 1] mask)``."""
    sums = jnp.asarray(sums, jnp.float32)
    return sums[:, None], jnp.ones((sums.shape[0], 1), bool)


def response_scores(response, policy=None, reference=None, mask=None, weights=None, kl=None):
    """The scores of one response from ``[B, T]`` arrays (None ones are left out)."""
    scored = {}
    for score, value in ((terms.token_logps(POLICY, response), policy),
                         (terms.token_logps(REFERENCE, response), reference),
                         (terms.mask(response), mask), (terms.token_weights(response), weights),
                         (terms.token_kl(response), kl)):
        if value is not None:
            scored[score] = value
    return scored


def pair_scores(logps, masks, weights=(None, None), kls=(None, None)):
    """Chosen and rejected scores from ``logps = (pi_w, pi_l, ref_w, ref_l)`` ``[B, T]`` each."""
    return {**response_scores(CHOSEN, logps[0], logps[2], masks[0], weights[0], kls[0]),
            **response_scores(REJECTED, logps[1], logps[3], masks[1], weights[1], kls[1])}


def summed_scores(**responses):
    """``name=(policy_sum, ref_sum)`` with ``[B]`` sums, for responses given as Response objects
    through ``responses[name] = (Response, policy [B], reference [B])``."""
    scored = {}
    for response, policy, reference in responses.values():
        policy_tokens, mask = as_tokens(policy)
        scored.update(response_scores(response, policy_tokens, as_tokens(reference)[0], mask))
    return scored
