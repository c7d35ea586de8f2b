"""Logical axis names on parameters.

Every parameter of our models names its axes from one vocabulary (``vocab``, ``embed``, ``mlp``,
``heads``, ``kv_heads``; ``None`` for an axis never sharded). The names are metadata only: a model
is built unsharded (flax 0.12's eager sharding is switched off per variable, so no mesh is needed to
construct one) and ``mmpo_jax.engine.sharding`` turns the names into mesh placements.

An axis may also carry a tuple of names: it is sharded over every mesh axis those names map to,
in order. A LoRA factor uses that: its one large axis takes both axis names of the kernel it
adapts, so the factor spreads over the same mesh axes as the kernel (``models.lora``).
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

from flax import nnx

AXIS_NAMES = ("vocab", "embed", "mlp", "heads", "kv_heads")

AxisName = Union[str, tuple[str, ...], None]
"""One array axis's logical name: a name, a tuple of names (sharded over all their mesh axes), or
None (never sharded)."""


def axis_names(name: AxisName) -> tuple[str, ...]:
    """The logical names of one axis: ``()`` for None, ``(name,)`` for a name, else the tuple."""
    if name is None:
        return ()
    return (name,) if isinstance(name, str) else tuple(name)


def logical(initializer: Callable, names: Sequence[AxisName]) -> Callable:
    """Wrap ``initializer`` so the created parameter carries the logical axis ``names``."""
    unknown = [n for name in names for n in axis_names(name) if n not in AXIS_NAMES]
    if unknown:
        raise ValueError(f"unknown logical axis names {unknown}; valid names are {AXIS_NAMES}")
    return nnx.with_partitioning(initializer, tuple(names), eager_sharding=False)
