"""Contrastive amplification decoding: plain decoding at alpha = 0, the plausible head, parity with
cache-free forwards on the clean and the noisy image, and one compilation per shape."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from mmpo_jax.generation import contrastive_generate, generate, sampling_logits
from mmpo_jax.generation.contrastive import contrastive_logits
from tests.generation.helpers import COUNT_AND_BAN_IMAGE, PAD, TRACES, log_softmax, reference_forward
from tests.models.hf_fixtures import IMAGE_TOKEN_ID as IMAGE

MAX_NEW = 12
RTOL = 1e-4


@pytest.fixture(scope="module")
def setup(tiny_llava):
    noise = np.random.default_rng(7).normal(size=tiny_llava["pixels"].shape).astype(np.float32)
    # METHODS.md §5's diffusion noise at t=600: sqrt(abar) x0 + sqrt(1 - abar) eps
    return {**tiny_llava, "noisy": 0.734 * tiny_llava["pixels"] + 0.679 * jnp.asarray(noise)}


def run(setup, input_ids=None, **options):
    return contrastive_generate(
        setup["model"], setup["input_ids"] if input_ids is None else input_ids, setup["pixels"], setup["noisy"],
        attention_mask=setup["mask"], max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=PAD,
        logits_processor=COUNT_AND_BAN_IMAGE, **options)


def run_plain(setup, **options):
    return generate(setup["model"], setup["input_ids"], setup["pixels"], attention_mask=setup["mask"],
                    max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=PAD, logits_processor=COUNT_AND_BAN_IMAGE,
                    **options)


def numpy_contrastive(clean, noisy, alpha, plausibility):
    """METHODS.md §5 on log-probabilities (the tested code uses raw logits: the two must agree)."""
    clean, noisy = log_softmax(clean), log_softmax(noisy)
    with np.errstate(divide="ignore"):  # log(0) = -inf: every token is plausible
        head = clean >= np.log(plausibility) + clean.max(-1, keepdims=True)
    return np.where(head, (1 + alpha) * clean - alpha * noisy, -np.inf), head


def test_contrastive_logits_match_the_log_probability_form():
    rng = np.random.default_rng(0)
    clean, noisy = rng.normal(0, 3, (4, 30)).astype(np.float32), rng.normal(0, 3, (4, 30)).astype(np.float32)
    for alpha, b in [(0.1, 0.1), (2.0, 0.5), (0.0, 0.0), (1.0, 1.0)]:
        got = np.asarray(contrastive_logits(clean + 5.0, noisy - 3.0, alpha=alpha, plausibility=b))
        expected, head = numpy_contrastive(clean, noisy, alpha, b)
        np.testing.assert_array_equal(np.isfinite(got), head)
        np.testing.assert_allclose(log_softmax(got), log_softmax(expected), rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(contrastive_logits(clean, noisy, alpha=3.0, plausibility=0.0))).all()
    assert (np.isfinite(np.asarray(contrastive_logits(clean, noisy, alpha=3.0, plausibility=1.0))).sum(-1) == 1).all()


def test_alpha_zero_is_plain_greedy_decoding(setup):
    greedy = run_plain(setup)
    # b = 0 keeps every token: the distribution itself is the plain one
    unrestricted = run(setup, alpha=0.0, plausibility=0.0)
    np.testing.assert_array_equal(unrestricted.new_tokens, greedy.new_tokens)
    np.testing.assert_allclose(unrestricted.token_logps, greedy.token_logps, rtol=RTOL)
    # the default head never excludes the argmax
    np.testing.assert_array_equal(run(setup, alpha=0.0).new_tokens, greedy.new_tokens)


@pytest.mark.slow
def test_alpha_zero_is_plain_sampling(setup):
    key = jax.random.key(3)
    sampled = run_plain(setup, temperature=1.0, top_p=0.9, rng=key)
    contrastive = run(setup, alpha=0.0, plausibility=0.0, temperature=1.0, top_p=0.9, rng=key)
    np.testing.assert_array_equal(contrastive.new_tokens, sampled.new_tokens)
    np.testing.assert_allclose(contrastive.token_logps, sampled.token_logps, rtol=RTOL)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tokens_come_from_the_plausible_head_of_the_clean_distribution(setup, temperature):
    """A strongly weighted amateur (alpha = 5) would pick implausible tokens; the head forbids them."""
    alpha, b = 5.0, 0.1
    options = dict(temperature=temperature, top_p=0.9, rng=jax.random.key(5)) if temperature else {}
    output = run(setup, alpha=alpha, plausibility=b, **options)
    clean, _ = reference_forward(setup, output.sequences, setup["pixels"])
    noisy, _ = reference_forward(setup, output.sequences, setup["noisy"])
    expected, head = numpy_contrastive(clean, noisy, alpha, b)
    expected[..., IMAGE] = -np.inf  # BanTokens acts after the combination
    tokens = np.asarray(output.new_tokens)
    assert np.take_along_axis(head, tokens[..., None], axis=-1).all(), "a token outside the plausible head"
    # the restriction mattered: without it the amplified amateur picks implausible tokens
    unrestricted = (1 + alpha) * log_softmax(clean) - alpha * log_softmax(noisy)
    unrestricted[..., IMAGE] = -np.inf
    assert not np.take_along_axis(head, unrestricted.argmax(-1)[..., None], axis=-1).all()
    if temperature == 0:
        np.testing.assert_array_equal(tokens, expected.argmax(-1))
        chosen_from = expected
    else:
        flat = jnp.asarray(expected.reshape(-1, expected.shape[-1]))
        chosen_from = np.asarray(sampling_logits(flat, temperature, 0.9)).reshape(expected.shape)
    expected_logps = np.take_along_axis(log_softmax(chosen_from), tokens[..., None], axis=-1)
    np.testing.assert_allclose(output.token_logps, expected_logps[..., 0], rtol=RTOL)


def test_compiles_once_per_shape(setup):
    first = run(setup, temperature=0.2, top_p=0.9, rng=jax.random.key(0))
    traces = len(TRACES)
    assert traces > 0
    new_prompts = np.where(setup["input_ids"] == IMAGE, IMAGE, (setup["input_ids"] + 7) % 90)
    again = run(setup, temperature=0.2, top_p=0.9, rng=jax.random.key(0))
    run(setup, input_ids=new_prompts, temperature=0.7, top_p=0.5, rng=jax.random.key(1),
        alpha=0.5, plausibility=0.3)
    assert len(TRACES) == traces, "a new key, prompt, temperature, alpha or plausibility recompiled"
    np.testing.assert_array_equal(again.new_tokens, first.new_tokens)


def test_argument_errors_name_the_bad_value(setup):
    with pytest.raises(ValueError, match=r"noisy_pixel_values has shape \(1, 30, 30, 3\)"):
        contrastive_generate(setup["model"], setup["input_ids"], setup["pixels"], setup["noisy"][:1],
                             attention_mask=setup["mask"], max_new_tokens=2, eos_token_id=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"plausibility must lie in \[0, 1\].*got 1.5"):
        run(setup, plausibility=1.5)
