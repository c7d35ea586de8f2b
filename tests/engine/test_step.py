"""The jitted train step: sharding equality, accumulation, padding, compile counts."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmpo_jax.engine import scoring, sharding
from mmpo_jax.engine import state as state_lib
from mmpo_jax.engine.step import (GRAD_NORM, NONFINITE_GRAD_NORM, NONFINITE_LOSS, SKIPPED,
                                  guarded_update, make_train_step, masked_objective)
from mmpo_jax.objectives import terms
from tests.engine import step_fixtures as fx

CATPO = {"name": "catpo"}
DPO = {"name": "dpo"}


def _first_batch(plan, **kwargs):
    return fx.as_numpy(next(fx.batches(plan, **kwargs)))


def _unsharded_step(plan, method):
    """``(step, policy split, reference state, tx)``: the step of ``method`` without shardings,
    from the base model, reference a frozen copy, SGD."""
    split = state_lib.split_policy(state_lib.copy_model(fx.base_model()), fx.MODEL_CONFIG)
    ref_graphdef, ref_state = nnx.split(state_lib.copy_model(fx.base_model()))
    tx = optax.sgd(1e-3)
    fn = make_train_step(graphdef=split.graphdef, plan=plan, method_config=method, tx=tx,
                         reference_mode="copy", reference_graphdef=ref_graphdef,
                         image_config=fx.IMAGE_CONFIG, eos_token_id=fx.tokenizer().eos_token_id)
    return fn, split, ref_state, tx


def test_eight_device_fsdp_tensor_mesh_matches_one_device():
    plan = scoring.plan_scoring(CATPO)
    batch = _first_batch(plan)
    # Two steps, so the second step's rewards (and accuracy) are away from the tie at 0.
    one, metrics_one = fx.run_step(plan, CATPO, batch, tx=optax.sgd(0.05), steps=2)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    eight, metrics_eight = fx.run_step(plan, CATPO, batch, mesh=mesh, tx=optax.sgd(0.05), steps=2)
    fx.tree_allclose(one, eight, rtol=1e-4, atol=1e-6)
    for key in metrics_one:
        np.testing.assert_allclose(metrics_eight[key], metrics_one[key], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_the_whole_batch():
    plan = scoring.plan_scoring(DPO)
    batch = _first_batch(plan)
    whole, metrics_whole = fx.run_step(plan, DPO, batch, steps=2)
    accumulated, metrics_acc = fx.run_step(plan, DPO, batch, accum_steps=4, steps=2)
    fx.tree_allclose(whole, accumulated, rtol=1e-4, atol=1e-6)
    for key in metrics_whole:
        np.testing.assert_allclose(metrics_acc[key], metrics_whole[key], rtol=1e-4, atol=1e-6)


def test_padding_rows_change_nothing():
    plan = scoring.plan_scoring(DPO)
    batch = _first_batch(plan)
    masked = batch.replace(example_mask=np.concatenate([batch.example_mask[:6], [0, 0]]))
    # The padded rows' content is replaced by other examples: the update must not see it.
    swapped = masked.replace(**{
        name: np.concatenate([value[:6], value[:2]]) for name, value in vars(masked).items()
        if name not in ("example_mask", "example_index") and value is not None})
    first, metrics_first = fx.run_step(plan, DPO, masked)
    second, metrics_second = fx.run_step(plan, DPO, swapped)
    fx.tree_allclose(first, second, rtol=1e-5, atol=1e-7)
    assert metrics_first["examples"] == 6.0
    np.testing.assert_allclose(metrics_first["loss/total"], metrics_second["loss/total"],
                               rtol=1e-6)


def test_policy_equal_to_reference_gives_zero_rewards_and_kl():
    plan = scoring.plan_scoring(CATPO)
    _, metrics = fx.run_step(plan, CATPO, _first_batch(plan))
    assert abs(metrics["rewards/margins"]) < 1e-4
    assert abs(metrics["loss/token_kl"]) < 1e-6
    np.testing.assert_allclose(metrics["loss/dpo"], np.log(2.0), rtol=1e-4)


def test_step_compiles_once_per_length_bucket():
    plan = scoring.plan_scoring(DPO)
    buckets = (30, 32, 34, 36, 38, 40, 96)
    iterator = fx.batches(plan, batch_size=2, buckets=buckets)
    fn, split, ref_state, tx = _unsharded_step(plan, DPO)
    trainable, opt_state = split.trainable, tx.init(split.trainable)
    lengths = []
    for index, batch in enumerate(iterator):
        lengths.append(batch.sequence_length)
        trainable, opt_state, _ = fn(trainable, opt_state, split.frozen, ref_state,
                                     jax.tree.map(jnp.asarray, batch), {}, jax.random.key(index))
    assert len(lengths) == 8 and len(set(lengths)) >= 2, lengths
    assert fn._cache_size() == len(set(lengths))


def test_masked_objective_weights_only_real_examples():
    scored = {terms.token_logps(terms.POLICY, terms.CHOSEN):
              jnp.array([[-1.0, -2.0], [-3.0, 0.0], [-50.0, 0.0]]),
              terms.mask(terms.CHOSEN): jnp.array([[1, 1], [1, 0], [1, 0]])}
    loss_sum, metrics = masked_objective({"name": "sft"}, scored, jnp.array([1, 1, 0]))
    # nll with per-token mean: 1.5 and 3.0; the third row is padding.
    np.testing.assert_allclose(loss_sum, 4.5)
    np.testing.assert_allclose(metrics["loss/nll"][0] / metrics["loss/nll"][1], 2.25)


def test_a_step_with_a_non_finite_loss_or_gradient_norm_changes_nothing():
    tx = optax.adamw(0.1)
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
    opt_state = tx.init(params)
    grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.arange(3.0)}
    update = jax.jit(lambda g, loss: guarded_update(tx, g, opt_state, params, loss))

    applied, applied_state, metrics = update(grads, jnp.float32(0.3))
    updates, expected_state = tx.update(grads, opt_state, params)
    fx.tree_allclose(applied, optax.apply_updates(params, updates), rtol=0, atol=0)
    fx.tree_allclose(applied_state, expected_state, rtol=0, atol=0)
    assert {k: float(v[0]) for k, v in metrics.items()} == {
        GRAD_NORM: pytest.approx(float(optax.tree.norm(grads))), SKIPPED: 0.0,
        NONFINITE_LOSS: 0.0, NONFINITE_GRAD_NORM: 0.0}

    infinite = {"w": grads["w"].at[0, 0].set(jnp.inf), "b": grads["b"]}
    for bad_grads, loss, flags in ((grads, jnp.float32(jnp.nan), (1.0, 1.0, 0.0)),
                                   (infinite, jnp.float32(0.3), (1.0, 0.0, 1.0))):
        kept, kept_state, metrics = update(bad_grads, loss)
        fx.tree_allclose(kept, params, rtol=0, atol=0)  # bitwise: nothing moved
        fx.tree_allclose(kept_state, opt_state, rtol=0, atol=0)  # Adam's count did not advance
        assert tuple(float(metrics[k][0]) for k in (SKIPPED, NONFINITE_LOSS,
                                                     NONFINITE_GRAD_NORM)) == flags


def test_a_profile_of_the_step_reads_as_the_data_flow():
    """The compiled step's ops carry the named scopes of its stages (what a profiler shows)."""
    plan = scoring.plan_scoring(CATPO)
    fn, split, ref_state, tx = _unsharded_step(plan, CATPO)
    batch = jax.tree.map(jnp.asarray, _first_batch(plan, batch_size=2))
    text = fn.lower(split.trainable, tx.init(split.trainable), split.frozen, ref_state, batch, {},
                    jax.random.key(0)).as_text(debug_info=True)
    stages = ("vision_tower", "projector", "embed", "decoder_layer_0", "decoder_layer_1",
              "final_norm", "policy_forward", "policy_logprobs", "reference_forward",
              "reference_logprobs", "token_weights", "token_kl", "loss", "update")
    # a scope is one component of an op's name path (under autodiff: `jvp(policy_forward)/...`)
    assert [s for s in stages if not re.search(rf"[/(]{s}[)/]", text)] == []
