"""FiSAO verifier rewards and their placement on tokens (METHODS.md §6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpo_jax.rewards import fisao


def test_object_reward_is_plus_minus_one_at_the_calibration_means_and_clipped():
    mu_c, mu_h = 0.31, 0.22
    scores = jnp.array([mu_c, mu_h, (mu_c + mu_h) / 2, 0.5, 0.0])
    np.testing.assert_allclose(fisao.object_reward(scores, mu_c, mu_h), [1, -1, 0, 1, -1], atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.floats(-1.0, 1.0), st.floats(0.01, 0.5))
def test_object_reward_transcription(score, gap):
    mu_h = 0.2
    mu_c = mu_h + gap
    expected = min(1.0, max(-1.0, 2 * (score - mu_h) / (mu_c - mu_h) - 1))
    np.testing.assert_allclose(fisao.object_reward(score, mu_c, mu_h), expected, rtol=1e-5, atol=1e-5)


def test_calibrate_takes_the_means_and_refuses_a_useless_verifier():
    assert fisao.calibrate([0.3, 0.32, 0.34], [0.2, 0.22]) == pytest.approx((0.32, 0.21))
    with pytest.raises(ValueError, match="mu_c=0.2 must exceed mu_h=0.3"):
        fisao.calibrate([0.2], [0.3])
    with pytest.raises(ValueError, match="0 hallucinated"):
        fisao.calibrate([0.2], [])


def test_verifier_scores_are_cosines():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(2, 8)), rng.normal(size=(2, 3, 8))
    got = fisao.verifier_scores(image, text)
    for b in range(2):
        for w in range(3):
            cos = image[b] @ text[b, w] / np.linalg.norm(image[b]) / np.linalg.norm(text[b, w])
            np.testing.assert_allclose(got[b, w], cos, rtol=1e-5)


def placement_inputs():
    # Example 0: words ending at tokens 3 and 6 (+1, -0.5), one padding word with garbage index.
    # Example 1: one word ending at token 2 (0.25). Response tokens: 1..7 and 1..4.
    rewards = np.array([[1.0, -0.5, 9.0], [0.25, 9.0, 9.0]], np.float32)
    last = np.array([[3, 6, 99], [2, -5, 1234]], np.int32)
    words = np.array([[True, True, False], [True, False, False]])
    response = np.zeros((2, 9), bool)
    response[0, 1:8] = True
    response[1, 1:5] = True
    return rewards, last, words, response


def test_token_rewards_sit_on_last_sub_tokens_only():
    rewards, last, words, response = placement_inputs()
    placed = np.asarray(fisao.place_word_rewards(rewards, last, 9, word_mask=words))
    expected = np.zeros((2, 9), np.float32)
    expected[0, 3], expected[0, 6], expected[1, 2] = 1.0, -0.5, 0.25
    np.testing.assert_array_equal(placed, expected)
    jitted = jax.jit(
        lambda *a: fisao.place_word_rewards(*a, 9, word_mask=words, response_mask=response)
    )(rewards, last)
    np.testing.assert_array_equal(jitted, expected)


def test_sentence_granularity_and_sequence_end_reward():
    rewards, last, words, response = placement_inputs()
    placed = np.asarray(
        fisao.place_word_rewards(
            rewards, last, 9, word_mask=words, response_mask=response, reward_granularity="sentence",
            sequence_end_reward=np.array([2.0, -1.0], np.float32),
        )
    )  # fmt: skip
    expected = np.where(response, np.array([[0.25], [0.25]], np.float32), 0.0)
    expected[0, 7] += 2.0
    expected[1, 4] -= 1.0
    np.testing.assert_allclose(placed, expected, rtol=1e-6)
    no_words = fisao.place_word_rewards(
        rewards, last, 9, word_mask=np.zeros_like(words), response_mask=response,
        reward_granularity="sentence",
    )  # fmt: skip
    assert np.all(np.asarray(no_words) == 0.0)


def test_placement_errors_name_the_problem():
    rewards, last, words, _ = placement_inputs()
    with pytest.raises(ValueError, match="response_mask"):
        fisao.place_word_rewards(rewards, last, 9, reward_granularity="sentence")
    with pytest.raises(ValueError, match="reward_granularity='word'"):
        fisao.place_word_rewards(rewards, last, 9, reward_granularity="word")
