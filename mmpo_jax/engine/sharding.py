"""Device mesh and the logical-axis rules that map parameter, activation and batch axes onto it.

Every parameter of the models carries logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``,
``kv_heads``; ``None`` for axes never sharded) in its ``out_sharding`` metadata. A rules table — one
vocabulary for parameters, activations and batches, declared in the config — maps each logical name
to a mesh axis (``data``, ``fsdp``, ``tensor``) or to nothing; an axis named by a tuple of logical
names (a LoRA factor's large axis, ``models.partitioning``) takes the mesh axes of each, in order.
A dimension that the mesh axes do not divide is replicated instead of failing to compile: tiny
models on many devices stay runnable, and ``describe_replications`` says which parameters that
happened to.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmpo_jax.models.partitioning import AxisName, axis_names

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or a tuple of mesh axes, or None). FSDP shards the embedding axis of
# every weight; tensor parallelism shards heads and the MLP's hidden axis (Megatron-style); the
# batch is split over both data-parallel axes.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over ``MESH_AXES`` from a ``{'data': d, 'fsdp': f, 'tensor': t}`` mapping.

    One axis may be ``-1``: it takes whatever the device count leaves. Missing axes are 1.

    Raises:
      ValueError: unknown axis names, sizes < 1 (other than one -1), or a product that does not
        equal the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    wildcards = [axis for axis, size in sizes.items() if size == -1]
    bad = {axis: size for axis, size in sizes.items() if size < 1 and size != -1}
    if bad or len(wildcards) > 1:
        raise ValueError(
            f"mesh sizes must be positive, with at most one -1; got {dict(sizes)}"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if wildcards:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh {dict(sizes)}: {len(devices)} devices are not divisible by the fixed "
                f"axes' product {fixed}"
            )
        sizes[wildcards[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh {dict(sizes)} has {math.prod(sizes.values())} slots but there are "
            f"{len(devices)} devices; sizes must multiply to the device count"
        )
    grid = np.asarray(devices).reshape([sizes[axis] for axis in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def _mesh_axes_for(name: AxisName, rules: Mapping[str, Any]) -> tuple[str, ...]:
    """The mesh axes of one array axis's logical name(s), in order, each once."""
    axes: list[str] = []
    for logical_name in axis_names(name):
        target = rules.get(logical_name)
        for axis in () if target is None else (target,) if isinstance(target, str) else target:
            if axis not in axes:
                axes.append(axis)
    return tuple(axes)


def logical_to_spec(
    names: Sequence[AxisName],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
) -> PartitionSpec:
    """The ``PartitionSpec`` for an array whose axes carry logical ``names`` (a name, a tuple of
    names or None per axis).

    A mesh axis is used at most once per array (first come, first served) and only where it
    divides the dimension; otherwise that dimension is replicated over it.
    """
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} logical names {tuple(names)} for a rank-{len(shape)} array")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = tuple(
            a for a in _mesh_axes_for(name, table) if a not in used and mesh.shape[a] > 1
        )
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _logical_names(variable: nnx.Variable) -> tuple[AxisName, ...] | None:
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def state_shardings(
    state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> Any:
    """A ``NamedSharding`` for every leaf of an NNX ``state`` (same tree structure).

    Variables without logical names (and plain arrays, e.g. optimizer counters) are replicated.
    """

    def sharding_of(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            names = _logical_names(leaf)
            shape = leaf.get_value().shape
            spec = PartitionSpec() if names is None else logical_to_spec(names, shape, mesh, rules)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rank: int, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch-major array of ``rank`` axes: the leading axis over the batch axes."""
    axes = tuple(a for a in _mesh_axes_for("batch", dict(rules)) if mesh.shape[a] > 1)
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (rank - 1))))


def describe_replications(
    state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> list[str]:
    """Parameters whose logical axes asked for sharding the mesh could not give (not divisible)."""
    notes = []
    table = dict(rules)
    for path, leaf in nnx.to_flat_state(state):
        if not isinstance(leaf, nnx.Variable) or _logical_names(leaf) is None:
            continue
        names = _logical_names(leaf)
        shape = leaf.get_value().shape
        spec = logical_to_spec(names, shape, mesh, rules)
        for name, dim, got in zip(names, shape, spec):
            wanted = [a for a in _mesh_axes_for(name, table) if mesh.shape[a] > 1]
            if wanted and got is None:
                notes.append(f"{'/'.join(map(str, path))}: axis {name!r} of size {dim} replicated")
    return notes
