"""Attention core: every implementation and the explicit path agree, probe forms, hooks, spec validation.

The explicit path is checked against a NumPy softmax written out here; the fast implementations
against the same reference, so all are pinned to the textbook formula. Keys and values are in the
KV cache's ``[B, K, S, D]`` layout.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.models import attention
from mmpo_jax.models.attention import AttentionHooks, ProbeSpec, attend, key_is_image, resolve_attention_impl

B, T, S, H, K, D = 2, 5, 7, 4, 2, 8
IMAGE_POSITIONS = np.array([[1, 2, 4], [0, 3, 5]], np.int32)


@pytest.fixture(scope="module")
def qkv_mask():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(B, T, H, D)).astype(np.float32)
    key = rng.normal(size=(B, K, S, D)).astype(np.float32)
    value = rng.normal(size=(B, K, S, D)).astype(np.float32)
    allowed = rng.random((B, T, S)) < 0.7
    allowed[:, :, 0] = True  # every query sees at least one key
    allowed[1, 2] = False  # ... except one fully masked row (a left-pad query)
    return query, key, value, allowed


def numpy_attention(query, key, value, allowed, logit_bias=None):
    """Textbook GQA attention: query head h reads key/value head h // (H // K); float64.

    query [B, T, H, D]; key, value [B, K, S, D]; allowed [B, T, S]."""
    groups = query.shape[2] // key.shape[1]
    key, value = np.repeat(key, groups, axis=1), np.repeat(value, groups, axis=1)
    logits = np.einsum("bthd,bhsd->bhts", query, key).astype(np.float64) / np.sqrt(query.shape[-1])
    if logit_bias is not None:
        logits = logits + logit_bias
    logits = np.where(allowed[:, None], logits, -1e30)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bthd", probs, value), probs


def assert_close(actual, expected, rtol=1e-5):
    """Max abs error relative to the largest reference magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


def test_explicit_path_and_the_einsum_form_match_textbook(qkv_mask):
    query, key, value, allowed = qkv_mask
    expected_out, expected_probs = numpy_attention(query, key, value, allowed)
    fast, no_probe = attend(query, key, value, allowed, impl="einsum")
    explicit, full = attend(query, key, value, allowed, probe_form="full")
    assert no_probe is None
    assert_close(full, expected_probs)
    assert_close(explicit, expected_out)
    assert_close(fast, expected_out)
    np.testing.assert_allclose(np.asarray(full).sum(-1), 1.0, rtol=1e-6)
    # A query with no visible key gets a uniform, finite row (no NaN reaches the gradients).
    np.testing.assert_allclose(np.asarray(full)[1, :, 2], 1.0 / S, rtol=1e-6)


def test_image_probe_forms_are_gathered_columns_of_the_full_probe(qkv_mask):
    query, key, value, allowed = qkv_mask
    _, full = attend(query, key, value, allowed, probe_form="full")
    _, heads = attend(query, key, value, allowed, probe_form="image_heads", image_positions=IMAGE_POSITIONS)
    _, mean = attend(query, key, value, allowed, probe_form="image", image_positions=IMAGE_POSITIONS)
    expected_heads = np.stack([np.asarray(full)[b][..., IMAGE_POSITIONS[b]] for b in range(B)])
    assert heads.shape == (B, H, T, IMAGE_POSITIONS.shape[1])
    assert mean.shape == (B, T, IMAGE_POSITIONS.shape[1])
    np.testing.assert_array_equal(heads, expected_heads)
    assert_close(mean, expected_heads.mean(axis=1))


def test_zero_bias_and_identity_edit_change_nothing(qkv_mask):
    query, key, value, allowed = qkv_mask
    reference, reference_probe = attend(query, key, value, allowed, probe_form="full")
    hooks = AttentionHooks(layers=(0,), image_logit_bias=jnp.zeros((B, 1, 1, 3)),
                           post_softmax_edit=lambda probs, is_image, layer: probs)
    output, probe = attend(query, key, value, allowed, probe_form="full", image_positions=IMAGE_POSITIONS, hooks=hooks)
    np.testing.assert_array_equal(output, reference)
    np.testing.assert_array_equal(probe, reference_probe)


