import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmpo_jax.objectives import metrics as metric_lib
from mmpo_jax.objectives import registry
from mmpo_jax.objectives.adapt import vag_dpo_loss
from mmpo_jax.objectives.catpo import catpo_loss, weighted_token_kl_loss, weighted_token_sum
from mmpo_jax.objectives.dpo import dpo_loss
from mmpo_jax.objectives.fisao import fisao_ppo_loss
from mmpo_jax.objectives.logprobs import sequence_logps
from mmpo_jax.objectives.mdpo import anchor_loss, copo_loss, mdpo_loss
from mmpo_jax.objectives.p2dpo import p2dpo_loss
from mmpo_jax.objectives.tpo import tpo_weighted_logps

B, T = 4, 7


def fabricate(keys, seed=0):
    """Random arrays for the given scored names, respecting the per-token contracts."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(keys, key=lambda k: not k.endswith("/mask")):  # masks first
        if key.endswith("/mask"):
            mask = np.ones((B, T), bool)
            mask[rng.integers(B), : rng.integers(1, 3)] = False
            mask[rng.integers(B), T - rng.integers(1, 4):] = False
            out[key] = mask
        elif key.endswith("/group_ids"):
            out[key] = np.array([0, 0, 1, 1])
        elif key.startswith("p2dpo/"):
            out[key] = rng.uniform(0.3, 0.7, size=B).astype(np.float32)
        else:
            response = key.split("/")[-2]
            value = {
                "token_logps": lambda: -rng.exponential(1.5, size=(B, T)),
                "token_weights": lambda: rng.uniform(0.5, 1.5, size=(B, T)),
                "token_kl": lambda: rng.exponential(0.2, size=(B, T)),
                "token_rewards": lambda: rng.uniform(-1, 1, size=(B, T)),
            }[key.split("/")[-1]]()
            mask = out.get(f"{response}/mask")
            out[key] = np.where(mask, value, 0.0).astype(np.float32) if mask is not None else value.astype(np.float32)
    return out


class RecordingScores(dict):
    """A dict that remembers which names were read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


CONFIGS = [
    {"name": "dpo"},
    {"name": "dpo", "loss_type": "ipo", "reduction": "mean"},
    {"name": "mdpo", "anchor_delta": 0.2},
    {"name": "catpo"},
    {"name": "catpo", "terms": {"dpo": 1.0, "token_kl": 0.0}},
    {"name": "catpo", "terms": {"dpo": 1.0, "token_kl": 0.03, "copo": 0.5, "anchor": 2.0, "nll": 0.1}},
    {"name": "tpo"},
    {"name": "p2dpo", "token_weights": "tpo", "calib_ref_response": "rejected"},
    {"name": "mdpo", "token_weights": "catpo"},
    {"name": "adapt"},
    {"name": "p2dpo"},
    {"name": "p2dpo", "calib_ref_response": "rejected", "ddw": True},
    {"name": "p2dpo", "lambda_calib": 0.0},
    {"name": "p2dpo", "branches": ("robust",)},
    {"name": "p2dpo", "branches": ["focus"], "calib_ref_response": "rejected"},
    {"name": "fisao"},
    {"name": "sft"},
    {"name": "dpo", "terms": {"dpo": 1.0, "token_kl": 0.1}, "token_weights": "none"},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c))
def test_every_config_reads_exactly_its_required_scores(config):
    required = registry.required_scores(config)
    scored = RecordingScores(fabricate(required))
    losses, metrics = registry.compute_objective(config, scored)
    assert scored.read == set(required)
    assert losses.shape == (B,) and losses.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(losses)))
    np.testing.assert_allclose(metric_lib.finalize(metrics)["loss/total"], jnp.mean(losses), rtol=1e-6)


def _seq(s, model, response, **kw):
    return sequence_logps(s[f"{model}/{response}/token_logps"], s[f"{response}/mask"], **kw)


