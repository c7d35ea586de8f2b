import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpo_jax.objectives import metrics as metric_lib
from mmpo_jax.objectives.dpo import dpo_loss, preference_loss, reward_metrics


def numpy_dpo(pw, pl, rw, rl, beta, eps, loss_type):
    """METHODS.md §1 transcribed with loops: z = beta*(h_w - h_l)."""
    out = []
    for i in range(len(pw)):
        h_w = pw[i] - rw[i]
        h_l = pl[i] - rl[i]
        z = beta * (h_w - h_l)
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z))))
        elif loss_type == "ipo":
            out.append((z / beta - 1 / (2 * beta)) ** 2)
        else:
            out.append(max(0.0, 1 - z))
    return np.array(out)


def _random_logps(seed, batch=6):
    rng = np.random.default_rng(seed)
    return [rng.normal(-20.0, 8.0, size=batch).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize(
    "loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_dpo_matches_numpy_transcription(loss_type, eps):
    pw, pl, rw, rl = _random_logps(0)
    losses, _ = dpo_loss(pw, pl, rw, rl, beta=0.3, label_smoothing=eps, loss_type=loss_type)
    expected = numpy_dpo(pw, pl, rw, rl, 0.3, eps, loss_type)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)


def test_dpo_is_log2_when_policy_equals_reference():
    pw, pl, _, _ = _random_logps(1)
    losses, m = dpo_loss(pw, pl, pw, pl)
    np.testing.assert_allclose(losses, np.full(6, math.log(2.0)), rtol=1e-6)
    assert float(metric_lib.finalize(m)["rewards/accuracy"]) == 0.0


def test_hand_cases():
    # h_w = 2 - 1 = 1, h_l = -1 - 0 = -1, margin 2; beta 0.5 => z = 1.
    args = (jnp.array([2.0]), jnp.array([-1.0]), jnp.array([1.0]), jnp.array([0.0]))
    sig, m = dpo_loss(*args, beta=0.5)
    np.testing.assert_allclose(sig, [math.log(1 + math.exp(-1.0))], rtol=1e-6)
    smooth, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    np.testing.assert_allclose(
        smooth, [0.9 * math.log(1 + math.exp(-1.0)) + 0.1 * math.log(1 + math.exp(1.0))], rtol=1e-6
    )
    ipo, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")
    np.testing.assert_allclose(ipo, [(2.0 - 1.0) ** 2], rtol=1e-6)  # (margin - 1/(2 beta))^2
    hinge, _ = dpo_loss(*args, beta=0.5, loss_type="hinge")
    np.testing.assert_allclose(hinge, [0.0], atol=1e-7)
    hinge_small, _ = dpo_loss(*args, beta=0.25, loss_type="hinge")
    np.testing.assert_allclose(hinge_small, [0.5], rtol=1e-6)
    f = metric_lib.finalize(m)
    np.testing.assert_allclose(f["rewards/chosen"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(f["rewards/rejected"], -0.5, rtol=1e-6)
    np.testing.assert_allclose(f["rewards/margins"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(f["rewards/accuracy"], 1.0)
    np.testing.assert_allclose(f["loss/dpo"], sig[0], rtol=1e-6)


def test_preference_loss_is_what_dpo_uses():
    pw, pl, rw, rl = _random_logps(2)
    z = 0.1 * ((pw - rw) - (pl - rl))
    np.testing.assert_allclose(preference_loss(z, beta=0.1), dpo_loss(pw, pl, rw, rl)[0], rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(gap=st.floats(-1e4, 1e4), beta=st.sampled_from([0.01, 0.1, 1.0]))
def test_extreme_gaps_are_finite_with_finite_gradients(gap, beta):
    def total(pw):
        return jnp.sum(dpo_loss(pw, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=beta)[0])

    value, grad = jax.value_and_grad(total)(jnp.array([gap], jnp.float32))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert value >= 0.0


def test_reference_gets_no_gradient_and_policy_gradient_matches_formula():
    pw, pl, rw, rl = (jnp.asarray(a) for a in _random_logps(3))
    beta = 0.2
    grads = jax.grad(lambda *a: jnp.sum(dpo_loss(*a, beta=beta)[0]), argnums=(0, 1, 2, 3))(
        pw, pl, rw, rl
    )
    z = beta * ((pw - rw) - (pl - rl))
    np.testing.assert_allclose(grads[0], -beta * jax.nn.sigmoid(-z), rtol=1e-5)
    np.testing.assert_allclose(grads[1], beta * jax.nn.sigmoid(-z), rtol=1e-5)
    assert np.all(grads[2] == 0) and np.all(grads[3] == 0)


def test_jit_equals_eager():
    args = [jnp.asarray(a) for a in _random_logps(4)]
    eager = dpo_loss(*args, label_smoothing=0.1)
    jitted = jax.jit(lambda *a: dpo_loss(*a, label_smoothing=0.1))(*args)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
    for key in eager[1]:
        np.testing.assert_allclose(jitted[1][key][0], eager[1][key][0], rtol=1e-6)


def test_reward_metrics_respects_example_mask():
    m = reward_metrics(
        jnp.array([1.0, 5.0, -1.0]), jnp.array([0.0, 9.0, 0.0]), example_mask=jnp.array([1, 0, 1])
    )
    f = metric_lib.finalize(m)
    np.testing.assert_allclose(f["rewards/chosen"], 0.0)
    np.testing.assert_allclose(f["rewards/accuracy"], 0.5)


def test_bad_options_name_the_value():
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="'logistic'"):
        preference_loss(z, loss_type="logistic")
    with pytest.raises(ValueError, match="label_smoothing=0.1"):
        preference_loss(z, loss_type="ipo", label_smoothing=0.1)
