"""KV-cache generation against transformers' `LlavaForConditionalGeneration.generate`, plus its own contracts.

The reference is a tiny random torch LLaVA (`tests/models/hf_fixtures.py`) loaded into ours with
`load_hf_llava`; prompts are a batch of two of different lengths, left-padded, one image each.
This random model emits token 2 (its EOS) early in both rows, so the token-for-token parity test
runs with `eos_token_id=None` (20 tokens in both rows) and a second parity test checks EOS handling
with EOS ids that stop the rows at different steps. float32 throughout; log-probabilities are
compared at 1e-4 relative.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from flax import nnx, struct

from mmpo_jax.generation import (
    AdaptDecoding,
    BanTokens,
    LogitsProcessor,
    ProcessorChain,
    generate,
    sampling_logits,
    select_tokens,
    top_p_filter,
)
from mmpo_jax.models.attention import AttentionHooks
from mmpo_jax.models.convert import load_hf_llava
from mmpo_jax.models.llama import init_cache
from mmpo_jax.models.llava import Llava
from tests.generation.helpers import PAD, TRACES, CountTraces, left_padded_prompts
from tests.models import hf_fixtures

IMAGE = hf_fixtures.IMAGE_TOKEN_ID
MAX_NEW = 20
RTOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The torch reference, our converted model, a left-padded batch, and our greedy generation of it."""
    directory = tmp_path_factory.mktemp("llava")
    torch_model = hf_fixtures.save_tiny_llava(directory, seed=0)
    model, config = load_hf_llava(directory)
    rng = np.random.default_rng(0)
    input_ids, mask = left_padded_prompts(config.num_image_tokens, rng)
    pixels_torch = rng.normal(size=(2, 3, 30, 30)).astype(np.float32)
    pixels = jnp.asarray(pixels_torch.transpose(0, 2, 3, 1))
    greedy = generate(
        model, input_ids, pixels, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=PAD
    )
    return dict(
        torch_model=torch_model, model=model, input_ids=input_ids, mask=mask, pixels=pixels,
        pixels_torch=pixels_torch, greedy=greedy,
    )


def hf_generate(setup, eos_token_id) -> np.ndarray:
    """transformers' greedy new tokens, padded with PAD to MAX_NEW (it stops once every row has ended)."""
    with torch.no_grad():
        output = setup["torch_model"].generate(
            input_ids=torch.tensor(setup["input_ids"]),
            attention_mask=torch.tensor(setup["mask"]),
            pixel_values=torch.tensor(setup["pixels_torch"]),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            eos_token_id=eos_token_id,
            pad_token_id=PAD,
        )
    new_tokens = output[:, setup["input_ids"].shape[1]:].numpy()
    return np.pad(new_tokens, ((0, 0), (0, MAX_NEW - new_tokens.shape[1])), constant_values=PAD)


def full_forward_logps(setup, sequences, pixels=None) -> np.ndarray:
    """Log-softmax of one cache-free forward over prompt + new tokens, at the positions predicting them: [B, M, V]."""
    model, prompt_length = setup["model"], setup["input_ids"].shape[1]
    mask = np.concatenate([setup["mask"], np.ones((2, MAX_NEW), int)], axis=1)
    logits = _forward(model, jnp.asarray(sequences), setup["pixels"] if pixels is None else pixels,
                      jnp.asarray(mask, bool))
    return np.array(jax.nn.log_softmax(logits[:, prompt_length - 1:-1], axis=-1))


@nnx.jit
def _forward(model, input_ids, pixels, mask):
    return model(input_ids, pixel_values=pixels, attention_mask=mask).logits


