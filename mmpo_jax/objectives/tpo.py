"""TPO-style visual-anchored token weights (METHODS.md §7).

``Delta_t = logit(y_t | I) - logit(y_t | I_noise)`` from the reference (the pre-softmax logit of
the label token under the clean and the noised image); chosen ``w_t = sigma(Delta_t) + 0.5``,
rejected ``w_t = 1 - sigma(Delta_t) + 0.5``. The weights enter as Cat-PO's do,
``logp^w(y) = sum_t w_t log pi(y_t)`` on the policy and the reference alike, so the gradient of
each token's log-prob is proportional to its ``w_t``. (An earlier specification,
``sum_t (log pi(y_t) + log w_t)``, only shifted each example's margin: with ``w_t`` fixed by the
reference every token got the same gradient.)

``DECLARATIONS``: the ``tpo`` weighting (the reference re-reads each weighted response on the
noised image to form ``Delta_t``) and the ``tpo`` method (``dpo`` with ``tpo`` weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmpo_jax.data.fields import NOISED
from mmpo_jax.objectives.terms import Method, Weighting


def label_token_logits(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """The logit of each label token, ``logits[b, t, labels[b, t]]``, ``[B, T]`` float32.

    Args:
      logits: ``[B, T, V]`` aligned with ``labels`` (the caller shifts, as in ``logprobs``).
      labels: ``[B, T]`` token ids; any value at masked positions.
      mask: ``[B, T]`` bool or 0/1; masked positions come out 0.
    """
    valid = jnp.asarray(mask) > 0
    safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked.astype(jnp.float32), 0.0)


def tpo_token_weights(
    clean_token_logits: jax.Array,
    noisy_token_logits: jax.Array,
    mask: jax.Array,
    *,
    chosen: bool,
) -> jax.Array:
    """Visual-anchored weights in ``[0.5, 1.5]`` on valid tokens, 0 elsewhere, ``[B, T]``.

    Args:
      clean_token_logits: ``[B, T]`` reference logit of the label token given the clean image.
      noisy_token_logits: ``[B, T]`` the same given the noised image.
      mask: ``[B, T]`` bool or 0/1 response mask.
      chosen: True for the chosen response (``sigma(Delta) + 0.5``), False for the rejected one
        (``1 - sigma(Delta) + 0.5``).
    """
    valid = jnp.asarray(mask) > 0
    delta = jax.lax.stop_gradient(
        jnp.asarray(clean_token_logits, jnp.float32) - jnp.asarray(noisy_token_logits, jnp.float32)
    )
    weights = jax.nn.sigmoid(delta if chosen else -delta) + 0.5  # 1 - sigma(d) = sigma(-d)
    return jnp.where(valid, weights, 0.0)


DECLARATIONS = (Weighting("tpo", reread_on=NOISED), Method("tpo", {"dpo": 1.0}, token_weights="tpo"))
