import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.objectives import metrics as metric_lib
from mmpo_jax.objectives import registry
from mmpo_jax.objectives.dpo import dpo_loss
from mmpo_jax.objectives.mdpo import CHOSEN_CORRUPT, anchor_loss, copo_loss
from mmpo_jax.objectives.terms import CHOSEN, REJECTED
from tests.objectives.scores import summed_scores


def mdpo_loss(pw, pl, rw, rl, pc, rc, *, beta=0.1, dpo_weight=1.0, copo_weight=1.0,
              anchor_weight=1.0, anchor_delta=0.0, label_smoothing=0.0):
    """The ``mdpo`` method through the registry, on summed log-probs ``[B]``."""
    method = {"name": "mdpo", "beta": beta, "anchor_delta": anchor_delta,
              "label_smoothing": label_smoothing,
              "terms": {"dpo": dpo_weight, "copo": copo_weight, "anchor": anchor_weight}}
    return registry.compute_objective(method, summed_scores(
        chosen=(CHOSEN, pw, rw), rejected=(REJECTED, pl, rl), corrupt=(CHOSEN_CORRUPT, pc, rc)))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def numpy_mdpo(pw, pl, rw, rl, pc, rc, beta, w_dpo, w_copo, w_anc, delta, eps):
    """METHODS.md §2 transcribed term by term."""
    out = []
    for i in range(len(pw)):
        z = beta * ((pw[i] - rw[i]) - (pl[i] - rl[i]))
        l_dpo = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
        l_copo = -log_sigmoid(beta * ((pw[i] - pc[i]) - (rw[i] - rc[i])))
        l_anc = -log_sigmoid(beta * (pw[i] - rw[i]) - delta)
        out.append(w_dpo * l_dpo + w_copo * l_copo + w_anc * l_anc)
    return np.array(out)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(-30.0, 10.0, size=5).astype(np.float32) for _ in range(6)]


@pytest.mark.parametrize(
    "weights,delta,eps", [((1.0, 1.0, 1.0), 0.0, 0.0), ((0.5, 2.0, 0.3), 0.7, 0.1)]
)
def test_mdpo_matches_numpy_transcription(weights, delta, eps):
    args = _inputs(0)
    losses, _ = mdpo_loss(
        *args, beta=0.2, dpo_weight=weights[0], copo_weight=weights[1], anchor_weight=weights[2],
        anchor_delta=delta, label_smoothing=eps,
    )
    np.testing.assert_allclose(losses, numpy_mdpo(*args, 0.2, *weights, delta, eps), rtol=1e-5)


def test_copo_is_log2_when_corruption_changes_nothing():
    pw, _, rw, _, _, _ = _inputs(1)
    losses, m = copo_loss(pw, pw, rw, rw)
    np.testing.assert_allclose(losses, np.full(5, math.log(2.0)), rtol=1e-6)
    np.testing.assert_allclose(metric_lib.finalize(m)["rewards/copo_margins"], 0.0, atol=1e-7)


def test_hand_cases():
    # h(y_w|I) = 3 - 1 = 2, h(y_w|I') = 0 - 2 = -2; beta 0.25: copo z = 1, anchor z = 0.5 - delta.
    copo, _ = copo_loss(jnp.array([3.0]), jnp.array([0.0]), jnp.array([1.0]), jnp.array([2.0]), beta=0.25)
    np.testing.assert_allclose(copo, [math.log1p(math.exp(-1.0))], rtol=1e-6)
    anchor, _ = anchor_loss(jnp.array([3.0]), jnp.array([1.0]), beta=0.25, delta=0.5)
    np.testing.assert_allclose(anchor, [math.log(2.0)], rtol=1e-6)


def test_terms_and_metrics_compose():
    args = [jnp.asarray(a) for a in _inputs(2)]
    pw, pl, rw, rl, pc, rc = args
    total, m = mdpo_loss(*args, copo_weight=0.5, anchor_weight=2.0)
    parts = (dpo_loss(pw, pl, rw, rl)[0], copo_loss(pw, pc, rw, rc)[0], anchor_loss(pw, rw)[0])
    np.testing.assert_allclose(total, parts[0] + 0.5 * parts[1] + 2.0 * parts[2], rtol=1e-6)
    f = metric_lib.finalize(m)
    for key, part in zip(("loss/dpo", "loss/copo", "loss/anchor"), parts):
        np.testing.assert_allclose(f[key], jnp.mean(part), rtol=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"} <= set(m)


def test_gradients_skip_reference_and_stay_finite_at_extreme_gaps():
    args = [jnp.asarray(a) for a in _inputs(3)]
    args[0] = args[0].at[0].set(1e4).at[1].set(-1e4)
    grads = jax.grad(lambda *a: jnp.sum(mdpo_loss(*a)[0]), argnums=tuple(range(6)))(*args)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    for ref_index in (2, 3, 5):
        assert np.all(np.asarray(grads[ref_index]) == 0.0)


def test_jit_equals_eager():
    args = [jnp.asarray(a) for a in _inputs(4)]
    eager, _ = mdpo_loss(*args, anchor_delta=0.3)
    jitted, _ = jax.jit(lambda *a: mdpo_loss(*a, anchor_delta=0.3))(*args)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
