import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.objectives import metrics as metric_lib
from mmpo_jax.objectives import registry
from mmpo_jax.objectives.dpo import dpo_loss
from tests.objectives.scores import pair_scores


def numpy_catpo(pw, pl, rw, rl, ww, wl, mw, ml, kw, kl, beta, lambda_kl):
    """METHODS.md §3: logp^w = sum_t w_t logp_t (policy and reference), + lambda_kl sum_t w_t KL_t."""
    out = []
    for b in range(pw.shape[0]):
        lpw = lrw = lpl = lrl = kl_sum = 0.0
        for t in range(pw.shape[1]):
            if mw[b, t]:
                lpw += ww[b, t] * pw[b, t]
                lrw += ww[b, t] * rw[b, t]
                kl_sum += ww[b, t] * kw[b, t]
            if ml[b, t]:
                lpl += wl[b, t] * pl[b, t]
                lrl += wl[b, t] * rl[b, t]
                kl_sum += wl[b, t] * kl[b, t]
        z = beta * ((lpw - lrw) - (lpl - lrl))
        out.append(math.log1p(math.exp(-z)) + lambda_kl * kl_sum)
    return np.array(out)


def _case(seed=0, batch=3, seq=9):
    rng = np.random.default_rng(seed)
    logps = [-rng.exponential(1.5, size=(batch, seq)).astype(np.float32) for _ in range(4)]
    weights = [rng.uniform(0.5, 1.5, size=(batch, seq)).astype(np.float32) for _ in range(2)]
    masks = [np.ones((batch, seq), bool) for _ in range(2)]
    masks[0][0, 6:] = False
    masks[1][1, 3:] = False
    masks[1][2, :2] = False
    kls = [rng.exponential(0.3, size=(batch, seq)).astype(np.float32) for _ in range(2)]
    for m, arrays in ((masks[0], (logps[0], logps[2], kls[0])), (masks[1], (logps[1], logps[3], kls[1]))):
        for a in arrays:
            a[~m] = 0.0  # upstream contract: masked per-token values are 0
    return logps, weights, masks, kls


def _call(logps, weights, masks, kls, *, beta=0.1, lambda_kl=0.03):
    """Cat-PO through the registry: the ``catpo`` method (weighted DPO + lambda_kl * token KL)."""
    method = {"name": "catpo", "beta": beta, "terms": {"dpo": 1.0, "token_kl": lambda_kl}}
    return registry.compute_objective(method, pair_scores(logps, masks, weights, kls))


def test_matches_numpy_transcription():
    logps, weights, masks, kls = _case()
    losses, m = _call(logps, weights, masks, kls, beta=0.3, lambda_kl=0.05)
    expected = numpy_catpo(*logps, *weights, *masks, *kls, 0.3, 0.05)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    f = metric_lib.finalize(m)
    assert {"loss/dpo", "loss/token_kl", "rewards/chosen", "rewards/accuracy"} <= set(f)


def test_hand_case():
    # One token each: w_w = 2, w_l = 0.5; pi_w - ref_w = 1, pi_l - ref_l = -2 => h^w = 2, -1.
    one = lambda x: jnp.array([[x]], jnp.float32)
    losses, m = _call([one(-1.0), one(-3.0), one(-2.0), one(-1.0)], [one(2.0), one(0.5)],
                      [one(1.0), one(1.0)], [one(0.4), one(2.0)], beta=0.5, lambda_kl=0.1)
    z = 0.5 * (2.0 - (-1.0))
    np.testing.assert_allclose(losses, [math.log1p(math.exp(-z)) + 0.1 * (2.0 * 0.4 + 0.5 * 2.0)], rtol=1e-6)
    np.testing.assert_allclose(metric_lib.finalize(m)["rewards/chosen"], 1.0, rtol=1e-6)


def test_unit_weights_without_kl_is_plain_dpo():
    logps, weights, masks, _ = _case(1)
    ones = [np.ones_like(w) for w in weights]
    losses, _ = _call(logps, ones, masks, (None, None), lambda_kl=0.0)
    sums = [np.where(masks[i % 2], logps[i], 0).sum(-1) for i in range(4)]
    np.testing.assert_allclose(losses, dpo_loss(*sums)[0], rtol=1e-5)
    with pytest.raises(KeyError, match="chosen/token_kl"):
        _call(logps, ones, masks, (None, None))


def test_gradient_is_weights_times_dpo_gradient():
    logps, weights, masks, _ = _case(2)
    beta = 0.2
    method = {"name": "catpo", "beta": beta, "terms": {"dpo": 1.0}}
    grads = jax.grad(
        lambda pw, pl: jnp.sum(registry.compute_objective(
            method, pair_scores([pw, pl, *logps[2:]], masks, weights))[0]),
        argnums=(0, 1),
    )(jnp.asarray(logps[0]), jnp.asarray(logps[1]))
    sums = [np.sum(np.where(masks[i % 2], weights[i % 2] * logps[i], 0), -1) for i in range(4)]
    d_chosen, d_rejected = jax.grad(lambda a, b: jnp.sum(dpo_loss(a, b, sums[2], sums[3], beta=beta)[0]), argnums=(0, 1))(
        jnp.asarray(sums[0]), jnp.asarray(sums[1])
    )
    np.testing.assert_allclose(grads[0], weights[0] * masks[0] * np.asarray(d_chosen)[:, None], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(grads[1], weights[1] * masks[1] * np.asarray(d_rejected)[:, None], rtol=1e-5, atol=1e-8)


def test_padding_with_garbage_changes_nothing_and_grads_stay_finite():
    logps, weights, masks, kls = _case(3)
    base, _ = _call(logps, weights, masks, kls)

    def pad(a, value):
        return np.concatenate([a, np.full((a.shape[0], 4), value, a.dtype)], axis=1)

    padded_logps = [pad(a, -np.inf) for a in logps]
    padded_weights = [pad(w, np.nan) for w in weights]
    padded_masks = [pad(m, False) for m in masks]
    padded_kls = [pad(k, np.inf) for k in kls]
    losses, _ = _call(padded_logps, padded_weights, padded_masks, padded_kls)
    np.testing.assert_allclose(losses, base, rtol=1e-6)
    grads = jax.grad(lambda *a: jnp.sum(_call(a, padded_weights, padded_masks, padded_kls)[0]), argnums=(0, 1))(
        *[jnp.asarray(a) for a in padded_logps[:2]], *[jnp.asarray(a) for a in padded_logps[2:]]
    )
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


def test_all_masked_and_one_token_rows_are_finite():
    logps, weights, masks, kls = _case(4)
    masks[0][0] = False
    masks[1][0] = False
    masks[0][1] = False
    masks[0][1, 4] = True  # one-token response
    losses, _ = _call(logps, weights, masks, kls)
    assert np.all(np.isfinite(np.asarray(losses)))
    np.testing.assert_allclose(losses[0], math.log(2.0), rtol=1e-6)  # empty pair: h^w = 0, no KL


def test_extreme_gaps_are_finite():
    logps, weights, masks, kls = _case(5)
    logps[0][:, 0] = -1e4
    logps[2][:, 0] = 0.0
    value, grad = jax.value_and_grad(lambda x: jnp.sum(_call([x, *logps[1:]], weights, masks, kls)[0]))(
        jnp.asarray(logps[0])
    )
    assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad)))


def test_jit_equals_eager():
    logps, weights, masks, kls = _case(6)
    eager, _ = _call(logps, weights, masks, kls)
    jitted, _ = jax.jit(lambda *a: _call(a[:4], a[4:6], a[6:8], a[8:]))(*logps, *weights, *masks, *kls)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
