"""Image interventions used to build or score preference pairs (mDPO, P2-DPO, ADAPT; METHODS.md).

Two kinds, by where they run:

- `jnp`, jit- and vmap-able, randomness from a `jax.random` key (they may run inside a training or
  generation step): `sample_crop_box`, `random_resized_crop` (mDPO's corrupted image),
  `add_diffusion_noise` (P2-DPO's / ADAPT's noisy image), `erase_box` (P2-DPO's degraded image),
  `visually_enhance` (ADAPT's enhanced image).
- NumPy/PIL, deterministic, for data generation only: `crop_to_box`, `combine` (P2-DPO's
  enhanced input).

All act on one channel-last image `[H, W, C]`; batch them with `jax.vmap`. Boxes are pixel
coordinates `[x0, y0, x1, y1]` with exclusive ends (Python slicing: rows y0:y1, columns x0:x1).
Integer images (uint8) are processed in float32 and rounded back to their dtype; float images
(raw [0, 255] or CLIP-normalised) keep their dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmpo_jax.data.image_processing import CLIP_MEAN, CLIP_STD

COMBINE_MODES = ("two_images", "stitch")


def sample_crop_box(
    key: jax.Array,
    height: int,
    width: int,
    *,
    area_range: tuple[float, float] = (0.01, 0.2),
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """Draws torchvision's `RandomResizedCrop` box: area fraction and log-aspect uniform.

    Area `~ U(area_range) * H * W`, aspect `w/h = exp(U(log aspect_range))`, sides rounded and
    clipped to the image (torchvision retries 10 times, then centre-crops, instead of clipping;
    with the default ranges neither happens for aspect ratios up to 3.75:1), position uniform.

    Returns:
      int32 `[4]` box `[x0, y0, x1, y1]`.
    """
    area_key, aspect_key, y_key, x_key = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(area_key, minval=area_range[0], maxval=area_range[1])
    log_aspect = jax.random.uniform(
        aspect_key, minval=math.log(aspect_range[0]), maxval=math.log(aspect_range[1])
    )
    aspect = jnp.exp(log_aspect)
    crop_width = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, width).astype(jnp.int32)
    crop_height = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, height).astype(jnp.int32)
    y0 = jax.random.randint(y_key, (), 0, height - crop_height + 1)
    x0 = jax.random.randint(x_key, (), 0, width - crop_width + 1)
    return jnp.stack([x0, y0, x0 + crop_width, y0 + crop_height]).astype(jnp.int32)


def random_resized_crop(
    key: jax.Array,
    image: jax.Array,
    *,
    area_range: tuple[float, float] = (0.01, 0.2),
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """mDPO's corruption: crop a random box (`sample_crop_box`) and resize it back to `[H, W]`.

    Bilinear with half-pixel centres and edge clamping at the crop's border, i.e. exactly
    torchvision's crop-then-resize on a tensor (`F.interpolate(..., "bilinear",
    align_corners=False)`; antialiasing is moot since the crop is only ever enlarged). Works on the
    normalised pixel tensor, as mDPO's released code does. `jnp`, jit-able.

    Args:
      key: PRNG key; the same key gives the same crop.
      image: `[H, W, C]`.

    Returns:
      `[H, W, C]`, the dtype of `image`.
    """
    height, width = image.shape[:2]
    box = sample_crop_box(key, height, width, area_range=area_range, aspect_range=aspect_range)
    rows_low, rows_high, row_frac = _bilinear_taps(box[1], box[3], height)
    cols_low, cols_high, col_frac = _bilinear_taps(box[0], box[2], width)
    pixels = image.astype(jnp.float32)
    rows = _lerp(pixels[rows_low], pixels[rows_high], row_frac[:, None, None])
    out = _lerp(rows[:, cols_low], rows[:, cols_high], col_frac[None, :, None])
    return _restore_dtype(out, image.dtype)


def _bilinear_taps(
    start: jax.Array, stop: jax.Array, size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Source indices (low, high) and weight of high to resample `[start, stop)` onto `size`."""
    scale = (stop - start).astype(jnp.float32) / size
    source = jnp.maximum((jnp.arange(size, dtype=jnp.float32) + 0.5) * scale - 0.5, 0.0)
    low = jnp.minimum(jnp.floor(source).astype(jnp.int32), stop - start - 1)
    high = jnp.minimum(low + 1, stop - start - 1)
    return start + low, start + high, source - low


def _lerp(low: jax.Array, high: jax.Array, frac: jax.Array) -> jax.Array:
    return low * (1 - frac) + high * frac


def diffusion_noise_coefficients(
    step: int = 600, num_steps: int = 1000, beta_range: tuple[float, float] = (1e-5, 5e-3)
) -> tuple[float, float]:
    """`(sqrt(abar_t), sqrt(1 - abar_t))` of the sigmoid schedule VCD and P2-DPO use.

    `beta_s = sigmoid(linspace(-6, 6, num_steps))_s * (beta_max - beta_min) + beta_min`,
    `abar_t = prod_{s=0..t} (1 - beta_s)` (0-based `t`, inclusive). At t=600 of 1000 with
    1e-5..5e-3: abar = 0.5391, coefficients 0.7342 / 0.6789 (METHODS.md §5: 0.539, 0.734/0.679).
    Computed in float64 NumPy from static arguments, so it is free inside jit.
    """
    if not 0 <= step < num_steps:
        raise ValueError(f"step={step} must lie in [0, num_steps={num_steps}).")
    sigmoid = 1 / (1 + np.exp(-np.linspace(-6.0, 6.0, num_steps)))
    betas = beta_range[0] + (beta_range[1] - beta_range[0]) * sigmoid
    alpha_bar = float(np.prod(1 - betas[: step + 1]))
    return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)


def add_diffusion_noise(
    key: jax.Array,
    image: jax.Array,
    *,
    step: int = 600,
    num_steps: int = 1000,
    beta_range: tuple[float, float] = (1e-5, 5e-3),
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> jax.Array:
    """Forward-diffusion noise `sqrt(abar) x0 + sqrt(1 - abar) eps`, defined in CLIP units.

    METHODS.md §5 defines the noise on the CLIP-normalised tensor. An image normalised with other
    constants (`mean`, `std`: the model's, e.g. the shapes world v1's 0.5 / 0.5) is taken to CLIP
    units, noised there and brought back, which in closed form is

        x = a x0 + (1 - a) (CLIP_MEAN - mean) / std + b (CLIP_STD / std) eps

    with `(a, b) = diffusion_noise_coefficients(...)` and `eps ~ N(0, 1)` per element. So the
    pixel-space image, `x * std + mean`, is the same for every normalisation given the same key: the
    noise has pixel-space std `b * CLIP_STD` (about 0.679 x 0.27 x 255 = 47 grey levels at t=600)
    [our choice: METHODS.md asks only that `eps` be scaled to that std; converting the signal too
    also keeps the shrunken image's pixel mean at CLIP's, so the intervention does not depend on
    the normalisation at all]. With CLIP's constants (the default) this is the plain formula.
    `jnp`, jit-able.

    Args:
      key: PRNG key; the same key gives the same noise.
      image: float `[H, W, C]`, normalised with `mean` / `std` (C = 3).
      mean, std: the per-channel normalisation constants of `image`, in [0, 1] units.

    Returns:
      float `[H, W, C]`, the dtype of `image`, normalised like `image`.
    """
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise TypeError(
            f"add_diffusion_noise needs a normalised float image, got dtype {image.dtype}."
        )
    signal, noise = diffusion_noise_coefficients(step, num_steps, beta_range)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    shift = ((1 - signal) * (np.asarray(CLIP_MEAN) - mean) / std).astype(np.float32)
    scale = (noise * np.asarray(CLIP_STD) / std).astype(np.float32)
    eps = jax.random.normal(key, image.shape, jnp.float32)
    return (signal * image.astype(jnp.float32) + shift + scale * eps).astype(image.dtype)


def erase_box(image: jax.Array, box: jax.Array | Sequence[int]) -> jax.Array:
    """P2-DPO's `Erase`: fills `box` with the image's mean colour (per channel, over the image).

    The box may be traced (e.g. from a saliency map) and may extend past the image; only its part
    inside the image is filled. `jnp`, jit-able.

    Args:
      image: `[H, W, C]`.
      box: int `[4]` `[x0, y0, x1, y1]`, exclusive ends.

    Returns:
      `[H, W, C]`, the dtype of `image`; integer images get the rounded mean colour.
    """
    height, width = image.shape[:2]
    x0, y0, x1, y1 = (jnp.asarray(box)[i] for i in range(4))
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    pixels = image.astype(jnp.float32)
    mean_colour = pixels.mean(axis=(0, 1))
    return _restore_dtype(jnp.where(inside[..., None], mean_colour, pixels), image.dtype)


def upsample_mask(mask: jax.Array, image_size: tuple[int, int]) -> jax.Array:
    """Bicubic upsampling (`jax.image.resize`, Keys a=-0.5, as PIL) of a `[..., h, w]` mask to
    `[..., H, W]`, clipped to [0, 1] against bicubic overshoot [our choice]. `jnp`, jit-able.

    Args:
      image_size: `(H, W)` in pixels.
    """
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim < 2:
        raise ValueError(f"mask must be [..., h, w], got shape {mask.shape}.")
    height, width = image_size
    upsampled = jax.image.resize(mask, (*mask.shape[:-2], height, width), method="bicubic")
    return jnp.clip(upsampled, 0.0, 1.0)


def visually_enhance(
    image: jax.Array, mask: jax.Array, *, white: float | Sequence[float] | jax.Array = 255.0
) -> jax.Array:
    """ADAPT's visually-enhanced image `I * m + white * (1 - m)`.

    The mask (e.g. the refined anchor on the patch grid) is upsampled to the image by
    `upsample_mask` (a mask already at `[H, W]` is kept as it is). The blend is affine, so blending
    raw pixels with `white=255` and then normalising equals blending the normalised tensor with
    `white=(1 - mean) / std`. `jnp`, jit-able; leading axes of image and mask broadcast.

    Args:
      image: `[..., H, W, C]`.
      mask: float `[..., h, w]`, 1 keeps a pixel, 0 whitens it.
      white: the white value in the image's units, scalar or per channel `[C]`.

    Returns:
      `[..., H, W, C]`, the dtype of `image`.
    """
    keep = upsample_mask(mask, tuple(image.shape[-3:-1]))[..., None]
    white = jnp.asarray(white, jnp.float32)
    return _restore_dtype(image.astype(jnp.float32) * keep + white * (1 - keep), image.dtype)


def crop_to_box(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The region `[y0:y1, x0:x1]` of `[H, W, C]`; the box must lie inside the image. NumPy."""
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = image.shape[:2]
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box={[x0, y0, x1, y1]} is empty or outside the {height}x{width} image.")
    return image[y0:y1, x0:x1]


def combine(
    image: np.ndarray, crop: np.ndarray, mode: str = "two_images", *,
    fill: Sequence[int] | None = None,
) -> tuple[np.ndarray, ...]:
    """P2-DPO's `Combine(I, crop)`: the images of the focus-enhanced prompt. NumPy/PIL (data gen).

    Modes:
      "two_images": `(image, crop)` unchanged, for a two-image prompt (`num_images=2`).
      "stitch": one canvas of the image's size `[H, W, 3]` holding the image and, right of it, the
        crop, both scaled by one factor so that nothing is squeezed: the crop is scaled to height
        H (aspect kept), the `[H, W + w']` strip is scaled uniformly to width W (bicubic) and
        centred vertically on a canvas of `fill` (default: the image's mean colour, as P2-DPO's
        `Erase` fills) [our choice: pad, never squeeze; the released stitch resizes the strip to
        the input size, which halves the image's width and turns circles into ellipses].

    Args:
      image: uint8 `[H, W, 3]`.
      crop: uint8 `[h, w, 3]`, e.g. `crop_to_box(image, box)`.
      fill: RGB of the "stitch" padding.

    Returns:
      the prompt's images, in order; `len` of it is the prompt's `num_images`.
    """
    for name, array in (("image", image), ("crop", crop)):
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"{name} must be uint8 [H, W, 3], got {array.dtype} {array.shape}.")
    if mode == "two_images":
        return image, crop
    if mode != "stitch":
        raise ValueError(f"mode={mode!r} is unknown; valid: {COMBINE_MODES}.")
    height, width = image.shape[:2]
    scaled_width = max(1, round(crop.shape[1] * height / crop.shape[0]))
    scaled_crop = Image.fromarray(crop).resize((scaled_width, height), Image.Resampling.BICUBIC)
    strip = np.concatenate([image, np.asarray(scaled_crop)], axis=1)
    strip_height = max(1, round(height * width / strip.shape[1]))
    strip = np.asarray(Image.fromarray(strip).resize((width, strip_height), Image.Resampling.BICUBIC))
    if fill is None:
        fill = np.round(image.reshape(-1, 3).astype(np.float64).mean(axis=0))
    canvas = np.empty_like(image)
    canvas[...] = np.asarray(fill, np.uint8)
    top = (height - strip_height) // 2
    canvas[top : top + strip_height] = strip
    return (canvas,)


def _restore_dtype(values: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Casts float32 results back to `dtype`, rounding and clipping for integer dtypes."""
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        values = jnp.clip(jnp.round(values), info.min, info.max)
    return values.astype(dtype)
