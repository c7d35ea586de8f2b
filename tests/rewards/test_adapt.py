"""ADAPT anchor, refined mask and decode-time modes against NumPy transcriptions of METHODS.md §4."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.rewards import adapt

# ---------------------------------------------------------------------------------------------
# NumPy transcription of METHODS.md §4 (loops, one map at a time)
# ---------------------------------------------------------------------------------------------


def np_minmax(x):
    span = x.max() - x.min()
    return np.full_like(x, 0.5) if span == 0 else (x - x.min()) / span


def np_frame(grid, border=2):
    frame = np.zeros((grid, grid), bool)
    for i in range(grid):
        for j in range(grid):
            frame[i, j] = i < border or j < border or i >= grid - border or j >= grid - border
    return frame


def np_boundary(a):
    frame = np_frame(a.shape[0])
    r = a[frame].mean() / a[~frame].mean()
    return 1 - min(1.0, 2 * (r - 0.6)) if r > 0.6 else 1.0


def np_spectral(a, d):
    power = np.abs(np.fft.fftshift(np.fft.fft2(np_minmax(a)))) ** 2
    g = a.shape[0]
    c = g // 2
    r_max = math.sqrt(c * c + c * c)
    high = 0.0
    for i in range(g):
        for j in range(g):
            if math.sqrt((i - c) ** 2 + (j - c) ** 2) > 0.25 * r_max:
                high += power[i, j]
    fraction = high / (power.sum() + 1e-6)
    return 1 - abs(fraction - (0.8 * (1 - d) + 0.2 * d))


def np_correlate(a, kernel, mode):
    k = kernel.shape[0] // 2
    padded = np.pad(a, k, mode=mode)
    out = np.zeros_like(a)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i, j] = (padded[i : i + 2 * k + 1, j : j + 2 * k + 1] * kernel).sum()
    return out


SOBEL = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)


def np_smoothness(a):
    gx = np_correlate(a, SOBEL, "constant")
    gy = np_correlate(a, SOBEL.T, "constant")
    return 1 / (1 + np.sqrt(gx**2 + gy**2).mean())


def np_concentration(a):
    p = a.reshape(-1) / a.sum()
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    return 1 - entropy / math.log(p.size)


def np_depth_prior(d):
    return min(1.0, max(0.0, 1 - 4 * (d - 0.645) ** 2))


def np_anchor(history):
    """history [L, K, N] -> anchor [G, G]."""
    num_layers = history.shape[0]
    g = int(round(math.sqrt(history.shape[-1])))
    maps = [history[l].mean(axis=0).reshape(g, g) for l in range(num_layers)]
    scores = []
    for l, a in enumerate(maps):
        d = l / (num_layers - 1)
        scores.append(
            0.25 * np_boundary(a)
            + 0.30 * np_spectral(a, d)
            + 0.15 * np_smoothness(a)
            + 0.20 * np_concentration(a)
            + 0.10 * np_depth_prior(d)
        )
    s = np_minmax(np.array(scores))
    w = np.exp(10 * s) / np.exp(10 * s).sum()
    return sum(w[l] * maps[l] for l in range(num_layers))


def np_refined(anchor):
    m = np_minmax(anchor)
    z = (m - m.mean()) / m.std(ddof=1) * 10
    m = 1 / (1 + np.exp(-z))
    m = np_correlate(m, np.full((3, 3), 1 / 9), "edge")
    m = np.where(np_frame(m.shape[0]), m * 0.5, m)
    m = np_correlate(m, np.full((5, 5), 1 / 25), "edge")
    return np_minmax(m)


def random_history(seed, batch=None, layers=4, steps=3, grid=8):
    rng = np.random.default_rng(seed)
    shape = (layers, steps, grid * grid) if batch is None else (batch, layers, steps, grid * grid)
    return rng.dirichlet(np.ones(grid * grid), size=shape[:-1]).astype(np.float32) * 0.6


# ---------------------------------------------------------------------------------------------
# Anchor and mask
# ---------------------------------------------------------------------------------------------


def test_layer_scores_match_numpy_transcription():
    maps = np.asarray(random_history(0).mean(axis=1).reshape(4, 8, 8), np.float64)
    depths = np.linspace(0, 1, 4)
    got = {
        "boundary": adapt.boundary_score(maps),
        "spectral": adapt.spectral_score(maps, depths),
        "smoothness": adapt.smoothness_score(maps),
        "concentration": adapt.concentration_score(maps),
        "depth": adapt.depth_prior(depths),
    }
    expected = {
        "boundary": [np_boundary(a) for a in maps],
        "spectral": [np_spectral(a, d) for a, d in zip(maps, depths)],
        "smoothness": [np_smoothness(a) for a in maps],
        "concentration": [np_concentration(a) for a in maps],
        "depth": [np_depth_prior(d) for d in depths],
    }
    for name in got:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_boundary_score_hand_cases():
    inside = np.zeros((8, 8), np.float32)
    inside[2:6, 2:6] = 1.0
    assert float(adapt.boundary_score(inside)) == 1.0  # r = 0
    flat = np.ones((8, 8), np.float32)
    np.testing.assert_allclose(adapt.boundary_score(flat), 1 - 2 * (1 - 0.6), rtol=1e-6)  # r = 1
    frame_only = 1.0 - inside
    assert float(adapt.boundary_score(frame_only)) == 0.0  # r = inf, fully penalised


def test_visual_anchor_and_refined_mask_match_numpy_transcription():
    history = random_history(1, batch=2)
    anchor = adapt.visual_anchor(history)
    mask = adapt.refined_mask(anchor)
    for b in range(2):
        expected_anchor = np_anchor(history[b].astype(np.float64))
        np.testing.assert_allclose(anchor[b], expected_anchor, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(mask[b], np_refined(expected_anchor), rtol=1e-4, atol=1e-5)


def test_depth_prior_peaks_near_layer_20_of_32():
    prior = adapt.depth_prior(adapt.layer_depths(32))
    assert int(jnp.argmax(prior)) == 20
    assert float(prior[0]) == 0.0 and float(prior[20]) > 0.99


def test_anchor_and_mask_peak_on_the_attended_region():
    grid, rng = 12, np.random.default_rng(2)
    history = rng.uniform(0.0, 1e-4, size=(6, 5, grid * grid)).astype(np.float32)
    region = np.zeros((grid, grid), bool)
    region[3:6, 6:9] = True
    history[..., region.reshape(-1)] += 0.05
    anchor = adapt.visual_anchor(history)
    mask = adapt.refined_mask(anchor)
    assert region[np.unravel_index(int(jnp.argmax(anchor)), (grid, grid))]
    assert region[np.unravel_index(int(jnp.argmax(mask)), (grid, grid))]
    assert float(mask[region].mean()) > 0.8 > 0.2 > float(mask[~region].mean())


def test_refined_mask_threshold_option_zeroes_the_low_percentile():
    anchor = adapt.visual_anchor(random_history(3))
    mask = adapt.refined_mask(anchor, threshold_percentile=0.4)
    base = adapt.refined_mask(anchor)
    zeroed = np.asarray(base) < np.quantile(np.asarray(base), 0.4)
    assert np.all(np.asarray(mask)[zeroed] == 0.0)
    assert float(mask.max()) == 1.0


def test_degenerate_maps_are_finite():
    zeros = np.zeros((3, 2, 64), np.float32)
    anchor = adapt.visual_anchor(zeros)
    mask = adapt.refined_mask(anchor)
    assert np.all(np.isfinite(anchor)) and np.all(np.isfinite(mask))
    # Only the frame attenuation is left: 0 in the corner, 1 in the centre.
    np.testing.assert_allclose([mask[0, 0], mask[4, 4]], [0.0, 1.0], atol=1e-5)
    assert np.all(np.isfinite(adapt.visual_anchor(np.ones((1, 1, 64), np.float32))))


def test_upsample_and_visual_enhancement():
    mask = adapt.refined_mask(adapt.visual_anchor(random_history(4)))
    pixels = adapt.upsample_mask(mask, (32, 40))
    assert pixels.shape == (32, 40)
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    np.testing.assert_allclose(adapt.upsample_mask(jnp.full((8, 8), 0.3), (16, 16)), 0.3, rtol=1e-6)
    image = np.random.default_rng(5).uniform(0, 1, (16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(adapt.visually_enhance(image, jnp.ones((16, 16))), image)
    np.testing.assert_allclose(adapt.visually_enhance(image, jnp.zeros((16, 16))), 1.0)
    half = adapt.visually_enhance(image * 255, jnp.full((16, 16), 0.5), white=255.0)
    np.testing.assert_allclose(half, image * 255 * 0.5 + 127.5, rtol=1e-5)


def test_jit_equals_eager_for_the_anchor_chain():
    history = random_history(6, batch=2)
    eager = adapt.refined_mask(adapt.visual_anchor(history))
    jitted = jax.jit(lambda h: adapt.refined_mask(adapt.visual_anchor(h)))(history)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


def test_history_with_non_square_token_count_is_rejected():
    with pytest.raises(ValueError, match="square patch grid"):
        adapt.visual_anchor(np.ones((2, 1, 10), np.float32))


# ---------------------------------------------------------------------------------------------
# Decode-time modes
# ---------------------------------------------------------------------------------------------

GRID, N_IMG, T_KV = 6, 36, 44


def attention_step(seed, heads=2, queries=2):
    """probs [2, H, Tq, Tkv]: example 0 has its 36 image keys at 3..38, example 1 has none."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(2, heads, queries, T_KV)).astype(np.float32)
    key_is_image = np.zeros((2, T_KV), bool)
    key_is_image[0, 3 : 3 + N_IMG] = True
    anchor = rng.uniform(0, 1, size=(2, N_IMG)).astype(np.float32)
    return logits, jax.nn.softmax(logits, axis=-1), key_is_image, anchor


