"""The scoring plan and ``score_batch`` against direct forwards of each response on its image.

Every score a method reads is recomputed here the plain way: the model called with
``pixel_values`` (not the engine's shared visual tokens) on exactly the token group and the image
the response declares, log-softmax over the whole vocabulary, the label gathered. Policy and
reference differ (the policy's parameters are perturbed), so a score taken from the wrong model,
the wrong tokens or the wrong image cannot pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmpo_jax.data import example_randomness, pipeline
from mmpo_jax.data.batch import shift_for_next_token
from mmpo_jax.data.fields import ENHANCED, IMAGE_KINDS, TOKEN_GROUPS
from mmpo_jax.engine import scoring
from mmpo_jax.engine.state import copy_model
from mmpo_jax.models.attention import ProbeSpec
from mmpo_jax.objectives import logprobs
from mmpo_jax.objectives import metrics as metric_lib
from mmpo_jax.objectives import registry, terms
from mmpo_jax.objectives.p2dpo import PAIRS, ddw_weights
from mmpo_jax.objectives.terms import CHOSEN, POLICY, REFERENCE, REJECTED
from mmpo_jax.objectives.tpo import tpo_token_weights
from mmpo_jax.rewards import catpo as catpo_rewards
from tests.engine import step_fixtures as fx

B = 4
SPEC = {
    "chosen": ("chosen", "original"), "rejected": ("rejected", "original"),
    "chosen_corrupt": ("chosen", "corrupted"),  # mDPO's CoPO: y_w on I'
    "chosen_ve": ("chosen", "enhanced"), "rejected_noise": ("rejected", "noised"),  # ADAPT
    "focus_chosen": ("chosen", "original"), "focus_rejected": ("rejected", "original"),
    "robust_chosen": ("robust_chosen", "pair_noised"),
    "robust_rejected": ("robust_rejected", "pair_noised"),
    "calib_chosen_aug": ("chosen", "augmented"), "calib_chosen_deg": ("chosen", "degraded"),
    "calib_rejected_aug": ("rejected", "augmented"), "calib_rejected_deg": ("rejected", "degraded"),
}
"""Response -> (token group, image) as METHODS.md defines it, written out independently of the
objectives' declarations."""
METHODS = [
    {"name": "dpo"},
    {"name": "mdpo"},
    {"name": "catpo"},
    {"name": "tpo"},
    {"name": "adapt"},
    {"name": "p2dpo", "ddw": True},
    {"name": "p2dpo", "calib_ref_response": "rejected"},
    {"name": "catpo", "terms": {"dpo": 1.0, "token_kl": 0.03, "copo": 1.0, "anchor": 1.0}},
]


@functools.lru_cache(maxsize=None)
def _batch():
    """One batch with every token group and image: P2-DPO-style records built from the shapes
    world (the robustness pair's texts taken from other records, so every group differs)."""
    base = fx.records(8)
    rng = np.random.default_rng(0)
    records = []
    for i, record in enumerate(base[:B]):
        other = base[(i + 3) % len(base)]
        records.append({
            **record,
            "robust_chosen": other["chosen"], "robust_rejected": other["rejected"],
            "noise_key": example_randomness.noise_key(7, i, 600),
            "focus_aug_image": np.ascontiguousarray(record["image"][:, ::-1]),
            "focus_deg_image": np.ascontiguousarray(record["image"][::-1]),
            # crop scores far from the full image's: DDW weights far from 0.5 / 0.5
            "ddw_clip_crop": float(rng.uniform(0.1, 0.5)), "ddw_clip_full": 0.3,
        })
    iterator = pipeline.preference_pipeline(
        records, tokenizer=fx.tokenizer(), image_config=fx.IMAGE_CONFIG, num_image_tokens=16,
        batch_size=B, buckets=(64, 96), seed=0, shuffle=False,
        extras=("corrupt_pixel_values", "noise_pixel_values", "focus_images", "robust_pair",
                "ddw_clip"))
    return jax.tree.map(jnp.asarray, next(iterator))


