"""Metrics carried as (sum, count) pairs so averages survive gradient accumulation and sharding.

A loss returns ``dict[str, Metric]``. Adding two such dicts pair-wise (``accumulate``) and dividing
at the end (``finalize``) gives the same average as one big batch would, whatever the split.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

Metric = tuple[jax.Array, jax.Array]
"""``(sum, count)``: both float32 scalars."""


def mean_metric(values: jax.Array, mask: jax.Array | None = None) -> Metric:
    """The (sum, count) of ``values`` over the entries where ``mask`` is true.

    Args:
      values: any shape, e.g. per-example losses ``[B]``.
      mask: same shape as ``values`` (bool or 0/1), or None for all entries.
    """
    values = jnp.asarray(values, jnp.float32)
    if mask is None:
        return jnp.sum(values), jnp.asarray(values.size, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    return jnp.sum(jnp.where(mask > 0, values, 0.0)), jnp.sum(mask)


def accumulate(total: Mapping[str, Metric], new: Mapping[str, Metric]) -> dict[str, Metric]:
    """Pair-wise sum of two metric dicts with the same keys (gradient accumulation)."""
    if set(total) != set(new):
        raise ValueError(f"metric keys differ: {sorted(set(total) ^ set(new))}")
    return {k: (total[k][0] + new[k][0], total[k][1] + new[k][1]) for k in total}


def finalize(metrics: Mapping[str, Metric]) -> dict[str, jax.Array]:
    """``sum / count`` per metric; a metric that counted nothing is 0, not NaN."""
    return {k: s / jnp.maximum(c, 1.0) for k, (s, c) in metrics.items()}
