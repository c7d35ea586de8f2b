"""Defining properties of the image interventions (crop, noise, erase, enhance, combine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmpo_jax.data import interventions as iv


def _image(height=48, width=40, seed=0, dtype=np.float32) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, 256, (height, width, 3))
    return values.astype(dtype)


def test_crop_boxes_keep_1_to_20_percent_with_bounded_aspect():
    height, width = 60, 80
    boxes = np.asarray(jax.vmap(lambda k: iv.sample_crop_box(k, height, width))(
        jax.random.split(jax.random.key(0), 2000)
    ))
    x0, y0, x1, y1 = boxes.T
    crop_w, crop_h = x1 - x0, y1 - y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    # Sides are rounded to whole pixels, so the bounds hold up to half a pixel per side.
    area = height * width
    assert ((crop_w - 0.5) * (crop_h - 0.5) <= 0.2 * area).all()
    assert ((crop_w + 0.5) * (crop_h + 0.5) >= 0.01 * area).all()
    assert ((crop_w - 0.5) / (crop_h + 0.5) <= 4 / 3).all()
    assert ((crop_w + 0.5) / (crop_h - 0.5) >= 3 / 4).all()
    fraction = crop_w * crop_h / area
    assert fraction.min() < 0.03 and fraction.max() > 0.18  # the whole range is used
    assert len({(a, b) for a, b in zip(x0, y0)}) > 500  # positions spread over the image


def test_random_resized_crop_equals_torch_crop_then_bilinear_resize():
    image = _image() / 255  # [0, 1], so that atol is relative to the value range
    for seed in range(5):
        key = jax.random.key(seed)
        x0, y0, x1, y1 = np.asarray(iv.sample_crop_box(key, 48, 40)).tolist()
        ours = np.asarray(jax.jit(iv.random_resized_crop)(key, jnp.asarray(image)))
        crop = torch.from_numpy(image[y0:y1, x0:x1]).permute(2, 0, 1)[None]
        reference = torch.nn.functional.interpolate(
            crop, size=(48, 40), mode="bilinear", align_corners=False
        )[0].permute(1, 2, 0)
        np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-5, atol=1e-6)


def test_random_resized_crop_same_key_same_output_and_uint8_stays_uint8():
    image = jnp.asarray(_image(dtype=np.uint8))
    first = iv.random_resized_crop(jax.random.key(1), image)
    assert first.dtype == jnp.uint8 and first.shape == image.shape
    np.testing.assert_array_equal(first, iv.random_resized_crop(jax.random.key(1), image))
    assert not np.array_equal(first, iv.random_resized_crop(jax.random.key(2), image))


def test_diffusion_schedule_matches_methods_numbers():
    signal, noise = iv.diffusion_noise_coefficients()
    assert signal**2 == pytest.approx(0.5391, abs=1e-4)
    assert signal == pytest.approx(0.7342, abs=1e-4) and noise == pytest.approx(0.6789, abs=1e-4)
    first_beta = 1e-5 + (5e-3 - 1e-5) / (1 + np.exp(6.0))  # sigmoid(-6) at s = 0
    signal_0, _ = iv.diffusion_noise_coefficients(step=0)
    assert signal_0**2 == pytest.approx(1 - first_beta, rel=1e-12)
    with pytest.raises(ValueError, match="step=1000"):
        iv.diffusion_noise_coefficients(step=1000)


@pytest.mark.parametrize("mean,std", [((0.5,) * 3, (0.5,) * 3), (iv.CLIP_MEAN, iv.CLIP_STD)])
def test_diffusion_noise_has_clip_pixel_strength_under_any_normalisation(mean, std):
    """METHODS.md §5: at t=600 the pixel-space noise std is 0.679 x CLIP std (~47 grey levels),
    whether the model normalises with v1's 0.5 / 0.5 or CLIP's constants."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3)) / 255.0  # [0, 1] units
    normalised = jnp.asarray((pixels - mean) / std, jnp.float32)
    noisy = iv.add_diffusion_noise(jax.random.key(3), normalised, mean=tuple(mean), std=tuple(std))
    noisy_pixels = np.asarray(noisy, np.float64) * std + mean
    signal, _ = iv.diffusion_noise_coefficients(600)
    # what is left besides the noise: the image shrunk toward CLIP's mean, in pixel units
    expected = signal * pixels + (1 - signal) * np.asarray(iv.CLIP_MEAN)
    noise_std = (noisy_pixels - expected).std(axis=(0, 1))
    target = 0.679 * np.asarray(iv.CLIP_STD)
    np.testing.assert_allclose(noise_std, target, rtol=0.05)
    assert noise_std.mean() * 255 == pytest.approx(47.1, rel=0.05)
    # the same key gives the same pixels whatever the normalisation
    clip_in = jnp.asarray((pixels - np.asarray(iv.CLIP_MEAN)) / np.asarray(iv.CLIP_STD), jnp.float32)
    clip_pixels = np.asarray(iv.add_diffusion_noise(jax.random.key(3), clip_in)) * np.asarray(iv.CLIP_STD) \
        + np.asarray(iv.CLIP_MEAN)
    np.testing.assert_allclose(noisy_pixels, clip_pixels, atol=1e-5)


