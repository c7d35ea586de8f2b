"""A tiny random LLaVA (transformers' layout, loaded into ours) and a left-padded batch, shared by the
contrastive and ADAPT decoding tests."""

from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp

from mmpo_jax.models.convert import load_hf_llava
from tests.generation.helpers import left_padded_prompts
from tests.models import hf_fixtures


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """dict(model, config, input_ids [2, T], mask [2, T] (int), pixels [2, 30, 30, 3]).

    Two prompts of different lengths (left-padded), one 5x5-patch image each (25 image tokens); the
    wide random weights (`hf_fixtures.randomize_parameters`) give peaked attention and logits.
    """
    directory = tmp_path_factory.mktemp("tiny_llava")
    hf_fixtures.save_tiny_llava(directory, seed=1)
    model, config = load_hf_llava(directory)
    rng = np.random.default_rng(1)
    input_ids, mask = left_padded_prompts(config.num_image_tokens, rng)
    pixels = jnp.asarray(rng.normal(size=(2, 30, 30, 3)).astype(np.float32))
    return dict(model=model, config=config, input_ids=input_ids, mask=mask, pixels=pixels)