@functools.lru_cache(maxsize=None)
def _models():
    """``(policy, reference)``: the reference is the base model, the policy a copy whose projector
    and decoder are perturbed (its vision tower stays the reference's: frozen, as in training)."""
    reference = fx.base_model()
    policy = copy_model(reference)
    params = nnx.state(policy, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision_tower"))))
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    nnx.update(policy, jax.tree.map(
        lambda x: x + 0.05 * jnp.std(x) * jax.random.normal(next(keys), x.shape, x.dtype), params))
    return policy, reference


def _image(batch, reference, kind, plan):
    if kind != ENHANCED:
        return getattr(batch, IMAGE_KINDS[kind].field)
    visual = {"original": reference.encode_images(batch.pixel_values)}
    threshold = plan.options["mask_threshold_percentile"] or None
    return scoring.enhanced_images(reference, batch, visual, fx.IMAGE_CONFIG,
                                   anchor_steps=plan.options["anchor_steps"],
                                   threshold_percentile=threshold)


def _direct(model, batch, response, image, probe=None):
    """``(token log-probs [B, T], label logits [B, T], log-softmax [B, T, V], labels, mask, out)``
    of ``response``'s tokens read on ``image`` by a plain forward."""
    input_ids = getattr(batch, f"{response.tokens}_input_ids")
    loss_mask = getattr(batch, f"{response.tokens}_loss_mask")
    attention_mask = getattr(batch, f"{response.tokens}_attention_mask")
    inputs, labels, mask = shift_for_next_token(input_ids, loss_mask)
    out = model(inputs, pixel_values=image, attention_mask=attention_mask, probe=probe)
    log_probs = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    label_logits = jnp.take_along_axis(out.logits, labels[..., None], axis=-1)[..., 0]
    valid = mask > 0
    return (jnp.where(valid, picked, 0.0), jnp.where(valid, label_logits, 0.0), log_probs, labels,
            mask, out)


def _scored(method):
    plan = scoring.plan_scoring(method)
    policy, reference = _models()
    batch = _batch()
    scored = scoring.score_batch(plan, policy, reference, batch, image_config=fx.IMAGE_CONFIG,
                                 eos_token_id=fx.tokenizer().eos_token_id)
    return plan, batch, scored


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_every_response_is_read_on_its_tokens_and_image(method):
    plan, batch, scored = _scored(method)
    policy, reference = _models()
    required = registry.required_scores(method)
    assert set(required) <= set(scored)
    models = {POLICY: policy, REFERENCE: reference}
    for score in required:
        if score.kind == terms.TOKEN_LOGPS:
            tokens, image = SPEC[score.response.name]
            response = terms.Response(score.response.name, tokens, image)
            expected = _direct(models[score.model], batch, response,
                               _image(batch, reference, image, plan))[0]
            np.testing.assert_allclose(scored[score], expected, rtol=1e-5, atol=1e-5,
                                       err_msg=score.key)
        elif score.kind == terms.MASK:
            tokens = SPEC[score.response.name][0]
            expected = shift_for_next_token(getattr(batch, f"{tokens}_input_ids"),
                                            getattr(batch, f"{tokens}_loss_mask"))[2]
            np.testing.assert_array_equal(scored[score], expected, err_msg=score.key)
        elif score.kind == terms.EXAMPLE_VALUE:
            np.testing.assert_array_equal(scored[score], getattr(batch, score.name))
    # the batch's groups differ, so reading the wrong one would show
    for a, b in ((CHOSEN, REJECTED), (CHOSEN, PAIRS["robust"][0])):
        assert not np.array_equal(getattr(batch, f"{a.tokens}_input_ids"),
                                  getattr(batch, f"{b.tokens}_input_ids"))


def test_token_kl_is_kl_of_the_policy_from_the_reference():
    """METHODS.md §3: KL(pi_theta(.|h_t) || pi_ref(.|h_t)) at each response position."""
    method = {"name": "catpo"}
    _, batch, scored = _scored(method)
    policy, reference = _models()
    for response in (CHOSEN, REJECTED):
        _, _, policy_lp, _, mask, _ = _direct(policy, batch, response, batch.pixel_values)
        _, _, ref_lp, _, _, _ = _direct(reference, batch, response, batch.pixel_values)
        forward = jnp.sum(jnp.exp(policy_lp) * (policy_lp - ref_lp), axis=-1) * mask
        backward = jnp.sum(jnp.exp(ref_lp) * (ref_lp - policy_lp), axis=-1) * mask
        got = scored[terms.token_kl(response)]
        np.testing.assert_allclose(got, forward, rtol=1e-4, atol=1e-6)
        valid = np.asarray(mask) > 0
        gap = np.abs(np.asarray(forward - backward))[valid]
        assert gap.max() > 100 * (np.abs(np.asarray(got - forward))[valid].max() + 1e-9)


def test_tpo_weights_come_from_the_clean_and_the_noised_reads():
    _, batch, scored = _scored({"name": "tpo"})
    _, reference = _models()
    for response in (CHOSEN, REJECTED):
        _, clean, _, _, mask, _ = _direct(reference, batch, response, batch.pixel_values)
        _, noisy, _, _, _, _ = _direct(reference, batch, response, batch.noise_pixel_values)
        expected = tpo_token_weights(clean, noisy, mask,
                                     chosen=TOKEN_GROUPS[response.tokens].preferred)
        np.testing.assert_allclose(scored[terms.token_weights(response)], expected, rtol=1e-5,
                                   atol=1e-6)


def test_catpo_weights_come_from_the_reference_band_and_eos_has_weight_one():
    plan, batch, scored = _scored({"name": "catpo"})
    _, reference = _models()
    band = catpo_rewards.layer_band(reference.config.text_config.num_hidden_layers,
                                    tuple(plan.options["layer_band"]))
    eos_id = fx.tokenizer().eos_token_id
    visual = reference.encode_images(batch.pixel_values)
    for response in (CHOSEN, REJECTED):
        *_, labels, mask, out = _direct(reference, batch, response, batch.pixel_values,
                                        ProbeSpec(band, "image"))
        attention = jnp.mean(jnp.stack([out.probes[layer] for layer in band]), axis=0)
        expected = catpo_rewards.token_weights(
            attention, reference.language_model.model.embed_tokens(labels), visual, mask,
            chosen=response is CHOSEN, special_token_mask=labels == eos_id)
        weights = np.asarray(scored[terms.token_weights(response)])
        np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-6)
        valid, eos = np.asarray(mask) > 0, np.asarray(labels) == eos_id
        assert np.all(weights[~valid] == 0)
        np.testing.assert_allclose(weights[valid & eos], 1.0)
        inner = weights[valid & ~eos]
        assert inner.min() >= 0.5 - 1e-6 and inner.max() <= 1.5 + 1e-6 and inner.std() > 0


