"""P2-DPO saliency, adaptive crop and pair filter (METHODS.md §5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.rewards import p2dpo

# ---------------------------------------------------------------------------------------------
# Adaptive crop
# ---------------------------------------------------------------------------------------------


def np_crop(saliency, width, height, base=336, ratios=(1, 1.2, 1.4, 1.6, 1.8, 2)):
    """METHODS.md §5 'Adaptive crop' with explicit loops (x outer, y inner, strict max)."""
    g_h, g_w = saliency.shape
    block_w, block_h = width / g_w, height / g_h
    best = None
    for r in ratios:
        n_w = max(1, min(int(base * r / block_w), g_w))
        n_h = max(1, min(int(base * r / block_h), g_h))
        if g_w - n_w < 1 and g_h - n_h < 1:
            if r == ratios[0]:
                return 0, 0, width, height
            continue
        sums = {}
        top, pos = -np.inf, None
        for x in range(g_w - n_w + 1):
            for y in range(g_h - n_h + 1):
                sums[x, y] = saliency[y : y + n_h, x : x + n_w].sum()
                if sums[x, y] > top:
                    top, pos = sums[x, y], (x, y)
        x, y = pos
        neighbours = [sums[n] for n in [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)] if n in sums]
        score = (top - np.mean(neighbours)) / (n_w * n_h)
        if best is None or score > best[0]:
            best = (score, r, pos, (n_w, n_h))
    _, r, (x, y), (n_w, n_h) = best
    half = (base * r) // 2
    cx = min(max(int(x * block_w + block_w * n_w / 2), half), width - half)
    cy = min(max(int(y * block_h + block_h * n_h / 2), half), height - half)
    return int(max(0, cx - half)), int(max(0, cy - half)), int(min(width, cx + half)), int(min(height, cy + half))


@pytest.mark.parametrize("seed,size", [(0, (672, 672)), (1, (1000, 700)), (2, (500, 900))])
def test_crop_matches_numpy_transcription(seed, size):
    saliency = np.random.default_rng(seed).gamma(0.5, size=(24, 24))
    assert p2dpo.adaptive_crop_box(saliency, image_size=size) == np_crop(saliency, *size)


def test_crop_is_centred_on_a_saliency_peak():
    # A blob centred on patch (row 11, col 9); blocks are 56 px, so its centre is (532, 644) px.
    rows, cols = np.mgrid[0:24, 0:24]
    saliency = np.exp(-((rows - 11) ** 2 + (cols - 9) ** 2) / (2 * 1.5**2))
    x0, y0, x1, y1 = p2dpo.adaptive_crop_box(saliency, image_size=(1344, 1344))
    assert (x1 - x0) == (y1 - y0) and (x1 - x0) in {int(336 * r) for r in (1, 1.2, 1.4, 1.6, 1.8, 2)}
    # An even window centres on a block edge, half a block from the blob's centre.
    assert abs((x0 + x1) / 2 - 532) <= 28 and abs((y0 + y1) / 2 - 644) <= 28


def test_crop_is_clamped_at_the_border():
    saliency = np.full((24, 24), 1e-3)
    saliency[0, 23] = 1.0  # top-right corner patch
    x0, y0, x1, y1 = p2dpo.adaptive_crop_box(saliency, image_size=(1344, 1344))
    assert y0 == 0 and x1 == 1344 and (x1 - x0) == (y1 - y0) >= 336


def test_window_covering_the_whole_grid_means_the_full_image():
    saliency = np.random.default_rng(3).random((24, 24))
    assert p2dpo.adaptive_crop_box(saliency, image_size=(336, 336)) == (0, 0, 336, 336)
    assert p2dpo.adaptive_crop_box(saliency, image_size=(300, 200)) == (0, 0, 300, 200)


def test_crop_rejects_a_batch():
    with pytest.raises(ValueError, match=r"\(2, 24, 24\)"):
        p2dpo.adaptive_crop_box(np.ones((2, 24, 24)), image_size=(672, 672))


# ---------------------------------------------------------------------------------------------
# Saliency
# ---------------------------------------------------------------------------------------------


def test_saliency_map_reads_the_query_row_and_means_heads():
    rng = np.random.default_rng(4)
    attention = rng.uniform(0, 1, (2, 3, 5, 16)).astype(np.float32)
    grad = rng.normal(size=(2, 3, 5, 16)).astype(np.float32)
    query = np.array([4, 2])
    plain = p2dpo.saliency_map(attention, query, mode="attention")
    graded = p2dpo.saliency_map(attention, query, mode="grad_attention", attention_grad=grad)
    for b in range(2):
        np.testing.assert_allclose(plain[b], attention[b, :, query[b]].mean(0).reshape(4, 4), rtol=1e-6)
        expected = (attention[b, :, query[b]] * np.maximum(grad[b, :, query[b]], 0)).mean(0)
        np.testing.assert_allclose(graded[b], expected.reshape(4, 4), rtol=1e-6)
    with pytest.raises(ValueError, match="attention_grad"):
        p2dpo.saliency_map(attention, query)


def test_saliency_objective_is_minus_ce_of_the_argmax_and_differentiates():
    logits = jnp.array([[1.0, 3.0, 0.0], [2.0, -1.0, 0.5]])
    expected = sum(float(jax.nn.log_softmax(row)[int(jnp.argmax(row))]) for row in logits)
    np.testing.assert_allclose(p2dpo.saliency_objective(logits), expected, rtol=1e-6)
    grad = jax.grad(p2dpo.saliency_objective)(logits)
    np.testing.assert_allclose(grad[0], jnp.eye(3)[1] - jax.nn.softmax(logits[0]), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Filtering
# ---------------------------------------------------------------------------------------------


def pair(mean_w, mean_l, length=4, total=6):
    """Token log-probs with the given means over `length` tokens, garbage beyond."""
    tokens = np.full((2, total), np.nan, np.float32)
    tokens[:, length:] = -np.inf
    tokens[0, :length] = mean_w + np.linspace(-0.01, 0.01, length)
    tokens[1, :length] = mean_l + np.linspace(0.01, -0.01, length)
    mask = np.zeros((2, total), bool)
    mask[:, :length] = True
    return tokens, mask


def test_pair_filter_drops_exactly_the_pairs_outside_the_thresholds():
    log25 = math.log(2.5)
    cases = [  # (mean logp chosen, mean logp rejected, expected reason)
        (-0.5, -0.5, "kept"),
        (-0.3, -0.5, "kept"),  # margin 0.2 <= 0.208
        (-0.5, -0.326, "kept"),  # margin -0.174 (inclusive)
        (-0.28, -0.5, "margin"),  # margin 0.22
        (-0.5, -0.3, "margin"),  # margin -0.2
        (-log25 - 0.01, -log25 - 0.01, "perplexity"),  # PPL just above 2.5
        (-0.1, -log25 - 0.05, "perplexity"),  # one side only, margin also off: perplexity first
        (-log25 + 0.01, -log25 + 0.01, "kept"),  # PPL just below 2.5
        (-0.5, -0.5, "empty"),  # the chosen response has no tokens
    ]
    chosen, chosen_mask, rejected, rejected_mask = [], [], [], []
    for mean_w, mean_l, expected in cases:
        tokens, mask = pair(mean_w, mean_l)
        if expected == "empty":
            mask[0] = False
        chosen.append(tokens[0]), rejected.append(tokens[1])
        chosen_mask.append(mask[0]), rejected_mask.append(mask[1])
    keep, reason = p2dpo.pair_filter(
        np.stack(chosen), np.stack(chosen_mask), np.stack(rejected), np.stack(rejected_mask)
    )
    assert [p2dpo.FILTER_REASONS[int(r)] for r in reason] == [c[2] for c in cases]
    np.testing.assert_array_equal(keep, [c[2] == "kept" for c in cases])
