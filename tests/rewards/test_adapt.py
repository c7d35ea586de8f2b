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


def np_frame_share(grid, border=2):
    """Share of each patch inside the outer border/24 of the image side, by counting the pixels of
    a (24 G)-pixel image (each patch 24 x 24 pixels, the frame border * G pixels wide)."""
    side, band = 24 * grid, border * grid
    pixels = np.zeros((side, side), bool)
    pixels[:band], pixels[-band:], pixels[:, :band], pixels[:, -band:] = True, True, True, True
    return pixels.reshape(grid, 24, grid, 24).mean(axis=(1, 3))


def np_boundary(a, share):
    """The boundary score with each patch weighed into the frame and centre means by its share
    (whole patches at 24x24: METHODS.md's plain means)."""
    r = (a * share).sum() / share.sum() / ((a * (1 - share)).sum() / (1 - share).sum())
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
            0.25 * np_boundary(a, np_frame_share(g))
            + 0.30 * np_spectral(a, d)
            + 0.15 * np_smoothness(a)
            + 0.20 * np_concentration(a)
            + 0.10 * np_depth_prior(d)
        )
    s = np_minmax(np.array(scores))
    w = np.exp(10 * s) / np.exp(10 * s).sum()
    return sum(w[l] * maps[l] for l in range(num_layers))


def np_refined(anchor, blurs=(3, 5), share=None):
    """METHODS.md §4's chain: blurs of `blurs`, each patch times 1 - 0.5 x its frame share (default
    the 2-patch frame of this grid)."""
    m = np_minmax(anchor)
    z = (m - m.mean()) / m.std(ddof=1) * 10
    m = 1 / (1 + np.exp(-z))
    m = np_correlate(m, np.full((blurs[0], blurs[0]), 1 / blurs[0] ** 2), "edge")
    share = np_frame(m.shape[0]) if share is None else share
    m = m * (1 - 0.5 * share)
    m = np_correlate(m, np.full((blurs[1], blurs[1]), 1 / blurs[1] ** 2), "edge")
    return np_minmax(m)


def random_history(seed, batch=None, layers=4, steps=3, grid=8):
    rng = np.random.default_rng(seed)
    shape = (layers, steps, grid * grid) if batch is None else (batch, layers, steps, grid * grid)
    return rng.dirichlet(np.ones(grid * grid), size=shape[:-1]).astype(np.float32) * 0.6


# ---------------------------------------------------------------------------------------------
# Anchor and mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [24, 8])  # the frame scales with G / 24
def test_layer_scores_match_numpy_transcription(grid):
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
        "boundary": [np_boundary(a, np_frame_share(grid)) for a in maps],
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
    np.testing.assert_allclose(adapt.boundary_score(flat), 1 - 2 * (1 - 0.6), rtol=1e-5)  # r = 1, float32 sums
    frame_only = 1.0 - inside
    assert float(adapt.boundary_score(frame_only)) == 0.0  # r = inf, fully penalised


# grid -> the blurs of METHODS.md's 3x3 / 5x5 scaled by G / 24 to odd kernels of at least 1
SCALED_BLURS = {24: (3, 5), 12: (1, 3), 8: (1, 1), 4: (1, 1), 18: (3, 3), 48: (7, 11)}


@pytest.mark.parametrize("grid", [24, 8, 12])
def test_visual_anchor_and_refined_mask_match_numpy_transcription(grid):
    history = random_history(1, batch=2, grid=grid)
    anchor = adapt.visual_anchor(history)
    mask = adapt.refined_mask(anchor)
    for b in range(2):
        expected_anchor = np_anchor(history[b].astype(np.float64))
        np.testing.assert_allclose(anchor[b], expected_anchor, rtol=1e-4, atol=1e-7)
        expected = np_refined(expected_anchor, SCALED_BLURS[grid], np_frame_share(grid))
        np.testing.assert_allclose(mask[b], expected, rtol=1e-4, atol=1e-5)


def test_the_24x24_chain_is_methods_chain_and_smaller_grids_scale():
    assert {g: (adapt.scaled_kernel(3, g), adapt.scaled_kernel(5, g)) for g in SCALED_BLURS} == SCALED_BLURS
    # the frame: whole patches where its band ends on patch edges, shares elsewhere
    np.testing.assert_array_equal(adapt.frame_share(24), np_frame(24, 2))
    np.testing.assert_array_equal(adapt.frame_share(12), np_frame(12, 1))
    for grid in (4, 6, 8, 16):
        np.testing.assert_allclose(adapt.frame_share(grid), np_frame_share(grid), atol=1e-6)
    np.testing.assert_allclose(adapt.frame_share(8)[0, :2], [8 / 9, 2 / 3], rtol=1e-6)
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


def test_visually_enhanced_image_keeps_the_objects_of_an_oracle_anchor_on_the_v2_grid():
    """I_VE from a perfect anchor (each patch's true object coverage, 8x8 grid of 128-px shapes
    world v2 images): >= 95 % of objects keep a mean mask >= 0.5 over their box, >= 30 % of the
    background is whitened. The unscaled chain (2-patch frame, 3x3 and 5x5 blurs on 8x8) does not."""
    from mmpo_jax.data import interventions, shapes_world_v2, shapes_world_v2_splits

    spec = shapes_world_v2.WorldSpecV2(preference_size=200)
    scenes = [shapes_world_v2_splits.scene_and_image(spec, "preference", i)[1].objects for i in range(200)]
    anchors = np.stack([shapes_world_v2.patch_coverage(s, 128, 8) for s in scenes])
    kept = {}
    for scale in (True, False):
        grid_masks = adapt.refined_mask(anchors, threshold_percentile=0.4, scale_to_grid=scale)
        masks = np.asarray(interventions.upsample_mask(grid_masks, (128, 128)))
        boxes = [m[o.bbox[1]:o.bbox[3], o.bbox[0]:o.bbox[2]].mean() >= 0.5 for m, s in zip(masks, scenes) for o in s]
        whitened = [(1 - m[shapes_world_v2.object_coverage(s, 128) == 0]).mean() for m, s in zip(masks, scenes)]
        kept[scale] = float(np.mean(boxes))
        if scale:
            assert kept[scale] >= 0.95 and float(np.mean(whitened)) >= 0.3
    assert kept[False] < 0.9
