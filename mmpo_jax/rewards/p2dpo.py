"""P2-DPO's saliency map, adaptive crop and pair filter (METHODS.md §5; its DDW weights are part
of the loss, ``objectives.p2dpo.ddw_weights``).

``saliency_map``, ``saliency_objective`` and ``pair_filter`` are pure ``jnp``
functions (jittable, batched). ``adaptive_crop_box`` is NumPy: it runs once per example during pair
generation, outside any jitted step, and returns Python ints for PIL-style cropping.

The crop search transcribes the released code (github.com/ZrpChuang/P2-DPO,
``Data_gen/focus_pair/utils.py``, itself ViCrop's ``bbox_from_att_image_adaptive``), including its
tie-breaking (first maximum scanning x, then y) and its clamping of the centre.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmpo_jax.objectives.logprobs import sequence_logps
from mmpo_jax.rewards.adapt import grid_side

SALIENCY_MODES = ("grad_attention", "attention")
FILTER_REASONS = ("kept", "perplexity", "margin", "empty")
"""``pair_filter`` reason codes index this tuple."""


def saliency_objective(last_logits: jax.Array) -> jax.Array:
    """The scalar whose gradient w.r.t. the attention gives the ``grad_attention`` saliency.

    ``-CE(logits_last, argmax(logits_last))`` per example, summed over the batch (a sum, not
    torch's mean, so each example's gradient is what a batch of one would give).

    Args:
      last_logits: ``[B, V]`` logits at the last prompt position.
    """
    logp = jax.nn.log_softmax(jnp.asarray(last_logits, jnp.float32), axis=-1)
    target = jax.lax.stop_gradient(jnp.argmax(logp, axis=-1))
    return jnp.sum(jnp.take_along_axis(logp, target[:, None], axis=-1))


def saliency_map(
    image_attention: jax.Array,
    query_index: jax.Array,
    *,
    mode: str = "grad_attention",
    attention_grad: jax.Array | None = None,
) -> jax.Array:
    """Head-mean saliency of the image patches from one query row, on the patch grid.

    ``grad_attention``: ``mean_h A_h * relu(dL/dA_h)`` (per head, then the mean, as the released
    code); ``attention``: ``mean_h A_h``.

    Args:
      image_attention: ``[B, H, T, N_img]`` post-softmax attention from every query to the image
        keys at the saliency layer (the model's ``"image_heads"`` probe).
      query_index: ``[B]`` int, the row to read (the last prompt position).
      mode: one of ``SALIENCY_MODES``.
      attention_grad: ``[B, H, T, N_img]`` gradient of ``saliency_objective`` w.r.t.
        ``image_attention``; required for ``grad_attention``.

    Returns:
      ``[B, G, G]`` float32 saliency, ``G * G = N_img``.
    """
    if mode not in SALIENCY_MODES:
        raise ValueError(f"mode={mode!r} is not one of {SALIENCY_MODES}")
    attention = jnp.asarray(image_attention, jnp.float32)
    if attention.ndim != 4:
        raise ValueError(f"image_attention has shape {attention.shape}; expected [B, H, T, N_img]")
    if mode == "grad_attention":
        if attention_grad is None:
            raise ValueError("mode='grad_attention' needs attention_grad (dL/dA); got None")
        attention = attention * jax.nn.relu(jnp.asarray(attention_grad, jnp.float32))
    index = jnp.asarray(query_index, jnp.int32)[:, None, None, None]
    row = jnp.take_along_axis(attention, index, axis=2)[:, :, 0, :]  # [B, H, N_img]
    grid = grid_side(row.shape[-1])
    return jnp.mean(row, axis=1).reshape(row.shape[0], grid, grid)


def _window_sums(saliency: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Sums of every ``rows x cols`` window: ``[G - rows + 1, G - cols + 1]`` (integral image)."""
    integral = np.pad(np.cumsum(np.cumsum(saliency, axis=0), axis=1), ((1, 0), (1, 0)))
    return (
        integral[rows:, cols:]
        - integral[:-rows, cols:]
        - integral[rows:, :-cols]
        + integral[:-rows, :-cols]
    )


def adaptive_crop_box(
    saliency: np.ndarray,
    *,
    image_size: tuple[int, int],
    base_box: float = 336,
    ratios: Sequence[float] = (1, 1.2, 1.4, 1.6, 1.8, 2),
) -> tuple[int, int, int, int]:
    """The crop box around the most salient region (NumPy; data generation only, not jittable).

    For each ratio ``r``: a window of ``min(int(base_box * r / block), G)`` blocks per axis
    (``block`` = image side / grid side, at least 1 block [our choice: guards images whose block
    exceeds the box]), slid to its maximal summed saliency; score = (that sum minus the mean of the
    up-to-4 neighbouring window sums) / blocks in the window. The best ratio's square box of side
    ``base_box * r`` is centred on its window and clamped to the image. If the first ratio's
    window already covers the whole grid the box is the full image; later ratios that cover it are
    skipped.

    Args:
      saliency: ``[G_h, G_w]`` saliency on the patch grid (``saliency_map`` of one example).
      image_size: ``(width, height)`` in pixels of the image the box is for.
      base_box: the base box side in pixels (the model's input side, 336 for LLaVA-1.5).
      ratios: the window scales tried, in order (ties keep the first).

    Returns:
      ``(x0, y0, x1, y1)`` ints, ``0 <= x0 < x1 <= width``, ``0 <= y0 < y1 <= height``.
    """
    saliency = np.asarray(saliency, np.float64)
    if saliency.ndim != 2:
        raise ValueError(f"saliency has shape {saliency.shape}; expected one [G, G] map")
    width, height = image_size
    grid_h, grid_w = saliency.shape
    block_w, block_h = width / grid_w, height / grid_h
    candidates = []  # (score, ratio, (x, y) window origin in blocks, (blocks_w, blocks_h))
    for ratio in ratios:
        blocks_w = max(1, min(int(base_box * ratio / block_w), grid_w))
        blocks_h = max(1, min(int(base_box * ratio / block_h), grid_h))
        if grid_w - blocks_w < 1 and grid_h - blocks_h < 1:
            if ratio == ratios[0]:
                return 0, 0, int(width), int(height)
            continue
        sums = _window_sums(saliency, blocks_h, blocks_w)
        # Scan order of the released code: x outer, y inner, first strict maximum.
        x, y = np.unravel_index(np.argmax(sums.T), sums.T.shape)
        neighbours = [
            sums[y, x - 1] if x > 0 else None,
            sums[y, x + 1] if x < sums.shape[1] - 1 else None,
            sums[y - 1, x] if y > 0 else None,
            sums[y + 1, x] if y < sums.shape[0] - 1 else None,
        ]
        neighbour_mean = np.mean([n for n in neighbours if n is not None])
        score = (sums[y, x] - neighbour_mean) / (blocks_w * blocks_h)
        candidates.append((score, ratio, (int(x), int(y)), (blocks_w, blocks_h)))
    best = int(np.argmax([c[0] for c in candidates]))
    _, ratio, (x, y), (blocks_w, blocks_h) = candidates[best]
    side = base_box * ratio
    half = side // 2
    x_centre = int(x * block_w + block_w * blocks_w / 2)
    y_centre = int(y * block_h + block_h * blocks_h / 2)
    x_centre = min(max(x_centre, half), width - half)
    y_centre = min(max(y_centre, half), height - half)
    return (
        int(max(0, x_centre - half)),
        int(max(0, y_centre - half)),
        int(min(width, x_centre + half)),
        int(min(height, y_centre + half)),
    )


def pair_filter(
    chosen_token_logps: jax.Array,
    chosen_mask: jax.Array,
    rejected_token_logps: jax.Array,
    rejected_mask: jax.Array,
    *,
    max_perplexity: float = 2.5,
    margin_range: tuple[float, float] = (-0.174, 0.208),
) -> tuple[jax.Array, jax.Array]:
    """Which generated pairs to keep, by reference perplexity and mean-logp margin.

    A pair is dropped (reason ``perplexity``) if ``max(PPL_w, PPL_l) >= max_perplexity`` with
    ``PPL = exp(-mean token logp under M_ref)``, else dropped (reason ``margin``) unless
    ``mean logp(y_w) - mean logp(y_l)`` lies in ``margin_range`` (inclusive), as the released
    ``filter_pairs.py``. A pair with an empty response is dropped first (reason ``empty``) [our
    choice: its mean log-prob would read as 0, a perplexity of 1].

    Args:
      chosen_token_logps, rejected_token_logps: ``[N, T]`` reference per-token log-probs.
      chosen_mask, rejected_mask: ``[N, T]`` response masks.

    Returns:
      ``(keep [N] bool, reason [N] int32)``; ``FILTER_REASONS[reason]`` names it.
    """
    mean_w = sequence_logps(chosen_token_logps, chosen_mask, reduction="mean")
    mean_l = sequence_logps(rejected_token_logps, rejected_mask, reduction="mean")
    too_perplexing = jnp.exp(-jnp.minimum(mean_w, mean_l)) >= max_perplexity
    margin = mean_w - mean_l
    low, high = margin_range
    outside = (margin < low) | (margin > high)
    empty = ~jnp.any(jnp.asarray(chosen_mask) > 0, axis=-1) | ~jnp.any(
        jnp.asarray(rejected_mask) > 0, axis=-1
    )
    reason = jnp.select([empty, too_perplexing, outside], [3, 1, 2], 0).astype(jnp.int32)
    return reason == 0, reason