def test_ddw_weights_reach_their_branches():
    method = {"name": "p2dpo", "ddw": True}
    _, batch, scored = _scored(method)
    losses, metrics = registry.compute_objective(method, scored)
    w_focus, w_robust = ddw_weights(batch.ddw_clip_crop, batch.ddw_clip_full)
    assert np.ptp(np.asarray(w_focus)) > 0.1  # the examples' weights differ
    per_example = {}
    for branch in ("focus", "robust"):
        branch_method = {"name": "p2dpo", "branches": (branch,)}
        per_example[branch] = registry.compute_objective(branch_method, scored)[0]
    np.testing.assert_allclose(losses, w_focus * per_example["focus"]
                               + w_robust * per_example["robust"], rtol=1e-5)
    finalized = metric_lib.finalize(metrics)
    np.testing.assert_allclose(finalized["weights/focus"], np.mean(w_focus), rtol=1e-6)


def test_adapt_enhanced_image_lies_between_the_image_and_white():
    plan = scoring.plan_scoring({"name": "adapt"})
    assert plan.images[-1] == ENHANCED and plan.needs_anchor
    batch = _batch()
    model = fx.base_model()
    enhanced = np.asarray(_image(batch, model, ENHANCED, plan))
    pixels = np.asarray(batch.pixel_values)
    white = 1.0  # (1 - 0.5) / 0.5 with the tiny preprocessing
    low, high = np.minimum(pixels, white), np.maximum(pixels, white)
    assert enhanced.shape == pixels.shape
    assert np.all(enhanced >= low - 1e-5) and np.all(enhanced <= high + 1e-5)
    assert np.any(np.abs(enhanced - pixels) > 1e-3)  # the mask whitens something
    assert np.any(np.abs(enhanced - pixels) < 1e-4)  # and keeps something


