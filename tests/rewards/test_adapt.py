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


def np_boundary(a, border=2):
    frame = np_frame(a.shape[0], border)
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


def np_anchor(history, border=2):
    """history [L, K, N] -> anchor [G, G]; `border` is the boundary score's frame on this grid."""
    num_layers = history.shape[0]
    g = int(round(math.sqrt(history.shape[-1])))
    maps = [history[l].mean(axis=0).reshape(g, g) for l in range(num_layers)]
    scores = []
    for l, a in enumerate(maps):
        d = l / (num_layers - 1)
        scores.append(
            0.25 * np_boundary(a, border)
            + 0.30 * np_spectral(a, d)
            + 0.15 * np_smoothness(a)
            + 0.20 * np_concentration(a)
            + 0.10 * np_depth_prior(d)
        )
    s = np_minmax(np.array(scores))
    w = np.exp(10 * s) / np.exp(10 * s).sum()
    return sum(w[l] * maps[l] for l in range(num_layers))


def np_refined(anchor, blurs=(3, 5), border=2):
    """METHODS.md §4's chain with the sizes of the 24x24 grid (`blurs`, `border` on this grid)."""
    m = np_minmax(anchor)
    z = (m - m.mean()) / m.std(ddof=1) * 10
    m = 1 / (1 + np.exp(-z))
    m = np_correlate(m, np.full((blurs[0], blurs[0]), 1 / blurs[0] ** 2), "edge")
    if 2 * border < m.shape[0]:
        m = np.where(np_frame(m.shape[0], border), m * 0.5, m)
    m = np_correlate(m, np.full((blurs[1], blurs[1]), 1 / blurs[1] ** 2), "edge")
    return np_minmax(m)


def random_history(seed, batch=None, layers=4, steps=3, grid=8):
    rng = np.random.default_rng(seed)
    shape = (layers, steps, grid * grid) if batch is None else (batch, layers, steps, grid * grid)
    return rng.dirichlet(np.ones(grid * grid), size=shape[:-1]).astype(np.float32) * 0.6