def assert_rows_are_distributions(probs):
    assert np.all(np.asarray(probs) >= 0)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def np_steer(probs, key_is_image, anchor, tau, alpha):
    out = np.array(probs, np.float64)
    image_cols = np.flatnonzero(key_is_image)
    w = anchor / anchor.max()
    for q in range(probs.shape[1]):
        a = probs[:, q, image_cols].mean(axis=0)
        s_amc = (a**2 * w).sum() / (a.sum() ** 2 + 1e-9)
        if s_amc < tau:
            for h in range(probs.shape[0]):
                row = out[h, q].copy()
                row[image_cols] *= np.exp(alpha * np.log(w + 1e-9))
                out[h, q] = row / row.sum()
    return out


@pytest.mark.parametrize("tau", [0.0, 0.6, 2.0])
def test_steer_matches_transcription_and_equals_biased_softmax(tau):
    logits, probs, key_is_image, anchor = attention_step(0)
    steered = adapt.steer(probs, key_is_image, anchor, tau=tau, alpha=0.5)
    bias = adapt.steer_bias(probs, key_is_image, anchor, tau=tau, alpha=0.5)
    np.testing.assert_allclose(steered, jax.nn.softmax(logits + bias, axis=-1), rtol=1e-5, atol=1e-7)
    expected = np_steer(np.asarray(probs[0], np.float64), key_is_image[0], anchor[0], tau, 0.5)
    np.testing.assert_allclose(steered[0], expected, rtol=1e-5, atol=1e-7)
    assert_rows_are_distributions(steered)
    np.testing.assert_array_equal(steered[1], probs[1])  # text-only example untouched