def test_dpo_and_mdpo_equal_their_direct_functions():
    cfg = {"name": "mdpo", "beta": 0.3, "label_smoothing": 0.1, "anchor_delta": 0.2, "terms": {"dpo": 1.0, "copo": 0.5, "anchor": 2.0}}
    s = fabricate(registry.required_scores(cfg), seed=1)
    got, m = registry.compute_objective(cfg, s)
    seq = {f"{mo}/{r}": _seq(s, mo, r) for mo in ("policy", "ref") for r in ("chosen", "rejected", "chosen_corrupt")}
    expected, expected_m = mdpo_loss(
        seq["policy/chosen"], seq["policy/rejected"], seq["ref/chosen"], seq["ref/rejected"],
        seq["policy/chosen_corrupt"], seq["ref/chosen_corrupt"],
        beta=0.3, label_smoothing=0.1, copo_weight=0.5, anchor_weight=2.0, anchor_delta=0.2,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert set(expected_m) <= set(m)
    dpo_only, _ = registry.compute_objective({"name": "dpo"}, s)
    np.testing.assert_allclose(
        dpo_only, dpo_loss(seq["policy/chosen"], seq["policy/rejected"], seq["ref/chosen"], seq["ref/rejected"])[0], rtol=1e-6
    )


def test_catpo_method_equals_catpo_loss():
    cfg = ml_collections.ConfigDict({"name": "catpo", "beta": 0.2, "terms": {"dpo": 1.0, "token_kl": 0.05}})
    s = fabricate(registry.required_scores(cfg), seed=2)
    got, _ = registry.compute_objective(cfg, s)
    expected, _ = catpo_loss(
        s["policy/chosen/token_logps"], s["policy/rejected/token_logps"], s["ref/chosen/token_logps"],
        s["ref/rejected/token_logps"], s["chosen/token_weights"], s["rejected/token_weights"],
        s["chosen/mask"], s["rejected/mask"], s["chosen/token_kl"], s["rejected/token_kl"],
        beta=0.2, lambda_kl=0.05,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_composition_is_the_weighted_sum_of_separate_terms():
    weights = {"dpo": 1.0, "token_kl": 0.03, "copo": 0.5, "anchor": 2.0, "nll": 0.1}
    cfg = {"name": "catpo", "terms": weights}
    s = fabricate(registry.required_scores(cfg), seed=3)
    got, metrics = registry.compute_objective(cfg, s)

    def wseq(model, response):
        return weighted_token_sum(s[f"{model}/{response}/token_logps"], s[f"{response}/token_weights"], s[f"{response}/mask"])

    parts = {
        "dpo": dpo_loss(wseq("policy", "chosen"), wseq("policy", "rejected"), wseq("ref", "chosen"), wseq("ref", "rejected"))[0],
        "token_kl": weighted_token_kl_loss(
            s["chosen/token_kl"], s["rejected/token_kl"], s["chosen/token_weights"], s["rejected/token_weights"],
            s["chosen/mask"], s["rejected/mask"],
        )[0],
        "copo": copo_loss(wseq("policy", "chosen"), wseq("policy", "chosen_corrupt"), wseq("ref", "chosen"), wseq("ref", "chosen_corrupt"))[0],
        "anchor": anchor_loss(wseq("policy", "chosen"), wseq("ref", "chosen"))[0],
        "nll": -sequence_logps(s["policy/chosen/token_logps"], s["chosen/mask"], reduction="mean"),
    }
    np.testing.assert_allclose(got, sum(w * parts[k] for k, w in weights.items()), rtol=1e-5)
    finalized = metric_lib.finalize(metrics)
    for term, part in parts.items():
        np.testing.assert_allclose(finalized[f"loss/{term}"], jnp.mean(part), rtol=1e-5)


def test_tpo_weights_the_policy_only():
    cfg = {"name": "tpo"}
    s = fabricate(registry.required_scores(cfg), seed=4)
    got, _ = registry.compute_objective(cfg, s)
    pol = {r: tpo_weighted_logps(s[f"policy/{r}/token_logps"], s[f"{r}/token_weights"], s[f"{r}/mask"]) for r in ("chosen", "rejected")}
    np.testing.assert_allclose(got, dpo_loss(pol["chosen"], pol["rejected"], _seq(s, "ref", "chosen"), _seq(s, "ref", "rejected"))[0], rtol=1e-6)


def test_adapt_p2dpo_and_fisao_equal_their_functions():
    s = fabricate(registry.required_scores({"name": "adapt"}), seed=5)
    np.testing.assert_allclose(
        registry.compute_objective({"name": "adapt", "beta": 0.2}, s)[0],
        vag_dpo_loss(*(_seq(s, m, r) for m, r in [("policy", "chosen_ve"), ("policy", "rejected_noise"), ("ref", "chosen_ve"), ("ref", "rejected_noise")]), beta=0.2)[0],
        rtol=1e-6,
    )
    cfg = {"name": "p2dpo", "calib_ref_response": "rejected", "ddw": True, "lambda_calib": 0.4}
    s = fabricate(registry.required_scores(cfg), seed=6)
    pairs = [(m, f"{kind}_{r}") for kind in ("focus", "robust") for r in ("chosen", "rejected") for m in ("policy", "ref")]
    main = {f"{m}/{r}": _seq(s, m, r) for m, r in pairs}
    expected = p2dpo_loss(
        main["policy/focus_chosen"], main["policy/focus_rejected"], main["ref/focus_chosen"], main["ref/focus_rejected"],
        main["policy/robust_chosen"], main["policy/robust_rejected"], main["ref/robust_chosen"], main["ref/robust_rejected"],
        policy_calib_chosen_aug_logps=_seq(s, "policy", "calib_chosen_aug"),
        policy_calib_chosen_deg_logps=_seq(s, "policy", "calib_chosen_deg"),
        ref_calib_rejected_aug_logps=_seq(s, "ref", "calib_rejected_aug"),
        ref_calib_rejected_deg_logps=_seq(s, "ref", "calib_rejected_deg"),
        focus_weights=s["p2dpo/focus_weights"], robust_weights=s["p2dpo/robust_weights"],
        lambda_calib=0.4, calib_ref_response="rejected",
    )[0]
    np.testing.assert_allclose(registry.compute_objective(cfg, s)[0], expected, rtol=1e-6)
    cfg = {"name": "fisao", "clip_eps": 0.1, "beta_kl": 0.02}
    s = fabricate(registry.required_scores(cfg), seed=7)
    expected = fisao_ppo_loss(
        s["policy/sample/token_logps"], s["old/sample/token_logps"], s["ref/sample/token_logps"],
        s["sample/token_rewards"], s["sample/mask"], s["sample/group_ids"], clip_eps=0.1, beta_kl=0.02,
    )[0]
    np.testing.assert_allclose(registry.compute_objective(cfg, s)[0], expected, rtol=1e-6)


def test_zero_weight_terms_need_no_inputs():
    assert "chosen/token_kl" not in registry.required_scores({"name": "catpo", "terms": {"dpo": 1.0, "token_kl": 0.0}})
    assert "chosen/token_kl" in registry.required_scores({"name": "catpo"})


def test_jit_equals_eager():
    cfg = {"name": "catpo", "terms": {"dpo": 1.0, "token_kl": 0.03, "copo": 1.0}}
    s = {k: jnp.asarray(v) for k, v in fabricate(registry.required_scores(cfg), seed=8).items()}
    eager, _ = registry.compute_objective(cfg, s)
    jitted, _ = jax.jit(lambda scored: registry.compute_objective(cfg, scored))(s)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_errors_name_the_offending_value():
    with pytest.raises(ValueError, match="'ppo'"):
        registry.compute_objective({"name": "ppo"}, {})
    with pytest.raises(ValueError, match="kl_token"):
        registry.required_scores({"name": "dpo", "terms": {"kl_token": 1.0}})
    with pytest.raises(ValueError, match="'attention'"):
        registry.required_scores({"name": "dpo", "token_weights": "attention"})
    with pytest.raises(ValueError, match="no term with a non-zero weight"):
        registry.required_scores({"name": "dpo", "terms": {"dpo": 0.0}})
    s = fabricate(registry.required_scores({"name": "dpo"}))
    with pytest.raises(KeyError, match="chosen_corrupt"):
        registry.compute_objective({"name": "mdpo"}, s)
