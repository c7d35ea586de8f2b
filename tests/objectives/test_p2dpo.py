"""P2-DPO loss (METHODS.md §5) against a NumPy transcription, plus its option and safety invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.objectives.dpo import dpo_loss
from mmpo_jax.objectives.metrics import finalize
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpo_jax.objectives.p2dpo import ddw_weights, p2dpo_loss

NAMES = [
    "policy_focus_chosen", "policy_focus_rejected", "ref_focus_chosen", "ref_focus_rejected",
    "policy_robust_chosen", "policy_robust_rejected", "ref_robust_chosen", "ref_robust_rejected",
    "policy_calib_chosen_aug", "policy_calib_chosen_deg",
    "ref_calib_chosen_aug", "ref_calib_chosen_deg", "ref_calib_rejected_aug", "ref_calib_rejected_deg",
]  # fmt: skip


def random_inputs(seed, batch=5):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(-25.0, 5.0, size=batch).astype(np.float32) for name in NAMES}


def call(x, **options):
    positional = [x[name] for name in NAMES[:8]]
    keywords = {f"{name}_logps": x[name] for name in NAMES[8:]}
    return p2dpo_loss(*positional, **keywords, **options)


def neg_log_sigmoid(z):
    return math.log1p(math.exp(-z))


def np_p2dpo(x, beta, lam, calib_ref, w_focus, w_rob):
    """METHODS.md §5 'Loss' transcribed per example."""
    y = "chosen" if calib_ref == "chosen" else "rejected"
    out = []
    for i in range(len(x["policy_focus_chosen"])):
        def h(kind, response):
            return x[f"policy_{kind}_{response}"][i] - x[f"ref_{kind}_{response}"][i]

        l_focus_dpo = neg_log_sigmoid(beta * (h("focus", "chosen") - h("focus", "rejected")))
        l_rob = neg_log_sigmoid(beta * (h("robust", "chosen") - h("robust", "rejected")))
        policy_gain = x["policy_calib_chosen_aug"][i] - x["policy_calib_chosen_deg"][i]
        ref_gain = x[f"ref_calib_{y}_aug"][i] - x[f"ref_calib_{y}_deg"][i]
        l_calib = neg_log_sigmoid(beta * (policy_gain - ref_gain))
        out.append(w_focus[i] * (l_focus_dpo + lam * l_calib) + w_rob[i] * l_rob)
    return np.array(out)


@pytest.mark.parametrize("calib_ref", ["chosen", "rejected"])
def test_matches_numpy_transcription(calib_ref):
    x = random_inputs(0)
    w_focus, w_rob = ddw_weights(np.array([0.3, 0.35, 0.25, 0.3, 0.4]), np.full(5, 0.3))
    losses, _ = call(
        x, beta=0.2, lambda_calib=0.3, calib_ref_response=calib_ref,
        focus_weights=w_focus, robust_weights=w_rob,
    )  # fmt: skip
    expected = np_p2dpo(x, 0.2, 0.3, calib_ref, np.asarray(w_focus), np.asarray(w_rob))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_calib_ref_options_differ_exactly_in_the_reference_gain():
    x = random_inputs(1)
    chosen, _ = call(x, calib_ref_response="chosen")
    rejected, _ = call(x, calib_ref_response="rejected")
    # "rejected" reads only the y_l reference pair: swapping it into the y_w slots reproduces it.
    swapped = dict(x)
    swapped["ref_calib_chosen_aug"] = x["ref_calib_rejected_aug"]
    swapped["ref_calib_chosen_deg"] = x["ref_calib_rejected_deg"]
    np.testing.assert_allclose(call(swapped, calib_ref_response="chosen")[0], rejected, rtol=1e-6)
    # ... and never the y_w pair (nor does "chosen" read the y_l pair).
    for option, unused in [("rejected", "ref_calib_chosen"), ("chosen", "ref_calib_rejected")]:
        garbage = dict(x, **{f"{unused}_aug": x["policy_focus_chosen"] * 7, f"{unused}_deg": -x["ref_focus_chosen"]})
        np.testing.assert_array_equal(call(garbage, calib_ref_response=option)[0], call(x, calib_ref_response=option)[0])
    assert not np.allclose(chosen, rejected)


def test_missing_calibration_inputs_are_named_and_lambda_zero_needs_none():
    x = random_inputs(2)
    positional = [x[name] for name in NAMES[:8]]
    with pytest.raises(ValueError, match="ref_calib_rejected_aug_logps"):
        p2dpo_loss(
            *positional,
            policy_calib_chosen_aug_logps=x["policy_calib_chosen_aug"],
            policy_calib_chosen_deg_logps=x["policy_calib_chosen_deg"],
            calib_ref_response="rejected",
        )
    with pytest.raises(ValueError, match="calib_ref_response='both'"):
        call(x, calib_ref_response="both")
    losses, metrics = p2dpo_loss(*positional, lambda_calib=0.0)
    focus, _ = dpo_loss(*positional[:4])
    robust, _ = dpo_loss(*positional[4:])
    np.testing.assert_allclose(losses, 0.5 * focus + 0.5 * robust, rtol=1e-6)
    assert "loss/calib" not in metrics


def test_metrics_report_each_term_and_both_pairs():
    x = random_inputs(3)
    losses, metrics = call(x, beta=0.1)
    final = finalize(metrics)
    focus_chosen = 0.1 * (x["policy_focus_chosen"] - x["ref_focus_chosen"])
    robust_chosen = 0.1 * (x["policy_robust_chosen"] - x["ref_robust_chosen"])
    np.testing.assert_allclose(final["focus/rewards/chosen"], focus_chosen.mean(), rtol=1e-5)
    np.testing.assert_allclose(final["robust/rewards/chosen"], robust_chosen.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        final["rewards/chosen"], np.concatenate([focus_chosen, robust_chosen]).mean(), rtol=1e-5
    )
    np.testing.assert_allclose(final["loss/p2dpo"], np.mean(losses), rtol=1e-6)
    np.testing.assert_allclose(
        final["loss/focus"], final["loss/dpo_focus"] + 0.3 * final["loss/calib"], rtol=1e-5
    )
    assert float(final["weights/focus"]) == 0.5 == float(final["weights/robust"])


def test_gradients_skip_references_and_weights():
    x = {k: jnp.asarray(v) for k, v in random_inputs(4).items()}
    w = jnp.full(5, 0.6)

    def total(x, w):
        return jnp.sum(call(x, focus_weights=w, robust_weights=1 - w)[0])

    grads, w_grad = jax.grad(total, argnums=(0, 1))(x, w)
    for name in NAMES:
        assert np.any(np.asarray(grads[name]) != 0) == name.startswith("policy"), name
    assert np.all(np.asarray(w_grad) == 0)
    assert np.all(np.asarray(grads["policy_calib_chosen_aug"]) < 0)


def test_extreme_gaps_are_finite_and_jit_equals_eager():
    x = random_inputs(5)
    x["policy_focus_chosen"][:2] = [1e4, -1e4]
    x["policy_calib_chosen_deg"][2:4] = [1e4, -1e4]
    x["ref_robust_rejected"][4] = 1e4
    losses, metrics = call(x)
    assert np.all(np.isfinite(losses))
    assert all(np.isfinite(v) for v in finalize(metrics).values())
    jitted = jax.jit(lambda x: call(x, calib_ref_response="rejected")[0])(x)
    np.testing.assert_allclose(jitted, call(x, calib_ref_response="rejected")[0], rtol=1e-6)


def test_single_branch_ablations_train_that_pair_alone_without_the_other_logps():
    x = random_inputs(6)
    full, _ = call(x, beta=0.1)
    focus, _ = call(x, beta=0.1, branches=("focus",))
    robust, _ = call(x, beta=0.1, branches=("robust",))
    np.testing.assert_allclose(0.5 * focus + 0.5 * robust, full, rtol=1e-6)
    np.testing.assert_allclose(
        focus, np_p2dpo(x, 0.1, 0.3, "chosen", np.ones(5), np.zeros(5)), rtol=1e-5)
    # "w/o FEPs": the focus pair and the calibration inputs are never read.
    positional = [None] * 4 + [x[name] for name in NAMES[4:8]]
    alone, metrics = p2dpo_loss(*positional, branches=["robust"])
    np.testing.assert_allclose(alone, dpo_loss(*positional[4:])[0], rtol=1e-6)
    assert not any(k.startswith(("focus/", "loss/calib", "loss/dpo_focus", "weights/focus"))
                   for k in metrics)
    with pytest.raises(ValueError, match=r"needs the log-probs of the \['focus'\] pair"):
        p2dpo_loss(*positional, branches=("focus", "robust"))


@pytest.mark.parametrize("branches, ddw, match", [
    ((), False, "non-empty subset"), (("focus", "vrp"), False, "non-empty subset"),
    (("robust",), True, "ddw=True splits weight"),
])
def test_bad_branch_selections_are_refused(branches, ddw, match):
    x = random_inputs(7)
    weights = dict(focus_weights=np.full(5, 0.5), robust_weights=np.full(5, 0.5)) if ddw else {}
    with pytest.raises(ValueError, match=match):
        call(x, branches=branches, **weights)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0.0, 2.0), min_size=1, max_size=6), st.floats(0.01, 2.0))
def test_ddw_weights_sum_to_one(crop_scores, full_score):
    w_focus, w_rob = ddw_weights(np.array(crop_scores), np.full(len(crop_scores), full_score))
    np.testing.assert_allclose(np.asarray(w_focus) + np.asarray(w_rob), 1.0, rtol=1e-6)
    assert np.all(np.asarray(w_focus) >= 0.3 - 1e-6) and np.all(np.asarray(w_focus) <= 0.7 + 1e-6)


def test_ddw_hand_cases():
    w_focus, w_rob = ddw_weights(jnp.array([0.3, 0.33, 0.27, 0.5]), jnp.array([0.3, 0.3, 0.3, 0.0]))
    a = 0.2 * math.tanh(0.1 / 0.1)
    np.testing.assert_allclose(w_focus, [0.5, 0.5 + a, 0.5 - a, 0.7], rtol=1e-5)
    np.testing.assert_allclose(w_rob, [0.5, 0.5 - a, 0.5 + a, 0.3], rtol=1e-5)
