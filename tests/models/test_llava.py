"""Llava against transformers' LlavaForConditionalGeneration, plus its own contracts and presets.

The reference models are tiny random torch models saved with `save_pretrained` and loaded through
`load_hf_llava`, so these tests cover the composition and the conversion together. float32
everywhere; relative tolerance 1e-4 on logits and hidden states (observed ~1e-6).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mmpo_jax.models import presets
from mmpo_jax.objectives import logprobs
from mmpo_jax.models.attention import ProbeSpec
from mmpo_jax.models.convert import load_hf_llava
from mmpo_jax.models.llama import init_cache
from mmpo_jax.models.llava import Llava, default_image_positions, image_token_positions, scatter_visual_tokens
from tests.models import hf_fixtures

RTOL = 1e-4
IMAGE = hf_fixtures.IMAGE_TOKEN_ID

# (name, fixture options, probe form)
CONFIGS = {
    "mha_layer-2_default": (dict(num_key_value_heads=4, vision_feature_layer=-2), "image"),
    "gqa_layer-1_full": (dict(num_key_value_heads=2, vision_feature_layer=-1, vision_feature_select_strategy="full"),
                         "image_heads"),
    "gqa_layers-1-3_tied": (dict(num_key_value_heads=1, vision_feature_layer=[-1, -3], tie_word_embeddings=True),
                            "image"),
}


_SAVED: dict = {}


def load_pair(name: str, tmp_path_factory):
    """(torch model, our model, our config) of configuration `name`, built once per test session."""
    if name not in _SAVED:
        options, _ = CONFIGS[name]
        directory = tmp_path_factory.mktemp(name)
        torch_model = hf_fixtures.save_tiny_llava(directory, seed=len(name), **options)
        _SAVED[name] = (torch_model, *load_hf_llava(directory))
    return _SAVED[name]


@pytest.fixture(params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, torch model, our model, our config) for each configuration."""
    return request.param, *load_pair(request.param, tmp_path_factory)


@pytest.fixture
def gqa(tmp_path_factory):
    """The grouped-query, `full`-strategy configuration: (torch model, our model, our config)."""
    return load_pair("gqa_layer-1_full", tmp_path_factory)


@nnx.jit(static_argnames=("output_hidden_states",))
def forward(model: Llava, input_ids, *, pixel_values=None, visual_tokens=None, probe=None, cache=None,
            output_hidden_states=False):
    return model(input_ids, pixel_values=pixel_values, visual_tokens=visual_tokens, probe=probe, cache=cache,
                 output_hidden_states=output_hidden_states)


def forward_with_probes(model: Llava, input_ids: np.ndarray, pixels: np.ndarray, probe_form: str):
    """The parity test's call (other tests reuse it, and so its compilation)."""
    probe = ProbeSpec(layers=(0, -1), form=probe_form)
    return forward(
        model, jnp.asarray(input_ids), pixel_values=channels_last(pixels), probe=probe, output_hidden_states=True
    )


def two_image_batch(num_image_tokens: int, seed: int = 0, images_per_row: tuple[int, int] = (2, 2)):
    """input_ids [2, T] with the given images per row (text between them), pixels [N, 3, 30, 30] (torch layout)."""
    rng = np.random.default_rng(seed)
    rows = []
    for count in images_per_row:
        row = [1, *rng.integers(3, 90, 3)]
        for _ in range(count):
            row += [IMAGE] * num_image_tokens + list(rng.integers(3, 90, 2))
        rows.append(row)
    length = max(len(row) for row in rows)
    rows = [row + list(rng.integers(3, 90, length - len(row))) for row in rows]  # equal lengths, no padding
    pixels = rng.normal(size=(sum(images_per_row), 3, 30, 30)).astype(np.float32)
    return np.array(rows), pixels


def run_torch(torch_model, input_ids, pixels=None):
    with torch.no_grad():
        return torch_model(
            input_ids=torch.tensor(input_ids),
            pixel_values=None if pixels is None else torch.tensor(pixels),
            output_hidden_states=True,
            output_attentions=True,
        )


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


def projected_visual_tokens(reference, width: int) -> np.ndarray:
    """transformers' projected visual tokens of all images, in batch order, as rows: [N_images * n, D].

    The contract is the projector's output per image; its container is incidental and has changed
    within transformers 5 (a flat [N*n, D] tensor, then a list of per-image [n, D] tensors in 5.25),
    so every element is flattened to rows of D. `image_outputs.pooler_output` is the name 5.25 asks
    for: `image_hidden_states`, its deprecated alias, is announced to mean something else from 5.30.
    """
    return np.concatenate([np.asarray(image).reshape(-1, width) for image in reference.image_outputs.pooler_output])


