"""LoRA adapters on the language model's linear layers (PEFT's formulation, in Flax NNX).

``apply_lora`` swaps each targeted ``nnx.Linear`` of the decoder (transformers names ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``) for a ``LoRALinear``:

    y = x W + b + (alpha / r) * dropout(x) A B,      A [in, r], B [r, out]

The base ``kernel``/``bias`` stay plain ``nnx.Param`` at their old paths (so checkpoints, sharding
rules and ``convert.py`` see the same tree plus two leaves per layer); ``lora_a``/``lora_b`` are
``nnx.LoRAParam``. What the optimizer updates is chosen by ``trainable_filter`` (the base weights and
the vision tower never). ``adapters_enabled`` is a static attribute of every ``LoRALinear``: it lives
in the graph definition, so a jitted function retraces when it flips instead of reusing a stale
trace, and the disabled path skips the adapter matmuls altogether. ``without_adapters(model)`` is the
``lora_base`` reference (mDPO): a view of the same parameters with the adapters off.

Dropout on the adapter input follows NNX's train/eval convention (``deterministic``); adapters are
created in eval mode, so nothing turns stochastic until ``model.train()`` or
``nnx.view(model, deterministic=False)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from mmpo_jax.models.llama import LlamaForCausalLM, LlamaModel
from mmpo_jax.models.partitioning import AxisName, axis_names, logical

LLAMA_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The decoder's linear layers (transformers' attribute names), every valid LoRA target."""