def test_steer_with_tau_that_never_fires_is_the_identity():
    _, probs, key_is_image, anchor = attention_step(1)
    assert np.all(np.asarray(adapt.steer_bias(probs, key_is_image, anchor, tau=-1.0)) == 0.0)
    np.testing.assert_array_equal(adapt.steer(probs, key_is_image, anchor, tau=-1.0), probs)


def test_steer_keeps_text_ratios_and_moves_mass_towards_the_anchor():
    _, probs, key_is_image, anchor = attention_step(2)
    steered = np.asarray(adapt.steer(probs, key_is_image, anchor, tau=10.0))
    text = ~key_is_image[0]
    ratio = steered[0][..., text] / np.asarray(probs[0])[..., text]
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-5)
    top = 3 + int(np.argmax(anchor[0]))
    assert np.all(steered[0][..., top] >= np.asarray(probs[0])[..., top])


def test_amc_and_hhi_hand_cases():
    np.testing.assert_allclose(adapt.amc_score(jnp.array([0.5, 0.5, 0.0]), jnp.array([1.0, 0.0, 1.0])), 0.25, rtol=1e-6)
    image_map = np.zeros((8, 8), np.float32)
    image_map[0, 0], image_map[4, 4] = 0.4, 0.6  # the frame value is halved before squaring
    np.testing.assert_allclose(adapt.hhi(image_map), 0.2**2 + 0.6**2, rtol=1e-6)


