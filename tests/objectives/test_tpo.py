import math

import jax
import jax.numpy as jnp
import numpy as np

from mmpo_jax.objectives import registry
from mmpo_jax.objectives.tpo import label_token_logits, tpo_token_weights
from tests.objectives.scores import pair_scores


def numpy_tpo(clean, noisy, logps, mask, chosen):
    """METHODS.md §7 with loops: weights, then the weighted log-prob sum_t w_t log pi."""
    weights = np.zeros(clean.shape)
    totals = np.zeros(clean.shape[0])
    for b in range(clean.shape[0]):
        for t in range(clean.shape[1]):
            if mask[b, t]:
                s = 1 / (1 + math.exp(-(clean[b, t] - noisy[b, t])))
                weights[b, t] = s + 0.5 if chosen else 1 - s + 0.5
                totals[b] += weights[b, t] * logps[b, t]
    return weights, totals


def tpo_loss(logps, masks, weights, beta=0.1):
    """The ``tpo`` method (DPO on TPO-weighted log-probs) through the registry."""
    return registry.compute_objective({"name": "tpo", "beta": beta},
                                      pair_scores(logps, masks, weights))[0]


def _case(seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.normal(0, 3, size=(3, 7)).astype(np.float32)
    noisy = rng.normal(0, 3, size=(3, 7)).astype(np.float32)
    logps = -rng.exponential(2.0, size=(3, 7)).astype(np.float32)
    mask = np.ones((3, 7), bool)
    mask[0, :2] = False
    mask[2, 4:] = False
    return clean, noisy, logps, mask


def test_matches_numpy_transcription_both_sides():
    clean, noisy, logps, mask = _case()
    weights, totals = {}, {}
    for chosen in (True, False):
        weights[chosen] = tpo_token_weights(clean, noisy, mask, chosen=chosen)
        expected_w, totals[chosen] = numpy_tpo(clean, noisy, logps, mask, chosen)
        np.testing.assert_allclose(weights[chosen], expected_w, rtol=1e-6)
    # policy and reference alike: h^w = sum_t w_t (pi_t - ref_t)
    ref = logps - 0.25
    losses = tpo_loss([logps, logps, ref, ref], [mask, mask], [weights[True], weights[False]],
                      beta=0.5)
    ref_totals = {c: numpy_tpo(clean, noisy, ref, mask, c)[1] for c in (True, False)}
    z = 0.5 * ((totals[True] - ref_totals[True]) - (totals[False] - ref_totals[False]))
    np.testing.assert_allclose(losses, np.log1p(np.exp(-z)), rtol=1e-5)


def test_token_gradients_are_proportional_to_the_weights():
    """METHODS.md §7 as corrected: each token's log-prob gets w_t times the example's gradient,
    so tokens with different weights get different gradients (the old additive form gave every
    token the same one)."""
    clean, noisy, logps, mask = _case(4)
    weights = [tpo_token_weights(clean, noisy, mask, chosen=c) for c in (True, False)]
    ref = [logps - 0.5, logps + 0.3]
    grads = jax.grad(lambda pw, pl: jnp.sum(tpo_loss([pw, pl, *ref], [mask, mask], weights)),
                     argnums=(0, 1))(jnp.asarray(logps), jnp.asarray(logps))
    for grad, w in zip(grads, weights):
        grad, w = np.asarray(grad), np.asarray(w)
        assert np.all(grad[~mask] == 0.0)
        for row in range(mask.shape[0]):
            ratio = grad[row][mask[row]] / w[row][mask[row]]
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)  # one factor per example
            assert np.ptp(grad[row][mask[row]]) > 1e-4  # the tokens differ


def test_hand_case_and_mirror():
    w = tpo_token_weights(jnp.array([[2.0, 0.0]]), jnp.array([[2.0, 0.0]]), jnp.ones((1, 2)), chosen=True)
    np.testing.assert_allclose(w, [[1.0, 1.0]])  # Delta = 0 -> sigma = 0.5 -> 1.0
    clean, noisy, _, mask = _case(1)
    total = tpo_token_weights(clean, noisy, mask, chosen=True) + tpo_token_weights(
        clean, noisy, mask, chosen=False
    )
    np.testing.assert_allclose(np.asarray(total)[mask], 2.0, rtol=1e-6)
    assert np.all(np.asarray(total)[~mask] == 0.0)


def test_extreme_logit_gaps_and_padding_are_safe():
    clean, noisy, logps, mask = _case(2)
    clean[0, 0] = 1e4  # masked position holding garbage
    logps[0, 1] = -np.inf
    clean[1, 3], noisy[1, 3] = -1e4, 1e4  # valid, Delta = -2e4: rejected-side weight 1.5, chosen 0.5
    weights = [tpo_token_weights(clean, noisy, mask, chosen=c) for c in (True, False)]
    value, grad = jax.value_and_grad(
        lambda x: jnp.sum(tpo_loss([x, logps, logps, logps], [mask, mask], weights)))(
        jnp.asarray(logps))
    assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(tpo_token_weights(clean, noisy, mask, chosen=True)[1, 3], 0.5)


def test_label_token_logits_gathers_and_masks():
    logits = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    labels = jnp.array([[1, 3, -100], [0, 2, 2]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    np.testing.assert_allclose(label_token_logits(logits, labels, mask), [[1.0, 7.0, 0.0], [12.0, 18.0, 22.0]])


def test_jit_equals_eager():
    clean, noisy, logps, mask = _case(3)

    def f(c, n, l, m):
        weights = [tpo_token_weights(c, n, m, chosen=side) for side in (True, False)]
        return tpo_loss([l, l - 1.0, l - 0.5, l], [m, m], weights)

    np.testing.assert_allclose(jax.jit(f)(clean, noisy, logps, mask), f(clean, noisy, logps, mask), rtol=1e-6)
