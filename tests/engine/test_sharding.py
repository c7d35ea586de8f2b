"""Mesh construction and logical-axis sharding on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mmpo_jax.models.partitioning import logical
from mmpo_jax.engine import sharding


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
