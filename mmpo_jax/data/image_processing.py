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

One definition per model: `from_pretrained_dir` reads the settings saved with a model (transformers
4's `preprocessor_config.json` or transformers 5's `processor_config.json` with the image processor
nested), with LLaVA-1.5's pad-to-square an explicit `image_aspect_ratio` ("pad" / "square", the LLaVA
repository's spelling); training, pair generation and evaluation all call it, and an export writes
the settings back (`to_hf_image_processor_dict`, transformers' `LlavaImageProcessor` with `do_pad`).
A file of unknown layout is an error, never a silent default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
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

PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# transformers' CLIP/LLaVA image processors (torchvision "Fast", PIL "Pil" backends) and the old
# feature-extractor name: the ones whose steps this module implements.
SUPPORTED_PROCESSOR_TYPES = frozenset(
    f"{name}{backend}" for name in ("CLIPImageProcessor", "LlavaImageProcessor") for backend in ("", "Fast", "Pil")
) | {"CLIPFeatureExtractor"}
IMAGE_ASPECT_RATIOS = ("pad", "square")


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


def tiny(image_size: int) -> ImageProcessorConfig:
    """Shapes-world preset: identity geometry for square `image_size` images, mean = std = 0.5.

    Resizing a square image to its own size is the identity in PIL, so for square images only
    rescaling and normalisation to [-1, 1] remain (pad-to-square guards non-square ones).
    [our choice] mean/std 0.5: the synthetic images have no natural-image statistics, and [-1, 1]
    is symmetric for the tiny conv stem.
    """
    return ImageProcessorConfig(
        size=image_size,
        crop_size=image_size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pad_to_square=True,
    )


def from_hf_preprocessor_config(
    config: Mapping[str, Any], *, pad_to_square: bool | None = None
) -> ImageProcessorConfig:
    """Reads a transformers image-processor dict (a `preprocessor_config.json`, or the
    `image_processor` entry of a v5 `processor_config.json`) of a CLIP/LLaVA image processor.

    Understands both layouts transformers has written: `size: {"shortest_edge": n}` /
    `crop_size: {"height": c, "width": c}` and the older plain integers. Pad-to-square comes from
    `do_pad` (transformers' `LlavaImageProcessor`) or `image_aspect_ratio` (the LLaVA repository's
    spelling, "pad" or "square"); the `pad_to_square` argument overrides both, because llava-hf
    checkpoints ship a plain `CLIPImageProcessor` although LLaVA-1.5 was trained with "pad".

    Raises:
      ValueError: a processor type other than CLIP/LLaVA's, missing `size` or `crop_size` (never
        a silent 224-px default), or settings this module does not implement (disabled resize/
        crop/rescale/normalise, a non-square crop, `size` as height/width, a rescale factor other
        than 1/255).
    """
    kind = config.get("image_processor_type", config.get("feature_extractor_type"))
    if kind is not None and kind not in SUPPORTED_PROCESSOR_TYPES:
        raise ValueError(f"image processor type {kind!r} is not supported; valid: {sorted(SUPPORTED_PROCESSOR_TYPES)}")
    missing = [key for key in ("size", "crop_size") if key not in config]
    if missing:
        raise ValueError(f"image processor config lacks {missing}; expected a CLIP/LLaVA "
                         "preprocessor_config.json with size and crop_size")
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
        if "image_aspect_ratio" in config:
            pad_to_square = pads_to_square(config["image_aspect_ratio"])
    return ImageProcessorConfig(
        size=_shortest_edge(config["size"]),
        crop_size=_square_crop(config["crop_size"]),
        mean=tuple(config.get("image_mean", CLIP_MEAN)),
        std=tuple(config.get("image_std", CLIP_STD)),
        pad_to_square=pad_to_square,
        resample=str(resample).lower(),
    )


def pads_to_square(image_aspect_ratio: str) -> bool:
    """LLaVA's `image_aspect_ratio` -> pad-to-square: "pad" -> True, "square" (the CLIP
    processor's own resize + centre crop, the LLaVA repository's default) -> False."""
    if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio={image_aspect_ratio!r} is not supported; valid: "
                         f"{IMAGE_ASPECT_RATIOS} (LLaVA-NeXT's 'anyres' tiling is not implemented)")
    return image_aspect_ratio == "pad"