@pytest.mark.parametrize("bias_shape", [(B, 1, 1, 3), (B, H, T, 3), (3,)])
def test_image_logit_bias_equals_softmax_with_bias_on_image_keys(qkv_mask, bias_shape):
    query, key, value, allowed = qkv_mask
    bias = np.random.default_rng(1).normal(size=bias_shape).astype(np.float32) * 2
    dense_bias = np.zeros((B, H, T, S))
    for b in range(B):
        dense_bias[b][..., IMAGE_POSITIONS[b]] += np.broadcast_to(bias, (B, H, T, 3))[b]
    expected_out, expected_probs = numpy_attention(query, key, value, allowed, dense_bias)
    hooks = AttentionHooks(layers=(0,), image_logit_bias=jnp.asarray(bias))
    output, probe = attend(query, key, value, allowed, probe_form="full", image_positions=IMAGE_POSITIONS, hooks=hooks)
    assert_close(probe, expected_probs)
    assert_close(output, expected_out)


def test_post_softmax_edit_sees_image_keys_and_layer_and_feeds_values(qkv_mask):
    query, key, value, allowed = qkv_mask
    seen = {}

    def drop_image_keys(probs, is_image, layer_index):
        seen["is_image"], seen["layer"] = np.asarray(is_image), layer_index
        kept = jnp.where(is_image[:, None, None, :], 0.0, probs)
        return kept / kept.sum(-1, keepdims=True)

    hooks = AttentionHooks(layers=(3,), post_softmax_edit=drop_image_keys)
    output, probe = attend(query, key, value, allowed & ~np.asarray(key_is_image(IMAGE_POSITIONS, S))[:, None],
                           probe_form="image", image_positions=IMAGE_POSITIONS)
    edited, edited_probe = attend(query, key, value, allowed, probe_form="image", image_positions=IMAGE_POSITIONS,
                                  hooks=hooks, layer_index=3)
    expected_is_image = np.zeros((B, S), bool)
    for b in range(B):
        expected_is_image[b, IMAGE_POSITIONS[b]] = True
    np.testing.assert_array_equal(seen["is_image"], expected_is_image)
    assert seen["layer"] == 3
    # Rows that saw a non-image key: dropping image keys after the softmax == masking them before.
    rows = (allowed & ~expected_is_image[:, None]).any(-1)
    assert_close(np.asarray(edited)[rows], np.asarray(output)[rows])
    np.testing.assert_array_equal(np.asarray(edited_probe)[rows], 0.0)


def test_attend_under_jit_with_specs_as_arguments(qkv_mask):
    query, key, value, allowed = qkv_mask
    hooks = AttentionHooks(layers=(0,), image_logit_bias=jnp.ones((B, 1, 1, 3)))
    jitted = jax.jit(lambda q, k, v, m, p, h: attend(q, k, v, m, probe_form="image", image_positions=p, hooks=h))
    output, probe = jitted(query, key, value, allowed, IMAGE_POSITIONS, hooks)
    eager_output, eager_probe = attend(query, key, value, allowed, probe_form="image",
                                       image_positions=IMAGE_POSITIONS, hooks=hooks)
    assert_close(output, eager_output)
    assert_close(probe, eager_probe)
    # ProbeSpec has no array leaves: it passes through jit as pure structure.
    assert jax.tree_util.tree_leaves(ProbeSpec(layers=(0, -1), form="image_heads")) == []
    assert jax.jit(lambda spec: jnp.float32(len(spec.layers)))(ProbeSpec(layers=(0, -1))) == 2


def test_probe_spec_resolution_and_errors():
    assert ProbeSpec(layers=[-1, 0, 3], form="full").resolve(4) == ProbeSpec(layers=(0, 3), form="full")
    assert AttentionHooks(layers=(-2,)).resolve(4).layers == (2,)
    with pytest.raises(ValueError, match=r"probe layer index 4 is out of range .* 4 layers; valid indices are -4..3"):
        ProbeSpec(layers=(4,)).resolve(4)
    with pytest.raises(ValueError, match=r"hook layer index -5"):
        AttentionHooks(layers=(-5,)).resolve(4)
    with pytest.raises(ValueError, match=r"probe form 'mean' is not one of"):
        ProbeSpec(layers=(0,), form="mean")
    with pytest.raises(TypeError, match=r"probe layer index 1.0 is not an int"):
        ProbeSpec(layers=(1.0,)).resolve(4)


