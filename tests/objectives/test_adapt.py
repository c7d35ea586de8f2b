"""VAG-DPO (METHODS.md §4) against a NumPy transcription, plus its DPO and safety invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from mmpo_jax.objectives.adapt import vag_dpo_loss
from mmpo_jax.objectives.dpo import dpo_loss
from mmpo_jax.objectives.metrics import finalize


def np_vag_dpo(p_w_ve, p_l_noise, r_w_ve, r_l_noise, beta):
    """-log sigma(beta*((p(y_w|I_VE)-r(y_w|I_VE)) - (p(y_l|I_noise)-r(y_l|I_noise))))."""
    out = []
    for i in range(len(p_w_ve)):
        z = beta * ((p_w_ve[i] - r_w_ve[i]) - (p_l_noise[i] - r_l_noise[i]))
        out.append(math.log1p(math.exp(-z)))
    return np.array(out)


def random_logps(seed, batch=5):
    rng = np.random.default_rng(seed)
    return [rng.normal(-30.0, 6.0, size=batch).astype(np.float32) for _ in range(4)]


def test_matches_numpy_transcription_and_reward_metrics():
    logps = random_logps(0)
    losses, metrics = vag_dpo_loss(*logps, beta=0.2)
    np.testing.assert_allclose(losses, np_vag_dpo(*logps, 0.2), rtol=1e-5)
    final = finalize(metrics)
    np.testing.assert_allclose(final["rewards/chosen"], 0.2 * np.mean(logps[0] - logps[2]), rtol=1e-5)
    np.testing.assert_allclose(final["rewards/rejected"], 0.2 * np.mean(logps[1] - logps[3]), rtol=1e-5)
    np.testing.assert_allclose(final["loss/dpo"], np.mean(np_vag_dpo(*logps, 0.2)), rtol=1e-5)


def test_hand_case():
    # (policy - ref) = 3 on I_VE for y_w, -1 on I_noise for y_l; beta 0.25 -> z = 1.
    losses, _ = vag_dpo_loss(jnp.array([-7.0]), jnp.array([-9.0]), jnp.array([-10.0]), jnp.array([-8.0]), beta=0.25)
    np.testing.assert_allclose(losses, [math.log1p(math.exp(-1.0))], rtol=1e-6)


def test_equals_dpo_when_enhanced_and_noisy_images_give_the_original_logps():
    original = random_logps(1)  # logp(y_w|I), logp(y_l|I) for policy and reference
    vag, vag_metrics = vag_dpo_loss(*original, beta=0.1, label_smoothing=0.1)
    dpo, dpo_metrics = dpo_loss(*original, beta=0.1, label_smoothing=0.1)
    np.testing.assert_array_equal(vag, dpo)
    assert set(vag_metrics) == set(dpo_metrics)


def test_gradients_push_the_enhanced_chosen_up_and_never_reach_the_reference():
    logps = [jnp.asarray(x) for x in random_logps(2)]
    grads = jax.grad(lambda *a: jnp.sum(vag_dpo_loss(*a)[0]), argnums=(0, 1, 2, 3))(*logps)
    assert np.all(np.asarray(grads[0]) < 0) and np.all(np.asarray(grads[1]) > 0)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)


def test_extreme_gaps_are_finite_and_jit_equals_eager():
    big = jnp.array([1e4, -1e4, 0.0], jnp.float32)
    zeros = jnp.zeros(3, jnp.float32)
    for args in [(big, zeros, zeros, zeros), (zeros, big, zeros, zeros)]:
        losses, metrics = vag_dpo_loss(*args)
        assert np.all(np.isfinite(losses))
        assert all(np.isfinite(v) for v in finalize(metrics).values())
    logps = random_logps(3)
    np.testing.assert_allclose(jax.jit(vag_dpo_loss)(*logps)[0], vag_dpo_loss(*logps)[0], rtol=1e-6)
