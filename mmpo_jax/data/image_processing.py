"""CLIP image preprocessing as LLaVA-1.5 uses it, on NumPy/PIL (no torch, no TensorFlow).

Steps, in order (each matches transformers' `CLIPImageProcessor` / `LlavaImageProcessor`, PIL
backend, to float32 round-off):

1. optional pad-to-square with the mean colour (LLaVA-1.5's `expand2square`, background
   `tuple(int(x * 255) for x in mean)`, the image centred on the longer side);
2. resize so the shortest side equals `size` (the longer side `int(size * long / short)`), PIL
   resampling on the uint8 image;
3. centre crop to `crop_size` x `crop_size` (offsets `(dim - crop) // 2`);
4. rescale by 1/255 (computed in float64, stored as float32);
5. normalise `(x - mean) / std` per channel in float32.

The output is channel-last float32 `[crop_size, crop_size, 3]`, the layout our vision tower takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

# OpenAI CLIP normalisation constants (the same values transformers ships as OPENAI_CLIP_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESAMPLE_METHODS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESAMPLE_BY_PIL_CODE = {int(code): name for name, code in RESAMPLE_METHODS.items()}


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Everything that determines how an image becomes `pixel_values`.

    Attributes:
      size: length in pixels of the shortest side after resizing.
      crop_size: side in pixels of the square centre crop (the model's input side); <= `size`.
      mean: per-channel (R, G, B) mean in [0, 1] units, subtracted after rescaling.
      std: per-channel (R, G, B) standard deviation in [0, 1] units.
      pad_to_square: pad the image to a square with the mean colour before resizing (LLaVA-1.5's
        `image_aspect_ratio="pad"`).
      resample: PIL resampling filter name, one of `RESAMPLE_METHODS`.
    """

    size: int
    crop_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = False
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        _validate_options(self.size, self.crop_size, self.mean, self.std, self.resample)
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Preprocesses uint8 `[H, W, 3]` with this config -> float32 `[crop, crop, 3]`."""
        return preprocess(image, **dataclasses.asdict(self))


def clip_vit_l_336(*, pad_to_square: bool = True) -> ImageProcessorConfig:
    """LLaVA-1.5's image processing: CLIP ViT-L/14-336, bicubic, pad-to-square on by default."""
    return ImageProcessorConfig(size=336, crop_size=336, pad_to_square=pad_to_square)


def tiny(image_size: int, *, mean: Sequence[float] = (0.5, 0.5, 0.5),
         std: Sequence[float] = (0.5, 0.5, 0.5)) -> ImageProcessorConfig:
    """Shapes-world preset: identity geometry for square `image_size` images, mean = std = 0.5.

    Resizing a square image to its own size is the identity in PIL, so for square images only
    rescaling and normalisation remain (pad-to-square guards non-square ones).
    [our choice] mean/std 0.5 for v1: the synthetic images have no natural-image statistics, and
    [-1, 1] is symmetric for the tiny conv stem. The shapes world v2 records CLIP's constants
    (`for_shapes_world`), so noise defined in CLIP units has the paper's pixel strength.
    """
    return ImageProcessorConfig(size=image_size, crop_size=image_size, mean=tuple(mean),
                                std=tuple(std), pad_to_square=True)


def for_shapes_world(world: Mapping[str, Any]) -> ImageProcessorConfig:
    """The preprocessing of a shapes world from its dataset metadata (`"world"`): `tiny` at its
    `image_size`, with its `image_mean` / `image_std` when it records them (v2), else v1's 0.5."""
    mean, std = world.get("image_mean", (0.5, 0.5, 0.5)), world.get("image_std", (0.5, 0.5, 0.5))
    return tiny(int(world["image_size"]), mean=mean, std=std)


def from_hf_preprocessor_config(
    config: Mapping[str, Any], *, pad_to_square: bool | None = None
) -> ImageProcessorConfig:
    """Reads a transformers `preprocessor_config.json` (as a dict) of a CLIP/LLaVA image processor.

    Understands both layouts transformers has written: `size: {"shortest_edge": n}` /
    `crop_size: {"height": c, "width": c}` and the older plain integers. `do_pad` (LLaVA's
    processor) maps to `pad_to_square`; the `pad_to_square` argument overrides it, because original
    LLaVA checkpoints keep that switch in the model config (`image_aspect_ratio="pad"`).

    Raises:
      ValueError: for settings this module does not implement (disabled resize/crop/rescale/
        normalise, a non-square crop, `size` as height/width, a rescale factor other than 1/255).
    """
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if not config.get(flag, True):
            raise ValueError(f"preprocessor config has {flag}=False; only True is supported.")
    rescale_factor = float(config.get("rescale_factor", 1 / 255))
    if not np.isclose(rescale_factor, 1 / 255, rtol=1e-9, atol=0.0):
        raise ValueError(f"rescale_factor={rescale_factor!r} is not supported; expected 1/255.")
    resample = config.get("resample", 3)
    if isinstance(resample, int):
        if resample not in _RESAMPLE_BY_PIL_CODE:
            raise ValueError(
                f"resample={resample!r} is not a PIL filter code; "
                f"valid: {sorted(_RESAMPLE_BY_PIL_CODE)}."
            )
        resample = _RESAMPLE_BY_PIL_CODE[resample]
    if pad_to_square is None:
        pad_to_square = bool(config.get("do_pad", False))
    return ImageProcessorConfig(
        size=_shortest_edge(config.get("size", 224)),
        crop_size=_square_crop(config.get("crop_size", 224)),
        mean=tuple(config.get("image_mean", CLIP_MEAN)),
        std=tuple(config.get("image_std", CLIP_STD)),
        pad_to_square=pad_to_square,
        resample=str(resample).lower(),
    )