def test_greedy_matches_transformers_token_for_token(setup):
    greedy = setup["greedy"]
    reference = hf_generate(setup, eos_token_id=None)
    np.testing.assert_array_equal(greedy.new_tokens, reference)
    np.testing.assert_array_equal(greedy.sequences, np.concatenate([setup["input_ids"], reference], axis=1))
    np.testing.assert_array_equal(greedy.lengths, [MAX_NEW, MAX_NEW])
    # The cached decode gives the log-probs of one cache-free forward over the final sequences.
    logps = full_forward_logps(setup, greedy.sequences)
    np.testing.assert_array_equal(logps.argmax(-1), greedy.new_tokens)
    expected = np.take_along_axis(logps, np.asarray(greedy.new_tokens)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(greedy.token_logps, expected, rtol=RTOL)


def test_visual_tokens_instead_of_pixels_give_the_same_generation(setup):
    model = setup["model"]
    output = generate(
        model, setup["input_ids"], attention_mask=setup["mask"], max_new_tokens=MAX_NEW, eos_token_id=None,
        pad_token_id=PAD, visual_tokens=model.encode_images(setup["pixels"]),
    )
    np.testing.assert_array_equal(output.new_tokens, setup["greedy"].new_tokens)
    np.testing.assert_allclose(output.token_logps, setup["greedy"].token_logps, rtol=RTOL)


def test_eos_ends_each_row_and_pads_after_it_as_transformers(setup):
    eos = [2, 13]
    output = generate(
        setup["model"], setup["input_ids"], setup["pixels"], attention_mask=setup["mask"], max_new_tokens=MAX_NEW,
        eos_token_id=eos, pad_token_id=PAD,
    )
    np.testing.assert_array_equal(output.new_tokens, hf_generate(setup, eos_token_id=eos))
    # Derived from the EOS-free run: a row ends at its first EOS, pads after it, and its logps are 0 there.
    free = np.asarray(setup["greedy"].new_tokens)
    first_eos = [int(np.flatnonzero(np.isin(row, eos))[0]) for row in free]
    assert first_eos[0] != first_eos[1] and max(first_eos) < MAX_NEW - 1  # rows end at different steps
    np.testing.assert_array_equal(output.lengths, np.array(first_eos) + 1)
    for row, end in enumerate(first_eos):
        np.testing.assert_array_equal(output.new_tokens[row, : end + 1], free[row, : end + 1])
        assert (np.asarray(output.new_tokens[row, end + 1:]) == PAD).all()
        assert (np.asarray(output.token_logps[row, end + 1:]) == 0).all()
        np.testing.assert_allclose(output.token_logps[row, : end + 1], setup["greedy"].token_logps[row, : end + 1],
                                   rtol=RTOL)


def test_sampling_is_reproducible_per_key_and_never_recompiles(setup):
    model, pixels = setup["model"], setup["pixels"]
    # The random model samples image placeholders now and then; banned so the sequences can be re-scored.
    processor = ProcessorChain((CountTraces(), BanTokens(jnp.array([IMAGE]))))

    def sample(key, input_ids=setup["input_ids"], temperature=1.0):
        return generate(
            model, input_ids, pixels, attention_mask=setup["mask"], max_new_tokens=MAX_NEW, eos_token_id=None,
            pad_token_id=PAD, temperature=temperature, top_p=0.9, rng=key, logits_processor=processor,
        )

    first = sample(jax.random.key(0))
    traces = len(TRACES)
    assert traces > 0
    again, other = sample(jax.random.key(0)), sample(jax.random.key(1))
    np.testing.assert_array_equal(again.new_tokens, first.new_tokens)
    assert not np.array_equal(other.new_tokens, first.new_tokens)
    new_prompts = np.where(setup["input_ids"] == IMAGE, IMAGE, (setup["input_ids"] + 7) % 90)
    sample(jax.random.key(2), new_prompts, temperature=0.7)
    assert len(TRACES) == traces, "a new key, new prompts or a new temperature recompiled generate"

    # Each sampled token's logp is its log-prob under the tempered top-p nucleus of a cache-free forward.
    logits = full_forward_logps(setup, first.sequences)  # log-softmax shifts logits; the nucleus is unchanged
    logits[..., IMAGE] = -np.inf
    nucleus = np.asarray(jax.nn.log_softmax(sampling_logits(jnp.asarray(logits.reshape(-1, logits.shape[-1])), 1.0,
                                                            0.9), axis=-1)).reshape(logits.shape)
    expected = np.take_along_axis(nucleus, np.asarray(first.new_tokens)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(first.token_logps, expected, rtol=RTOL)


def numpy_nucleus(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Reference: probabilities of softmax(logits / T) restricted to the smallest top set with mass >= p."""
    probs = np.exp(logits / temperature - (logits / temperature).max())
    probs /= probs.sum()
    kept, mass = [], 0.0
    for index in np.argsort(-probs, kind="stable"):
        kept.append(index)
        mass += probs[index]
        if mass >= top_p:
            break
    result = np.zeros_like(probs)
    result[kept] = probs[kept]
    return result / result.sum()


@pytest.mark.parametrize("temperature, top_p, kept", [
    (1.0, 0.5, [1, 2]),        # probs .1 .4 .3 .2: the argmax alone (.4) is short of .5
    (1.0, 0.75, [1, 2, 3]),
    (0.5, 0.7, [1, 2]),
    (2.0, 1.0, [0, 1, 2, 3]),
    (1.0, 0.01, [1]),          # the argmax alone, however small p is
])
def test_temperature_and_top_p_match_numpy_reference(temperature, top_p, kept):
    logits = np.log(np.array([0.1, 0.4, 0.3, 0.2], np.float32))
    expected = numpy_nucleus(logits, temperature, top_p)
    assert sorted(np.flatnonzero(expected)) == kept
    processed = sampling_logits(jnp.asarray(logits)[None], temperature, top_p)
    np.testing.assert_allclose(jax.nn.softmax(processed, axis=-1)[0], expected, rtol=1e-6, atol=1e-7)
    assert np.isneginf(np.asarray(processed[0])[np.setdiff1d(np.arange(4), kept)]).all()


def test_top_p_keeps_ties_and_greedy_logps():
    logits = jnp.log(jnp.array([[0.3, 0.3, 0.3, 0.1]]))
    np.testing.assert_array_equal(np.isfinite(top_p_filter(logits, 0.5)), [[True, True, True, False]])
    tokens, logps = select_tokens(jnp.array([[0.0, 2.0, 1.0]]), sample=False)
    np.testing.assert_array_equal(tokens, [1])
    np.testing.assert_allclose(logps, jax.nn.log_softmax(jnp.array([0.0, 2.0, 1.0]))[1:2], rtol=1e-6)


def test_banned_tokens_are_never_emitted(setup):
    # Ban what greedy picks most: both rows must go elsewhere, and the chain applies every member.
    free = np.asarray(setup["greedy"].new_tokens)
    banned = [int(free[0, 0]), int(free[1, 1])]
    processor = ProcessorChain((BanTokens(jnp.array(banned[:1])), BanTokens(jnp.array(banned[1:]))))
    output = generate(
        setup["model"], setup["input_ids"], setup["pixels"], attention_mask=setup["mask"], max_new_tokens=MAX_NEW,
        eos_token_id=None, pad_token_id=PAD, temperature=3.0, rng=jax.random.key(0), logits_processor=processor,
    )
    assert not np.isin(np.asarray(output.new_tokens), banned).any()
    assert np.isfinite(np.asarray(output.token_logps)).all()


@struct.dataclass
class AmplifyAgainstOtherImages(LogitsProcessor):
    """Contrastive-style processor: ``(1 + alpha) l - alpha l_other``, ``l_other`` from the same model on
    other images, decoded in the processor's own KV cache (exercises init_state/consume)."""

    other_pixels: jax.Array
    alpha: float = struct.field(pytree_node=False, default=0.5)

    def init_state(self, model, prompt):
        batch, window = prompt.attention_mask.shape
        cache = init_cache(model.config.text_config, batch, window)
        output = model(prompt.input_ids, pixel_values=self.other_pixels, attention_mask=prompt.attention_mask,
                       cache=cache)
        return {"cache": output.cache, "logits": output.logits[:, -1]}

    def consume(self, model, state, inputs):
        output = model(inputs.tokens, attention_mask=inputs.attention_mask, cache=state["cache"])
        return {"cache": output.cache, "logits": output.logits[:, -1]}

    def __call__(self, logits, step, state):
        return (1 + self.alpha) * logits - self.alpha * state["logits"], state


def test_processor_with_its_own_cache_matches_cache_free_reference(setup):
    other_pixels = jnp.flip(setup["pixels"], axis=0)  # each row sees the other row's image
    processor = ProcessorChain((AmplifyAgainstOtherImages(other_pixels), BanTokens(jnp.array([IMAGE]))))
    output = generate(
        setup["model"], setup["input_ids"], setup["pixels"], attention_mask=setup["mask"], max_new_tokens=MAX_NEW,
        eos_token_id=None, pad_token_id=PAD, logits_processor=processor,
    )
    clean = full_forward_logps(setup, output.sequences)
    other = full_forward_logps(setup, output.sequences, other_pixels)
    combined = 1.5 * clean - 0.5 * other  # the log-softmax shifts only shift the combination
    combined[..., IMAGE] = -np.inf
    combined = np.asarray(jax.nn.log_softmax(combined, axis=-1))
    np.testing.assert_array_equal(output.new_tokens, combined.argmax(-1))
    assert not np.array_equal(output.new_tokens, setup["greedy"].new_tokens)
    expected = np.take_along_axis(combined, np.asarray(output.new_tokens)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(output.token_logps, expected, rtol=RTOL)


def test_hooks_reach_attention_in_prefill_and_decode(setup):
    edited_layers = []

    def identity_edit(probs, key_is_image, layer_index):
        edited_layers.append(layer_index)
        return probs

    def run(bias):
        hooks = AttentionHooks(layers=(0, -1), image_logit_bias=jnp.full((1, 1, 1, 1), bias),
                               post_softmax_edit=identity_edit)
        return generate(
            setup["model"], setup["input_ids"], setup["pixels"], attention_mask=setup["mask"],
            max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=PAD, hooks=hooks,
        )

    unchanged = run(0.0)
    np.testing.assert_array_equal(unchanged.new_tokens, setup["greedy"].new_tokens)
    np.testing.assert_allclose(unchanged.token_logps, setup["greedy"].token_logps, rtol=RTOL)
    # prefill + step 0 trace and the loop body trace, each through both hooked layers
    assert sorted(set(edited_layers)) == [0, 1] and len(edited_layers) == 4
    # Hiding the image keys (same hook structure, so no recompile) changes what is generated.
    blind = run(-1e4)
    assert len(edited_layers) == 4
    assert not np.allclose(blind.token_logps, unchanged.token_logps, rtol=1e-3)


def test_argument_errors_name_the_bad_value(setup):
    model, input_ids, pixels = setup["model"], setup["input_ids"], setup["pixels"]
    kwargs = dict(max_new_tokens=4, eos_token_id=None, pad_token_id=PAD)
    right_padded = np.flip(setup["mask"], axis=1)
    with pytest.raises(ValueError, match="prompt 1 is not left-padded"):
        generate(model, input_ids, pixels, attention_mask=right_padded, **kwargs)
    with pytest.raises(ValueError, match="temperature=0.5 samples and needs an rng key"):
        generate(model, input_ids, pixels, attention_mask=setup["mask"], temperature=0.5, **kwargs)
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]; got 0.0"):
        generate(model, input_ids, pixels, attention_mask=setup["mask"], top_p=0.0, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1; got 0"):
        generate(model, input_ids, pixels, attention_mask=setup["mask"], **{**kwargs, "max_new_tokens": 0})


def test_generation_under_remat_equals_generation_without(setup):
    """The LLaVA presets set `remat=True`; generate (greedy, and ADAPT's probed and hooked steps) must run
    under it and give the plain model's tokens (remat changes the backward pass only)."""
    model = setup["model"]
    config = model.config
    remat_config = dataclasses.replace(config, text_config=dataclasses.replace(config.text_config, remat=True))
    remat_model = Llava(remat_config, rngs=nnx.Rngs(1))
    nnx.update(remat_model, nnx.state(model))
    kwargs = dict(attention_mask=setup["mask"], max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=PAD)
    for controller in (None, AdaptDecoding("steer", anchor_steps=2, tau=2.0)):
        plain = setup["greedy"] if controller is None else generate(
            model, setup["input_ids"], setup["pixels"], controller=controller, **kwargs)
        remat = generate(remat_model, setup["input_ids"], setup["pixels"], controller=controller, **kwargs)
        np.testing.assert_array_equal(remat.new_tokens, plain.new_tokens)
        np.testing.assert_allclose(remat.token_logps, plain.token_logps, rtol=1e-5, atol=1e-6)


def _cache_sized_copies(hlo: str, cache_shape: tuple[int, ...]) -> dict[str, list[str]]:
    """HLO computation name -> its copy / transpose instructions whose result has `cache_shape`'s dims in any order."""
    found, computation = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = line.split()[1 if line.startswith("ENTRY") else 0]
            continue
        match = re.search(r"= \w+\[([\d,]*)\]\{[\d,]*\} (copy|transpose)\(", line)
        if match and sorted(int(d) for d in match.group(1).split(",") if d) == sorted(cache_shape):
            found.setdefault(computation, []).append(line.strip())
    return found


def test_decode_loop_copies_nothing_cache_sized(setup):
    """The compiled generate program holds no copy or transpose of a KV-cache-sized array: the cache is stored
    in the layout the attention dots read ([B, K, S, D]), so a decode step writes one slot and reads in place."""
    model, input_ids = setup["model"], setup["input_ids"]
    graphdef, state = nnx.split(model)

    def run(state, input_ids, mask, pixels):
        return generate(nnx.merge(graphdef, state), input_ids, pixels, attention_mask=mask, max_new_tokens=MAX_NEW,
                        eos_token_id=None, pad_token_id=PAD).new_tokens

    hlo = jax.jit(run).lower(state, input_ids, jnp.asarray(setup["mask"], bool), setup["pixels"]).compile().as_text()
    assert "while" in hlo
    text = model.config.text_config
    window = input_ids.shape[1] + MAX_NEW - 1
    cache_shape = (input_ids.shape[0], text.num_key_value_heads, window, text.head_dim)
    assert _cache_sized_copies(hlo, cache_shape) == {}
    # The check sees such copies: the [B, S, K, D] -> [B, K, S, D] transpose of a cache-sized array is one.
    transposed = jax.jit(lambda c: jnp.swapaxes(c, 1, 2) * 2).lower(
        jnp.zeros((cache_shape[0], window, cache_shape[1], cache_shape[3]))).compile().as_text()
    assert _cache_sized_copies(transposed, cache_shape)
