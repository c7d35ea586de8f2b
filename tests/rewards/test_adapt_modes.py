"""ADAPT's decode-time modes (steer, blend, mask) against NumPy transcriptions of METHODS.md §4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.rewards import adapt, adapt_modes
from tests.rewards.test_adapt import np_frame

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
    steered = adapt_modes.steer(probs, key_is_image, anchor, tau=tau, alpha=0.5)
    bias = adapt_modes.steer_bias(probs, key_is_image, anchor, tau=tau, alpha=0.5)
    np.testing.assert_allclose(steered, jax.nn.softmax(logits + bias, axis=-1), rtol=1e-5, atol=1e-7)
    expected = np_steer(np.asarray(probs[0], np.float64), key_is_image[0], anchor[0], tau, 0.5)
    np.testing.assert_allclose(steered[0], expected, rtol=1e-5, atol=1e-7)
    assert_rows_are_distributions(steered)
    np.testing.assert_array_equal(steered[1], probs[1])  # text-only example untouched


def test_steer_with_tau_that_never_fires_is_the_identity():
    _, probs, key_is_image, anchor = attention_step(1)
    assert np.all(np.asarray(adapt_modes.steer_bias(probs, key_is_image, anchor, tau=-1.0)) == 0.0)
    np.testing.assert_array_equal(adapt_modes.steer(probs, key_is_image, anchor, tau=-1.0), probs)


def test_steer_keeps_text_ratios_and_moves_mass_towards_the_anchor():
    _, probs, key_is_image, anchor = attention_step(2)
    steered = np.asarray(adapt_modes.steer(probs, key_is_image, anchor, tau=10.0))
    text = ~key_is_image[0]
    ratio = steered[0][..., text] / np.asarray(probs[0])[..., text]
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=1e-5)
    top = 3 + int(np.argmax(anchor[0]))
    assert np.all(steered[0][..., top] >= np.asarray(probs[0])[..., top])


def test_amc_and_hhi_hand_cases():
    np.testing.assert_allclose(adapt_modes.amc_score(jnp.array([0.5, 0.5, 0.0]), jnp.array([1.0, 0.0, 1.0])), 0.25, rtol=1e-6)
    image_map = np.zeros((8, 8), np.float32)
    image_map[0, 0], image_map[4, 4] = 0.4, 0.6  # the frame value is halved before squaring
    np.testing.assert_allclose(adapt_modes.hhi(image_map), 0.2**2 + 0.6**2, rtol=1e-6)


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
    hhi_base = adapt_modes.hhi(anchor.reshape(2, GRID, GRID))
    blended = adapt_modes.blend(probs, key_is_image, anchor, hhi_base)
    expected = np_blend(np.asarray(probs[0], np.float64), key_is_image[0], anchor[0], float(hhi_base[0]))
    np.testing.assert_allclose(blended[0], expected, rtol=1e-5, atol=1e-7)
    assert_rows_are_distributions(blended)
    np.testing.assert_array_equal(blended[1], probs[1])
    # A concentrated current map (HHI above the baseline) is left alone.
    unchanged = adapt_modes.blend(probs, key_is_image, anchor, jnp.full((2,), 1e-9))
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
    masked = np.asarray(adapt_modes.mask(probs, key_is_image, refined))
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
    hhi_base = adapt_modes.hhi(anchor.reshape(2, GRID, GRID))
    for fn in (
        lambda p: adapt_modes.steer(p, key_is_image, anchor, tau=0.6),
        lambda p: adapt_modes.blend(p, key_is_image, anchor, hhi_base),
        lambda p: adapt_modes.mask(p, key_is_image, anchor),
    ):
        out = fn(probs)
        assert np.all(np.isfinite(out))
        assert_rows_are_distributions(out)
        np.testing.assert_allclose(jax.jit(fn)(probs), out, rtol=1e-6, atol=1e-7)


def test_mode_shape_errors_name_the_shapes():
    _, probs, key_is_image, anchor = attention_step(6)
    with pytest.raises(ValueError, match=r"key_is_image has shape \(2, 43\)"):
        adapt_modes.mask(probs, key_is_image[:, :-1], anchor)
    with pytest.raises(ValueError, match="expected \\[B, N_img\\]"):
        adapt_modes.steer(probs, key_is_image, anchor[0])
