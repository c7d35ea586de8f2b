"""Cat-PO token rewards (METHODS.md §3) from the reference model's own attention and embeddings.

Per response token ``t`` with text→image attention ``a[t, j]`` (head-mean, averaged over the layer
band that ``layer_band`` picks):

- ``S_global = sum_j a[t, j]``;
- ``S_local = 1 - H(P_t) / log N_img`` with ``P[t, j] = a[t, j] / (sum_k a[t, k] + eps)``;
- ``S_semantic = (1 + cos(e(y_t), sum_j P[t, j] v_j)) / 2``;
- optional per-response min-max normalisation of each signal, then
  ``s_t = alpha * (S_global + S_local) / 2 + (1 - alpha) * S_semantic`` and
  ``w_t = lambda_ref + tanh(s_t)`` (chosen) or ``lambda_ref + 1 - tanh(s_t)`` (rejected).

Every function is pure, ``[B, T, ...]`` in, ``[B, T]`` out, and treats its inputs as constants
(``stop_gradient``): the rewards come from the frozen reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmpo_jax.objectives.catpo import NORMALIZATIONS


def layer_band(num_layers: int, band: tuple[float, float] = (0.6, 0.7)) -> tuple[int, ...]:
    """0-based indices of the decoder layers whose depth lies in ``band``.

    Rounding: ``floor(lo * L)`` to ``floor(hi * L)`` inclusive (a 1e-9 slack absorbs float error
    such as ``0.29 * 100 = 28.999...``), clamped to the last layer. For 32 layers and the default
    band this is layers 19–22, the reference implementation's choice; it is never empty.

    Args:
      num_layers: ``L >= 1`` decoder layers.
      band: ``(lo, hi)`` with ``0 <= lo <= hi <= 1``.
    """
    lo, hi = band
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"band={band} must satisfy 0 <= lo <= hi <= 1")
    first = min(math.floor(lo * num_layers + 1e-9), num_layers - 1)
    last = min(math.floor(hi * num_layers + 1e-9), num_layers - 1)
    return tuple(range(first, last + 1))


def _image_distribution(text_to_image_attention: jax.Array, eps: float) -> jax.Array:
    """``P[t, j] = a[t, j] / (sum_k a[t, k] + eps)``, ``[B, T, N_img]``."""
    attention = jax.lax.stop_gradient(jnp.asarray(text_to_image_attention, jnp.float32))
    return attention / (jnp.sum(attention, axis=-1, keepdims=True) + eps)


def global_relevance(text_to_image_attention: jax.Array) -> jax.Array:
    """``S_global[b, t] = sum_j a[b, t, j]``: attention mass on the image, ``[B, T]`` in [0, 1]."""
    attention = jax.lax.stop_gradient(jnp.asarray(text_to_image_attention, jnp.float32))
    return jnp.sum(attention, axis=-1)


def local_relevance(text_to_image_attention: jax.Array, *, eps: float = 1e-8) -> jax.Array:
    """``S_local = 1 - H(P) / log N_img``: 0 for uniform attention, 1 for one-hot, ``[B, T]``.

    ``H(P) = -sum_j P_j log(P_j + eps)``. A row with no attention on the image has ``P = 0`` and
    therefore ``S_local = 1`` by this formula (its ``S_global`` is 0).

    Args:
      text_to_image_attention: ``[B, T, N_img]`` with ``N_img >= 2``.
      eps: the smoothing constant of METHODS.md.
    """
    num_image_tokens = text_to_image_attention.shape[-1]
    if num_image_tokens < 2:
        raise ValueError(
            f"local_relevance needs N_img >= 2 image positions to normalise the entropy by "
            f"log N_img, got N_img={num_image_tokens}"
        )
    distribution = _image_distribution(text_to_image_attention, eps)
    entropy = -jnp.sum(distribution * jnp.log(distribution + eps), axis=-1)
    return 1.0 - entropy / math.log(num_image_tokens)


def semantic_relevance(
    text_to_image_attention: jax.Array,
    token_embeddings: jax.Array,
    visual_tokens: jax.Array,
    *,
    eps: float = 1e-8,
) -> jax.Array:
    """``(1 + cos(e(y_t), v_c(t))) / 2`` with ``v_c(t) = sum_j P[t, j] v_j``, ``[B, T]`` in [0, 1].

    Args:
      text_to_image_attention: ``[B, T, N_img]``.
      token_embeddings: ``[B, T, D]`` the LLM's input embedding rows of the response tokens.
      visual_tokens: ``[B, N_img, D]`` projector outputs (the LLM's embedding space).
      eps: floor of the norm product (a zero vector gives cos 0, i.e. 0.5).
    """
    distribution = _image_distribution(text_to_image_attention, eps)
    embeddings = jax.lax.stop_gradient(jnp.asarray(token_embeddings, jnp.float32))
    visual = jax.lax.stop_gradient(jnp.asarray(visual_tokens, jnp.float32))
    attended = jnp.einsum("btn,bnd->btd", distribution, visual)
    dot = jnp.einsum("btd,btd->bt", embeddings, attended)
    norms = jnp.linalg.norm(embeddings, axis=-1) * jnp.linalg.norm(attended, axis=-1)
    return 0.5 * (1.0 + dot / jnp.maximum(norms, eps))


def minmax_normalize(signal: jax.Array, mask: jax.Array, *, eps: float = 1e-8) -> jax.Array:
    """Rescale each row of ``signal`` to [0, 1] over its valid tokens; a constant row gives 0.5.

    Args:
      signal: ``[B, T]``.
      mask: ``[B, T]`` bool or 0/1; invalid positions neither count nor change (they come out 0).
      eps: a row whose range is ``<= eps`` counts as constant.
    """
    valid = jnp.asarray(mask) > 0
    low = jnp.min(jnp.where(valid, signal, jnp.inf), axis=-1, keepdims=True)
    high = jnp.max(jnp.where(valid, signal, -jnp.inf), axis=-1, keepdims=True)
    spread = high - low
    constant = ~(spread > eps)  # also true for an all-masked row (spread = -inf)
    scaled = (signal - jnp.where(constant, 0.0, low)) / jnp.where(constant, 1.0, spread)
    return jnp.where(valid, jnp.where(constant, 0.5, scaled), 0.0)


def fuse(
    global_score: jax.Array,
    local_score: jax.Array,
    semantic_score: jax.Array,
    *,
    alpha: float = 0.5,
) -> jax.Array:
    """``s = alpha * (0.5 * S_global + 0.5 * S_local) + (1 - alpha) * S_semantic``, ``[B, T]``."""
    return alpha * (0.5 * global_score + 0.5 * local_score) + (1.0 - alpha) * semantic_score


def top_k_mask(scores: jax.Array, mask: jax.Array, top_k_percent: float) -> jax.Array:
    """True on the ``ceil(k% * n_valid)`` highest-scoring valid tokens of each row, ``[B, T]``.

    Ties are broken by position (earlier first). A row with at least one valid token selects at
    least one.

    Args:
      scores: ``[B, T]``.
      mask: ``[B, T]`` bool or 0/1, the tokens that compete.
      top_k_percent: ``k`` in ``(0, 100]``.
    """
    if not 0.0 < top_k_percent <= 100.0:
        raise ValueError(f"top_k_percent={top_k_percent} must lie in (0, 100]")
    valid = jnp.asarray(mask) > 0
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    count = jnp.ceil(top_k_percent / 100.0 * jnp.sum(valid, axis=-1, keepdims=True))
    return valid & (rank < count)


def token_weights(
    text_to_image_attention: jax.Array,
    token_embeddings: jax.Array,
    visual_tokens: jax.Array,
    response_mask: jax.Array,
    *,
    chosen: bool,
    alpha: float = 0.5,
    lambda_ref: float = 0.5,
    normalize: str = "minmax",
    special_token_mask: jax.Array | None = None,
    top_k_percent: float | None = None,
    eps: float = 1e-8,
) -> jax.Array:
    """Cat-PO token weights of one response, ``[B, T]`` float32.

    Args:
      text_to_image_attention: ``[B, T, N_img]`` head-mean attention of each response position
        (query) to the image positions, averaged over the ``layer_band`` layers.
      token_embeddings: ``[B, T, D]`` input embedding rows ``e(y_t)`` of the response tokens.
      visual_tokens: ``[B, N_img, D]`` projector outputs ``v_j``.
      response_mask: ``[B, T]`` bool or 0/1, true on response tokens.
      chosen: True for the chosen response (``lambda_ref + T_t``), False for the rejected one
        (``lambda_ref + 1 - T_t``).
      alpha: attention (1) versus similarity (0) balance.
      lambda_ref: weight offset.
      normalize: ``"minmax"`` (each signal rescaled to [0, 1] over the response) or ``"none"``.
      special_token_mask: optional ``[B, T]``, true on EOS and other special tokens: weight 1.0,
        and they do not enter the min-max ranges nor the top-k count.
      top_k_percent: optional ``k`` in ``(0, 100]``: only the top k% tokens by ``s_t`` keep
        their weight, the others get 1.0.
      eps: METHODS.md's smoothing constant.

    Returns:
      ``[B, T]`` weights: 0 outside ``response_mask``, 1.0 on special tokens.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not one of {NORMALIZATIONS}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    in_response = jnp.asarray(response_mask) > 0
    special = (
        jnp.zeros_like(in_response)
        if special_token_mask is None
        else jnp.asarray(special_token_mask) > 0
    )
    scored = in_response & ~special
    signals = (
        global_relevance(text_to_image_attention),
        local_relevance(text_to_image_attention, eps=eps),
        semantic_relevance(text_to_image_attention, token_embeddings, visual_tokens, eps=eps),
    )
    if normalize == "minmax":
        signals = tuple(minmax_normalize(s, scored, eps=eps) for s in signals)
    fused = fuse(*signals, alpha=alpha)
    relevance = jnp.tanh(fused)
    weights = lambda_ref + (relevance if chosen else 1.0 - relevance)
    keep = scored if top_k_percent is None else top_k_mask(fused, scored, top_k_percent)
    weights = jnp.where(keep, weights, 1.0)
    return jnp.where(in_response, weights, 0.0).astype(jnp.float32)
