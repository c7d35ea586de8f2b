"""Decoder-level probes, hooks, rematerialisation and probe memory.

Parity of the probe values with transformers is in ``test_llama.py``; here: hooks act only where
listed and do what they say, remat changes nothing numerically, and probing keeps memory at
O(B·T·N_img) per probed layer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmpo_jax.models.attention import AttentionHooks, ProbeSpec
from mmpo_jax.models.llama import LlamaConfig, LlamaForCausalLM
from tests.models.test_llama import BASE, IMAGE_POSITIONS, assert_close, forward, left_padded_batch

N_IMAGE = IMAGE_POSITIONS.shape[1]


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(**{**BASE, "num_hidden_layers": 3, "num_key_value_heads": 2})
    return LlamaForCausalLM(config, rngs=nnx.Rngs(3))


def test_hooks_act_only_in_their_layers(model):
    input_ids, mask, positions = left_padded_batch()
    called_in = []

    def renormalised_image_drop(probs, is_image, layer_index):
        called_in.append(layer_index)  # runs at trace time, once per hooked layer
        kept = jnp.where(is_image[:, None, None, :], 0.5 * probs, probs)
        return kept / kept.sum(-1, keepdims=True)

    hooks = AttentionHooks(layers=(-2,), image_logit_bias=jnp.full((1, 1, 1, N_IMAGE), 3.0),
                           post_softmax_edit=renormalised_image_drop)
    common = dict(positions=positions, attention_mask=mask, image_positions=IMAGE_POSITIONS, output_hidden_states=True)
    _, plain = forward(model, input_ids, **common)
    _, hooked = forward(model, input_ids, hooks=hooks, **common)
    assert called_in == [1]
    # hidden_states[i] is the input of layer i: untouched up to the hooked layer, changed after it.
    for i in (0, 1):
        np.testing.assert_array_equal(hooked.hidden_states[i], plain.hidden_states[i])
    assert np.abs(np.asarray(hooked.hidden_states[2] - plain.hidden_states[2]))[mask].max() > 1e-3


def test_neutral_hooks_in_every_layer_change_nothing(model):
    input_ids, mask, positions = left_padded_batch()
    hooks = AttentionHooks(layers=(0, 1, 2), image_logit_bias=jnp.zeros((2, 1, 1, N_IMAGE)),
                           post_softmax_edit=lambda probs, is_image, layer: probs)
    common = dict(positions=positions, attention_mask=mask, image_positions=IMAGE_POSITIONS)
    plain_logits, _ = forward(model, input_ids, **common)
    hooked_logits, _ = forward(model, input_ids, hooks=hooks, **common)
    assert_close(hooked_logits, plain_logits, rtol=1e-5)  # fused vs explicit path: rounding only


def test_image_bias_in_the_model_is_a_softmax_with_bias(model):
    """Layer 0's input does not depend on the hooks, so its biased probabilities must equal
    ``p * exp(b) / Z`` on the image columns, from its unbiased probabilities ``p``."""
    input_ids, mask, positions = left_padded_batch()
    bias = np.random.default_rng(0).normal(size=(2, 1, 1, N_IMAGE)).astype(np.float32)
    common = dict(positions=positions, attention_mask=mask, image_positions=IMAGE_POSITIONS,
                  probe=ProbeSpec(layers=(0,), form="full"))
    _, plain = forward(model, input_ids, **common)
    _, biased = forward(model, input_ids, hooks=AttentionHooks(layers=(0,), image_logit_bias=bias), **common)
    weights = np.ones(plain.probes[0].shape)
    for b in range(2):
        weights[b][..., IMAGE_POSITIONS[b]] = np.exp(bias[b, 0, 0])
    expected = np.asarray(plain.probes[0]) * weights
    expected /= expected.sum(-1, keepdims=True)
    rows = np.broadcast_to(mask[:, None, :, None], expected.shape)
    assert_close(np.where(rows, biased.probes[0], 0), np.where(rows, expected, 0), rtol=1e-5)


def test_remat_gives_the_same_outputs_and_gradients(model):
    input_ids, mask, positions = left_padded_batch()
    remat_model = LlamaForCausalLM(LlamaConfig(**{**vars(model.config), "remat": True}), rngs=nnx.Rngs(0))
    nnx.update(remat_model, nnx.state(model))
    hooks = AttentionHooks(layers=(2,), image_logit_bias=jnp.ones((2, 1, 1, N_IMAGE)))
    kwargs = dict(positions=positions, attention_mask=mask, image_positions=IMAGE_POSITIONS, hooks=hooks,
                  probe=ProbeSpec(layers=(1,), form="image"))
    logit_weights = np.random.default_rng(1).normal(size=(2, 9, BASE["vocab_size"])).astype(np.float32)

    def loss(m):
        logits, output = m(input_ids, **kwargs)
        return jnp.sum(logits * logit_weights) + jnp.sum(output.probes[1] ** 2)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    remat_value, remat_grads = nnx.jit(nnx.value_and_grad(loss))(remat_model)
    # Not bit-identical: XLA fuses the recomputed graph differently (reduction order), hence 1e-4.
    assert_close(remat_value, value)
    for (path, g), (_, rg) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(remat_grads)):
        assert_close(rg[...], g[...])
    # One rematerialised (recomputed-in-backward) block per decoder layer, none without remat.
    for m, expected in ((remat_model, remat_model.config.num_hidden_layers), (model, 0)):
        graphdef, state = nnx.split(m)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: loss(nnx.merge(graphdef, s))))(state))
        assert jaxpr.count("differentiated=True") == expected


def test_probing_keeps_no_per_layer_attention_matrices():
    """Compiled memory of a forward with probes in 1 vs all layers.

    How this was checked: ``jax.jit(...).lower(...).compile()`` and ``memory_analysis()`` with shapes
    chosen so that one layer's attention ``[B, H, T, T] = [3, 5, 37, 37]`` float32 (82 kB) dwarfs
    a probe ``[B, T, N_img] = [3, 37, 7]`` (3 kB). On CPU, ``jax.nn.dot_product_attention`` has no
    flash kernel: its XLA form builds each layer's logits transiently, so the optimised HLO holds
    ``f32[3,5,37,37]`` values in every layer, probed or not (we looked), and counting them cannot
    separate probed from unprobed layers here. What must hold on any platform, and is asserted:
    probing all 4 layers needs no more temporary memory than probing one (the explicit layer's
    matrices are transient, never kept per layer), probing one layer costs at most about one extra
    ``[B, H, T, T]`` transient over the unprobed fused forward, and the "image" probes add only
    their own ``[B, T, N_img]`` outputs, while "full" probes return ``L`` whole matrices.
    """
    batch, length, heads, layers, n_image = 3, 37, 5, 4, 7
    config = LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads)
    graphdef, state = nnx.split(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    input_ids = jnp.zeros((batch, length), jnp.int32)
    image_positions = jnp.tile(jnp.arange(2, 2 + n_image, dtype=jnp.int32), (batch, 1))

    def logits_and_probes(state, input_ids, image_positions, probe):
        logits, output = nnx.merge(graphdef, state)(input_ids, probe=probe, image_positions=image_positions)
        return logits, output.probes

    def memory(probe):
        compiled = jax.jit(logits_and_probes).lower(state, input_ids, image_positions, probe).compile()
        analysis = compiled.memory_analysis()
        return analysis.temp_size_in_bytes, analysis.output_size_in_bytes

    attention_bytes = batch * heads * length * length * 4
    probe_bytes = batch * length * n_image * 4
    temp_none, out_none = memory(None)
    temp_one, out_one = memory(ProbeSpec(layers=(1,), form="image"))
    temp_all, out_all = memory(ProbeSpec(layers=tuple(range(layers)), form="image"))
    _, out_full = memory(ProbeSpec(layers=tuple(range(layers)), form="full"))
    assert temp_all <= temp_one + attention_bytes // 4
    assert temp_one <= temp_none + 1.5 * attention_bytes
    assert out_one - out_none < 2 * probe_bytes
    assert out_all - out_none < layers * probe_bytes + attention_bytes // 4
    assert out_full - out_none >= layers * attention_bytes
