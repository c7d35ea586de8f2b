"""FiSAO token rewards from the model's own vision encoder as verifier (METHODS.md §6, [our choice]).

- ``verifier_scores``: ``S(o) = cos(CLIP_image(I), CLIP_text("a photo of a {o}."))``;
- ``calibrate``: the mean scores ``mu_c`` of correct and ``mu_h`` of hallucinated mentions on a
  calibration set;
- ``object_reward``: ``clip(2 (S - mu_h) / (mu_c - mu_h) - 1, -1, 1)``;
- ``place_word_rewards``: rewards on the last sub-token of each object word (or, with
  ``reward_granularity="sentence"``, the mean object reward on every response token), plus an
  optional sequence-end reward.

Finding which tokens spell an object word (tokenizer + vocabulary with synonyms) belongs to the
rollout pipeline; here words arrive as ``word_last_token_index [B, W]`` with a ``word_mask``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

REWARD_GRANULARITIES = ("token", "sentence")


def verifier_scores(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """Cosine similarity of each object prompt's text embedding with its image embedding.

    Args:
      image_embeds: ``[B, D]`` projected CLIP image embeddings.
      text_embeds: ``[B, W, D]`` projected CLIP text embeddings of ``"a photo of a {o}."`` per word.

    Returns:
      ``[B, W]`` float32 scores in [-1, 1].
    """
    image = jnp.asarray(image_embeds, jnp.float32)
    text = jnp.asarray(text_embeds, jnp.float32)
    image = image / jnp.maximum(jnp.linalg.norm(image, axis=-1, keepdims=True), 1e-12)
    text = text / jnp.maximum(jnp.linalg.norm(text, axis=-1, keepdims=True), 1e-12)
    return jnp.einsum("bd,bwd->bw", image, text)


def calibrate(correct_scores: np.ndarray, hallucinated_scores: np.ndarray) -> tuple[float, float]:
    """``(mu_c, mu_h)``: mean verifier scores of correct and of hallucinated object mentions.

    Runs eagerly, once, on the calibration set (not jittable: it checks the result).

    Args:
      correct_scores: ``[N_c]`` scores of mentions of objects present in the image.
      hallucinated_scores: ``[N_h]`` scores of mentions of absent objects.

    Raises:
      ValueError: if either set is empty or ``mu_c <= mu_h`` (the verifier does not separate them,
        so the reward scale would be undefined or inverted).
    """
    correct = np.asarray(correct_scores, np.float64).reshape(-1)
    hallucinated = np.asarray(hallucinated_scores, np.float64).reshape(-1)
    if correct.size == 0 or hallucinated.size == 0:
        raise ValueError(
            f"calibration needs both kinds of mentions; got {correct.size} correct and "
            f"{hallucinated.size} hallucinated scores"
        )
    mu_c, mu_h = float(correct.mean()), float(hallucinated.mean())
    if not mu_c > mu_h:
        raise ValueError(
            f"mu_c={mu_c:.6g} must exceed mu_h={mu_h:.6g}: the verifier does not score correct "
            "mentions above hallucinated ones on this calibration set"
        )
    return mu_c, mu_h


def object_reward(scores: jax.Array, mu_c: float, mu_h: float) -> jax.Array:
    """``clip(2 (S - mu_h) / (mu_c - mu_h) - 1, -1, 1)``: +1 at ``mu_c``, -1 at ``mu_h``; any shape."""
    scores = jnp.asarray(scores, jnp.float32)
    return jnp.clip(2.0 * (scores - mu_h) / (mu_c - mu_h) - 1.0, -1.0, 1.0)


def place_word_rewards(
    word_rewards: jax.Array,
    word_last_token_index: jax.Array,
    num_tokens: int,
    *,
    word_mask: jax.Array | None = None,
    response_mask: jax.Array | None = None,
    reward_granularity: str = "token",
    sequence_end_reward: jax.Array | None = None,
) -> jax.Array:
    """Token rewards ``[B, T]`` from per-word rewards.

    ``"token"``: each word's reward sits on its last sub-token (two words ending on one token add),
    every other token gets 0. ``"sentence"``: every response token gets the mean reward of the
    response's words (0 without words). ``sequence_end_reward`` is added on the last response
    token.

    Args:
      word_rewards: ``[B, W]`` ``object_reward`` of each object mention.
      word_last_token_index: ``[B, W]`` int position of each word's last sub-token in ``[0, T)``.
      num_tokens: ``T``.
      word_mask: ``[B, W]`` bool, false on padding words (default: all real).
      response_mask: ``[B, T]`` bool, the response tokens; needed for ``"sentence"`` and for
        ``sequence_end_reward``.
      reward_granularity: one of ``REWARD_GRANULARITIES``.
      sequence_end_reward: ``[B]`` optional reward for the whole response.

    Returns:
      ``[B, T]`` float32 rewards, 0 outside the response.
    """
    if reward_granularity not in REWARD_GRANULARITIES:
        raise ValueError(
            f"reward_granularity={reward_granularity!r} is not one of {REWARD_GRANULARITIES}"
        )
    needs_response = reward_granularity == "sentence" or sequence_end_reward is not None
    if needs_response and response_mask is None:
        raise ValueError(
            "response_mask [B, T] is required with reward_granularity='sentence' or a "
            "sequence_end_reward"
        )
    word_rewards = jnp.asarray(word_rewards, jnp.float32)
    batch = word_rewards.shape[0]
    real = (
        jnp.ones(word_rewards.shape, bool) if word_mask is None else jnp.asarray(word_mask, bool)
    )
    word_rewards = jnp.where(real, word_rewards, 0.0)
    if reward_granularity == "token":
        # Padding words point past the end and are dropped by the scatter.
        index = jnp.where(real, jnp.asarray(word_last_token_index, jnp.int32), num_tokens)
        rows = jnp.arange(batch)[:, None]
        rewards = jnp.zeros((batch, num_tokens), jnp.float32).at[rows, index].add(
            word_rewards, mode="drop"
        )
    else:
        count = jnp.sum(real, axis=-1, keepdims=True).astype(jnp.float32)
        mean = jnp.sum(word_rewards, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
        rewards = jnp.broadcast_to(mean, (batch, num_tokens))
    if response_mask is not None:
        rewards = jnp.where(jnp.asarray(response_mask, bool), rewards, 0.0)
    if sequence_end_reward is not None:
        valid = jnp.asarray(response_mask, bool)
        positions = jnp.arange(num_tokens)[None, :]
        last = jnp.max(jnp.where(valid, positions, -1), axis=-1, keepdims=True)
        end_bonus = jnp.asarray(sequence_end_reward, jnp.float32)[:, None]
        rewards = rewards + jnp.where(positions == last, end_bonus, 0.0)
    return rewards