def channels_last(pixels: np.ndarray) -> jax.Array:
    return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def test_parity_with_transformers(pair):
    name, torch_model, model, config = pair
    probe_form = CONFIGS[name][1]
    input_ids, pixels = two_image_batch(config.num_image_tokens)
    reference = run_torch(torch_model, input_ids, pixels)
    output = forward_with_probes(model, input_ids, pixels, probe_form)
    assert_close(output.logits, reference.logits)
    assert len(output.hidden_states) == len(reference.hidden_states) == config.text_config.num_hidden_layers + 1
    for ours, theirs in zip(output.hidden_states, reference.hidden_states):
        assert_close(ours, theirs)
    width = config.text_config.hidden_size
    assert_close(output.visual_tokens.reshape(-1, width), projected_visual_tokens(reference, width))
    image_positions = np.asarray(output.image_positions)
    assert image_positions.shape == (2, 2 * config.num_image_tokens)
    np.testing.assert_array_equal(input_ids[np.arange(2)[:, None], image_positions], IMAGE)
    for layer in (0, config.text_config.num_hidden_layers - 1):
        attentions = reference.attentions[layer].numpy()  # [B, H, T, T]
        gathered = np.stack([attentions[b][:, :, image_positions[b]] for b in range(2)])  # [B, H, T, N]
        expected = gathered.mean(axis=1) if probe_form == "image" else gathered
        # probabilities (at most 1): 1e-5 absolute
        np.testing.assert_allclose(np.asarray(output.probes[layer]), expected, rtol=0, atol=1e-5)
    text_ids = input_ids[:, :4]  # text only: no image tokens, no pixels
    assert_close(forward(model, jnp.asarray(text_ids)).logits, run_torch(torch_model, text_ids).logits)


def test_images_fill_placeholders_in_batch_order(gqa):
    """Rows with different image counts: the k-th image fills the k-th placeholder block of the batch."""
    torch_model, model, config = gqa
    input_ids, pixels = two_image_batch(config.num_image_tokens, seed=1, images_per_row=(1, 2))
    output = forward(model, jnp.asarray(input_ids), pixel_values=channels_last(pixels))
    assert_close(output.logits, run_torch(torch_model, input_ids, pixels).logits)
    assert output.image_positions is None  # rows hold different counts and no probe asked for them


def test_visual_tokens_path_matches_pixel_path(gqa):
    _, model, config = gqa
    input_ids, pixels = two_image_batch(config.num_image_tokens)
    from_pixels = forward_with_probes(model, input_ids, pixels, CONFIGS["gqa_layer-1_full"][1])
    visual_tokens = from_pixels.visual_tokens
    assert visual_tokens.shape == (4, config.num_image_tokens, config.text_config.hidden_size)
    from_tokens = forward(
        model, jnp.asarray(input_ids), visual_tokens=visual_tokens, probe=ProbeSpec(layers=(0, -1), form="image_heads"),
        output_hidden_states=True,
    )
    assert_close(from_tokens.logits, from_pixels.logits)
    np.testing.assert_array_equal(from_tokens.image_positions, from_pixels.image_positions)
    assert_close(from_tokens.probes[1], from_pixels.probes[1])


def test_kv_cache_decoding_matches_full_forward(gqa):
    """Prefill with the images through a cache, then one token at a time: same logits as one pass."""
    _, model, config = gqa
    input_ids, pixels = two_image_batch(config.num_image_tokens)
    full = forward_with_probes(model, input_ids, pixels, CONFIGS["gqa_layer-1_full"][1])
    prompt = input_ids.shape[1] - 2  # every row ends in two text tokens
    cache = init_cache(config.text_config, batch_size=2, max_length=input_ids.shape[1] + 3)
    step = forward(model, jnp.asarray(input_ids[:, :prompt]), pixel_values=channels_last(pixels), cache=cache)
    logits = [step.logits]
    for t in range(prompt, input_ids.shape[1]):
        step = forward(model, jnp.asarray(input_ids[:, t : t + 1]), cache=step.cache)
        logits.append(step.logits)
    assert_close(jnp.concatenate(logits, axis=1), full.logits)


@nnx.jit(static_argnames=("probe", "return_logits"))
def forward_at(model: Llava, input_ids, pixels, positions, probe, return_logits):
    return model(input_ids, pixel_values=pixels, probe=probe, output_positions=positions, return_logits=return_logits)


