"""Parity of our CLIP/LLaVA image preprocessing with transformers' PIL image processors.

transformers 5.x ships `CLIPImageProcessor` on a torchvision backend (torchvision is not installable
here) and the same steps on a PIL/NumPy backend as `CLIPImageProcessorPil` /
`LlavaImageProcessorPil`; the PIL ones are the reference. LLaVA-1.5's own pad-to-square
(`expand2square`, transcribed below from `llava/mm_utils.py`) is checked as well.
"""

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

from mmpo_jax.data import image_processing as ip

# Shapes chosen to hit odd sizes, portrait, landscape, square, and upscaling of a tiny image.
IMAGE_SHAPES = [(41, 57), (80, 33), (30, 97), (36, 36), (3, 5), (1, 1)]
SIZE, CROP = 36, 30


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5 `llava.mm_utils.expand2square`, verbatim."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def _hf_pixels(processor, image: np.ndarray) -> np.ndarray:
    # A PIL input leaves no doubt about the channel axis (a 3x5x3 array would be read as CHW).
    chw = processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    return np.moveaxis(chw, 0, -1)


def _hf_clip(size: int, crop: int, mean=ip.CLIP_MEAN, std=ip.CLIP_STD) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": crop, "width": crop},
        image_mean=list(mean),
        image_std=list(std),
    )


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_matches_transformers_clip_processor(shape):
    image = _random_image(*shape)
    ours = ip.preprocess(image, size=SIZE, crop_size=CROP, mean=ip.CLIP_MEAN, std=ip.CLIP_STD)
    assert ours.shape == (CROP, CROP, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _hf_pixels(_hf_clip(SIZE, CROP), image), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_pad_to_square_matches_llava_expand2square_then_clip(shape):
    image = _random_image(*shape, seed=1)
    config = ip.ImageProcessorConfig(size=SIZE, crop_size=CROP, pad_to_square=True)
    background = tuple(int(x * 255) for x in ip.CLIP_MEAN)
    reference_input = np.asarray(expand2square(Image.fromarray(image), background))
    np.testing.assert_allclose(
        config(image), _hf_pixels(_hf_clip(SIZE, CROP), reference_input), rtol=1e-6, atol=1e-6
    )
    llava_hf = LlavaImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": CROP, "width": CROP}, do_pad=True
    )
    np.testing.assert_allclose(config(image), _hf_pixels(llava_hf, image), rtol=1e-6, atol=1e-6)


def test_expand_to_square_pads_with_mean_colour_and_centres():
    image = _random_image(5, 8)
    square = ip.expand_to_square(image, (10, 20, 30))
    assert square.shape == (8, 8, 3)
    np.testing.assert_array_equal(square[1:6], image)  # offset (8 - 5) // 2 = 1
    np.testing.assert_array_equal(square[0], np.broadcast_to([10, 20, 30], (8, 3)))
    np.testing.assert_array_equal(square[6:], np.broadcast_to([10, 20, 30], (2, 8, 3)))


def test_clip_vit_l_336_on_a_photo_sized_image():
    image = _random_image(375, 500, seed=2)
    config = ip.clip_vit_l_336(pad_to_square=False)
    np.testing.assert_allclose(
        config(image), _hf_pixels(_hf_clip(336, 336), image), rtol=1e-6, atol=1e-6
    )


def test_tiny_preset_is_rescale_and_normalise_only():
    image = _random_image(16, 16, seed=3)
    expected = (image.astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(ip.tiny(16)(image), expected, rtol=1e-6, atol=1e-6)


def test_from_hf_preprocessor_config_reads_llava_hf_layouts():
    llava_hf = {  # llava-hf/llava-1.5-7b-hf preprocessor_config.json
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336},
    }
    assert ip.from_hf_preprocessor_config(llava_hf, pad_to_square=True) == ip.clip_vit_l_336()
    legacy = dict(llava_hf, size=336, crop_size=336, do_pad=True)
    assert ip.from_hf_preprocessor_config(legacy) == ip.clip_vit_l_336()
    saved = _hf_clip(SIZE, CROP).to_dict()  # what save_pretrained writes today
    config = ip.from_hf_preprocessor_config(saved)
    image = _random_image(41, 57, seed=4)
    np.testing.assert_allclose(config(image), _hf_pixels(_hf_clip(SIZE, CROP), image), rtol=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"crop_size": {"height": 336, "width": 224}}, "must be square"),
        ({"size": {"height": 336, "width": 336}}, "shortest_edge"),
        ({"do_center_crop": False}, "do_center_crop=False"),
        ({"rescale_factor": 1.0}, "rescale_factor=1.0"),
        ({"resample": 9}, "resample=9"),
    ],
)
def test_from_hf_preprocessor_config_rejects_unsupported(override, message):
    base = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    with pytest.raises(ValueError, match=message):
        ip.from_hf_preprocessor_config({**base, **override})


def test_invalid_inputs_name_the_value():
    with pytest.raises(TypeError, match="float32"):
        ip.tiny(4)(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        ip.tiny(4)(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="crop_size must be an int in"):
        ip.ImageProcessorConfig(size=8, crop_size=9)
    with pytest.raises(ValueError, match="resample='cubic'"):
        ip.ImageProcessorConfig(size=8, crop_size=8, resample="cubic")