def np_blend(probs, key_is_image, anchor, hhi_base, strength=0.4):
    image_cols = np.flatnonzero(key_is_image)
    frame = np_frame(GRID).reshape(-1)
    out = np.array(probs, np.float64)
    for q in range(probs.shape[1]):
        a = probs[:, q, image_cols].mean(axis=0)
        hhi_now = (np.where(frame, 0.5 * a, a) ** 2).sum()
        w = min(1.0, max(0.0, strength * min(1.0, max(0.0, 1 - hhi_now / hhi_base))))
        for h in range(probs.shape[0]):
            row = out[h, q].copy()
            row[image_cols] = (1 - w) * row[image_cols] + w * anchor
            out[h, q] = row / row.sum()
    return out


def test_blend_matches_transcription():
    _, probs, key_is_image, anchor = attention_step(3)
    hhi_base = adapt.hhi(anchor.reshape(2, GRID, GRID))
    blended = adapt.blend(probs, key_is_image, anchor, hhi_base)
    expected = np_blend(np.asarray(probs[0], np.float64), key_is_image[0], anchor[0], float(hhi_base[0]))
    np.testing.assert_allclose(blended[0], expected, rtol=1e-5, atol=1e-7)
    assert_rows_are_distributions(blended)
    np.testing.assert_array_equal(blended[1], probs[1])
    # A concentrated current map (HHI above the baseline) is left alone.
    unchanged = adapt.blend(probs, key_is_image, anchor, jnp.full((2,), 1e-9))
    np.testing.assert_array_equal(unchanged, probs)


def np_mask(probs, key_is_image, refined, percentile=0.4):
    image_cols = np.flatnonzero(key_is_image)
    cut = np.quantile(refined, percentile)
    out = np.array(probs, np.float64)
    for h in range(probs.shape[0]):
        for q in range(probs.shape[1]):
            row = out[h, q]
            drop = image_cols[refined < cut]
            keep = image_cols[refined >= cut]
            removed = row[drop].sum()
            row[drop] = 0.0
            row[keep] += row[keep] / row[keep].sum() * removed
    return out


def test_mask_matches_transcription_and_keeps_image_mass():
    _, probs, key_is_image, anchor = attention_step(4)
    refined = adapt.refined_mask(anchor.reshape(2, GRID, GRID)).reshape(2, N_IMG)
    masked = np.asarray(adapt.mask(probs, key_is_image, refined))
    expected = np_mask(np.asarray(probs[0], np.float64), key_is_image[0], np.asarray(refined[0]))
    np.testing.assert_allclose(masked[0], expected, rtol=1e-5, atol=1e-7)
    assert_rows_are_distributions(masked)
    np.testing.assert_array_equal(masked[1], probs[1])
    np.testing.assert_array_equal(masked[0][..., ~key_is_image[0]], np.asarray(probs[0])[..., ~key_is_image[0]])
    assert np.sum(masked[0][0, 0, key_is_image[0]] == 0.0) == np.sum(
        np.asarray(refined[0]) < np.quantile(np.asarray(refined[0]), 0.4)
    )


def test_modes_survive_zero_image_attention_and_jit():
    _, probs, key_is_image, anchor = attention_step(5)
    probs = np.array(probs)
    probs[0][..., key_is_image[0]] = 0.0  # no attention to the image at all
    probs[0] /= probs[0].sum(-1, keepdims=True)
    hhi_base = adapt.hhi(anchor.reshape(2, GRID, GRID))
    for fn in (
        lambda p: adapt.steer(p, key_is_image, anchor, tau=0.6),
        lambda p: adapt.blend(p, key_is_image, anchor, hhi_base),
        lambda p: adapt.mask(p, key_is_image, anchor),
    ):
        out = fn(probs)
        assert np.all(np.isfinite(out))
        assert_rows_are_distributions(out)
        np.testing.assert_allclose(jax.jit(fn)(probs), out, rtol=1e-6, atol=1e-7)


def test_mode_shape_errors_name_the_shapes():
    _, probs, key_is_image, anchor = attention_step(6)
    with pytest.raises(ValueError, match=r"key_is_image has shape \(2, 43\)"):
        adapt.mask(probs, key_is_image[:, :-1], anchor)
    with pytest.raises(ValueError, match="expected \\[B, N_img\\]"):
        adapt.steer(probs, key_is_image, anchor[0])