def test_outputs_at_selected_positions_equal_those_rows_of_the_full_forward(pair):
    """`output_positions` keeps hidden states, logits and probes at a few positions per row (repeats allowed, as
    a padded bucket has); log-probs from the gathered hidden states and the LM head table equal the full-logits
    path's (1e-5)."""
    name, _, model, config = pair
    probe_form = CONFIGS[name][1]
    input_ids, pixels = two_image_batch(config.num_image_tokens)
    full = forward_with_probes(model, input_ids, pixels, probe_form)
    length = input_ids.shape[1]
    positions = np.array([[length - 1, 3, 10, 3], [0, length - 2, length - 1, length - 1]], np.int32)
    probe = ProbeSpec(layers=(0, -1), form=probe_form)
    gathered = forward_at(model, jnp.asarray(input_ids), channels_last(pixels), jnp.asarray(positions), probe, True)
    rows = (np.arange(2)[:, None], positions)
    assert gathered.logits.shape == (2, 4, config.text_config.vocab_size)
    assert_close(gathered.logits, np.asarray(full.logits)[rows])
    assert_close(gathered.last_hidden_state, np.asarray(full.hidden_states[-1])[rows])
    query_axis = 1 if probe_form == "image" else 2
    for layer in (0, config.text_config.num_hidden_layers - 1):
        whole = np.asarray(full.probes[layer])
        expected = np.stack([np.take(whole[b], positions[b], axis=query_axis - 1) for b in range(2)])
        np.testing.assert_allclose(np.asarray(gathered.probes[layer]), expected, rtol=0, atol=1e-6)

    no_head = forward_at(model, jnp.asarray(input_ids), channels_last(pixels), jnp.asarray(positions), None, False)
    assert no_head.logits is None
    labels = jnp.asarray(np.random.default_rng(0).integers(0, config.text_config.vocab_size, (2, 4)))
    valid = jnp.asarray([[True, True, True, False], [True, True, False, False]])
    logps = logprobs.hidden_token_logprobs(no_head.last_hidden_state, model.language_model.lm_head_table(), labels,
                                           valid, chunk_size=2)
    expected = logprobs.token_logprobs(jnp.asarray(np.asarray(full.logits)[rows]), labels, valid, chunk_size=None)
    np.testing.assert_allclose(logps, expected, rtol=1e-5, atol=1e-5)


def test_placeholder_count_mismatch_names_both_counts(gqa):
    _, model, config = gqa
    input_ids, pixels = two_image_batch(config.num_image_tokens)
    input_ids[0, np.argmax(input_ids[0] == IMAGE)] = 3  # one placeholder fewer than image features
    total = 4 * config.num_image_tokens
    visual_tokens = jnp.zeros((4, config.num_image_tokens, config.text_config.hidden_size))
    with pytest.raises(ValueError, match=rf"{total - 1} placeholder tokens .* but {total} image features"):
        model(jnp.asarray(input_ids), visual_tokens=visual_tokens)


def test_argument_errors(gqa):
    _, model, config = gqa
    input_ids, pixels = two_image_batch(config.num_image_tokens, images_per_row=(1, 2))
    visual_tokens = jnp.zeros((3, config.num_image_tokens, config.text_config.hidden_size))
    with pytest.raises(ValueError, match="at most one of pixel_values and visual_tokens"):
        model(jnp.asarray(input_ids), pixel_values=channels_last(pixels), visual_tokens=visual_tokens)
    counts = (config.num_image_tokens, 2 * config.num_image_tokens)
    with pytest.raises(ValueError, match=r"different numbers of image tokens \[%d, %d\]" % counts):
        model(jnp.asarray(input_ids), visual_tokens=visual_tokens, probe=ProbeSpec(layers=(0,)))
    with pytest.raises(ValueError, match="no image tokens"):
        model(jnp.asarray(input_ids[:, :3]), probe=ProbeSpec(layers=(0,)))


def test_scatter_and_positions_follow_row_major_order():
    embeddings = jnp.zeros((2, 4, 1))
    input_ids = jnp.array([[7, 5, 7, 1], [1, 7, 7, 2]])
    visual_tokens = jnp.arange(1, 5, dtype=jnp.float32).reshape(2, 2, 1)  # image 0: 1, 2; image 1: 3, 4
    scattered = scatter_visual_tokens(embeddings, input_ids, visual_tokens, image_token_id=7)
    np.testing.assert_array_equal(scattered[..., 0], [[1, 0, 2, 0], [0, 3, 4, 0]])
    np.testing.assert_array_equal(image_token_positions(input_ids, 7), [[0, 2], [1, 2]])
    with pytest.raises(ValueError, match=r"expected 3 image tokens per example, rows hold \[2, 2\]"):
        image_token_positions(input_ids, 7, num_per_example=3)


