"""The policy's parameters split into what trains and what stays frozen, placed on a mesh.

The policy is an NNX ``Llava``; the step is a pure function of its states. ``split_policy``
cuts the model into ``(graphdef, trainable, frozen)`` with the config's filter:

- LoRA enabled: the adapters (and the projector when ``train_projector``), ``lora.trainable_filter``;
- otherwise every ``nnx.Param`` except the vision tower (when ``freeze_vision``) and the projector
  (unless ``train_projector``).

``frozen`` holds everything else (base weights, dropout RNG streams); it is an input of the step,
never an output, so at 7B the frozen weights are neither copied nor donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from mmpo_jax.models import lora
from mmpo_jax.models.llava import Llava
from mmpo_jax.engine import sharding

VISION_TOWER = "vision_tower"
PROJECTOR = "multi_modal_projector"


def lora_config(model_config: Mapping[str, Any]) -> lora.LoraConfig | None:
    """The ``LoraConfig`` of a ``model`` config section, or None when LoRA is off."""
    section = model_config["lora"]
    if not section["enabled"]:
        return None
    return lora.LoraConfig(rank=int(section["rank"]), alpha=float(section["alpha"]),
                           dropout=float(section["dropout"]), targets=tuple(section["targets"]),
                           train_projector=bool(model_config["train_projector"]))


def trainable_filter(model_config: Mapping[str, Any]) -> nnx.filterlib.Filter:
    """What the optimizer updates, from a ``model`` config section (see the module doc)."""
    adapters = lora_config(model_config)
    if adapters is not None:
        if not model_config["freeze_vision"]:
            raise ValueError("model.freeze_vision=False with LoRA: adapters cover the language "
                             "model only; train the vision tower without LoRA")
        return lora.trainable_filter(adapters)
    excluded = []
    if model_config["freeze_vision"]:
        excluded.append(nnx.PathContains(VISION_TOWER))
    if not model_config["train_projector"]:
        excluded.append(nnx.PathContains(PROJECTOR))
    return nnx.All(nnx.Param, *(nnx.Not(f) for f in excluded))


def prepare_policy(model: Llava, model_config: Mapping[str, Any], *, seed: int) -> Llava:
    """Adds LoRA adapters when configured (in place) and switches dropout to training mode."""
    adapters = lora_config(model_config)
    if adapters is not None:
        lora.apply_lora(model, adapters, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
        model.train()
    return model


@dataclasses.dataclass
class PolicySplit:
    """``nnx.split`` of the policy: ``nnx.merge(graphdef, trainable, frozen)`` rebuilds it."""

    graphdef: Any
    trainable: nnx.State
    frozen: nnx.State

    def merge(self) -> Llava:
        return nnx.merge(self.graphdef, self.trainable, self.frozen)

    @property
    def num_trainable(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.trainable))


def split_policy(model: Llava, model_config: Mapping[str, Any]) -> PolicySplit:
    """Split ``model`` by ``trainable_filter``; raises when nothing would train."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(model_config), ...)
    split = PolicySplit(graphdef, trainable, frozen)
    if split.num_trainable == 0:
        raise ValueError(f"the model config trains no parameter: {dict(model_config)}")
    return split


def place(state: nnx.State, mesh: Mesh, rules: Any) -> tuple[nnx.State, Any]:
    """``state`` on ``mesh`` by its logical axis names, and the shardings used."""
    shardings = sharding.state_shardings(state, mesh, rules)
    return jax.device_put(state, shardings), shardings


def copy_model(model: nnx.Module) -> nnx.Module:
    """A clone of ``model`` with its own buffers (``nnx.clone`` shares the immutable arrays, which
    a donating step would then delete under the original)."""
    clone = nnx.clone(model)
    nnx.update(clone, jax.tree.map(lambda x: x.copy(), nnx.state(clone)))
    return clone