PROJECTOR_NAME = "multi_modal_projector"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (PEFT's ``LoraConfig`` names: ``r`` is ``rank``, ``lora_alpha`` is ``alpha``).

    Reference settings (METHODS.md): mDPO r=64, alpha=128, dropout 0.05 on all LLM linear layers;
    Cat-PO r=128, alpha=256 (dropout not stated; PEFT's LLaVA recipes use 0.05), vision tower
    frozen; P2-DPO r=alpha in 32..128.

    Attributes:
      rank: ``r``, the inner dimension of ``A [in, r]`` and ``B [r, out]``.
      alpha: the adapter output is scaled by ``alpha / rank``.
      dropout: dropout rate on the adapter input, active in training mode only.
      targets: which of ``LLAMA_LINEAR_NAMES`` get adapters (default: all seven).
      train_projector: the multimodal projector is also trained (``trainable_filter``).
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = LLAMA_LINEAR_NAMES
    train_projector: bool = False

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be a positive int")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must lie in [0, 1)")
        unknown = [name for name in self.targets if name not in LLAMA_LINEAR_NAMES]
        if unknown or not self.targets:
            raise ValueError(
                f"targets={self.targets} must be a non-empty subset of {LLAMA_LINEAR_NAMES}; unknown: {unknown}"
            )

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor on the adapter output."""
        return self.alpha / self.rank


@functools.cache
def _linear_fields() -> frozenset[str]:
    """Public attribute names of an ``nnx.Linear`` (settings and the two variables)."""
    template = nnx.eval_shape(lambda: nnx.Linear(1, 1, rngs=nnx.Rngs(0)))
    return frozenset(name for name in vars(template) if not name.startswith("_"))


def _adopt_linear(target: nnx.Linear, source: nnx.Linear) -> None:
    """Give ``target`` the settings and the very ``kernel``/``bias`` variables of ``source``.

    Used both ways (Linear -> LoRALinear, LoRALinear -> Linear) so that no base kernel is ever
    re-initialised or copied.
    """
    for name in _linear_fields():
        value = getattr(source, name)
        # A missing bias is a data attribute of nnx.Linear (nnx.data(None)); keep it one.
        setattr(target, name, nnx.data(value) if name == "bias" and value is None else value)


def _peft_a_init(key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
    """PEFT's ``kaiming_uniform_(a=sqrt(5))`` on ``A``: uniform in ``+-1/sqrt(in)`` for ``A [in, r]``."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=0, out_axis=1)(key, shape, dtype)


def _kernel_axes(linear: nnx.Linear) -> tuple[AxisName, AxisName]:
    names = linear.kernel.get_metadata().get("out_sharding")
    return tuple(names) if names else (None, None)


def _adapter_axes(own: AxisName, other: AxisName) -> tuple[str, ...] | None:
    """The logical names of a factor's large axis: its own kernel axis's, then the other kernel
    axis's (each once), so that the factor is sharded over every mesh axis its kernel is."""
    names = tuple(dict.fromkeys(axis_names(own) + axis_names(other)))
    return names or None


class LoRALinear(nnx.Linear):
    """An ``nnx.Linear`` (same ``kernel``/``bias`` variables) plus a low-rank adapter.

    ``__call__``: ``x [..., in] -> [..., out]`` = base output ``+ scaling * dropout(x) @ lora_a @ lora_b``
    when ``adapters_enabled``, exactly the base output otherwise.

    Sharding: the rank axis is never sharded; the large axis of each factor carries both logical
    names of the kernel, its own first: ``lora_a [in, r]`` ``((in, out), None)``, ``lora_b [r, out]``
    ``(None, (out, in))``. [our choice] A factor has one large axis where its kernel has two, so it
    takes all of the kernel's mesh axes there: under FSDP (``embed`` -> ``fsdp``) both factors of
    every layer are split over the fsdp chips, as the kernel is (with the kernel's axis names alone,
    ``lora_b`` of ``q_proj`` ``[r, heads]`` and ``lora_a`` of ``o_proj`` ``[heads, r]`` would hold no
    fsdp axis and be replicated: 0.8 GiB per chip of the 7B preset's rank-128 adapters, and 1.6 of
    their Adam moments). Which of a factor and the activations XLA's partitioner moves at each
    adapter matmul is its own choice (the model sets no sharding constraint): on the tiny test
    model over data 2 x fsdp 4 it moves MLP activations (all-gathered elements per DPO step 0.75M
    with the kernel's names alone, 1.73M with these), which the 7B shapes have not been measured
    for.
    """

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
        _adopt_linear(self, base)
        in_axis, out_axis = _kernel_axes(base)
        self.lora_a = nnx.LoRAParam(
            logical(_peft_a_init, (_adapter_axes(in_axis, out_axis), None))(
                rngs.params(), (self.in_features, rank), self.param_dtype)
        )
        self.lora_b = nnx.LoRAParam(
            logical(nnx.initializers.zeros_init(), (None, _adapter_axes(out_axis, in_axis)))(
                rngs.params(), (rank, self.out_features), self.param_dtype
            )
        )
        self.scaling = alpha / rank
        self.adapters_enabled = True
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else nnx.data(None)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """``inputs [..., in]`` -> ``[..., out]``."""
        output = super().__call__(inputs, out_sharding=out_sharding)
        if not self.adapters_enabled:
            return output
        x = self.dropout(inputs) if self.dropout is not None else inputs
        x, lora_a, lora_b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        update = jnp.matmul(jnp.matmul(x, lora_a, precision=self.precision), lora_b, precision=self.precision)
        return output + (self.scaling * update).astype(output.dtype)

    def set_view(self, adapters_enabled: bool | None = None) -> None:
        """Hook of ``nnx.view``: ``nnx.view(model, adapters_enabled=False)`` switches adapters off."""
        if adapters_enabled is not None:
            self.adapters_enabled = bool(adapters_enabled)

    def merged_kernel(self) -> jax.Array:
        """``kernel + scaling * lora_a @ lora_b`` ``[in, out]`` in the kernel's dtype (float32 sum)."""
        kernel = self.kernel[...]
        update = jnp.matmul(
            self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        return (kernel.astype(jnp.float32) + self.scaling * update).astype(kernel.dtype)


def _language_model(model: nnx.Module) -> nnx.Module:
    root = getattr(model, "language_model", model)
    if not isinstance(root, (LlamaForCausalLM, LlamaModel)):
        raise TypeError(
            f"LoRA targets the Llama decoder: expected a Llava (with .language_model), a LlamaForCausalLM or a "
            f"LlamaModel, got {type(model).__name__}"
        )
    return root


def _named_linears(root: nnx.Module, kind: type) -> Iterator[tuple[nnx.Module, str, nnx.Module]]:
    """``(parent, attribute name, layer)`` for every ``kind`` module directly held as an attribute."""
    for _, parent in nnx.iter_modules(root):
        for name, child in vars(parent).items():
            if isinstance(child, kind):
                yield parent, name, child


def lora_layers(model: nnx.Module) -> list[LoRALinear]:
    """Every ``LoRALinear`` of ``model``, in traversal order."""
    return [layer for _, layer in nnx.iter_modules(model) if isinstance(layer, LoRALinear)]


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Add adapters to the decoder's targeted linear layers, in place; returns ``model``.

    Args:
      model: a ``Llava`` (its ``language_model`` is adapted; vision tower and projector are not), a
        ``LlamaForCausalLM`` or a ``LlamaModel``.
      config: rank, alpha, dropout and target names.
      rngs: ``params`` stream (or ``default``) draws ``lora_a``; ``dropout`` stream (or ``default``)
        seeds each layer's dropout.

    Raises:
      ValueError: the model already has adapters, or none of the targets exists in it.
    """
    root = _language_model(model)
    if lora_layers(model):
        raise ValueError(f"model already holds {len(lora_layers(model))} LoRA layers; apply_lora once")
    chosen = [
        (parent, name, layer)
        for parent, name, layer in _named_linears(root, nnx.Linear)
        if name in config.targets
    ]
    if not chosen:
        raise ValueError(f"no nnx.Linear named any of {config.targets} in {type(root).__name__}")
    for parent, name, layer in chosen:
        setattr(parent, name, LoRALinear(layer, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                                         rngs=rngs))
    return model


def set_adapters(model: nnx.Module, enabled: bool) -> None:
    """Switch every adapter of ``model`` on or off, in place (a static flag: jitted calls retrace)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no LoRA layers; call apply_lora first")
    for layer in layers:
        layer.adapters_enabled = bool(enabled)


def without_adapters(model: nnx.Module) -> nnx.Module:
    """The ``lora_base`` reference: a view of ``model`` sharing its arrays, with adapters off.

    Works inside ``nnx.jit``/``nnx.value_and_grad``; ``model`` itself is unchanged.
    """
    if not lora_layers(model):
        raise ValueError(f"{type(model).__name__} holds no LoRA layers; call apply_lora first")
    return nnx.view(model, only=LoRALinear, adapters_enabled=False)


def trainable_filter(config: LoraConfig) -> nnx.filterlib.Filter:
    """The ``nnx`` filter of what the optimizer updates: the adapters, plus the projector if asked.

    Base weights of the decoder and the whole vision tower are never selected.
    """
    if config.train_projector:
        return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains(PROJECTOR_NAME)))
    return nnx.LoRAParam


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel, in place; returns ``model`` with plain ``nnx.Linear``s.

    The merged kernel is ``W + (alpha / r) * A @ B`` (computed in float32, stored in the kernel's
    dtype) at the same path and with the same metadata, so the result has exactly the parameter
    tree of the model before ``apply_lora``. ``nnx.clone`` first to keep the adapters.
    """
    replaced = list(_named_linears(model, LoRALinear))
    if not replaced:
        raise ValueError(f"{type(model).__name__} holds no LoRA layers; nothing to merge")
    for parent, name, layer in replaced:
        layer.kernel[...] = layer.merged_kernel()
        plain = nnx.eval_shape(lambda: nnx.Linear(1, 1, rngs=nnx.Rngs(0)))
        _adopt_linear(plain, layer)
        setattr(parent, name, plain)
    return model


def lora_state(model: nnx.Module, config: LoraConfig | None = None) -> nnx.State:
    """What fine-tuning changed, for saving alone: the adapters (``nnx.LoRAParam``), plus the
    projector when ``config.train_projector``. Save it with orbax or ``nnx.to_pure_dict(state)``."""
    state = nnx.state(model, trainable_filter(config) if config is not None else nnx.LoRAParam)
    if not jax.tree.leaves(state):
        raise ValueError(f"{type(model).__name__} holds no LoRA parameters; call apply_lora first")
    return state


def load_lora_state(model: nnx.Module, state: nnx.State | dict, config: LoraConfig | None = None) -> None:
    """Write a ``lora_state`` (an ``nnx.State`` or its pure dict, e.g. restored by orbax) into ``model``.

    The model must hold exactly the same adapter paths and shapes (same targets, rank, and
    ``train_projector``), else ``ValueError`` naming the missing, unexpected or mis-shaped paths.
    """
    target = lora_state(model, config)
    pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    loaded = {_path_key(path): value for path, value in _flatten(pure)}
    expected = {_path_key(path): variable for path, variable in nnx.to_flat_state(target)}
    missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(f"LoRA state does not match the model: missing {missing}, unexpected {unexpected}")
    for key, variable in expected.items():
        value = jnp.asarray(loaded[key])
        if value.shape != variable.shape:
            raise ValueError(f"LoRA state {key} has shape {value.shape}; the model expects {variable.shape}")
        variable[...] = value.astype(variable.dtype)
    nnx.update(model, target)


def _flatten(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, prefix + (key,))
    else:
        yield prefix, tree


def _path_key(path: tuple) -> str:
    # orbax and json turn the int keys of nnx.List entries into strings; compare paths as text.
    return "/".join(str(part) for part in path)