def test_default_image_positions_eager_and_under_jit():
    input_ids = jnp.array([[7, 5, 7, 1], [1, 7, 7, 2]])
    uneven = jnp.array([[7, 5, 7, 1], [1, 7, 3, 2]])
    np.testing.assert_array_equal(default_image_positions(input_ids, 7, 4, required=False), [[0, 2], [1, 2]])
    assert default_image_positions(uneven, 7, 3, required=False) is None
    with pytest.raises(ValueError, match=r"different numbers of image tokens \[1, 2\]"):
        default_image_positions(uneven, 7, 3, required=True)
    jitted = jax.jit(default_image_positions, static_argnums=(1, 2), static_argnames="required")
    np.testing.assert_array_equal(jitted(input_ids, 7, 4, required=True), [[0, 2], [1, 2]])
    assert jitted(input_ids, 7, 4, required=False) is None
    with pytest.raises(ValueError, match="3 visual tokens cannot be split evenly over batch 2"):
        jitted(uneven, 7, 3, required=True)
    with pytest.raises(ValueError, match="need image_positions passed"):
        jitted(input_ids, 7, None, required=True)


def test_tiny_preset_size_and_conv_stem_forward():
    config = presets.tiny(vocab_size=256, image_token_id=255)
    assert config.num_image_tokens == 16
    model = Llava(config, rngs=nnx.Rngs(0))
    count = presets.count_parameters(model)
    assert count == presets.count_parameters(config)
    assert 0.9e6 <= count <= 1.0e6, count
    pixels = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
    input_ids = jnp.concatenate([jnp.full((3, 16), 255), jnp.arange(3 * 5).reshape(3, 5)], axis=1)
    changed_pixels = pixels.at[0].multiply(-1)
    both = forward(model, jnp.tile(input_ids, (2, 1)), pixel_values=jnp.concatenate([pixels, changed_pixels]),
                   probe=ProbeSpec(layers=(-1,)))
    assert both.logits.shape == (6, 21, 256)
    assert both.probes[1].shape == (6, 21, 16)
    assert bool(jnp.isfinite(both.logits).all())
    # a changed image changes its own row only: images stay independent through stem, merge and projector
    original, changed = both.logits[:3], both.logits[3:]
    assert not np.allclose(changed[0], original[0], atol=1e-5)
    np.testing.assert_allclose(changed[1:], original[1:], rtol=1e-5, atol=1e-6)


def count_by_extrapolation(config) -> int:
    """Parameters of a preset, counted on 1- and 2-layer variants (both counts are linear in the layers)."""

    def count(text_layers: int, vision_layers: int) -> int:
        return presets.count_parameters(dataclasses.replace(
            config,
            text_config=dataclasses.replace(config.text_config, num_hidden_layers=text_layers),
            vision_config=dataclasses.replace(config.vision_config, num_hidden_layers=vision_layers),
        ))

    base = count(1, 1)
    per_text_layer, per_vision_layer = count(2, 1) - base, count(1, 2) - base
    return (base + (config.text_config.num_hidden_layers - 1) * per_text_layer
            + (config.vision_config.num_hidden_layers - 1) * per_vision_layer)


@pytest.mark.parametrize(
    "preset, expected",
    [
        # Llama-2-7B 6,738,415,616 + 64 new rows in embed and head (524,288) + CLIP ViT-L/14-336 vision
        # 303,507,456 + projector 1024x4096 + 4096x4096 + biases 20,979,712 (llava-hf reports 7.06B)
        (presets.llava_1_5_7b, 7_063_427_072),
        # Llama-2-13B 13,015,864,320 + 655,360 + 303,507,456 + projector 31,467,520
        (presets.llava_1_5_13b, 13_351_494_656),
    ],
)
def test_llava_1_5_presets_parameter_counts(preset, expected):
    config = preset()
    assert count_by_extrapolation(config) == expected
    assert config.num_image_tokens == 576 and config.image_token_id == 32000


def test_config_validation_names_the_bad_value():
    config = presets.tiny(vocab_size=64, image_token_id=63)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='cls'"):
        dataclasses.replace(config, vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match="token_merge=2 .* cannot keep the class token"):
        dataclasses.replace(config, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match=r"vision_feature_layer -3 is out of range .* \(valid: -2..1\)"):
        dataclasses.replace(config, vision_feature_layer=-3)
    with pytest.raises(ValueError, match=r"image_token_id=64 is outside the vocabulary \[0, 64\)"):
        dataclasses.replace(config, image_token_id=64)
    assert type(config).from_dict(config.to_dict()) == config
