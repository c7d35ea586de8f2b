import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmpo_jax.data.fields import CORRUPTED
from mmpo_jax.objectives import metrics as metric_lib
from mmpo_jax.objectives import registry, terms
from mmpo_jax.objectives.adapt import CHOSEN_VE, REJECTED_NOISE, vag_dpo_loss
from mmpo_jax.objectives.catpo import weighted_token_kl_loss, weighted_token_sum
from mmpo_jax.objectives.dpo import dpo_loss
from mmpo_jax.objectives.fisao import PPO_READS, fisao_ppo_loss
from mmpo_jax.objectives.logprobs import sequence_logps
from mmpo_jax.objectives.mdpo import CHOSEN_CORRUPT, anchor_loss, copo_loss
from mmpo_jax.objectives.p2dpo import CALIB, PAIRS, ddw_weights, p2dpo_loss
from mmpo_jax.objectives.terms import CHOSEN, POLICY, REFERENCE, REJECTED

B, T = 4, 7


def fabricate(scores, seed=0):
    """Random arrays for the given ``Score`` s, respecting the per-token contracts."""
    rng = np.random.default_rng(seed)
    masks = {}
    for score in scores:
        if score.kind == terms.MASK:
            mask = np.ones((B, T), bool)
            mask[rng.integers(B), : rng.integers(1, 3)] = False
            mask[rng.integers(B), T - rng.integers(1, 4):] = False
            masks[score.response] = mask
    out = {terms.mask(r): m for r, m in masks.items()}
    for score in scores:
        if score.kind == terms.MASK:
            continue
        if score.kind == terms.EXAMPLE_VALUE:
            out[score] = (np.array([0, 0, 1, 1]) if score.name == "group_ids"
                          else rng.uniform(0.3, 0.7, size=B).astype(np.float32))
            continue
        value = {
            terms.TOKEN_LOGPS: lambda: -rng.exponential(1.5, size=(B, T)),
            terms.TOKEN_WEIGHTS: lambda: rng.uniform(0.5, 1.5, size=(B, T)),
            terms.TOKEN_KL: lambda: rng.exponential(0.2, size=(B, T)),
            terms.TOKEN_VALUE: lambda: rng.uniform(-1, 1, size=(B, T)),
        }[score.kind]()
        mask = masks.get(score.response)
        out[score] = (np.where(mask, value, 0.0) if mask is not None else value).astype(np.float32)
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
    assert len({score.key for score in required}) == len(required)  # keys name scores uniquely
    assert losses.shape == (B,) and losses.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(losses)))
    np.testing.assert_allclose(metric_lib.finalize(metrics)["loss/total"], jnp.mean(losses), rtol=1e-6)


def _seq(s, model, response, **kw):
    return sequence_logps(s[terms.token_logps(model, response)], s[terms.mask(response)], **kw)


def _wseq(s, model, response):
    return weighted_token_sum(s[terms.token_logps(model, response)],
                              s[terms.token_weights(response)], s[terms.mask(response)])


def test_mdpo_equals_its_terms():
    cfg = {"name": "mdpo", "beta": 0.3, "label_smoothing": 0.1, "anchor_delta": 0.2,
           "terms": {"dpo": 1.0, "copo": 0.5, "anchor": 2.0}}
    s = fabricate(registry.required_scores(cfg), seed=1)
    got, m = registry.compute_objective(cfg, s)
    seq = {(mo, r): _seq(s, mo, r) for mo in (POLICY, REFERENCE)
           for r in (CHOSEN, REJECTED, CHOSEN_CORRUPT)}
    parts = [
        (1.0, dpo_loss(seq[POLICY, CHOSEN], seq[POLICY, REJECTED], seq[REFERENCE, CHOSEN],
                       seq[REFERENCE, REJECTED], beta=0.3, label_smoothing=0.1)),
        (0.5, copo_loss(seq[POLICY, CHOSEN], seq[POLICY, CHOSEN_CORRUPT], seq[REFERENCE, CHOSEN],
                        seq[REFERENCE, CHOSEN_CORRUPT], beta=0.3)),
        (2.0, anchor_loss(seq[POLICY, CHOSEN], seq[REFERENCE, CHOSEN], beta=0.3, delta=0.2)),
    ]
    np.testing.assert_allclose(got, sum(w * part[0] for w, part in parts), rtol=1e-6)
    for _, (_, part_metrics) in parts:
        assert set(part_metrics) <= set(m)


