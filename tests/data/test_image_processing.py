"""Parity of our CLIP/LLaVA image preprocessing with transformers' PIL image processors.

transformers 5.x ships `CLIPImageProcessor` on a torchvision backend (torchvision is not installable
here) and the same steps on a PIL/NumPy backend as `CLIPImageProcessorPil` /
`LlavaImageProcessorPil`; the PIL ones are the reference. LLaVA-1.5's own pad-to-square
(`expand2square`, transcribed below from `llava/mm_utils.py`) is checked as well.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor, CLIPImageProcessorPil, LlavaImageProcessor, LlavaImageProcessorPil

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


# ----------------------------------------------------------------------------- real-looking images
# transformers 5 resolves `CLIPImageProcessor` / `LlavaImageProcessor` to their PIL backends when
# torchvision is absent (as here); the torchvision backends resize with another kernel.


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth colour gradients, a few filled shapes, sensor-like noise,
    then a JPEG round trip (quality 85) for compression artefacts."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([120 + 90 * np.sin(3 * x + c) * np.cos(2 * y - c) for c in rng.uniform(0, 6, 3)], -1)
    for _ in range(4):
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        base[(y - cy * height / max(height, width)) ** 2 + (x - cx) ** 2 < radius**2] = rng.uniform(0, 255, 3)
    noisy = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(noisy).save(encoded, format="JPEG", quality=85)
    return np.asarray(Image.open(encoded).convert("RGB"))


PHOTO_SHAPES = [(480, 640), (640, 427), (375, 500), (333, 500)]


@pytest.mark.parametrize("shape", PHOTO_SHAPES)
@pytest.mark.parametrize("pad", [False, True])
def test_clip_vit_l_336_matches_transformers_on_photos(shape, pad):
    """LLaVA-1.5's processing (CLIP ViT-L/14-336) against transformers' `CLIPImageProcessor`, and
    with pad-to-square against `LlavaImageProcessor(do_pad=True)` and LLaVA's own expand2square."""
    image = _photo(*shape, seed=shape[0])
    ours = ip.clip_vit_l_336(pad_to_square=pad)(image)
    settings = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    if pad:
        reference = _hf_pixels(LlavaImageProcessor(do_pad=True, **settings), image)
        background = tuple(int(x * 255) for x in ip.CLIP_MEAN)
        padded = np.asarray(expand2square(Image.fromarray(image), background))
        np.testing.assert_allclose(ours, _hf_pixels(CLIPImageProcessor(**settings), padded), rtol=0, atol=1e-5)
    else:
        reference = _hf_pixels(CLIPImageProcessor(**settings), image)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def _saved_processor(directory, image_processor) -> None:
    """What transformers 5 writes for a LlavaProcessor: processor_config.json with the image
    processor nested under "image_processor" (plus the tokenizer files)."""
    from transformers import LlavaProcessor

    from tests.models.hf_fixtures import llama_bpe_tokenizer

    LlavaProcessor(image_processor=image_processor, tokenizer=llama_bpe_tokenizer(legacy=False),
                   patch_size=14).save_pretrained(directory)


def test_from_pretrained_dir_reads_what_transformers_5_saves(tmp_path):
    _saved_processor(tmp_path, CLIPImageProcessor(size={"shortest_edge": 336},
                                                  crop_size={"height": 336, "width": 336}))
    assert (tmp_path / "processor_config.json").exists()
    assert not (tmp_path / "preprocessor_config.json").exists()
    assert ip.from_pretrained_dir(tmp_path) == ip.clip_vit_l_336(pad_to_square=False)
    assert ip.from_pretrained_dir(tmp_path, image_aspect_ratio="pad") == ip.clip_vit_l_336()
    assert ip.from_pretrained_dir(tmp_path / "processor_config.json") == ip.clip_vit_l_336(pad_to_square=False)


def test_from_pretrained_dir_reads_the_transformers_4_hub_layout(tmp_path):
    """llava-hf/llava-1.5-7b-hf: preprocessor_config.json + a flat processor_config.json."""
    llava_hf = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).to_dict()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(llava_hf))
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
         "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}))
    assert ip.from_pretrained_dir(tmp_path) == ip.clip_vit_l_336(pad_to_square=False)
    assert ip.from_pretrained_dir(tmp_path, image_aspect_ratio="pad") == ip.clip_vit_l_336()
    assert ip.from_pretrained_dir(tmp_path, image_aspect_ratio="square") == ip.clip_vit_l_336(pad_to_square=False)
    with pytest.raises(ValueError, match="no 'image_processor' entry"):
        ip.from_pretrained_dir(tmp_path / "processor_config.json")


def test_pad_settings_in_the_file_are_read(tmp_path):
    _saved_processor(tmp_path, LlavaImageProcessor(do_pad=True, size={"shortest_edge": 336},
                                                   crop_size={"height": 336, "width": 336}))
    assert ip.from_pretrained_dir(tmp_path) == ip.clip_vit_l_336()
    assert ip.from_pretrained_dir(tmp_path, image_aspect_ratio="square") == ip.clip_vit_l_336(pad_to_square=False)
    aspect = {"size": 336, "crop_size": 336, "image_aspect_ratio": "pad"}  # the LLaVA repository's key
    assert ip.from_hf_preprocessor_config(aspect) == ip.clip_vit_l_336()


@pytest.mark.parametrize("files, error, message", [
    ({}, FileNotFoundError, "neither processor_config.json nor preprocessor_config.json"),
    ({"processor_config.json": {"patch_size": 14}}, ValueError, "no 'image_processor' entry"),
    ({"preprocessor_config.json": {"image_processor_type": "SiglipImageProcessor", "size": 384,
                                   "crop_size": 384}}, ValueError, "'SiglipImageProcessor' is not supported"),
    ({"preprocessor_config.json": {"image_processor_type": "CLIPImageProcessor"}}, ValueError,
     r"lacks \['size', 'crop_size'\]"),
    ({"preprocessor_config.json": []}, ValueError, "JSON list, expected an object"),
])
def test_unknown_layouts_are_errors_never_224_px_defaults(tmp_path, files, error, message):
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(error, match=message):
        ip.from_pretrained_dir(tmp_path)


def test_image_aspect_ratio_values_are_checked(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 336, "crop_size": 336}))
    with pytest.raises(ValueError, match=r"image_aspect_ratio='anyres' is not supported; valid: \('pad', 'square'\)"):
        ip.from_pretrained_dir(tmp_path, image_aspect_ratio="anyres")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ip.from_pretrained_dir(tmp_path / "missing")


@pytest.mark.parametrize("pad", [False, True])
def test_exported_settings_make_transformers_process_as_we_do(tmp_path, pad):
    config = ip.ImageProcessorConfig(size=40, crop_size=32, pad_to_square=pad, resample="bilinear")
    settings = ip.to_hf_image_processor_dict(config)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    assert ip.from_pretrained_dir(tmp_path) == config
    fields = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
    image = _photo(90, 61, seed=5)
    np.testing.assert_allclose(config(image), _hf_pixels(LlavaImageProcessor(**fields), image), rtol=0, atol=1e-5)
