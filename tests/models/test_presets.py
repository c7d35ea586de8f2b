"""The tiny presets: v2's 8x8 visual-token grid for 128-px images, v1's preset unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax.models import presets
from mmpo_jax.models.attention import ProbeSpec
from mmpo_jax.models.llava import Llava


def test_tiny_v2_sees_128_px_images_as_an_8x8_token_grid():
    config = presets.tiny_v2(vocab_size=64, image_token_id=63)
    assert config.num_image_tokens == 64 and config.vision_config.grid_size == 8
    assert config.vision_config.image_size == 128 and config.vision_config.token_merge == 1
    assert 0.8e6 <= presets.count_parameters(config) <= 0.9e6
    # v1's preset is what it was: 64 px, 16 tokens (a 4x4 grid after the 2x2 merge)
    v1 = presets.tiny(vocab_size=64, image_token_id=63)
    assert v1.num_image_tokens == 16 and v1.vision_config.image_size == 64 and v1.vision_config.token_merge == 2
    assert set(presets.TINY_PRESETS) == {"tiny", "tiny_v2"}

    model = Llava(config, rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
    input_ids = jnp.concatenate([jnp.full((2, 64), 63), jnp.arange(2 * 4).reshape(2, 4)], axis=1)
    out = model(input_ids, pixel_values=pixels, probe=ProbeSpec(layers=(-1,)))
    assert out.logits.shape == (2, 68, 64) and out.probes[1].shape == (2, 68, 64)
    # the stem's cells are 16 px, in row-major order: a bump in the cell at row 1, column 6 reaches
    # the embeddings of the cells within the stem's 63-px receptive field of it and no others
    bumped = pixels.at[0, 16:32, 96:112].add(3.0)
    embeddings = model.vision_tower.embeddings(jnp.stack([pixels[0], bumped[0]]))[:, 1:]  # no class token
    change = np.abs(np.asarray(embeddings[1] - embeddings[0])).sum(-1).reshape(8, 8)
    changed = change > 1e-4 * change.max()  # not float noise of the batched convolution
    rows, cols = np.nonzero(changed)
    assert changed[1, 6] and np.abs(rows - 1).max() <= 2 and np.abs(cols - 6).max() <= 2