def test_composition_is_the_weighted_sum_of_separate_terms():
    weights = {"dpo": 1.0, "token_kl": 0.03, "copo": 0.5, "anchor": 2.0, "nll": 0.1}
    cfg = {"name": "catpo", "terms": weights}
    s = fabricate(registry.required_scores(cfg), seed=3)
    got, metrics = registry.compute_objective(cfg, s)
    parts = {
        "dpo": dpo_loss(_wseq(s, POLICY, CHOSEN), _wseq(s, POLICY, REJECTED),
                        _wseq(s, REFERENCE, CHOSEN), _wseq(s, REFERENCE, REJECTED))[0],
        "token_kl": weighted_token_kl_loss(
            *(s[terms.token_kl(r)] for r in (CHOSEN, REJECTED)),
            *(s[terms.token_weights(r)] for r in (CHOSEN, REJECTED)),
            *(s[terms.mask(r)] for r in (CHOSEN, REJECTED)))[0],
        "copo": copo_loss(_wseq(s, POLICY, CHOSEN), _wseq(s, POLICY, CHOSEN_CORRUPT),
                          _wseq(s, REFERENCE, CHOSEN), _wseq(s, REFERENCE, CHOSEN_CORRUPT))[0],
        "anchor": anchor_loss(_wseq(s, POLICY, CHOSEN), _wseq(s, REFERENCE, CHOSEN))[0],
        "nll": -_seq(s, POLICY, CHOSEN, reduction="mean"),
    }
    np.testing.assert_allclose(got, sum(w * parts[k] for k, w in weights.items()), rtol=1e-5)
    finalized = metric_lib.finalize(metrics)
    for term, part in parts.items():
        np.testing.assert_allclose(finalized[f"loss/{term}"], jnp.mean(part), rtol=1e-5)


def test_tpo_weights_policy_and_reference_alike():
    cfg = {"name": "tpo"}
    s = fabricate(registry.required_scores(cfg), seed=4)
    got, _ = registry.compute_objective(cfg, s)
    expected = dpo_loss(_wseq(s, POLICY, CHOSEN), _wseq(s, POLICY, REJECTED),
                        _wseq(s, REFERENCE, CHOSEN), _wseq(s, REFERENCE, REJECTED))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_adapt_p2dpo_and_fisao_equal_their_functions():
    s = fabricate(registry.required_scores({"name": "adapt"}), seed=5)
    np.testing.assert_allclose(
        registry.compute_objective({"name": "adapt", "beta": 0.2}, s)[0],
        vag_dpo_loss(_seq(s, POLICY, CHOSEN_VE), _seq(s, POLICY, REJECTED_NOISE),
                     _seq(s, REFERENCE, CHOSEN_VE), _seq(s, REFERENCE, REJECTED_NOISE),
                     beta=0.2)[0],
        rtol=1e-6)
    cfg = {"name": "p2dpo", "calib_ref_response": "rejected", "ddw": True, "lambda_calib": 0.4}
    s = fabricate(registry.required_scores(cfg), seed=6)
    main = [_seq(s, model, r) for branch in ("focus", "robust") for model in (POLICY, REFERENCE)
            for r in PAIRS[branch]]
    focus_weights, robust_weights = ddw_weights(s[terms.example_value("ddw_clip_crop")],
                                                s[terms.example_value("ddw_clip_full")])
    expected = p2dpo_loss(
        *main,
        policy_calib_chosen_aug_logps=_seq(s, POLICY, CALIB["chosen", "augmented"]),
        policy_calib_chosen_deg_logps=_seq(s, POLICY, CALIB["chosen", "degraded"]),
        ref_calib_rejected_aug_logps=_seq(s, REFERENCE, CALIB["rejected", "augmented"]),
        ref_calib_rejected_deg_logps=_seq(s, REFERENCE, CALIB["rejected", "degraded"]),
        focus_weights=focus_weights, robust_weights=robust_weights,
        lambda_calib=0.4, calib_ref_response="rejected",
    )[0]
    np.testing.assert_allclose(registry.compute_objective(cfg, s)[0], expected, rtol=1e-6)
    cfg = {"name": "fisao", "clip_eps": 0.1, "beta_kl": 0.02}
    s = fabricate(registry.required_scores(cfg), seed=7)
    expected = fisao_ppo_loss(*(s[score] for score in PPO_READS), clip_eps=0.1, beta_kl=0.02)[0]
    np.testing.assert_allclose(registry.compute_objective(cfg, s)[0], expected, rtol=1e-6)


