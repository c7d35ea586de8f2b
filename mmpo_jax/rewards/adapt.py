"""ADAPT's visual anchor, refined mask and visually-enhanced image (METHODS.md §4).

Everything here is a pure ``jnp`` function, vectorised over any leading axes; the public ones are
wrapped in ``jax.jit`` (integer/structural hyper-parameters static) so that eager calls, e.g. in
data generation, compile once instead of op by op.

Layout: a text->image attention map over one image is a patch grid ``[G, G]`` in row-major order
(image token ``j`` sits at row ``j // G``, column ``j % G``, LLaVA's order). The decode-time modes
that use the anchor live in ``rewards.adapt_modes``.

- Anchor: ``visual_anchor`` scores every layer's map (boundary, spectral, smoothness,
  concentration, depth prior), fuses them with ``softmax(10 * minmax(scores))`` and
  ``refined_mask`` turns the anchor into a soft foreground mask in [0, 1].
- VAG-DPO's enhanced image ``I*m + white*(1-m)`` is ``data.interventions.visually_enhance``.

Where the released code (github.com/yao-ustc/ADAPT) fixes what METHODS.md leaves open, it is
followed: the z-score uses the unbiased std, Sobel and the spectral radius are as there, the box
blurs pad by replication. Choices of ours are marked [our choice].

Grid size [our choice, METHODS.md §4]: the sizes in patches of the refinement chain (the 3x3 and
5x5 box blurs, the 2-patch frame halved) and of the boundary score (the 2-patch frame) are stated
for LLaVA-1.5's 24x24 grid and scaled by ``G / 24`` on a grid of side ``G``:

- the blurs to the nearest odd size, at least 1 (``scaled_kernel``): 3 and 5 at 24, 1 and 3 at 12,
  1 and 1 (the identity) at 8 and at v1's 4;
- the frame as what it is in the image, the outer ``2 / 24`` of the side on each edge: a patch
  belongs to it by the share of its area inside (``frame_share``; binary at 24, where it is exactly
  the 2-patch frame, and wherever the band ends on a patch edge, e.g. 1 patch at 12). The frame
  attenuation multiplies a patch by ``1 - 0.5 * share`` and the boundary score weighs each patch
  into the frame and centre means by its share. Rounding the frame to whole patches instead (1
  patch below ``G = 18``) measured worse on the shapes world v2 (8x8 grid, oracle anchor of each
  patch's true object coverage, 512 preference images, threshold 0.4): objects kept in ``I_VE``
  (mean mask >= 0.5 over the box) 90.5 % with a 1-patch frame halved, 96.2 % with the frame share
  (background whitened 88 % either way); unscaled (a 2-patch frame, 3x3 and 5x5 blurs on 8x8)
  79.6 %, background whitened 66 %.

So at ``G = 24`` every number is METHODS.md's exactly. Every other constant of the chain is already
relative to the grid and kept: the 40 % quantile of ``threshold_percentile`` (a fraction of the
patches), the spectral cut-off (a fraction of the largest radius), the concentration (entropy over
``log N_p``). ``scale_to_grid=False`` applies the sizes as whole patches of this grid (the chain
before this choice; on a 4x4 grid its 2-patch frame covers the whole grid and ``boundary_score``
is always 1). With the scaled frame the boundary score has frame and centre on every grid of side
>= 2, so it discriminates on every grid >= 6x6 (edge patches half in the frame at 6). The
decode-time HHI of ``rewards.adapt_modes`` takes its whole-patch frame width from its caller.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmpo_jax.rewards.catpo import minmax_normalize

LLAVA_GRID = 24
"""The grid side the sizes of METHODS.md §4 are stated for (LLaVA-1.5: 336 px / 14 px patches)."""
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


def scaled_kernel(size: int, grid: int) -> int:
    """A kernel size in patches stated for the 24x24 grid, on a grid of side ``grid``: the odd
    integer nearest to ``size * grid / 24`` (halves up), at least 1; ``size`` itself at 24."""
    value = size * grid / LLAVA_GRID
    return max(1, int(2 * math.floor((value - 1) / 2 + 0.5) + 1))


def frame_share(grid: int, *, border: float = 2, scale_to_grid: bool = True) -> np.ndarray:
    """``[G, G]`` share in [0, 1] of each patch's area inside the ``border``-patch frame.

    ``scale_to_grid``: the frame is the outer ``border / 24`` of the image side on each edge (the
    24x24 grid's frame, in image units; module docstring), computed exactly (integer arithmetic in
    units of ``1 / (24 G)`` of the side), so it is binary at ``G = 24``. Otherwise the
    ``border``-patch frame of this grid, binary, empty when it would cover the grid
    (``border_factor``).
    """
    if not scale_to_grid:
        return (border_factor(grid, border=int(border), factor=0.0) == 0.0).astype(np.float32)
    band = border * grid  # the frame's width in units of 1 / (24 G) of the side; a patch is 24
    low = LLAVA_GRID * np.arange(grid)
    inside = np.clip(np.minimum(low + LLAVA_GRID, LLAVA_GRID * grid - band) - np.maximum(low, band),
                     0, None) / LLAVA_GRID  # share of each row (column) of patches in the centre band
    return (1.0 - np.outer(inside, inside)).astype(np.float32)


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


@functools.partial(jax.jit, static_argnames=("border", "threshold", "strength", "scale_to_grid"))
def boundary_score(
    maps: jax.Array, *, border: int = 2, threshold: float = 0.6, strength: float = 2.0,
    scale_to_grid: bool = True,
) -> jax.Array:
    """Penalty for attention on the image frame: ``[..., G, G] -> [...]`` in [0, 1].

    ``r = mean(border frame) / mean(centre)``; score ``1 - min(1, strength (r - threshold))`` if
    ``r > threshold`` else 1. A map whose frame covers the grid scores 1. ``border`` is in patches
    of the 24x24 grid, the frame scaled to ``G`` (``frame_share``, each patch weighed into both
    means by its share) unless ``scale_to_grid=False``.
    """
    maps = jnp.asarray(maps, jnp.float32)
    share = frame_share(maps.shape[-1], border=border, scale_to_grid=scale_to_grid)
    if not share.any() or share.all():  # no frame, or no centre
        return jnp.ones(maps.shape[:-2], jnp.float32)
    if np.isin(share, (0.0, 1.0)).all():  # whole patches: plain means, as METHODS.md states them
        frame = share == 1.0
        mean_frame = jnp.mean(maps[..., frame], axis=-1)
        mean_centre = jnp.mean(maps[..., ~frame], axis=-1)
    else:  # each patch weighs into both means by its share
        mean_frame = jnp.sum(maps * share, axis=(-2, -1)) / share.sum()
        mean_centre = jnp.sum(maps * (1.0 - share), axis=(-2, -1)) / (1.0 - share).sum()
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


@functools.partial(jax.jit, static_argnames=("border", "blur_sizes", "threshold_percentile",
                                             "scale_to_grid"))
def refined_mask(
    anchor: jax.Array,
    *,
    contrast: float = 10.0,
    border: int = 2,
    blur_sizes: tuple[int, int] = (3, 5),
    threshold_percentile: float | None = None,
    scale_to_grid: bool = True,
) -> jax.Array:
    """The refined anchor mask in [0, 1]: ``[..., G, G] -> [..., G, G]``.

    Chain: min-max -> z-score (unbiased std) x ``contrast`` -> sigmoid -> 3x3 box blur (replicate
    padding) -> the ``border``-patch frame x 0.5 -> 5x5 box blur -> min-max. A constant map is 0.5
    after the sigmoid, so what is left is the frame attenuation (low at the edges, 1 inside).

    Args:
      border, blur_sizes: the frame width and the two blur kernels in patches of the 24x24 grid,
        scaled to ``G`` (module docstring: the frame by ``frame_share``, a patch multiplied by
        ``1 - 0.5 share``; the kernels by ``scaled_kernel``) unless ``scale_to_grid=False``.
      threshold_percentile: None (METHODS.md's chain) or a quantile in (0, 1) below which values are
        zeroed before a last min-max, as the released code's ``revise_mask`` does (0.4) for the
        visually-enhanced image (a fraction of the patches: the same on every grid).
    """
    maps = _minmax(jnp.asarray(anchor, jnp.float32), 2)
    grid = maps.shape[-1]
    first_blur, second_blur = blur_sizes
    if scale_to_grid:
        first_blur, second_blur = (scaled_kernel(k, grid) for k in blur_sizes)
    attenuation = 1.0 - 0.5 * frame_share(grid, border=border, scale_to_grid=scale_to_grid)
    count = maps.shape[-1] * maps.shape[-2]
    mean = jnp.mean(maps, axis=(-2, -1), keepdims=True)
    std = jnp.sqrt(jnp.sum((maps - mean) ** 2, axis=(-2, -1), keepdims=True) / max(count - 1, 1))
    z = jnp.where(std > 0, (maps - mean) / jnp.where(std > 0, std, 1.0), 0.0)
    maps = _box_blur(jax.nn.sigmoid(contrast * z), first_blur)
    maps = _box_blur(maps * attenuation, second_blur)
    maps = _minmax(maps, 2)
    if threshold_percentile is None:
        return maps
    flat = maps.reshape(*maps.shape[:-2], -1)
    cut = jnp.quantile(flat, threshold_percentile, axis=-1)[..., None, None]
    return _minmax(jnp.where(maps < cut, 0.0, maps), 2)
