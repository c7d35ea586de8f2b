"""Llama decoder parity with transformers' PyTorch LlamaForCausalLM (eager attention, float32).

Reference models are tiny random transformers models whose every parameter is redrawn wide
(``randomize_parameters``), copied into our NNX model by ``copy_hf_weights`` below (a test-local
mapping; ``convert.py`` is the real converter). Batches are left-padded. Comparisons are made at the
valid (non-pad) query positions: pad rows are don't-care by convention (both implementations give
them a uniform attention row today, but nothing depends on it).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mmpo_jax.models.attention import ProbeSpec
from mmpo_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache, positions_from_mask
from mmpo_jax.models.partitioning import AXIS_NAMES
from tests.models.hf_fixtures import randomize_parameters

VOCAB = 96
BATCH, LENGTH = 2, 9
PADS = 3  # left pads of the second example
IMAGE_POSITIONS = np.array([[2, 3, 4, 5], [4, 5, 6, 7]], np.int32)

BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=500.0, max_position_embeddings=64)
CONFIGS = {
    "multi_head": {},
    "grouped_query_tied_biased": dict(num_key_value_heads=2, head_dim=12, tie_word_embeddings=True,
                                      attention_bias=True, mlp_bias=True),
}


def hf_and_ours(name: str, seed: int = 0, **ours_overrides):
    """A random transformers Llama (eval, eager) and our model holding the same weights."""
    fields = {**BASE, **CONFIGS[name]}
    rope_theta = fields.pop("rope_theta")
    hf_config = transformers.LlamaConfig(
        **fields, rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, attn_implementation="eager"
    )
    torch.manual_seed(seed)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    randomize_parameters(hf_model, seed)
    ours = LlamaForCausalLM(LlamaConfig(**{**fields, "rope_theta": rope_theta, **ours_overrides}), rngs=nnx.Rngs(seed))
    copy_hf_weights(ours, hf_model)
    return hf_model, ours


def copy_hf_weights(model: LlamaForCausalLM, hf_model) -> None:
    """transformers names -> our attributes; torch Linear ``[out, in]`` -> kernel ``[in, out]``."""
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        path = name.replace(".weight", ".kernel" if "proj" in name or "lm_head" in name else ".scale")
        path = path.replace("embed_tokens.scale", "embed_tokens.embedding")
        target = model
        for part in path.split("."):
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        value = tensor.detach().numpy()
        value = value.T if path.endswith("kernel") else value
        assert target[...].shape == value.shape, (name, target[...].shape, value.shape)
        target[...] = value


def left_padded_batch(length: int = LENGTH):
    input_ids = np.random.default_rng(0).integers(0, VOCAB, (BATCH, length)).astype(np.int32)
    mask = np.ones((BATCH, length), bool)
    mask[1, :PADS] = False
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return input_ids, mask, positions


def hf_forward(hf_model, input_ids, mask, positions):
    with torch.no_grad():
        return hf_model(torch.tensor(input_ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                        position_ids=torch.tensor(positions, dtype=torch.long), output_hidden_states=True,
                        output_attentions=True)


@functools.partial(nnx.jit, static_argnames=("output_hidden_states", "prefill"))
def forward(model, input_ids, **kwargs):
    return model(input_ids, **kwargs)


def assert_close(actual, expected, rtol=1e-4):
    """Max abs error within ``rtol`` of the largest reference magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_hidden_states_and_probes_match_transformers(name):
    hf_model, model = hf_and_ours(name)
    input_ids, mask, positions = left_padded_batch()
    reference = hf_forward(hf_model, input_ids, mask, positions)
    common = dict(positions=positions, attention_mask=mask, image_positions=IMAGE_POSITIONS)
    logits, output = forward(model, input_ids, probe=ProbeSpec(layers=(-1,), form="full"),
                             output_hidden_states=True, **common)
    assert_close(logits[mask], reference.logits.numpy()[mask])
    assert len(output.hidden_states) == len(reference.hidden_states) == model.config.num_hidden_layers + 1
    for ours, theirs in zip(output.hidden_states, reference.hidden_states):
        assert_close(ours[mask], theirs.numpy()[mask])
    assert_close(output.last_hidden_state[mask], reference.hidden_states[-1].numpy()[mask])

    last = model.config.num_hidden_layers - 1
    assert set(output.probes) == {last}
    hf_probs = reference.attentions[last].numpy()  # [B, H, T, T]
    valid_rows = np.broadcast_to(mask[:, None, :, None], hf_probs.shape)
    assert_close(np.where(valid_rows, output.probes[last], 0), np.where(valid_rows, hf_probs, 0))

    for form in ("image_heads", "image"):
        _, probed = forward(model, input_ids, probe=ProbeSpec(layers=(0, 1), form=form), **common)
        for i in (0, 1):
            heads = np.stack([reference.attentions[i].numpy()[b][..., IMAGE_POSITIONS[b]] for b in range(BATCH)])
            expected = heads if form == "image_heads" else heads.mean(axis=1)  # [B, H, T, N] / [B, T, N]
            rows = mask[:, None, :, None] if form == "image_heads" else mask[:, :, None]
            rows = np.broadcast_to(rows, expected.shape)
            assert_close(np.where(rows, probed.probes[i], 0), np.where(rows, expected, 0))
    _, last_query = forward(model, input_ids, probe=ProbeSpec(layers=(0, 1), form="image_last"), **common)
    for i in (0, 1):  # the last query (a real token: the batch is left-padded) of the "image" form
        assert last_query.probes[i].shape == (BATCH, 1, len(IMAGE_POSITIONS[0]))
        assert_close(last_query.probes[i], probed.probes[i][:, -1:])
    if model.config.tie_word_embeddings:
        assert not hasattr(model, "lm_head")


