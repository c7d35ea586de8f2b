"""ADAPT's decode-time attention modes (METHODS.md §4), on one step's attention rows.

Each mode takes a decoder layer's attention probabilities ``probs [B, H, Tq, Tkv]`` plus
``key_is_image [B, Tkv]`` (an example holds no image keys, a text-only row, or exactly
``N_img = G * G`` of them in row-major grid order) and an anchor over the image tokens, and keeps
every row a probability distribution:

- ``steer_bias`` (pre-softmax, the paper's equations) / ``steer`` (its exact post-softmax form):
  ``S_AMC < tau`` -> ``+ alpha * log(w + 1e-9)`` on the image logits;
- ``blend`` (the released code's HHI mode): mix the anchor into dispersed rows;
- ``mask`` (the released code's default): zero image columns below the refined anchor's percentile
  and redistribute their mass.

They plug into a model's ``post_softmax_edit(probs, key_is_image, layer_index)`` hook through a
closure over the anchor (``generation.adapt`` does so inside the jitted decode loop). The anchor
itself comes from ``rewards.adapt`` (``visual_anchor``, ``refined_mask``). Pure ``jnp``, public
functions wrapped in ``jax.jit``; choices of ours are marked [our choice].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmpo_jax.rewards.adapt import border_factor, grid_side


def image_values_on_keys(values: jax.Array, key_is_image: jax.Array) -> jax.Array:
    """Place per-image-token values ``[B, N_img]`` at the image key positions: ``[B, Tkv]``.

    The ``n``-th image key of a row gets ``values[:, n]``; text keys get 0.
    """
    key_is_image = jnp.asarray(key_is_image, bool)
    values = jnp.asarray(values, jnp.float32)
    rank = jnp.clip(jnp.cumsum(key_is_image, axis=-1) - 1, 0, values.shape[-1] - 1)
    return jnp.where(key_is_image, jnp.take_along_axis(values, rank, axis=-1), 0.0)


def _prepare_rows(
    probs: jax.Array, key_is_image: jax.Array, anchor: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 ``probs [B, H, Tq, Tkv]``, bool ``key_is_image [B, Tkv]``, float32 ``anchor [B, N]``."""
    probs = jnp.asarray(probs, jnp.float32)
    key_is_image = jnp.asarray(key_is_image, bool)
    anchor = jnp.asarray(anchor, jnp.float32)
    if probs.ndim != 4:
        raise ValueError(f"probs has shape {probs.shape}; expected [B, H, Tq, Tkv]")
    if key_is_image.shape != (probs.shape[0], probs.shape[-1]):
        raise ValueError(
            f"key_is_image has shape {key_is_image.shape}; expected [B, Tkv] = "
            f"{(probs.shape[0], probs.shape[-1])}"
        )
    if anchor.ndim != 2 or anchor.shape[0] != probs.shape[0]:
        raise ValueError(f"anchor has shape {anchor.shape}; expected [B, N_img] with B={probs.shape[0]}")
    return probs, key_is_image, anchor


def _head_mean_image(probs: jax.Array, key_is_image: jax.Array) -> jax.Array:
    """Head-mean probabilities on image keys, 0 on text keys: ``[B, Tq, Tkv]``."""
    return jnp.where(key_is_image[:, None, :], jnp.mean(probs, axis=1), 0.0)


def _normalise_rows(probs: jax.Array, edited: jax.Array) -> jax.Array:
    """Rows divided by their sum where ``edited`` ``[B, 1|H, Tq, 1]``; other rows stay bit-exact."""
    total = jnp.sum(probs, axis=-1, keepdims=True)
    return jnp.where(edited & (total > 0), probs / jnp.where(total > 0, total, 1.0), probs)