# ---------------------------------------------------------------------------------------------
# Anchor and mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,border", [(24, 2), (8, 1)])  # the frame scales with G / 24
def test_layer_scores_match_numpy_transcription(grid, border):
    maps = np.asarray(random_history(0, grid=grid).mean(axis=1).reshape(4, grid, grid), np.float64)
    depths = np.linspace(0, 1, 4)
    got = {
        "boundary": adapt.boundary_score(maps),
        "spectral": adapt.spectral_score(maps, depths),
        "smoothness": adapt.smoothness_score(maps),
        "concentration": adapt.concentration_score(maps),
        "depth": adapt.depth_prior(depths),
    }
    expected = {
        "boundary": [np_boundary(a, border) for a in maps],
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


# grid -> (blurs, frame) of METHODS.md's 3x3 / 5x5 / 2-patch chain scaled by G / 24 to odd
# kernels and a frame of at least 1 (at 24 exactly METHODS.md's numbers).
SCALED_SIZES = {24: ((3, 5), 2), 12: ((1, 3), 1), 8: ((1, 1), 1), 18: ((3, 3), 2), 48: ((7, 11), 4)}


@pytest.mark.parametrize("grid", [24, 8, 12])
def test_visual_anchor_and_refined_mask_match_numpy_transcription(grid):
    history = random_history(1, batch=2, grid=grid)
    anchor = adapt.visual_anchor(history)
    mask = adapt.refined_mask(anchor)
    blurs, border = SCALED_SIZES[grid]
    for b in range(2):
        expected_anchor = np_anchor(history[b].astype(np.float64), border)
        np.testing.assert_allclose(anchor[b], expected_anchor, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(mask[b], np_refined(expected_anchor, blurs, border), rtol=1e-4, atol=1e-5)


def test_the_24x24_chain_is_methods_chain_and_smaller_grids_scale():
    assert {g: ((adapt.scaled_size(3, g, odd=True), adapt.scaled_size(5, g, odd=True)),
                adapt.scaled_size(2, g, odd=False)) for g in SCALED_SIZES} == SCALED_SIZES
    assert [adapt.scaled_size(2, g, odd=False) for g in (1, 4, 6)] == [1, 1, 1]
    # On a random 24x24 anchor the default chain is the unscaled one (today's numbers), exactly.
    anchor = np.random.default_rng(7).random((3, 24, 24)).astype(np.float32)
    for percentile in (None, 0.4):
        np.testing.assert_array_equal(
            adapt.refined_mask(anchor, threshold_percentile=percentile),
            adapt.refined_mask(anchor, threshold_percentile=percentile, scale_to_grid=False))
    np.testing.assert_allclose(adapt.refined_mask(anchor)[0], np_refined(anchor[0].astype(np.float64)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(adapt.boundary_score(anchor), adapt.boundary_score(anchor, scale_to_grid=False))
    # Unscaled, the old chain stays available on any grid.
    small = np.random.default_rng(8).random((8, 8))
    np.testing.assert_allclose(adapt.refined_mask(small.astype(np.float32), scale_to_grid=False),
                               np_refined(small), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grid", [6, 8, 12])
def test_boundary_score_discriminates_on_small_grids(grid):
    centre, frame = np.zeros((grid, grid), np.float32), np.ones((grid, grid), np.float32)
    centre[1:-1, 1:-1], frame[1:-1, 1:-1] = 1.0, 0.0
    assert float(adapt.boundary_score(centre)) == 1.0 and float(adapt.boundary_score(frame)) == 0.0
    # unscaled, the 2-patch frame of a 4x4 grid covers everything: always 1
    assert float(adapt.boundary_score(np.ones((4, 4), np.float32) - np.eye(4, dtype=np.float32),
                                      scale_to_grid=False)) == 1.0


def test_depth_prior_peaks_near_layer_20_of_32():
    prior = adapt.depth_prior(adapt.layer_depths(32))
    assert int(jnp.argmax(prior)) == 20
    assert float(prior[0]) == 0.0 and float(prior[20]) > 0.99


def _attended(grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(history [6, 5, G*G] attending to one region, the region [G, G]): rows and columns
    [G/4, G/2) x [G/2, 3G/4), the same part of the image on every grid."""
    rng = np.random.default_rng(2)
    history = rng.uniform(0.0, 1e-4, size=(6, 5, grid * grid)).astype(np.float32)
    region = np.zeros((grid, grid), bool)
    region[grid // 4 : grid // 2, grid // 2 : 3 * grid // 4] = True
    history[..., region.reshape(-1)] += 0.05
    return history, region


def test_anchor_and_mask_peak_on_the_attended_region_alike_on_every_grid():
    kept = {}
    for grid in (12, 24):
        history, region = _attended(grid)
        anchor = adapt.visual_anchor(history)
        mask = adapt.refined_mask(anchor)
        assert region[np.unravel_index(int(jnp.argmax(anchor)), (grid, grid))]
        assert region[np.unravel_index(int(jnp.argmax(mask)), (grid, grid))]
        kept[grid] = float(mask[region].mean())
        assert kept[grid] > 0.55 > 0.1 > float(mask[~region].mean())
    # The scaled chain keeps its meaning: the region keeps about what it keeps at 24x24 (0.71;
    # the unscaled chain at 12x12: 0.86, with 3x the background).
    assert abs(kept[12] - kept[24]) < 0.1


def test_refined_mask_threshold_option_zeroes_the_low_percentile():
    anchor = adapt.visual_anchor(random_history(3))
    mask = adapt.refined_mask(anchor, threshold_percentile=0.4)
    base = adapt.refined_mask(anchor)
    zeroed = np.asarray(base) < np.quantile(np.asarray(base), 0.4)
    assert np.all(np.asarray(mask)[zeroed] == 0.0)
    assert float(mask.max()) == 1.0


def test_degenerate_maps_are_finite():
    zeros = np.zeros((3, 2, 576), np.float32)
    anchor = adapt.visual_anchor(zeros)
    mask = adapt.refined_mask(anchor)
    assert np.all(np.isfinite(anchor)) and np.all(np.isfinite(mask))
    # Only the frame attenuation is left: 0 in the corner, 1 in the centre.
    np.testing.assert_allclose([mask[0, 0], mask[12, 12]], [0.0, 1.0], atol=1e-5)
    assert np.all(np.isfinite(adapt.visual_anchor(np.ones((1, 1, 64), np.float32))))


def test_jit_equals_eager_for_the_anchor_chain():
    history = random_history(6, batch=2)
    eager = adapt.refined_mask(adapt.visual_anchor(history))
    jitted = jax.jit(lambda h: adapt.refined_mask(adapt.visual_anchor(h)))(history)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


def test_history_with_non_square_token_count_is_rejected():
    with pytest.raises(ValueError, match="square patch grid"):
        adapt.visual_anchor(np.ones((2, 1, 10), np.float32))