def test_zero_weight_terms_need_no_inputs():
    no_kl = registry.required_scores({"name": "catpo", "terms": {"dpo": 1.0, "token_kl": 0.0}})
    assert terms.token_kl(CHOSEN) not in no_kl
    assert terms.token_kl(CHOSEN) in registry.required_scores({"name": "catpo"})


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


def test_every_builtin_module_is_discovered():
    assert set(registry.methods()) == {"dpo", "mdpo", "catpo", "tpo", "adapt", "p2dpo", "fisao",
                                       "sft"}
    assert set(registry.terms()) == {"dpo", "copo", "anchor", "token_kl", "nll", "adapt_vag",
                                     "p2dpo", "fisao_ppo"}
    assert set(registry.weightings()) == {"catpo", "tpo"}
    # one declaration per option name, shared by every term that reads it
    assert registry.option_declarations()["beta"] is registry.terms()["dpo"].options["beta"]


def _toy_loss(inputs):
    h = inputs.sequence(POLICY, TOY) - inputs.sequence(REFERENCE, TOY)
    losses = jnp.square(h - inputs.options["toy_target"])
    return losses, {"loss/toy": metric_lib.mean_metric(losses)}


TOY = terms.Response("toy_chosen_corrupt", tokens="chosen", image=CORRUPTED)
TOY_TERM = terms.Term("toy", _toy_loss, {"toy_target": terms.Option(1.0)}, terms.pairs(TOY))


def test_registered_declarations_are_used_and_removed():
    with registry.registered(TOY_TERM, terms.Method("toy", {"toy": 1.0, "dpo": 0.5})):
        cfg = {"name": "toy", "toy_target": 0.5}
        required = registry.required_scores(cfg)
        assert terms.token_logps(POLICY, TOY) in required
        s = fabricate(required, seed=9)
        got, metrics = registry.compute_objective(cfg, s)
        h = _seq(s, POLICY, TOY) - _seq(s, REFERENCE, TOY)
        dpo = dpo_loss(_seq(s, POLICY, CHOSEN), _seq(s, POLICY, REJECTED),
                       _seq(s, REFERENCE, CHOSEN), _seq(s, REFERENCE, REJECTED))[0]
        np.testing.assert_allclose(got, jnp.square(h - 0.5) + 0.5 * dpo, rtol=1e-6)
        assert "loss/toy" in metrics
        with pytest.raises(ValueError, match="already registered"):
            registry.register(TOY_TERM)
    assert "toy" not in registry.terms() and "toy" not in registry.methods()


def test_an_option_is_declared_once():
    clash = terms.Term("clash", _toy_loss, {"beta": terms.Option(0.5)})
    with pytest.raises(ValueError, match="'beta'"):
        registry.register(clash)
    assert "clash" not in registry.terms()