def test_cached_decoding_reproduces_the_full_forward():
    """Prefill 5 tokens into a 12-slot cache, then decode the other 4 one at a time."""
    _, model = hf_and_ours("grouped_query_tied_biased")
    input_ids, mask, positions = left_padded_batch()
    max_length, prefill = 12, 5
    window_mask = np.concatenate([mask, np.ones((BATCH, max_length - LENGTH), bool)], axis=1)
    probe = ProbeSpec(layers=(1,), form="image")
    full_logits, full = forward(model, input_ids, positions=positions, attention_mask=mask, probe=probe,
                                image_positions=IMAGE_POSITIONS)

    cache = init_cache(model.config, BATCH, max_length)
    logits, output = forward(model, input_ids[:, :prefill], positions=positions[:, :prefill],
                             attention_mask=window_mask, cache=cache, probe=probe, image_positions=IMAGE_POSITIONS)
    assert_close(logits[mask[:, :prefill]], full_logits[:, :prefill][mask[:, :prefill]])
    # A prefill (empty cache) attends its own keys and fills the same cache.
    prefill_logits, prefilled = forward(model, input_ids[:, :prefill], positions=positions[:, :prefill],
                                        attention_mask=window_mask, cache=cache, probe=probe,
                                        image_positions=IMAGE_POSITIONS, prefill=True)
    assert_close(prefill_logits[mask[:, :prefill]], full_logits[:, :prefill][mask[:, :prefill]])
    # Equal on the real tokens' slots; a left-pad query (no visible key) attends uniformly over whatever keys
    # it is given, and its slot stays masked for every later query.
    real = np.zeros((BATCH, max_length), bool)
    real[:, :prefill] = mask[:, :prefill]
    for ours, theirs in zip(prefilled.cache["layers"], output.cache["layers"]):
        for name in ("k", "v"):
            assert_close(np.moveaxis(np.asarray(ours[name]), 2, 1)[real],
                         np.moveaxis(np.asarray(theirs[name]), 2, 1)[real])
    step_logits, step_probes = [], []
    for t in range(prefill, LENGTH):
        # positions=None: derived from the window mask (cumsum - 1), as generate does.
        logits, output = forward(model, input_ids[:, t:t + 1], attention_mask=window_mask, cache=output.cache,
                                 probe=probe, image_positions=IMAGE_POSITIONS)
        step_logits.append(logits)
        step_probes.append(output.probes[1])
    assert int(output.cache["end_index"]) == LENGTH
    assert output.cache["layers"][0]["k"].shape == (BATCH, 2, max_length, 12)
    assert_close(jnp.concatenate(step_logits, axis=1), full_logits[:, prefill:])
    assert_close(jnp.concatenate(step_probes, axis=1), full.probes[1][:, prefill:])