def preprocess(
    image: np.ndarray,
    *,
    size: int,
    crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    pad_to_square: bool = False,
    resample: str = "bicubic",
) -> np.ndarray:
    """CLIP/LLaVA preprocessing of one RGB image.

    Args:
      image: uint8 `[H, W, 3]` RGB.
      size: shortest side after resizing, in pixels.
      crop_size: side of the square centre crop, in pixels (<= `size`).
      mean, std: per-channel normalisation constants in [0, 1] units.
      pad_to_square: pad to a square with the mean colour first (LLaVA-1.5 `expand2square`).
      resample: PIL filter name (`RESAMPLE_METHODS`).

    Returns:
      float32 `[crop_size, crop_size, 3]`, normalised.
    """
    _validate_options(size, crop_size, mean, std, resample)
    _validate_image(image)
    if pad_to_square:
        image = expand_to_square(image, tuple(int(m * 255) for m in mean))
    image = resize_shortest_side(image, size, resample=resample)
    image = center_crop(image, crop_size)
    pixels = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def expand_to_square(image: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Pads uint8 `[H, W, 3]` to `[S, S, 3]`, `S = max(H, W)`, centred (offset `(S - d) // 2`)."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[...] = np.asarray(background, np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


def resize_shortest_side(image: np.ndarray, size: int, *, resample: str = "bicubic") -> np.ndarray:
    """Resizes uint8 `[H, W, 3]` to shortest side `size`, longer side `int(size * long / short)`."""
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_height, new_width = (new_long, size) if width <= height else (size, new_long)
    if (new_height, new_width) == (height, width):
        return image
    resized = Image.fromarray(image).resize(
        (new_width, new_height), resample=RESAMPLE_METHODS[resample]
    )
    return np.asarray(resized)


def center_crop(image: np.ndarray, crop_size: int) -> np.ndarray:
    """The central `[crop_size, crop_size]` window of `[H, W, C]` (needs H, W >= crop_size)."""
    height, width = image.shape[:2]
    if crop_size > min(height, width):
        raise ValueError(f"crop_size={crop_size} exceeds the image size {height}x{width}.")
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    return image[top : top + crop_size, left : left + crop_size]


def _validate_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = getattr(image, "dtype", type(image).__name__)
        raise TypeError(f"image must be a uint8 numpy array [H, W, 3], got {kind}.")
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image must have shape [H, W, 3] with H, W >= 1, got {image.shape}.")


def _validate_options(
    size: int, crop_size: int, mean: Sequence[float], std: Sequence[float], resample: str
) -> None:
    if not (isinstance(size, (int, np.integer)) and size >= 1):
        raise ValueError(f"size must be a positive int, got {size!r}.")
    if not (isinstance(crop_size, (int, np.integer)) and 1 <= crop_size <= size):
        raise ValueError(f"crop_size must be an int in [1, size={size}], got {crop_size!r}.")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 channel values, got mean={mean!r}, std={std!r}.")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {std!r}.")
    if resample not in RESAMPLE_METHODS:
        raise ValueError(f"resample={resample!r} is unknown; valid: {sorted(RESAMPLE_METHODS)}.")


def _shortest_edge(size: int | Mapping[str, int]) -> int:
    if isinstance(size, int):
        return size
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    raise ValueError(
        f"size={dict(size)!r} is not supported; expected an int or {{'shortest_edge': n}}."
    )


def _square_crop(crop_size: int | Mapping[str, int]) -> int:
    if isinstance(crop_size, int):
        return crop_size
    height, width = crop_size.get("height"), crop_size.get("width")
    if height is None or height != width:
        raise ValueError(
            f"crop_size={dict(crop_size)!r} must be square {{'height': c, 'width': c}}."
        )
    return int(height)
