"""The optimizer: schedule values by hand, clipping, the weight-decay mask, jit, nnx trees."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from mmpo_jax.engine.optimizer import (
    default_weight_decay_mask,
    learning_rate_schedule,
    make_optimizer,
)


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            "learning_rate": 1e-3,
            "schedule": "cosine",
            "warmup_ratio": 0.1,
            "end_learning_rate_ratio": 0.1,
            "weight_decay": 0.05,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "grad_clip": 1.0,
            "grad_accum_steps": 1,
        }
    )
    config.update(overrides)
    return config


class LinearNorm(nnx.Module):
    """Kernel (2-D), bias (1-D), norm scale and bias (1-D)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)


def model_params(kind: str):
    state = nnx.state(LinearNorm(rngs=nnx.Rngs(0)), nnx.Param)
    # Non-trivial norm parameters, so "unchanged" cannot pass by accident of ones and zeros.
    state["norm"]["scale"][...] = jnp.arange(1.0, 5.0)
    state["linear"]["bias"][...] = jnp.arange(4.0) - 1.5
    return nnx.to_pure_dict(state) if kind == "pure_dict" else state


# ---------------------------------------------------------------- schedule

# 100 steps, warmup round(0.1 * 100) = 10, peak 1e-3, end 1e-4.
@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        ("cosine", 0, 0.0),
        ("cosine", 5, 5e-4),
        ("cosine", 10, 1e-3),
        # 30 of 90 decay steps: 1e-4 + 9e-4 * (1 + cos(pi / 3)) / 2
        ("cosine", 40, 1e-4 + 9e-4 * 0.75),
        ("cosine", 55, 5.5e-4),
        ("cosine", 100, 1e-4),
        ("cosine", 150, 1e-4),
        ("linear", 5, 5e-4),
        ("linear", 40, 1e-3 - 9e-4 * 30 / 90),
        ("linear", 100, 1e-4),
        ("constant", 3, 3e-4),
        ("constant", 10, 1e-3),
        ("constant", 100, 1e-3),
    ],
)
def test_schedule_values_by_hand(schedule, step, expected):
    lr = learning_rate_schedule(optimizer_config(schedule=schedule), 100)
    np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-6, atol=1e-12)


def test_schedule_without_warmup_starts_at_peak():
    lr = learning_rate_schedule(optimizer_config(warmup_ratio=0.0), 20)
    np.testing.assert_allclose(float(lr(0)), 1e-3, rtol=1e-6)
    # 10 of 20 decay steps: halfway down the cosine.
    np.testing.assert_allclose(float(lr(10)), 1e-4 + 9e-4 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(20)), 1e-4, rtol=1e-6)


def test_schedule_warmup_rounds_and_may_fill_the_run():
    # round(0.25 * 10) = 2 warmup steps (Python rounds half to even).
    lr = learning_rate_schedule(optimizer_config(warmup_ratio=0.25, schedule="linear"), 10)
    np.testing.assert_allclose([float(lr(s)) for s in (1, 2)], [5e-4, 1e-3], rtol=1e-6)
    whole = learning_rate_schedule(optimizer_config(warmup_ratio=1.0), 4)
    np.testing.assert_allclose(
        [float(whole(s)) for s in range(6)], [0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rtol=1e-6
    )


def test_schedule_is_jit_compatible():
    lr = learning_rate_schedule(optimizer_config(), 100)
    steps = jnp.arange(0, 101, 7)
    np.testing.assert_allclose(jax.jit(jax.vmap(lr))(steps), [lr(int(s)) for s in steps], rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"schedule": "cosine_with_restarts"},
            r"schedule='cosine_with_restarts' is unknown; "
            r"valid: \('cosine', 'constant', 'linear'\)",
        ),
        ({"warmup_ratio": 1.5}, r"warmup_ratio=1.5 must lie in \[0, 1\]"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0 must be >= 0"),
        ({"end_learning_rate_ratio": -0.1}, "end_learning_rate_ratio=-0.1"),
    ],
)
def test_bad_schedule_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        learning_rate_schedule(optimizer_config(**overrides), 100)
    with pytest.raises(ValueError, match=message):
        make_optimizer(optimizer_config(**overrides), 100)


def test_bad_run_length_and_clip_are_named():
    with pytest.raises(ValueError, match="num_steps=0 must be >= 1"):
        learning_rate_schedule(optimizer_config(), 0)
    with pytest.raises(ValueError, match="grad_clip=-1.0 must be >= 0"):
        make_optimizer(optimizer_config(grad_clip=-1.0), 10)