def test_attend_errors(qkv_mask):
    query, key, value, allowed = qkv_mask
    with pytest.raises(ValueError, match=r"image_positions \[B, N_img\] is required for probe form 'image'"):
        attend(query, key, value, allowed, probe_form="image")
    with pytest.raises(ValueError, match=r"image_logit_bias of shape \(2, 1, 1, 4\) does not broadcast"):
        hooks = AttentionHooks(layers=(0,), image_logit_bias=jnp.zeros((B, 1, 1, 4)))
        attend(query, key, value, allowed, image_positions=IMAGE_POSITIONS, hooks=hooks)
    with pytest.raises(ValueError, match=r"4 query heads are not a multiple of 3 key/value heads"):
        attend(query, key[:, :1].repeat(3, 1), value[:, :1].repeat(3, 1), allowed, probe_form="full")
    with pytest.raises(ValueError, match=r"attention_impl='flash' is not one of"):
        resolve_attention_impl("flash", "float32")


def causal_left_padded(length: int, starts, seed: int = 0):
    """query [B, T, H, D], key and value [B, K, T, D], allowed [B, T, T]: causal self-attention of rows
    left-padded by ``starts`` tokens."""
    rng = np.random.default_rng(seed)
    batch = len(starts)
    query = rng.normal(size=(batch, length, H, D)).astype(np.float32)
    key = rng.normal(size=(batch, K, length, D)).astype(np.float32)
    value = rng.normal(size=(batch, K, length, D)).astype(np.float32)
    valid = np.arange(length)[None] >= np.asarray(starts)[:, None]
    allowed = valid[:, None, :] & np.tril(np.ones((length, length), bool))[None]
    return query, key, value, allowed, valid


@pytest.mark.parametrize(("impl", "chunk"), [("chunked", 4), ("chunked", 5), ("chunked", 30), ("einsum", 4),
                                           ("xla", 4)])
def test_every_implementation_matches_textbook_on_causal_self_attention(monkeypatch, impl, chunk):
    """Causal self-attention of left-padded rows; ``"chunked"`` in blocks of ``chunk`` queries reading keys up to
    their block's end (uneven last block included). Compared on the real tokens' queries."""
    monkeypatch.setattr(attention, "ATTENTION_CHUNK", chunk)
    query, key, value, allowed, valid = causal_left_padded(13, starts=[0, 3, 7])
    expected, _ = numpy_attention(query, key, value, allowed)
    output = jax.jit(lambda q, k, v, m: attend(q, k, v, m, impl=impl, causal_self=True)[0])(
        query, key, value, allowed)
    assert_close(np.asarray(output)[valid], expected[valid])


@pytest.mark.parametrize("form", ["image", "image_heads", "full"])
def test_probe_of_selected_queries_is_those_rows_of_the_whole_probe(qkv_mask, form):
    """``probe_queries`` computes the probe of a few rows (output by the fast path): same output, same rows."""
    query, key, value, allowed = qkv_mask
    queries = np.array([[4, 0, 4], [1, 3, 3]], np.int32)  # repeats, as a padded bucket has
    whole_out, whole = attend(query, key, value, allowed, probe_form=form, image_positions=IMAGE_POSITIONS)
    output, rows = attend(query, key, value, allowed, probe_form=form, probe_queries=queries,
                          image_positions=IMAGE_POSITIONS)
    axis = 1 if form == "image" else 2
    expected = np.stack([np.take(np.asarray(whole)[b], queries[b], axis=axis - 1) for b in range(B)])
    assert rows.shape == expected.shape
    assert_close(rows, expected)
    assert_close(output, whole_out)


def test_image_last_probe_without_hooks_is_the_last_row(qkv_mask):
    query, key, value, allowed = qkv_mask
    _, whole = attend(query, key, value, allowed, probe_form="image", image_positions=IMAGE_POSITIONS)
    _, last = attend(query, key, value, allowed, probe_form="image_last", image_positions=IMAGE_POSITIONS)
    assert last.shape == (B, 1, IMAGE_POSITIONS.shape[1])
    assert_close(last, np.asarray(whole)[:, -1:])


def test_auto_implementation_per_platform():
    assert resolve_attention_impl("auto", "float32", "cpu") == "chunked"
    assert resolve_attention_impl("auto", "bfloat16", "gpu") == "cudnn"
    assert resolve_attention_impl("auto", "float32", "gpu") == "xla"
    assert resolve_attention_impl("auto", "bfloat16", "tpu") == "xla"
    assert resolve_attention_impl("einsum", "bfloat16", "gpu") == "einsum"
