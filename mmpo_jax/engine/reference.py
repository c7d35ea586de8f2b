"""The frozen reference model of a run: its modes, its copy, and the model inside a traced step.

``reference.mode``:

- ``copy``: a frozen copy of the initial policy (LoRA adapters merged), placed on the mesh once;
  the step reads its state as an input;
- ``lora_base``: the policy with its adapters off (``models.lora.without_adapters``): the initial
  policy without a second copy of the base weights (needs LoRA, and a frozen projector, since the
  projector is shared);
- ``cache``: the reference's outputs computed once over the data and read from disk
  (``engine.reference_cache``); only for methods whose reference outputs are fixed per record.

On-policy methods score fresh samples every step, so only ``ON_POLICY_MODES`` serve them.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from mmpo_jax.engine import sharding
from mmpo_jax.engine.state import copy_model
from mmpo_jax.models import lora
from mmpo_jax.models.llava import Llava

MODES = ("copy", "lora_base", "cache")
ON_POLICY_MODES = ("copy", "lora_base")


def merged_copy(model: Llava) -> Llava:
    """A copy of ``model`` with its LoRA adapters (if any) merged into the base weights, in eval
    mode: the reference copy, and what an export writes."""
    copy = copy_model(model)
    if lora.lora_layers(copy):
        lora.merge_lora(copy)
    copy.eval()
    return copy


def placed_copy(model: Llava, mesh: Mesh, rules: Any) -> tuple[Any, nnx.State]:
    """``(graphdef, state)`` of ``merged_copy(model)``, the state on ``mesh`` by its logical axes."""
    graphdef, state = nnx.split(merged_copy(model))
    return graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, rules))


def reference_model(mode: str, policy: Llava, graphdef: Any = None, state: Any = None
                    ) -> Llava | None:
    """The reference inside a traced function: the copy merged from ``(graphdef, state)``
    (fresh Variables at this trace level), the policy's LoRA base, or None (``cache``)."""
    if mode not in MODES:
        raise ValueError(f"reference mode {mode!r} is not one of {MODES}")
    if mode == "copy":
        return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    if mode == "lora_base":
        return lora.without_adapters(policy)
    return None