# ---------------------------------------------------------------- clipping


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_clipping_rescales_a_huge_gradient_to_the_clip_norm(grad_clip):
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros((3,))}
    grads = {"w": jnp.full((2, 3), 100.0), "b": jnp.arange(3.0) * 50.0}
    norm = float(optax.tree.norm(grads))
    tx = make_optimizer(optimizer_config(grad_clip=grad_clip), 10)
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    # Adam's first moment after one step is (1 - b1) * (the gradient it was given).
    adam_state = state[1][0]
    scale = grad_clip / norm if grad_clip else 1.0
    for name in grads:
        np.testing.assert_allclose(adam_state.mu[name], 0.1 * scale * grads[name], rtol=1e-5)
    if grad_clip:
        mu_norm = float(optax.tree.norm(adam_state.mu))
        np.testing.assert_allclose(mu_norm, 0.1 * grad_clip, rtol=1e-5)


def test_state_tree_does_not_depend_on_clipping():
    params = {"w": jnp.ones((2, 3))}
    clipped = make_optimizer(optimizer_config(grad_clip=1.0), 10).init(params)
    unclipped = make_optimizer(optimizer_config(grad_clip=0.0), 10).init(params)
    assert jax.tree.structure(clipped) == jax.tree.structure(unclipped)


# ---------------------------------------------------------------- weight decay on nnx trees


@pytest.mark.parametrize("kind", ["pure_dict", "nnx_state"])
def test_zero_gradient_decays_matrices_only(kind):
    lr, wd = 1e-2, 0.5
    config = optimizer_config(
        learning_rate=lr, weight_decay=wd, warmup_ratio=0.0, schedule="constant"
    )
    params = model_params(kind)
    tx = make_optimizer(config, 10)
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    assert type(new_params) is type(params)
    flat_old = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    flat_new = dict(jax.tree_util.tree_flatten_with_path(new_params)[0])
    ndims = {}
    for path, old in flat_old.items():
        ndims[jax.tree_util.keystr(path)] = old.ndim
        expected = old * (1 - lr * wd) if old.ndim >= 2 else old
        np.testing.assert_allclose(flat_new[path], expected, rtol=1e-6, atol=0)
    # The tree really has both kinds of parameter, and the 2-D one really moved.
    assert sorted(ndims.values()) == [1, 1, 1, 2]
    kernel_path = next(p for p in flat_old if flat_old[p].ndim == 2)
    assert not np.allclose(flat_new[kernel_path], flat_old[kernel_path])


def test_default_mask_marks_matrices():
    mask = default_weight_decay_mask(nnx.to_pure_dict(model_params("nnx_state")))
    assert mask == {
        "linear": {"kernel": True, "bias": False},
        "norm": {"scale": False, "bias": False},
    }


def test_custom_mask_replaces_the_default():
    lr, wd = 1e-2, 0.5
    config = optimizer_config(
        learning_rate=lr, weight_decay=wd, warmup_ratio=0.0, schedule="constant"
    )
    params = {"w": jnp.ones((2, 2)), "scale": jnp.full((2,), 3.0)}
    tx = make_optimizer(config, 10, weight_decay_mask=lambda p: {"w": False, "scale": True})
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], params["w"])
    np.testing.assert_allclose(new["scale"], 3.0 * (1 - lr * wd), rtol=1e-6)


def test_nnx_optimizer_drives_a_model():
    model = LinearNorm(rngs=nnx.Rngs(1))
    tx = make_optimizer(optimizer_config(warmup_ratio=0.0, schedule="constant"), 10)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x):
        def loss_fn(model):
            return jnp.mean(model.norm(model.linear(x)) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    x = jax.random.normal(jax.random.key(0), (8, 3))
    losses = [float(train_step(model, optimizer, x)) for _ in range(5)]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]


def test_adam_moments_are_sharded_like_their_parameters():
    """On an FSDP mesh every moment of the run's optimizer has its parameter's sharding (jit of
    tx.init alone replicated them: the whole Adam state on every device)."""
    from mmpo_jax.engine import optimizer as optimizer_lib
    from mmpo_jax.engine import sharding
    from mmpo_jax.engine import state as state_lib
    from tests.engine import step_fixtures as fx

    mesh = sharding.make_mesh({"data": 1, "fsdp": 8}, devices=jax.devices())
    split = state_lib.split_policy(state_lib.copy_model(fx.base_model()), fx.MODEL_CONFIG)
    trainable = jax.device_put(
        split.trainable, sharding.state_shardings(split.trainable, mesh, sharding.DEFAULT_RULES))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = optimizer_lib.init_opt_state(tx, trainable, mesh)
    adam = opt_state[1][0]
    parameters = jax.tree.leaves(trainable)
    assert sum(not p.sharding.is_fully_replicated for p in parameters) > 10
    for moments in (adam.mu, adam.nu):
        for moment, parameter in zip(jax.tree.leaves(moments), parameters, strict=True):
            assert moment.sharding.is_equivalent_to(parameter.sharding, moment.ndim)
    assert adam.count.sharding.is_fully_replicated
