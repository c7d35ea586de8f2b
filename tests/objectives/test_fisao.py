"""FiSAO PPO pieces (METHODS.md §6) against NumPy transcriptions, plus PPO invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpo_jax.objectives import fisao
from mmpo_jax.objectives.metrics import finalize

B, T = 6, 10
GROUPS = np.array([7, 7, 7, 3, 3, 3])


def rollout(seed):
    """Log-probs, rewards and masks of 2 prompts x 3 samples with varied lengths (prompt masked)."""
    rng = np.random.default_rng(seed)
    new, old, ref = (rng.normal(-2.0, 0.5, (B, T)).astype(np.float32) for _ in range(3))
    new = old + rng.normal(0, 0.3, (B, T)).astype(np.float32)
    rewards = np.where(rng.random((B, T)) < 0.3, rng.uniform(-1, 1, (B, T)), 0).astype(np.float32)
    mask = np.zeros((B, T), bool)
    for b, (start, end) in enumerate([(1, 9), (1, 5), (1, 10), (2, 7), (2, 4), (2, 10)]):
        mask[b, start:end] = True
    return new, old, ref, rewards, mask


# ---------------------------------------------------------------------------------------------
# NumPy transcription of METHODS.md §6 "Optimisation" with the module's [our choice] details
# ---------------------------------------------------------------------------------------------


def np_advantages(old, ref, rewards, mask, groups, beta_kl, gamma, bins):
    r = np.where(mask, rewards - beta_kl * (old - ref), 0.0).astype(np.float64)
    returns = np.zeros_like(r)
    for b in range(B):
        running = 0.0
        for t in reversed(range(T)):
            running = r[b, t] + gamma * running
            returns[b, t] = running if mask[b, t] else 0.0
    cell = -np.ones((B, T), int)
    for b in range(B):
        positions = np.flatnonzero(mask[b])
        for j, t in enumerate(positions):
            cell[b, t] = min(bins - 1, int((j + 0.5) / len(positions) * bins))
    adv = np.zeros_like(returns)
    for b in range(B):
        for t in np.flatnonzero(mask[b]):
            same = [returns[b2, t2] for b2 in range(B) for t2 in range(T)
                    if groups[b2] == groups[b] and mask[b2, t2] and cell[b2, t2] == cell[b, t]]  # fmt: skip
            adv[b, t] = returns[b, t] - np.mean(same)
    valid = adv[mask]
    return np.where(mask, adv / (valid.std() + 1e-8), 0.0)


def np_ppo(new, old, adv, mask, eps):
    losses = []
    for b in range(B):
        terms = []
        for t in np.flatnonzero(mask[b]):
            rho = math.exp(new[b, t] - old[b, t])
            terms.append(min(rho * adv[b, t], min(max(rho, 1 - eps), 1 + eps) * adv[b, t]))
        losses.append(-np.mean(terms))
    return np.array(losses)


@pytest.mark.parametrize("gamma,bins", [(1.0, 10), (0.9, 3), (1.0, 1)])
def test_loss_matches_numpy_transcription(gamma, bins):
    new, old, ref, rewards, mask = rollout(0)
    losses, _ = fisao.fisao_ppo_loss(
        new, old, ref, rewards, mask, GROUPS, beta_kl=0.05, gamma=gamma, clip_eps=0.2,
        num_position_bins=bins,
    )  # fmt: skip
    adv = np_advantages(old, ref, rewards, mask, GROUPS, 0.05, gamma, bins)
    np.testing.assert_allclose(losses, np_ppo(new, old, adv, mask, 0.2), rtol=1e-4, atol=1e-6)


def test_pieces_hand_cases():
    mask = np.array([[0, 1, 1, 1]], bool)
    rewards = fisao.kl_penalised_rewards(
        jnp.array([[5.0, 1.0, 0.0, 2.0]]), jnp.array([[jnp.nan, -1.0, -2.0, -1.0]]),
        jnp.array([[0.0, -2.0, -2.0, -3.0]]), mask, beta_kl=0.5,
    )  # fmt: skip
    np.testing.assert_allclose(rewards, [[0.0, 0.5, 0.0, 1.0]])
    np.testing.assert_allclose(fisao.returns_to_go(rewards, mask, gamma=0.5), [[0.0, 0.75, 0.5, 1.0]])
    np.testing.assert_array_equal(fisao.position_bins(mask, 2), [[-1, 0, 1, 1]])  # u = 1/6, 1/2, 5/6


def test_clipped_surrogate_hand_cases():
    old = jnp.zeros((1, 4))
    new = jnp.log(jnp.array([[1.5, 1.5, 0.5, 0.5]]))
    adv = jnp.array([[1.0, -1.0, 1.0, -1.0]])
    surrogate, clipped = fisao.ppo_surrogate(new, old, adv, jnp.ones((1, 4), bool), clip_eps=0.2)
    np.testing.assert_allclose(surrogate, [[1.2, -1.5, 0.5, -0.8]], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [[True, False, False, True]])


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_group_baseline_makes_advantages_zero_mean_per_group(seed, bins):
    _, old, ref, rewards, mask = rollout(seed)
    returns = fisao.returns_to_go(fisao.kl_penalised_rewards(rewards, old, ref, mask), mask)
    for normalize in (False, True):
        adv = np.asarray(
            fisao.group_baseline_advantages(returns, mask, GROUPS, num_position_bins=bins, normalize=normalize)
        )
        for group in set(GROUPS):
            rows = GROUPS == group
            assert abs(adv[rows][mask[rows]].mean()) < 1e-5
        assert np.all(adv[~mask] == 0.0)


def test_zero_advantages_give_zero_gradient_except_via_the_kl_term():
    new, old, ref, rewards, mask = rollout(1)

    def grad_new(rewards, ref, beta_kl):
        return jax.grad(
            lambda n: jnp.sum(fisao.fisao_ppo_loss(n, old, ref, rewards, mask, GROUPS, beta_kl=beta_kl)[0])
        )(jnp.asarray(new))

    # No task reward and a policy equal to the reference: zero advantages, zero gradient.
    assert np.all(np.asarray(grad_new(np.zeros_like(rewards), old, 0.05)) == 0.0)
    # The KL term alone moves the policy, exactly as a reward of -beta_kl * (log pi_old - log pi_ref).
    via_kl = grad_new(np.zeros_like(rewards), ref, 0.05)
    as_reward = grad_new(np.where(mask, -0.05 * (old - ref), 0.0).astype(np.float32), ref, 0.0)
    assert np.any(np.asarray(via_kl) != 0.0)
    np.testing.assert_allclose(via_kl, as_reward, rtol=1e-5, atol=1e-7)
    # Only the new log-probs are differentiated.
    grads = jax.grad(
        lambda o, r, w: jnp.sum(fisao.fisao_ppo_loss(new, o, r, w, mask, GROUPS)[0]), argnums=(0, 1, 2)
    )(jnp.asarray(old), jnp.asarray(ref), jnp.asarray(rewards))
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_padding_never_changes_the_loss_and_extremes_stay_finite():
    new, old, ref, rewards, mask = rollout(2)
    clean, clean_metrics = fisao.fisao_ppo_loss(new, old, ref, rewards, mask, GROUPS)
    garbage = [np.where(mask, x, v) for x, v in [(new, np.inf), (old, -np.inf), (ref, np.nan), (rewards, 1e9)]]
    dirty, dirty_metrics = fisao.fisao_ppo_loss(*garbage, mask, GROUPS)
    np.testing.assert_array_equal(clean, dirty)
    for key in clean_metrics:
        np.testing.assert_array_equal(finalize(clean_metrics)[key], finalize(dirty_metrics)[key])
    # Extreme log-prob gaps, an all-masked row and a one-token response.
    extreme_mask = mask.copy()
    extreme_mask[1] = False
    extreme_mask[4] = False
    extreme_mask[4, 3] = True
    extreme_new = np.where(np.arange(T) % 2 == 0, 1e4, -1e4).astype(np.float32) * np.ones((B, 1), np.float32)
    losses, metrics = fisao.fisao_ppo_loss(extreme_new, old, ref, rewards, extreme_mask, GROUPS)
    grad = jax.grad(lambda n: jnp.sum(fisao.fisao_ppo_loss(n, old, ref, rewards, extreme_mask, GROUPS)[0]))(
        jnp.asarray(extreme_new)
    )
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(grad)) and float(losses[1]) == 0.0
    assert all(np.isfinite(v) for v in finalize(metrics).values())


def test_jit_equals_eager_and_metrics():
    new, old, ref, rewards, mask = rollout(3)
    eager, metrics = fisao.fisao_ppo_loss(new, old, ref, rewards, mask, GROUPS)
    jitted = jax.jit(lambda *a: fisao.fisao_ppo_loss(*a)[0])(new, old, ref, rewards, mask, GROUPS)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
    final = finalize(metrics)
    np.testing.assert_allclose(final["rewards/token"], rewards[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(final["kl/ref"], (old - ref)[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(final["loss/ppo"], np.mean(eager), rtol=1e-6)