def test_positions_from_mask_follow_generate():
    mask = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(positions_from_mask(mask), [[1, 1, 0, 1, 2, 1], [0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(positions_from_mask(mask, 3, 2), [[1, 2], [3, 4]])


def test_every_parameter_carries_logical_axis_names():
    _, model = hf_and_ours("grouped_query_tied_biased")
    names = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable[...].ndim, (path, axes)
        assert all(a is None or a in AXIS_NAMES for a in axes), (path, axes)
        names[".".join(map(str, path))] = tuple(axes)
    assert names["model.embed_tokens.embedding"] == ("vocab", "embed")
    assert names["model.layers.0.self_attn.q_proj.kernel"] == ("embed", "heads")
    assert names["model.layers.0.self_attn.k_proj.kernel"] == ("embed", "kv_heads")
    assert names["model.layers.0.self_attn.v_proj.bias"] == ("kv_heads",)
    assert names["model.layers.1.self_attn.o_proj.kernel"] == ("heads", "embed")
    assert names["model.layers.1.mlp.down_proj.kernel"] == ("mlp", "embed")
    assert names["model.norm.scale"] == (None,)
    untied = LlamaForCausalLM(LlamaConfig(**BASE), rngs=nnx.Rngs(0))
    assert untied.lm_head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")


def test_compute_and_storage_dtypes():
    config = LlamaConfig(**BASE, dtype="bfloat16", param_dtype="float32")
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    input_ids, mask, positions = left_padded_batch()
    logits, output = forward(model, input_ids, positions=positions, attention_mask=mask)
    assert model.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32
    assert output.last_hidden_state.dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32  # the head accumulates and returns float32
    reference, _ = forward(LlamaForCausalLM(dataclasses.replace(config, dtype="float32"), rngs=nnx.Rngs(0)),
                           input_ids, positions=positions, attention_mask=mask)
    assert_close(logits[mask], reference[mask], rtol=5e-2)  # bfloat16 compute: ~3 significant digits


def test_input_errors_name_the_offending_value():
    model = LlamaForCausalLM(LlamaConfig(**BASE), rngs=nnx.Rngs(0))
    input_ids, mask, positions = left_padded_batch()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 8\); expected \[B, S\] = \(2, 9\)"):
        model(input_ids, positions=positions, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match=r"probe layer index 2 is out of range"):
        model(input_ids, positions=positions, probe=ProbeSpec(layers=(2,)), image_positions=IMAGE_POSITIONS)
    with pytest.raises(ValueError, match=r"image_positions \[B, N_img\] is required"):
        model(input_ids, positions=positions, probe=ProbeSpec(layers=(0,)))
    with pytest.raises(ValueError, match=r"9 new tokens do not fit a cache of 4 slots"):
        model(input_ids, positions=positions, cache=init_cache(model.config, BATCH, 4))
    with pytest.raises(ValueError, match=r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        LlamaConfig(**{**BASE, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match=r"hidden_act='swish'"):
        LlamaConfig(**BASE, hidden_act="swish")
    with pytest.raises(ValueError, match=r"dtype='float33' is not a dtype name"):
        LlamaConfig(**BASE, dtype="float33")