def read_image_processor_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The image-processor settings saved with a model, as a dict.

    `path` is a model/processor directory or one of its files. Layouts:

    - transformers 5 `save_pretrained` of a `LlavaProcessor`: `processor_config.json` holding the
      image processor's settings under "image_processor";
    - transformers 4 / llava-hf hub checkpoints: `preprocessor_config.json` (a flat
      `processor_config.json` beside it holds only the processor's own fields).

    When both are present the nested v5 entry wins, as transformers 5 reads it.

    Raises:
      FileNotFoundError: neither file (or the given file does not exist).
      ValueError: a file that is not a JSON object, or a `processor_config.json` without an
        image processor and no `preprocessor_config.json` beside it.
    """
    path = pathlib.Path(path)
    directory = path if path.is_dir() else path.parent
    candidates = [path] if path.is_file() else [directory / PROCESSOR_CONFIG, directory / PREPROCESSOR_CONFIG]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected a model directory or its "
                                f"{PROCESSOR_CONFIG} / {PREPROCESSOR_CONFIG}")
    found = [candidate for candidate in candidates if candidate.is_file()]
    if not found:
        raise FileNotFoundError(f"{directory} has neither {PROCESSOR_CONFIG} nor {PREPROCESSOR_CONFIG}; "
                                "save the model's processor there (e.g. LlavaProcessor.save_pretrained)")
    for candidate in found:
        settings = json.loads(candidate.read_text())
        if not isinstance(settings, dict):
            raise ValueError(f"{candidate} holds a JSON {type(settings).__name__}, expected an object")
        if candidate.name == PROCESSOR_CONFIG and "image_processor" not in settings:
            if path.is_file():
                raise ValueError(f"{candidate} has no 'image_processor' entry (a transformers 4 layout); "
                                 f"pass the {PREPROCESSOR_CONFIG} beside it or the directory")
            continue  # transformers 4 layout: the image processor is in preprocessor_config.json
        nested = settings.get("image_processor", settings)
        if not isinstance(nested, dict):
            raise ValueError(f"{candidate}: 'image_processor' is a {type(nested).__name__}, expected an object")
        return nested
    raise ValueError(f"{directory / PROCESSOR_CONFIG} has no 'image_processor' entry and there is no "
                     f"{PREPROCESSOR_CONFIG} beside it")


def from_pretrained_dir(
    path: str | os.PathLike[str], *, image_aspect_ratio: str | None = None
) -> ImageProcessorConfig:
    """The image preprocessing of a saved model: the one definition that training, pair generation
    and evaluation all use.

    Args:
      path: a model directory (llava-hf checkpoint, export, or an orbax model directory holding
        the processor files) or its `processor_config.json` / `preprocessor_config.json`.
      image_aspect_ratio: "pad" (LLaVA-1.5's pad-to-square with the mean colour) or "square"
        (resize + centre crop only); None keeps what the file says (`do_pad` /
        `image_aspect_ratio`, else no padding, as transformers processes it).

    Raises:
      FileNotFoundError, ValueError: see `read_image_processor_dict` and
        `from_hf_preprocessor_config`; the message names the file.
    """
    settings = read_image_processor_dict(path)
    pad = None if image_aspect_ratio is None else pads_to_square(image_aspect_ratio)
    try:
        return from_hf_preprocessor_config(settings, pad_to_square=pad)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def to_hf_image_processor_dict(config: ImageProcessorConfig) -> dict[str, Any]:
    """`config` as the `preprocessor_config.json` of transformers' `LlavaImageProcessor`, which
    processes images exactly as `config` does (pad-to-square as `do_pad`)."""
    return {
        "image_processor_type": "LlavaImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_pad": config.pad_to_square,
        "do_resize": True, "size": {"shortest_edge": config.size},
        "do_center_crop": True, "crop_size": {"height": config.crop_size, "width": config.crop_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(config.mean), "image_std": list(config.std),
        "do_convert_rgb": True, "resample": int(RESAMPLE_METHODS[config.resample]),
    }


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
