"""ADAPT's visual anchor, refined mask and decode-time attention edits (METHODS.md §4).

Everything here is a pure ``jnp`` function, vectorised over any leading axes; the public ones are
wrapped in ``jax.jit`` (integer/structural hyper-parameters static) so that eager calls, e.g. in
data generation, compile once instead of op by op.

Layout: a text->image attention map over one image is a patch grid ``[G, G]`` in row-major order
(image token ``j`` sits at row ``j // G``, column ``j % G``, LLaVA's order). A decoder layer's
attention probabilities are ``probs [B, H, Tq, Tkv]`` plus ``key_is_image [B, Tkv]``; an example
holds either no image keys (a text-only row) or exactly ``N_img = G * G`` of them, in grid order.

- Anchor: ``visual_anchor`` scores every layer's map (boundary, spectral, smoothness,
  concentration, depth prior), fuses them with ``softmax(10 * minmax(scores))`` and
  ``refined_mask`` turns the anchor into a soft foreground mask in [0, 1].
- Decode-time modes, each on one step's full probability rows and each keeping every row a
  distribution: ``steer_bias`` (pre-softmax, the paper's equations) / ``steer`` (its exact
  post-softmax form), ``blend`` and ``mask`` (the released code's modes). They plug into a model's
  ``post_softmax_edit(probs, key_is_image, layer_index)`` hook through a closure over the anchor.
- VAG-DPO inputs: ``upsample_mask`` (bicubic) and ``visually_enhance`` (``I*m + white*(1-m)``).

Where the released code (github.com/yao-ustc/ADAPT) fixes what METHODS.md leaves open, it is
followed: the z-score uses the unbiased std, Sobel and the spectral radius are as there, the box
blurs pad by replication. Choices of ours are marked [our choice].
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmpo_jax.rewards.catpo import minmax_normalize

LAYER_SCORE_WEIGHTS = (0.25, 0.30, 0.15, 0.20, 0.10)
"""Weights of boundary, spectral, smoothness, concentration, depth prior."""

_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], np.float32)


# ----------------------------------------------------------------------------------------------
# Small grid helpers
# ----------------------------------------------------------------------------------------------


def _minmax(x: jax.Array, trailing_axes: int = 1) -> jax.Array:
    """Rescale to [0, 1] over the last ``trailing_axes`` axes; a constant slice becomes 0.5.

    The one min-max of the package (``rewards.catpo.minmax_normalize``) on the flattened slice.
    """
    flat = x.reshape(*x.shape[: x.ndim - trailing_axes], -1)
    return minmax_normalize(flat, jnp.ones(flat.shape, bool)).reshape(x.shape)


def border_factor(grid: int, *, border: int = 2, factor: float = 0.5) -> np.ndarray:
    """``[G, G]`` multiplier: ``factor`` on the ``border``-patch frame, 1 inside.

    A corner patch is halved once [our choice: the released HHI code halves corners twice, its
    mask code once]. When the frame would cover the whole grid (``2 * border >= G``) nothing is
    scaled, as in the released code.
    """
    out = np.ones((grid, grid), np.float32)
    if 2 * border < grid:
        out[:border, :] = factor
        out[-border:, :] = factor
        out[:, :border] = factor
        out[:, -border:] = factor
    return out


def _correlate_same(maps: jax.Array, kernel: np.ndarray, pad_mode: str) -> jax.Array:
    """2-D cross-correlation of ``maps [..., G, G]`` with a small odd ``kernel``, output ``[..., G, G]``.

    ``pad_mode`` is ``"constant"`` (zeros, as torch ``padding=1``) or ``"edge"`` (replicate).
    """
    k = kernel.shape[0]
    r = k // 2
    pad = [(0, 0)] * (maps.ndim - 2) + [(r, r), (r, r)]
    padded = jnp.pad(maps, pad, mode=pad_mode)
    g_rows, g_cols = maps.shape[-2:]
    out = jnp.zeros(maps.shape, jnp.float32)
    for i in range(k):
        for j in range(k):
            if kernel[i, j] != 0.0:
                out = out + float(kernel[i, j]) * padded[..., i : i + g_rows, j : j + g_cols]
    return out


def _box_blur(maps: jax.Array, size: int) -> jax.Array:
    """Mean over a ``size x size`` window with replicate padding."""
    return _correlate_same(maps, np.full((size, size), 1.0 / size**2, np.float32), "edge")


def grid_side(num_image_tokens: int) -> int:
    """The side ``G`` of a square patch grid holding ``num_image_tokens`` tokens."""
    side = int(round(num_image_tokens**0.5))
    if side * side != num_image_tokens:
        raise ValueError(
            f"{num_image_tokens} image tokens do not form a square patch grid; expected G*G "
            "(e.g. 576 = 24*24 for LLaVA-1.5)"
        )
    return side


# ----------------------------------------------------------------------------------------------
# Layer scores
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("border", "threshold", "strength"))
def boundary_score(
    maps: jax.Array, *, border: int = 2, threshold: float = 0.6, strength: float = 2.0
) -> jax.Array:
    """Penalty for attention on the image frame: ``[..., G, G] -> [...]`` in [0, 1].

    ``r = mean(border frame) / mean(centre)``; score ``1 - min(1, strength (r - threshold))`` if
    ``r > threshold`` else 1. A map whose frame covers the grid scores 1.
    """
    maps = jnp.asarray(maps, jnp.float32)
    grid = maps.shape[-1]
    if 2 * border >= grid:
        return jnp.ones(maps.shape[:-2], jnp.float32)
    frame = border_factor(grid, border=border, factor=0.0) == 0.0
    mean_frame = jnp.mean(maps[..., frame], axis=-1)
    mean_centre = jnp.mean(maps[..., ~frame], axis=-1)
    eps = 1e-6
    ratio = jnp.where(
        mean_centre > eps,
        mean_frame / jnp.where(mean_centre > eps, mean_centre, 1.0),
        jnp.where(mean_frame > eps, jnp.inf, 1.0),
    )
    penalised = 1.0 - jnp.minimum(1.0, strength * (ratio - threshold))
    return jnp.where(ratio > threshold, jnp.maximum(penalised, 0.0), 1.0)


@functools.partial(jax.jit, static_argnames=("cutoff",))
def spectral_score(maps: jax.Array, depth: jax.Array, *, cutoff: float = 0.25) -> jax.Array:
    """How well the share of high-frequency energy matches the layer's depth: ``[..., G, G] -> [...]``.

    FFT2 of the min-max-normalised map, centred; ``fraction`` = energy at radius
    ``> cutoff * r_max`` (``r_max`` = distance from the centre bin to the corner) over all energy;
    score ``1 - |fraction - ideal|`` with ``ideal = 0.8 (1 - d) + 0.2 d``.

    Args:
      maps: ``[..., G, G]`` attention maps.
      depth: layer depth ``d`` in [0, 1], broadcastable to ``maps.shape[:-2]``.
    """
    maps = jnp.asarray(maps, jnp.float32)
    rows, cols = maps.shape[-2:]
    power = jnp.abs(jnp.fft.fftshift(jnp.fft.fft2(_minmax(maps, 2)), axes=(-2, -1))) ** 2
    cy, cx = rows // 2, cols // 2
    y = np.arange(rows)[:, None] - cy
    x = np.arange(cols)[None, :] - cx
    high = np.sqrt(x**2 + y**2) > cutoff * np.sqrt(cy**2 + cx**2)
    fraction = jnp.sum(jnp.where(high, power, 0.0), axis=(-2, -1)) / (
        jnp.sum(power, axis=(-2, -1)) + 1e-6
    )
    depth = jnp.asarray(depth, jnp.float32)
    ideal = 0.8 * (1.0 - depth) + 0.2 * depth
    return 1.0 - jnp.abs(fraction - ideal)


@jax.jit
def smoothness_score(maps: jax.Array) -> jax.Array:
    """``1 / (1 + mean Sobel gradient magnitude)`` (zero padding): ``[..., G, G] -> [...]``."""
    maps = jnp.asarray(maps, jnp.float32)
    gx = _correlate_same(maps, _SOBEL_X, "constant")
    gy = _correlate_same(maps, _SOBEL_X.T, "constant")
    return 1.0 / (1.0 + jnp.mean(jnp.sqrt(gx**2 + gy**2), axis=(-2, -1)))


@jax.jit
def concentration_score(maps: jax.Array) -> jax.Array:
    """``1 - H(A / sum A) / log N_p`` in [0, 1]: ``[..., G, G] -> [...]``; an all-zero map scores 0."""
    flat = jnp.asarray(maps, jnp.float32).reshape(*maps.shape[:-2], -1)
    total = jnp.sum(flat, axis=-1, keepdims=True)
    p = flat / jnp.where(total > 0, total, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    score = jnp.clip(1.0 - entropy / np.log(flat.shape[-1]), 0.0, 1.0)
    return jnp.where(total[..., 0] > 0, score, 0.0)


def depth_prior(depth: jax.Array, *, peak: float = 0.645) -> jax.Array:
    """``clip(1 - 4 (d - peak)^2, 0, 1)``; 0.645 = layer 20 of 32 (depth ``l / (L - 1)``)."""
    depth = jnp.asarray(depth, jnp.float32)
    return jnp.clip(1.0 - 4.0 * (depth - peak) ** 2, 0.0, 1.0)


def layer_depths(num_layers: int) -> jax.Array:
    """``d_l = l / (L - 1)`` for ``l = 0..L-1`` (a single layer has depth 0): ``[L]``."""
    return jnp.linspace(0.0, 1.0, num_layers) if num_layers > 1 else jnp.zeros((1,), jnp.float32)


@functools.partial(jax.jit, static_argnames=("weights",))
def layer_scores(
    layer_maps: jax.Array,
    *,
    depths: jax.Array | None = None,
    weights: Sequence[float] = LAYER_SCORE_WEIGHTS,
) -> jax.Array:
    """Weighted sum of the five layer scores: ``[..., L, G, G] -> [..., L]``.

    Args:
      layer_maps: per-layer maps ``A_l`` (already averaged over the K anchor steps).
      depths: ``[L]`` depth of each map in [0, 1]; default ``l / (L - 1)`` (every layer present).
      weights: boundary, spectral, smoothness, concentration, depth prior.
    """
    if len(weights) != 5:
        raise ValueError(f"weights={weights} must hold 5 numbers (boundary, spectral, "
                         "smoothness, concentration, depth prior)")
    layer_maps = jnp.asarray(layer_maps, jnp.float32)
    depths = layer_depths(layer_maps.shape[-3]) if depths is None else jnp.asarray(depths)
    w_b, w_s, w_m, w_c, w_d = (float(w) for w in weights)
    return (
        w_b * boundary_score(layer_maps)
        + w_s * spectral_score(layer_maps, depths)
        + w_m * smoothness_score(layer_maps)
        + w_c * concentration_score(layer_maps)
        + w_d * depth_prior(depths)
    )


def fusion_weights(scores: jax.Array, *, temperature: float = 10.0) -> jax.Array:
    """``softmax(temperature * minmax(scores))`` over the last (layer) axis: ``[..., L] -> [..., L]``."""
    return jax.nn.softmax(temperature * _minmax(jnp.asarray(scores, jnp.float32)), axis=-1)


@jax.jit
def visual_anchor(
    attention_history: jax.Array,
    *,
    depths: jax.Array | None = None,
    temperature: float = 10.0,
) -> jax.Array:
    """The fused visual anchor ``sum_l w_l A_l`` from the first K decoding steps.

    Args:
      attention_history: ``[..., L, K, N_img]`` head-mean text->image attention of every layer for
        each of the first K generated tokens (e.g. ``[B, L, K, N_img]``); ``N_img = G * G``.
      depths: ``[L]`` layer depths in [0, 1]; default ``l / (L - 1)``.
      temperature: the softmax scale of the fusion (10).

    Returns:
      ``[..., G, G]`` anchor map (same units as attention, not normalised).
    """
    history = jnp.asarray(attention_history, jnp.float32)
    if history.ndim < 3:
        raise ValueError(
            f"attention_history has shape {history.shape}; expected [..., L, K, N_img]"
        )
    grid = grid_side(history.shape[-1])
    layer_maps = jnp.mean(history, axis=-2).reshape(*history.shape[:-2], grid, grid)
    weights = fusion_weights(layer_scores(layer_maps, depths=depths), temperature=temperature)
    return jnp.einsum("...l,...lij->...ij", weights, layer_maps)


@functools.partial(jax.jit, static_argnames=("border", "threshold_percentile"))
def refined_mask(
    anchor: jax.Array,
    *,
    contrast: float = 10.0,
    border: int = 2,
    threshold_percentile: float | None = None,
) -> jax.Array:
    """The refined anchor mask in [0, 1]: ``[..., G, G] -> [..., G, G]``.

    Chain: min-max -> z-score (unbiased std) x ``contrast`` -> sigmoid -> 3x3 box blur (replicate
    padding) -> the ``border``-patch frame x 0.5 -> 5x5 box blur -> min-max. A constant map is 0.5
    after the sigmoid, so what is left is the frame attenuation (low at the edges, 1 inside).

    Args:
      threshold_percentile: None (METHODS.md's chain) or a quantile in (0, 1) below which values are
        zeroed before a last min-max, as the released code's ``revise_mask`` does (0.4) for the
        visually-enhanced image.
    """
    maps = _minmax(jnp.asarray(anchor, jnp.float32), 2)
    count = maps.shape[-1] * maps.shape[-2]
    mean = jnp.mean(maps, axis=(-2, -1), keepdims=True)
    std = jnp.sqrt(jnp.sum((maps - mean) ** 2, axis=(-2, -1), keepdims=True) / max(count - 1, 1))
    z = jnp.where(std > 0, (maps - mean) / jnp.where(std > 0, std, 1.0), 0.0)
    maps = _box_blur(jax.nn.sigmoid(contrast * z), 3)
    maps = _box_blur(maps * border_factor(maps.shape[-1], border=border), 5)
    maps = _minmax(maps, 2)
    if threshold_percentile is None:
        return maps
    flat = maps.reshape(*maps.shape[:-2], -1)
    cut = jnp.quantile(flat, threshold_percentile, axis=-1)[..., None, None]
    return _minmax(jnp.where(maps < cut, 0.0, maps), 2)


@functools.partial(jax.jit, static_argnames=("image_size",))
def upsample_mask(mask_grid: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """Bicubic upsampling of a ``[..., G, G]`` mask to ``[..., H, W]``, clipped to [0, 1].

    Args:
      image_size: ``(H, W)`` in pixels.
    """
    mask_grid = jnp.asarray(mask_grid, jnp.float32)
    height, width = image_size
    out = jax.image.resize(mask_grid, (*mask_grid.shape[:-2], height, width), method="bicubic")
    return jnp.clip(out, 0.0, 1.0)


def visually_enhance(image: jax.Array, pixel_mask: jax.Array, *, white: float = 1.0) -> jax.Array:
    """``I_VE = I * m + white * (1 - m)``.

    Args:
      image: ``[..., H, W, C]`` raw (un-normalised) pixels, e.g. in [0, 1] (``white=1``) or [0, 255]
        (``white=255``); apply before the CLIP normalisation.
      pixel_mask: ``[..., H, W]`` in [0, 1] (``upsample_mask`` of the refined mask).
    """
    m = jnp.asarray(pixel_mask, jnp.float32)[..., None]
    return jnp.asarray(image, jnp.float32) * m + white * (1.0 - m)


# ----------------------------------------------------------------------------------------------
# Decode-time modes on one step's attention rows
# ----------------------------------------------------------------------------------------------


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