def amc_score(image_probs: jax.Array, anchor_weights: jax.Array) -> jax.Array:
    """``S_AMC = sum_i a_i^2 w_i / ((sum_i a_i)^2 + 1e-9)`` over the last axis.

    Args:
      image_probs: ``[..., N]`` head-mean attention on image positions (other entries 0).
      anchor_weights: ``[..., N]`` max-normalised anchor in [0, 1], broadcastable.
    """
    a = jnp.asarray(image_probs, jnp.float32)
    return jnp.sum(a**2 * anchor_weights, axis=-1) / (jnp.sum(a, axis=-1) ** 2 + 1e-9)


def _max_normalised(anchor: jax.Array) -> jax.Array:
    anchor = jnp.asarray(anchor, jnp.float32)
    peak = jnp.max(anchor, axis=-1, keepdims=True)
    return jnp.where(peak > 0, anchor / jnp.where(peak > 0, peak, 1.0), 0.0)


@jax.jit
def steer_bias(
    probs: jax.Array,
    key_is_image: jax.Array,
    anchor: jax.Array,
    *,
    tau: float = 0.6,
    alpha: float = 0.5,
) -> jax.Array:
    """Mode ``"steer"``: additive pre-softmax bias ``alpha * log(w + 1e-9)`` on image keys.

    ``w`` is the anchor max-normalised to [0, 1]; the bias is applied to a query row (all heads)
    only when its head-mean ``S_AMC < tau``, otherwise it is 0.

    Args:
      probs: ``[B, H, Tq, Tkv]`` the step's attention probabilities (without the bias).
      key_is_image: ``[B, Tkv]`` bool.
      anchor: ``[B, N_img]`` anchor map, flattened row-major.

    Returns:
      ``[B, 1, Tq, Tkv]`` float32 bias, 0 on text keys and on rows that do not fire.
    """
    probs, key_is_image, anchor = _prepare_rows(probs, key_is_image, anchor)
    w_keys = image_values_on_keys(_max_normalised(anchor), key_is_image)  # [B, Tkv]
    fires = amc_score(_head_mean_image(probs, key_is_image), w_keys[:, None, :]) < tau  # [B, Tq]
    log_prior = jnp.where(key_is_image, alpha * jnp.log(w_keys + 1e-9), 0.0)  # [B, Tkv]
    return jnp.where(fires[:, :, None], log_prior[:, None, :], 0.0)[:, None]


@jax.jit
def steer(
    probs: jax.Array,
    key_is_image: jax.Array,
    anchor: jax.Array,
    *,
    tau: float = 0.6,
    alpha: float = 0.5,
) -> jax.Array:
    """Mode ``"steer"`` as a post-softmax edit: exactly ``softmax(logits + steer_bias(...))``.

    ``softmax(l + b) = p * exp(b) / sum(p * exp(b))``, so the bias can be applied to the
    probabilities; text keys keep their mutual ratios. Shapes as ``steer_bias``; returns
    ``[B, H, Tq, Tkv]``.
    """
    probs = jnp.asarray(probs, jnp.float32)
    bias = steer_bias(probs, key_is_image, anchor, tau=tau, alpha=alpha)
    return _normalise_rows(probs * jnp.exp(bias), jnp.any(bias != 0, axis=-1, keepdims=True))


def hhi(image_map: jax.Array, *, border: int = 2) -> jax.Array:
    """Herfindahl index ``sum a^2`` of a ``[..., G, G]`` map with the ``border`` frame halved: ``[...]``."""
    image_map = jnp.asarray(image_map, jnp.float32)
    halved = image_map * border_factor(image_map.shape[-1], border=border)
    return jnp.sum(halved**2, axis=(-2, -1))