def test_diffusion_noise_statistics_match_the_coefficients():
    signal, noise = iv.diffusion_noise_coefficients()
    x0 = jax.random.normal(jax.random.key(0), (64, 64, 3))
    add_noise = jax.jit(iv.add_diffusion_noise)
    noisy = add_noise(jax.random.key(1), x0)
    residual = np.asarray(noisy - signal * x0)
    assert abs(residual.mean()) < 0.02 and residual.std() == pytest.approx(noise, rel=0.02)
    slope = float(np.sum(np.asarray(noisy) * np.asarray(x0)) / np.sum(np.asarray(x0) ** 2))
    assert slope == pytest.approx(signal, abs=0.02)
    np.testing.assert_array_equal(noisy, add_noise(jax.random.key(1), x0))
    assert not np.array_equal(noisy, add_noise(jax.random.key(2), x0))
    with pytest.raises(TypeError, match="uint8"):
        iv.add_diffusion_noise(jax.random.key(0), jnp.zeros((2, 2, 3), jnp.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_erase_box_fills_mean_colour_and_leaves_the_rest(dtype):
    image = _image(dtype=dtype)
    box = (5, 10, 25, 30)  # x0, y0, x1, y1
    erased = np.asarray(jax.jit(iv.erase_box)(jnp.asarray(image), jnp.asarray(box)))
    mean = image.astype(np.float64).mean(axis=(0, 1))
    expected_fill = np.round(mean) if dtype == np.uint8 else mean
    np.testing.assert_allclose(
        erased[10:30, 5:25], np.broadcast_to(expected_fill, (20, 20, 3)), rtol=1e-6
    )
    outside = np.ones(image.shape[:2], bool)
    outside[10:30, 5:25] = False
    np.testing.assert_array_equal(erased[outside], image[outside])
    assert erased.dtype == dtype


def test_erase_box_clips_a_box_past_the_border():
    image = _image(8, 8)
    erased = np.asarray(iv.erase_box(jnp.asarray(image), [6, -3, 20, 2]))
    np.testing.assert_array_equal(erased[2:], image[2:])
    np.testing.assert_array_equal(erased[:, :6], image[:, :6])
    fill = np.broadcast_to(image.mean((0, 1)), (2, 2, 3))
    np.testing.assert_allclose(erased[:2, 6:], fill, rtol=1e-6)


def test_visually_enhance_identity_for_ones_white_for_zeros():
    image = jnp.asarray(_image(dtype=np.uint8))
    np.testing.assert_array_equal(iv.visually_enhance(image, jnp.ones((6, 5))), image)
    whitened = iv.visually_enhance(image, jnp.zeros((6, 5)))
    np.testing.assert_array_equal(whitened, jnp.full_like(image, 255))


def test_upsampled_masks_stay_in_the_unit_interval_and_batches_broadcast():
    mask = jax.random.uniform(jax.random.key(4), (2, 8, 8)) ** 4  # sharp: bicubic overshoots
    pixels = iv.upsample_mask(mask, (32, 40))
    assert pixels.shape == (2, 32, 40)
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    np.testing.assert_allclose(iv.upsample_mask(jnp.full((8, 8), 0.3), (16, 16)), 0.3, rtol=1e-6)
    images = jax.random.uniform(jax.random.key(5), (2, 32, 40, 3))
    batched = iv.visually_enhance(images, mask, white=1.0)
    for row in range(2):
        # atol: batched and single XLA programs may differ in the last float32 bit
        np.testing.assert_allclose(batched[row], iv.visually_enhance(images[row], mask[row], white=1.0),
                                   rtol=1e-6, atol=1e-6)
    # a mask already at image size is used as it is
    np.testing.assert_allclose(iv.upsample_mask(pixels, (32, 40)), pixels, atol=1e-6)


def test_visually_enhance_upsamples_bicubically_and_commutes_with_normalisation():
    mask = jax.random.uniform(jax.random.key(3), (6, 5))
    upsampled = np.clip(np.asarray(jax.image.resize(mask, (48, 40), "bicubic")), 0, 1)[..., None]
    image = _image()
    enhanced = np.asarray(iv.visually_enhance(jnp.asarray(image), mask))
    expected = image * upsampled + 255 * (1 - upsampled)
    np.testing.assert_allclose(enhanced, expected, rtol=1e-5, atol=1e-4)
    mean, std = np.array([0.48, 0.46, 0.41]), np.array([0.27, 0.26, 0.28])
    normalised = (image / 255 - mean) / std
    enhanced_normalised = iv.visually_enhance(
        jnp.asarray(normalised, jnp.float32), mask, white=(1 - mean) / std
    )
    expected_normalised = (enhanced / 255 - mean) / std
    np.testing.assert_allclose(enhanced_normalised, expected_normalised, rtol=1e-4, atol=1e-5)


def test_combine_two_images_and_stitch_contains_both_padded_not_squeezed():
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((10, 10, 3), np.uint8)
    blue[..., 2] = 255
    assert iv.combine(red, blue, "two_images") == (red, blue)
    (stitched,) = iv.combine(red, blue, "stitch", fill=(0, 255, 0))
    assert stitched.shape == red.shape and stitched.dtype == np.uint8
    # Strip 40 x (40 + 40) scaled to 20 x 40, centred in rows 10..30: left the image, right the
    # crop, each 20 x 20 (square stays square); above and below the fill.
    np.testing.assert_array_equal(stitched[11:29, :19], np.broadcast_to([255, 0, 0], (18, 19, 3)))
    np.testing.assert_array_equal(stitched[11:29, 21:], np.broadcast_to([0, 0, 255], (18, 19, 3)))
    np.testing.assert_array_equal(stitched[:10], np.broadcast_to([0, 255, 0], (10, 40, 3)))
    np.testing.assert_array_equal(stitched[30:], np.broadcast_to([0, 255, 0], (10, 40, 3)))
    with pytest.raises(ValueError, match="mode='side'"):
        iv.combine(red, blue, "side")


@pytest.mark.parametrize("size,box", [(64, (8, 20, 40, 52)), (128, (60, 10, 124, 74))])
def test_stitch_keeps_aspect_ratio_of_image_and_crop(size, box):
    """A circle stays a circle in both halves (the released stitch halved widths: ellipses)."""
    image = np.full((size, size, 3), 235, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cx, cy, r = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2 - 2
    image[(xx - cx) ** 2 + (yy - cy) ** 2 <= r**2] = (200, 30, 30)
    (stitched,) = iv.combine(image, iv.crop_to_box(image, box), "stitch")
    fill = np.round(image.reshape(-1, 3).mean(axis=0))
    assert np.all(stitched[0] == fill) and np.all(stitched[-1] == fill)  # padded, not stretched
    red = (stitched[..., 0] > 150) & (stitched[..., 1] < 120)
    for half in (red[:, : size // 2 - 1], red[:, size // 2 + 1 :]):
        rows, cols = np.nonzero(half)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert abs(height - width) <= 1, (height, width)


def test_crop_to_box_slices_and_validates():
    image = _image(10, 12)
    np.testing.assert_array_equal(iv.crop_to_box(image, (2, 3, 7, 9)), image[3:9, 2:7])
    with pytest.raises(ValueError, match=r"box=\[2, 3, 13, 9\]"):
        iv.crop_to_box(image, (2, 3, 13, 9))
