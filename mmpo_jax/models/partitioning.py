"""Logical axis names on parameters.

Every parameter of our models names its axes from one vocabulary (``vocab``, ``embed``, ``mlp``,
``heads``, ``kv_heads``; ``None`` for an axis never sharded). The names are metadata only: a model
is built unsharded (flax 0.12's eager sharding is switched off per variable, so no mesh is needed to
construct one) and ``mmpo_jax.engine.sharding`` turns the names into mesh placements.
"""

from __future__ import annotations

from typing import Callable, Sequence

from flax import nnx

AXIS_NAMES = ("vocab", "embed", "mlp", "heads", "kv_heads")


def logical(initializer: Callable, names: Sequence[str | None]) -> Callable:
    """Wrap ``initializer`` so the created parameter carries the logical axis ``names``."""
    unknown = [n for n in names if n is not None and n not in AXIS_NAMES]
    if unknown:
        raise ValueError(f"unknown logical axis names {unknown}; valid names are {AXIS_NAMES}")
    return nnx.with_partitioning(initializer, tuple(names), eager_sharding=False)
