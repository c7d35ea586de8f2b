"""Mesh construction and logical-axis sharding on 8 fake CPU devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mmpo_jax.engine import sharding
from mmpo_jax.models.lora import LLAMA_LINEAR_NAMES, LoraConfig, apply_lora
from mmpo_jax.models.partitioning import logical
from mmpo_jax.models.llama import LlamaForCausalLM
from tests.models.test_lora import TEXT


class _TwoLayer(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(16, 32, kernel_init=logical(init, ("embed", "mlp")),
                             use_bias=False, rngs=rngs)
        self.odd = nnx.Linear(16, 6, kernel_init=logical(init, ("embed", "mlp")),
                              use_bias=False, rngs=rngs)
        self.scale = nnx.Param(jnp.ones(16))


def test_make_mesh_fills_the_wildcard_and_rejects_impossible_shapes():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="multiply to the device count"):
        sharding.make_mesh({"data": 3})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="not divisible"):
        sharding.make_mesh({"data": -1, "tensor": 3})


def test_logical_names_map_to_mesh_axes_and_undivisible_axes_replicate():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = _TwoLayer(rngs=nnx.Rngs(0))
    shardings = sharding.state_shardings(nnx.state(model), mesh)
    assert shardings["up"]["kernel"].get_value().spec == P("fsdp", "tensor")
    assert shardings["odd"]["kernel"].get_value().spec == P("fsdp", "tensor")
    assert shardings["scale"].get_value().spec == P()
    mesh8 = sharding.make_mesh({"tensor": 8})
    odd = sharding.state_shardings(nnx.state(model), mesh8)["odd"]["kernel"].get_value()
    assert odd.spec == P(None, None)  # 6 outputs cannot be split 8 ways
    notes = sharding.describe_replications(nnx.state(model), mesh8)
    assert any("odd" in n and "'mlp'" in n for n in notes)


def test_sharded_state_computes_the_same_as_unsharded():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = _TwoLayer(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    placed = jax.device_put(state, sharding.state_shardings(state, mesh))
    x = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) / 100
    x_placed = jax.device_put(x, sharding.batch_sharding(mesh, rank=2))

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state).up(x)

    # fsdp splits the contraction, so the float32 sum is reassociated: ~1e-5 relative at worst.
    np.testing.assert_allclose(forward(placed, x_placed), forward(state, x), rtol=1e-5, atol=1e-7)
    assert forward(placed, x_placed).sharding.spec[0] == ("data", "fsdp")



def test_lora_adapters_shard_over_fsdp_and_a_lora_step_matches_one_device():
    """Every adapter factor of a LoRA decoder is split over the 8 fsdp devices on its large
    axis, the rank axis whole (as its kernel is split, on ``embed``); an SGD step of the adapters
    on that mesh equals one device's."""
    one_layer = LlamaForCausalLM(dataclasses.replace(TEXT, num_hidden_layers=1), rngs=nnx.Rngs(0))
    model = apply_lora(one_layer, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    # lora_b starts at 0, where lora_a's gradient is 0 too: move it so both factors are tested
    adapters = jax.tree.map(lambda x: x + 0.1 * jnp.cos(jnp.arange(x.size).reshape(x.shape)),
                            adapters)
    mesh = sharding.make_mesh({"fsdp": 8})
    adapter_shardings = sharding.state_shardings(adapters, mesh)
    specs = {path: leaf.get_value().spec for path, leaf in nnx.to_flat_state(adapter_shardings)}
    assert len(specs) == 2 * len(LLAMA_LINEAR_NAMES)
    for path, spec in specs.items():
        assert spec == (P("fsdp", None) if path[-1] == "lora_a" else P(None, "fsdp")), (path, spec)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 63, size=(8, 12)), jnp.int32)

    def step(adapters, rest, ids):
        def loss(adapters):
            logits, _ = nnx.merge(graphdef, adapters, rest)(ids[:, :-1])
            picked = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)
            return -jnp.mean(picked)

        value, grads = jax.value_and_grad(loss)(adapters)
        return value, jax.tree.map(lambda p, g: p - 0.5 * g, adapters, grads)

    one = jax.jit(step)(adapters, rest, ids)
    placed = (jax.device_put(adapters, adapter_shardings),
              jax.device_put(rest, sharding.state_shardings(rest, mesh)),
              jax.device_put(ids, sharding.batch_sharding(mesh, rank=2)))
    eight = jax.jit(step)(*placed)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one[1], adapters)
    assert min(jax.tree.leaves(moved)) > 0  # every factor has a gradient
    np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
    for (path, new), (_, want) in zip(nnx.to_flat_state(eight[1]), nnx.to_flat_state(one[1])):
        assert new.get_value().sharding.spec == specs[path]  # the step keeps the split
        np.testing.assert_allclose(new.get_value(), want.get_value(), rtol=1e-5, atol=1e-6)
