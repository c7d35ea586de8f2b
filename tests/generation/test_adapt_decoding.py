"""ADAPT's attention-supervised decoding inside the jitted loop: a steer that never fires is plain
greedy, every mode keeps attention rows distributions, and the cached decode equals one cache-free
forward with the same edits and the anchor recomputed from its probes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import struct

from mmpo_jax.generation import AdaptDecoding, generate
from mmpo_jax.models.attention import AttentionHooks, ProbeSpec
from mmpo_jax.rewards.adapt import visual_anchor
from tests.generation.helpers import COUNT_AND_BAN_IMAGE, PAD, TRACES, log_softmax, reference_forward
from tests.models.hf_fixtures import IMAGE_TOKEN_ID as IMAGE

MAX_NEW = 12
K = 3  # anchor steps (METHODS.md: 5) so that most of the 12 steps are edited
RTOL = 1e-4


def run(setup, controller=None, input_ids=None):
    return generate(setup["model"], setup["input_ids"] if input_ids is None else input_ids, setup["pixels"],
                    attention_mask=setup["mask"], max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=PAD,
                    logits_processor=COUNT_AND_BAN_IMAGE, controller=controller)


def test_steer_that_never_fires_is_plain_greedy_and_new_values_do_not_recompile(tiny_llava):
    greedy = run(tiny_llava)
    silent = run(tiny_llava, AdaptDecoding("steer", anchor_steps=K, tau=0.0))  # S_AMC < 0 never holds
    np.testing.assert_array_equal(silent.new_tokens, greedy.new_tokens)
    np.testing.assert_allclose(silent.token_logps, greedy.token_logps, rtol=RTOL)
    traces = len(TRACES)
    always = run(tiny_llava, AdaptDecoding("steer", anchor_steps=K, tau=2.0, alpha=0.8))  # S_AMC <= 1 < 2
    new_prompts = np.where(tiny_llava["input_ids"] == IMAGE, IMAGE, (tiny_llava["input_ids"] + 7) % 90)
    run(tiny_llava, AdaptDecoding("steer", anchor_steps=K, tau=0.3), input_ids=new_prompts)
    assert len(TRACES) == traces, "new tau, alpha or prompts recompiled the ADAPT decode"
    # the first K tokens build the anchor unedited; steering changes what follows
    np.testing.assert_array_equal(always.new_tokens[:, :K], greedy.new_tokens[:, :K])
    np.testing.assert_allclose(always.token_logps[:, :K], greedy.token_logps[:, :K], rtol=RTOL)
    assert not np.allclose(always.token_logps[:, K:], greedy.token_logps[:, K:], rtol=1e-2)


RECORDS = []


def _record(step, before, after, *, layer):
    RECORDS.append((int(step), layer, np.asarray(before), np.asarray(after)))


@struct.dataclass
class RecordingAdapt(AdaptDecoding):
    """`AdaptDecoding` whose edit also reports (step, layer, rows before, rows after) from inside the loop."""

    def hooks(self, state, step):
        hooks = super().hooks(state, step)

        def edit(probs, key_is_image, layer_index):
            edited = hooks.post_softmax_edit(probs, key_is_image, layer_index)
            jax.debug.callback(functools.partial(_record, layer=layer_index), step, probs, edited)
            return edited

        return hooks.replace(post_softmax_edit=edit)


@pytest.mark.parametrize("mode, layers", [
    ("steer", None),
    pytest.param("blend", None, marks=pytest.mark.slow),
    pytest.param("mask", (-1,), marks=pytest.mark.slow),
])
def test_decode_equals_a_cache_free_forward_with_the_same_edits(tiny_llava, mode, layers):
    RECORDS.clear()
    controller = RecordingAdapt(mode, anchor_steps=K, layers=layers)
    output = run(tiny_llava, controller)
    jax.effects_barrier()
    num_layers = tiny_llava["config"].text_config.num_hidden_layers
    edited_layers = tuple(range(num_layers)) if layers is None else (num_layers - 1,)

    # Inside the real decode every edited row is still a distribution; nothing moves before step K.
    assert {layer for _, layer, _, _ in RECORDS} == set(edited_layers)
    assert {step for step, _, _, _ in RECORDS} == set(range(1, MAX_NEW))
    for step, _, before, after in RECORDS:
        assert (after >= 0).all()
        np.testing.assert_allclose(after.sum(-1), 1.0, rtol=1e-5)
        if step < K:
            np.testing.assert_array_equal(after, before)
    assert any(not np.allclose(after, before) for step, _, before, after in RECORDS if step >= K)

    # One cache-free forward over the result, edited on the queries that chose tokens K.. with the
    # decode's final anchor, probing every layer.
    state = output.controller_state
    first_edited = tiny_llava["input_ids"].shape[1] - 1 + K

    def reference_edit(probs, key_is_image, layer_index):
        edited = controller.edit_rows(probs, key_is_image, state)
        queries = jnp.arange(probs.shape[2]) >= first_edited
        return jnp.where(queries[None, None, :, None], edited, probs)

    hooks = AttentionHooks(layers=edited_layers, post_softmax_edit=reference_edit)
    logits, probes = reference_forward(tiny_llava, output.sequences, tiny_llava["pixels"], hooks=hooks,
                                       probe=ProbeSpec(tuple(range(num_layers)), "image"))
    logits[..., IMAGE] = -np.inf
    np.testing.assert_array_equal(output.new_tokens, logits.argmax(-1))
    expected = np.take_along_axis(log_softmax(logits), np.asarray(output.new_tokens)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(output.token_logps, expected, rtol=RTOL)
    # The anchor is the visual anchor of the first K tokens' attention as that forward probes it.
    start = tiny_llava["input_ids"].shape[1] - 1
    history = np.stack([np.asarray(probes[layer][:, start:start + K]) for layer in range(num_layers)], axis=1)
    np.testing.assert_allclose(state.history, history, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(state.anchor, np.asarray(visual_anchor(history)).reshape(2, -1), rtol=RTOL, atol=1e-7)


def test_bad_options_are_named(tiny_llava):
    with pytest.raises(ValueError, match="ADAPT mode 'focus' is not one of"):
        AdaptDecoding("focus")
    with pytest.raises(ValueError, match="anchor_steps must be an int >= 1.*got 0"):
        AdaptDecoding("steer", anchor_steps=0)
    with pytest.raises(ValueError, match=r"mask_percentile must lie in \[0, 1\]; got 1.5"):
        AdaptDecoding("mask", mask_percentile=1.5)
    with pytest.raises(ValueError, match="ADAPT layer index 2 is out of range .* 2 layers"):
        run(tiny_llava, AdaptDecoding("steer", layers=(2,)))
    with pytest.raises(ValueError, match="at most one of hooks .* and controller"):
        generate(tiny_llava["model"], tiny_llava["input_ids"], tiny_llava["pixels"], attention_mask=tiny_llava["mask"],
                 max_new_tokens=2, eos_token_id=None, pad_token_id=PAD, controller=AdaptDecoding(),
                 hooks=AttentionHooks(layers=(0,)))
