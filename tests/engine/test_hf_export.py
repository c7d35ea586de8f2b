"""Exports that transformers loads as llava-hf checkpoints: model, tokenizer and processor.

The source is a tiny random llava-hf checkpoint with a locally built Llama BPE tokenizer and a
`LlavaProcessor` saved by transformers 5 (and the transformers 4 hub layout); it is imported,
perturbed (so the export cannot pass by copying the source files), exported, and loaded back with
`AutoProcessor`, `AutoTokenizer` and `LlavaForConditionalGeneration`. The processor then builds the
inputs from a conversation and a photo-like non-square image, and transformers' logits and greedy
tokens must equal ours computed from our own template and preprocessing.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from mmpo_jax.data import image_processing
from mmpo_jax.data.template import TEMPLATES, encode_prompt
from mmpo_jax.data.tokenizer import load_tokenizer
from mmpo_jax.generation import generate
from mmpo_jax.models.convert import load_hf_llava
from mmpo_jax.engine.hf_export import export_pretrained, save_processor
from tests.data.test_image_processing import _photo
from tests.models import hf_fixtures

PROMPT = "What is in the image?"
MAX_NEW_TOKENS = 6


def _exported(tmp_path, *, layout: str, pad: bool):
    source = tmp_path / "source"
    hf_fixtures.save_tiny_llava_hf(source, layout=layout, do_pad=False)
    model, _ = load_hf_llava(source)
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                                   nnx.state(model, nnx.Param)))
    tokenizer = load_tokenizer(source)
    image_config = image_processing.from_pretrained_dir(source, image_aspect_ratio="pad" if pad else "square")
    export_pretrained(model, tmp_path / "export", tokenizer=tokenizer, image_config=image_config)
    return model, tokenizer, image_config, tmp_path / "export"


@pytest.mark.parametrize("layout, pad", [("v5", True), ("v4", False)])
def test_transformers_loads_the_export_and_reproduces_our_logits_and_greedy_tokens(tmp_path, layout, pad):
    model, tokenizer, image_config, export = _exported(tmp_path, layout=layout, pad=pad)
    assert_transformers_reproduces(model, tokenizer, image_config, export)


def assert_transformers_reproduces(model, tokenizer, image_config, export) -> None:
    """`AutoProcessor`, `AutoTokenizer` and `LlavaForConditionalGeneration` load `export` (no
    missing or unexpected weights); the processor builds the inputs of a conversation over a
    photo-like non-square image exactly as our template and `image_config` do, and transformers'
    logits (<= 1e-4 of their largest) and greedy tokens equal `model`'s."""
    reference, info = LlavaForConditionalGeneration.from_pretrained(
        export, output_loading_info=True, attn_implementation="eager")
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"]
    processor = AutoProcessor.from_pretrained(export)
    hf_tokenizer = AutoTokenizer.from_pretrained(export)
    config = json.loads((export / "config.json").read_text())
    assert config["text_config"]["bos_token_id"] == tokenizer.bos_token_id == reference.config.text_config.bos_token_id
    generation = json.loads((export / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert getattr(processor.image_processor, "do_pad", False) == image_config.pad_to_square

    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == TEMPLATES["llava_1_5"].prompt_text(PROMPT, num_images=1, system_prompt=None, image_token="<image>")
    assert hf_tokenizer.encode(text) == tokenizer.encode(text)
    image = _photo(47, 71, seed=1)
    inputs = processor(images=Image.fromarray(image), text=text, return_tensors="pt")

    ours_ids = encode_prompt(tokenizer, PROMPT, num_image_tokens=model.config.num_image_tokens).input_ids
    assert inputs["input_ids"][0].tolist() == ours_ids.tolist()
    ours_pixels = image_config(image)[None]
    np.testing.assert_allclose(inputs["pixel_values"].numpy().transpose(0, 2, 3, 1), ours_pixels, rtol=0, atol=1e-5)

    with torch.no_grad():
        expected = reference(**inputs).logits.numpy()
        expected_tokens = reference.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                             min_new_tokens=MAX_NEW_TOKENS)[0, len(ours_ids):].tolist()
    logits = nnx.jit(lambda m, i, p: m(i, pixel_values=p).logits)(
        model, jnp.asarray(ours_ids[None]), jnp.asarray(ours_pixels))
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    tokens = generate(model, jnp.asarray(ours_ids[None]), jnp.asarray(ours_pixels), max_new_tokens=MAX_NEW_TOKENS,
                      eos_token_id=None, pad_token_id=tokenizer.pad_token_id).new_tokens
    assert np.asarray(tokens)[0].tolist() == expected_tokens


def test_export_refuses_a_tokenizer_or_preprocessing_that_does_not_fit(tmp_path):
    source = tmp_path / "source"
    hf_fixtures.save_tiny_llava_hf(source)
    model, config = load_hf_llava(source)
    tokenizer = load_tokenizer(source)
    with pytest.raises(ValueError, match="crops to 336 px but the vision tower takes 30 px"):
        save_processor(tmp_path / "out", config=config, tokenizer=tokenizer,
                       image_config=image_processing.clip_vit_l_336())
    image_config = image_processing.from_pretrained_dir(source)
    other = config.__class__(**{**config.__dict__, "image_token_id": 7})
    with pytest.raises(ValueError, match="<image> id is 410 but the model's image_token_id is 7"):
        save_processor(tmp_path / "out", config=other, tokenizer=tokenizer, image_config=image_config)
    with pytest.raises(ValueError, match="template='vicuna' has no chat template"):
        save_processor(tmp_path / "out", config=config, tokenizer=tokenizer, image_config=image_config,
                       template="vicuna")