def test_cached_reference_outputs_replace_the_reference():
    method = {"name": "catpo", "terms": {"dpo": 1.0}}
    plan, batch, scored = _scored(method)
    policy, reference = _models()
    cached = scoring.reference_scores(plan, reference, batch, image_config=fx.IMAGE_CONFIG,
                                      eos_token_id=fx.tokenizer().eos_token_id)
    assert set(cached) == {s.key for s in plan.reference_outputs}
    from_cache = scoring.score_batch(plan, policy, None, batch, image_config=fx.IMAGE_CONFIG,
                                     eos_token_id=fx.tokenizer().eos_token_id, cached=cached)
    for score in registry.required_scores(method):
        np.testing.assert_allclose(from_cache[score], scored[score], rtol=1e-5, atol=1e-6)


def test_plan_of_every_preference_method():
    mdpo = scoring.plan_scoring({"name": "mdpo"})
    assert mdpo.images == ("corrupted", "original")
    assert mdpo.pipeline_extras == ("corrupt_pixel_values",)
    tpo = scoring.plan_scoring({"name": "tpo"})
    assert [r.name for r in tpo.reference_rows] == ["chosen", "rejected", "chosen@noised",
                                                    "rejected@noised"]
    p2 = scoring.plan_scoring({"name": "p2dpo", "ddw": True})
    assert p2.example_values == ("ddw_clip_crop", "ddw_clip_full")
    assert {"robust_chosen", "calib_chosen_aug"} <= {r.name for r in p2.policy}
    # responses reading the same tokens on the same image share one forward row
    combined = scoring.plan_scoring({"name": "p2dpo", "terms": {"p2dpo": 1.0, "dpo": 1.0}})
    rows = scoring._stack_rows(_batch(), combined.policy_rows)
    assert len(rows.keys) == len(combined.policy_rows) - 2
    with pytest.raises(NotImplementedError, match="rollouts"):
        scoring.plan_scoring({"name": "fisao"})


def test_scoring_at_response_positions_equals_the_full_logits_path():
    """Scoring runs the LM head at the response positions only (``P = T - N_img``, see the
    module doc): its log-probs, token KL and weights equal ``logprobs``' full-logits functions
    over the same forward to 1e-5, on a batch with a padding row and responses of different
    lengths; the lowered scoring holds no ``[., T, V]`` logits."""
    method = {"name": "catpo"}
    plan = scoring.plan_scoring(method)
    batch = jax.tree.map(jnp.asarray, next(fx.batches(plan, batch_size=4, count=3)))
    policy, reference = _models()
    eos = fx.tokenizer().eos_token_id
    assert list(np.asarray(batch.example_mask)) == [1, 1, 1, 0]
    lowered = jax.jit(lambda b: scoring.score_batch(
        plan, policy, reference, b, image_config=fx.IMAGE_CONFIG, eos_token_id=eos)).lower(batch)
    scored = lowered.compile()(batch)
    # only P = T - 16 positions meet the vocabulary
    length, vocab = batch.sequence_length, reference.config.text_config.vocab_size
    text = lowered.as_text()
    assert f"x{length - 16}x{vocab}xf32>" in text and f"x{length}x{vocab}xf32>" not in text
    logits = {}
    for response in (CHOSEN, REJECTED):
        for model_kind, model in ((POLICY, policy), (REFERENCE, reference)):
            input_ids, loss_mask, attention_mask = scoring.batch_tokens(batch, response.tokens)
            inputs, labels, mask = shift_for_next_token(input_ids, loss_mask)
            out = model(inputs, visual_tokens=model.encode_images(batch.pixel_values),
                        attention_mask=attention_mask, positions=scoring._positions(attention_mask))
            logits[model_kind] = out.logits
            np.testing.assert_allclose(
                scored[terms.token_logps(model_kind, response)],
                logprobs.token_logprobs(out.logits, labels, mask), rtol=1e-5, atol=1e-5,
                err_msg=f"{model_kind} {response.name}")
        lengths = np.sum(np.asarray(mask), axis=-1)
        assert len(set(lengths[:3])) > 1 and lengths[3] == 0
        np.testing.assert_allclose(
            scored[terms.token_kl(response)],
            logprobs.token_kl(logits[POLICY], logits[REFERENCE], mask), rtol=1e-4, atol=1e-6)