@functools.partial(jax.jit, static_argnames=("border",))
def blend(
    probs: jax.Array,
    key_is_image: jax.Array,
    anchor: jax.Array,
    hhi_base: jax.Array,
    *,
    strength: float = 0.4,
    border: int = 2,
) -> jax.Array:
    """Mode ``"blend"``: mix the anchor into the image columns when attention has spread out.

    ``HHI_t`` = ``hhi`` of the step's head-mean image map; ``d = clip(1 - HHI_t / HHI_base, 0, 1)``,
    ``w = clip(strength * d, 0, 1)``; on image columns ``a <- (1 - w) a + w * anchor`` (every head),
    then the row is renormalised to sum to 1 [our choice: the whole row, so text keys keep their
    mutual ratios; the released code does not renormalise]. A row with no image keys is unchanged.

    Args:
      probs: ``[B, H, Tq, Tkv]``.
      key_is_image: ``[B, Tkv]`` bool.
      anchor: ``[B, N_img]`` anchor map from the first K steps, row-major.
      hhi_base: ``[B]`` ``hhi`` of the anchor's grid map (a 0 baseline disables the blend).

    Returns:
      ``[B, H, Tq, Tkv]`` probabilities.
    """
    probs, key_is_image, anchor = _prepare_rows(probs, key_is_image, anchor)
    grid = grid_side(anchor.shape[-1])
    halving = image_values_on_keys(
        jnp.broadcast_to(border_factor(grid, border=border).reshape(-1), anchor.shape), key_is_image
    )
    hhi_now = jnp.sum((_head_mean_image(probs, key_is_image) * halving[:, None, :]) ** 2, axis=-1)
    hhi_base = jnp.asarray(hhi_base, jnp.float32)[:, None]
    ratio = hhi_now / jnp.where(hhi_base > 0, hhi_base, 1.0)
    dispersion = jnp.where(hhi_base > 0, jnp.clip(1.0 - ratio, 0.0, 1.0), 0.0)
    w = jnp.clip(strength * dispersion, 0.0, 1.0)[:, None, :, None]  # [B, 1, Tq, 1]
    anchor_keys = image_values_on_keys(anchor, key_is_image)[:, None, None, :]
    mixed = jnp.where(key_is_image[:, None, None, :], (1.0 - w) * probs + w * anchor_keys, probs)
    has_image = jnp.any(key_is_image, axis=-1)[:, None, None, None]
    return _normalise_rows(mixed, has_image & (w > 0))


@jax.jit
def mask(
    probs: jax.Array,
    key_is_image: jax.Array,
    refined_anchor: jax.Array,
    *,
    percentile: float = 0.4,
) -> jax.Array:
    """Mode ``"mask"``: zero image columns below the refined anchor's percentile, keep their mass.

    Image keys whose refined-anchor value is ``< quantile(refined_anchor, percentile)`` (linear
    interpolation, as ``torch.quantile``) are zeroed per row and their mass is redistributed over
    the row's remaining image keys in proportion to their probabilities (uniformly if those hold no
    mass), as the released code does; text keys are unchanged, so each row still sums to 1. A
    constant refined anchor masks nothing.

    Args:
      probs: ``[B, H, Tq, Tkv]``.
      key_is_image: ``[B, Tkv]`` bool.
      refined_anchor: ``[B, N_img]`` ``refined_mask`` of the anchor, flattened row-major.

    Returns:
      ``[B, H, Tq, Tkv]`` probabilities.
    """
    probs, key_is_image, refined_anchor = _prepare_rows(probs, key_is_image, refined_anchor)
    cut = jnp.quantile(refined_anchor, percentile, axis=-1, keepdims=True)
    dropped_values = (refined_anchor < cut).astype(jnp.float32)
    dropped = (image_values_on_keys(dropped_values, key_is_image) > 0)[:, None, None, :]
    kept = key_is_image[:, None, None, :] & ~dropped
    removed = jnp.sum(jnp.where(dropped, probs, 0.0), axis=-1, keepdims=True)
    kept_mass = jnp.sum(jnp.where(kept, probs, 0.0), axis=-1, keepdims=True)
    kept_count = jnp.sum(kept, axis=-1, keepdims=True).astype(jnp.float32)
    share = jnp.where(
        kept_mass > 0,
        probs / jnp.where(kept_mass > 0, kept_mass, 1.0),
        1.0 / jnp.maximum(kept_count, 1.0),
    )
    return jnp.where(dropped, 0.0, jnp.where(kept, probs + share * removed, probs))
