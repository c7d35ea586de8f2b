"""Llama-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) in Flax NNX.

Numerically the transformers ``LlamaForCausalLM`` (rotate-half RoPE, float32 RMS statistics, float32
softmax), with parameter attributes named as its modules (``model.layers[i].self_attn.q_proj`` ...;
kernels stored ``[in, out]``, norm weights as ``scale``, the embedding table as ``embedding``).
Every layer can return attention probes and take decode-time hooks (see ``attention.py``); a KV
cache with an explicit ``end_index`` serves incremental decoding.

Shapes: ``B`` batch, ``T`` new tokens, ``S`` key window (``T`` without a cache, ``S_max`` with one),
``D`` hidden size, ``V`` vocabulary, ``L`` layers.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mmpo_jax.models.attention import ATTENTION_IMPLS, AttentionHooks, ProbeSpec, attend, resolve_attention_impl
from mmpo_jax.models.layers import activation, head_logits, partitioned_linear
from mmpo_jax.models.partitioning import logical

_EMBED_INIT_STD = 0.02  # transformers' initializer_range default for Llama


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Decoder hyper-parameters, named as transformers' ``LlamaConfig`` (plus dtypes and remat).

    ``head_dim=None`` becomes ``hidden_size // num_attention_heads``. ``dtype`` is the compute dtype,
    ``param_dtype`` the storage dtype (names accepted by ``jnp.dtype``). ``remat`` rematerialises
    each decoder layer in the backward pass. ``attention_impl`` computes unprobed attention (one of
    ``attention.ATTENTION_IMPLS``; ``"auto"`` picks per platform, see ``attention.py``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        activation(self.hidden_act)  # ValueError naming the supported activations
        for field in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, field))
            except TypeError:
                raise ValueError(f"{field}={getattr(self, field)!r} is not a dtype name") from None


Cache = dict
"""``{"layers": [{"k": [B, K, S_max, D_h], "v": [B, K, S_max, D_h]}, ...], "end_index": int32 []}``:
keys (after RoPE) and values of every layer; ``end_index`` is the first free slot. Heads before
slots: the layout the attention dots read in place, so a decode step writes one slot per layer and
copies nothing cache-sized."""


class DecoderOutput(NamedTuple):
    """What ``LlamaModel`` returns.

    Attributes:
      last_hidden_state: ``[B, T, D]`` after the final norm (``[B, P, D]`` at ``output_positions``).
      hidden_states: None, or a tuple of ``L + 1`` arrays ``[B, T, D]``: the input embeddings, the
        outputs of layers ``0 .. L-2``, and ``last_hidden_state`` (transformers' convention).
      probes: decoder layer index -> probe array (see ``ProbeSpec``; the query axis holds the
        ``output_positions`` when given); empty without a probe.
      cache: the updated cache (``end_index`` advanced by ``T``), or None without one.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...] | None
    probes: dict[int, jax.Array]
    cache: Cache | None


class _LayerInputs(NamedTuple):
    """Arrays every decoder layer reads (one pytree so that remat sees them as plain inputs)."""

    cos: jax.Array  # [B, T, D_h] float32
    sin: jax.Array  # [B, T, D_h] float32
    allowed: jax.Array  # [B, T, S] bool; [B, T, T] in a prefill: attend the new tokens' own keys
    end_index: jax.Array  # int32 [] first cache slot written by this call
    image_positions: jax.Array | None  # [B, N_img] int32
    probe_queries: jax.Array | None  # [B, P] int32, the queries probes report (None: all)


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype: jnp.dtype | str = jnp.float32) -> Cache:
    """An empty KV cache of ``max_length`` slots per example (``end_index = 0``)."""
    shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_hidden_layers)]
    return {"layers": layers, "end_index": jnp.zeros((), jnp.int32)}


def positions_from_mask(attention_mask: jax.Array, start: int | jax.Array = 0, length: int | None = None) -> jax.Array:
    """RoPE positions as transformers' ``generate`` derives them: ``cumsum(mask) - 1``, pads at 1.

    Args:
      attention_mask: ``[B, S]`` key validity over the whole window.
      start, length: the window slice ``[start, start + length)`` holding the new tokens
        (``length=None``: the whole window).

    Returns:
      ``[B, length]`` int32.
    """
    attention_mask = attention_mask.astype(bool)
    positions = jnp.cumsum(attention_mask, axis=-1, dtype=jnp.int32) - 1
    positions = jnp.where(attention_mask, positions, 1)
    if length is None:
        return positions
    return jax.lax.dynamic_slice_in_dim(positions, start, length, axis=1)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[B, T, head_dim]`` float32, for RoPE at integer ``positions [B, T]``.

    Frequencies ``theta ** (-2i / head_dim)``, repeated over both halves (transformers' layout).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, heads, D_h]`` by ``cos, sin [B, T, D_h]`` (rotate-half convention)."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


def _linear(config: LlamaConfig, in_features: int, out_features: int, axes, *, use_bias: bool,
            rngs: nnx.Rngs) -> nnx.Linear:
    return partitioned_linear(
        in_features, out_features, axes, use_bias=use_bias, dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype), rngs=rngs,
    )


def _rms_norm(config: LlamaConfig, *, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        config.hidden_size,
        epsilon=config.rms_norm_eps,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        scale_init=logical(nnx.initializers.ones_init(), (None,)),
        rngs=rngs,
    )


class LlamaMLP(nnx.Module):
    """SwiGLU feed-forward: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        dim, hidden, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(config, dim, hidden, ("embed", "mlp"), use_bias=bias, rngs=rngs)
        self.up_proj = _linear(config, dim, hidden, ("embed", "mlp"), use_bias=bias, rngs=rngs)
        self.down_proj = _linear(config, hidden, dim, ("mlp", "embed"), use_bias=bias, rngs=rngs)
        self.activation = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D] -> [..., D]``."""
        return self.down_proj(activation(self.activation)(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE, an optional KV cache, probes and hooks."""

    def __init__(self, config: LlamaConfig, layer_index: int, *, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.layer_index = layer_index
        self.attention_impl = config.attention_impl
        self.compute_dtype = config.dtype
        dim, bias = config.hidden_size, config.attention_bias
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = _linear(config, dim, q_dim, ("embed", "heads"), use_bias=bias, rngs=rngs)
        self.k_proj = _linear(config, dim, kv_dim, ("embed", "kv_heads"), use_bias=bias, rngs=rngs)
        self.v_proj = _linear(config, dim, kv_dim, ("embed", "kv_heads"), use_bias=bias, rngs=rngs)
        self.o_proj = _linear(config, q_dim, dim, ("heads", "embed"), use_bias=bias, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        inputs: _LayerInputs,
        kv: dict | None,
        hooks: AttentionHooks | None,
        probe_form: str | None,
        query_rows: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None, dict | None]:
        """``x [B, T, D]`` -> ``(output [B, T', D], probe or None, updated kv or None)``.

        With ``kv`` (this layer's cache entry) the new keys/values are written at
        ``inputs.end_index`` and attention runs over the whole cache window. ``query_rows [B, P]``:
        keys and values of every token, queries (and so the output, ``T' = P``, and the probe) at
        these rows only.
        """
        batch, length, _ = x.shape
        key = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        value = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        key = apply_rope(key, inputs.cos, inputs.sin)
        allowed, probe_queries, causal_self = inputs.allowed, inputs.probe_queries, True
        cos, sin = inputs.cos, inputs.sin
        if query_rows is not None:
            rows = query_rows[..., None]
            x, cos, sin, allowed = (jnp.take_along_axis(a, rows, axis=1) for a in (x, cos, sin, allowed))
            probe_queries, causal_self = None, False  # every remaining query is reported
        query = self.q_proj(x).reshape(batch, x.shape[1], self.num_heads, self.head_dim)
        query = apply_rope(query, cos, sin)
        # [B, K, T, D_h]: the cache's layout, which the attention dots read without a transpose.
        key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
        if kv is not None:
            start = (0, 0, inputs.end_index, 0)
            kv = {
                "k": jax.lax.dynamic_update_slice(kv["k"], key.astype(kv["k"].dtype), start),
                "v": jax.lax.dynamic_update_slice(kv["v"], value.astype(kv["v"].dtype), start),
            }
            if inputs.allowed.shape[-1] != length:  # a prefill reads its own keys, not the empty cache's
                key, value = kv["k"].astype(query.dtype), kv["v"].astype(query.dtype)
        output, probe = attend(
            query,
            key,
            value,
            allowed,
            impl=resolve_attention_impl(self.attention_impl, self.compute_dtype),
            causal_self=causal_self and (kv is None or inputs.allowed.shape[-1] == length),
            probe_form=probe_form,
            probe_queries=probe_queries,
            image_positions=inputs.image_positions,
            hooks=hooks,
            layer_index=self.layer_index,
        )
        return self.o_proj(output.reshape(batch, x.shape[1], self.num_heads * self.head_dim)), probe, kv


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig, layer_index: int, *, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(config, layer_index, rngs=rngs)
        self.mlp = LlamaMLP(config, rngs=rngs)
        self.input_layernorm = _rms_norm(config, rngs=rngs)
        self.post_attention_layernorm = _rms_norm(config, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        inputs: _LayerInputs,
        kv: dict | None,
        hooks: AttentionHooks | None,
        probe_form: str | None,
        query_rows: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None, dict | None]:
        """``x [B, T, D]`` -> ``(x [B, T', D], probe or None, updated kv or None)``; ``T' = P`` with
        ``query_rows [B, P]`` (the block's output at those rows only; keys and values of every row)."""
        attended, probe, kv = self.self_attn(self.input_layernorm(x), inputs, kv, hooks, probe_form, query_rows)
        if query_rows is not None:
            x = jnp.take_along_axis(x, query_rows[..., None], axis=1)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), probe, kv


def _layer_runner(probe_form: str | None, remat: bool):
    """``run(layer, x, inputs, kv, hooks, query_rows)``; the static probe form is closed over so remat sees
    arrays only.

    Remat is ``jax.checkpoint`` of a pure function of the layer's state, not ``nnx.remat``: a decoder
    layer changes none of its variables, and ``nnx.remat`` writes them back after the call, which
    fails (``TraceContextError``) when the model was captured from an outer trace, as in the body of
    ``generate``'s ``while_loop``.
    """

    def run(layer: LlamaDecoderLayer, x, inputs, kv, hooks, query_rows):
        return layer(x, inputs, kv, hooks, probe_form, query_rows)

    if not remat:
        return run

    def rematerialised(layer: LlamaDecoderLayer, x, inputs, kv, hooks, query_rows):
        graphdef, state = nnx.split(layer)

        def pure(state, x, inputs, kv, hooks, query_rows):
            return nnx.merge(graphdef, state)(x, inputs, kv, hooks, probe_form, query_rows)

        return jax.checkpoint(pure)(state, x, inputs, kv, hooks, query_rows)

    return rematerialised


class LlamaModel(nnx.Module):
    """Token embedding, decoder layers and final norm (transformers' ``LlamaModel``)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=jnp.dtype(config.dtype),
            param_dtype=jnp.dtype(config.param_dtype),
            embedding_init=logical(nnx.initializers.normal(_EMBED_INIT_STD), ("vocab", "embed")),
            rngs=rngs,
        )
        self.layers = nnx.List([LlamaDecoderLayer(config, i, rngs=rngs) for i in range(config.num_hidden_layers)])
        self.norm = _rms_norm(config, rngs=rngs)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: Cache | None = None,
        probe: ProbeSpec | None = None,
        image_positions: jax.Array | None = None,
        hooks: AttentionHooks | None = None,
        output_hidden_states: bool = False,
        output_positions: jax.Array | None = None,
        prefill: bool = False,
    ) -> DecoderOutput:
        """Run the decoder on ``inputs_embeds [B, T, D]``.

        Args:
          positions: ``[B, T]`` int32 absolute RoPE positions of the new tokens; default
            ``positions_from_mask(attention_mask)`` over the new tokens' window slice.
          attention_mask: ``[B, S]`` bool key validity (``S = T`` without a cache, ``S_max`` with
            one: the mask covers the whole cache window); causality is added here. Default: all valid.
          cache: from ``init_cache`` or a previous call; keys/values go to slots
            ``[end_index, end_index + T)`` (the caller keeps ``end_index + T <= S_max``).
          probe: which layers return attention probes (``DecoderOutput.probes``).
          image_positions: ``[B, N_img]`` int32 key indices of the image tokens (cache slots when a
            cache is used); required by the ``"image"`` probe forms and by hooks.
          hooks: decode-time attention interventions for ``hooks.layers``.
          output_hidden_states: also return every layer's hidden states.
          output_positions: ``[B, P]`` int32 indices into the ``T`` new tokens: return
            ``last_hidden_state`` (hence logits) and the probes at these positions only (``"image_last"``
            probes still report the last token). Positions may repeat (e.g. padding a bucket).
          prefill: static; the ``cache`` is empty (``end_index`` 0, as from ``init_cache``): attention
            reads the new tokens' own keys (causal self-attention, by the configured implementation)
            instead of the whole cache window, and writes them to slots ``[0, T)``.
        """
        batch, length, _ = inputs_embeds.shape
        num_layers = self.config.num_hidden_layers
        probe = probe.resolve(num_layers) if probe is not None else ProbeSpec(layers=())
        hooks = hooks.resolve(num_layers) if hooks is not None else None
        if image_positions is None and (probe.needs_image_positions or hooks is not None):
            raise ValueError(f"image_positions [B, N_img] is required for probe {probe} and hooks {hooks}")
        window = length if cache is None else cache["layers"][0]["k"].shape[2]
        if length > window:
            raise ValueError(f"{length} new tokens do not fit a cache of {window} slots")
        end_index = jnp.zeros((), jnp.int32) if cache is None else cache["end_index"]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, window), bool)
        if attention_mask.shape != (batch, window):
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape}; expected [B, S] = {(batch, window)} "
                f"(S is the {'cache window' if cache is not None else 'sequence length'})"
            )
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(attention_mask, end_index, length)
        if prefill and cache is None:
            raise ValueError("prefill=True fills a cache; pass the empty cache (init_cache) to fill")
        query_slots = end_index + jnp.arange(length, dtype=jnp.int32)
        causal = jnp.arange(window, dtype=jnp.int32)[None, :] <= query_slots[:, None]
        if prefill:  # the slots after the new tokens are empty: only the first T keys exist
            causal, attention_mask = causal[:, :length], attention_mask[:, :length]
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        if output_positions is not None:
            output_positions = jnp.asarray(output_positions, jnp.int32)
            if output_positions.ndim != 2 or output_positions.shape[0] != batch:
                raise ValueError(f"output_positions has shape {output_positions.shape}; expected [B, P] with B={batch}")
        inputs = _LayerInputs(cos, sin, attention_mask[:, None, :] & causal[None], end_index, image_positions,
                              output_positions)

        x = inputs_embeds.astype(jnp.dtype(self.config.dtype))
        hidden_states, probes, new_layers = [], {}, []
        for index, layer in enumerate(self.layers):
            hidden_states.append(x)
            form = probe.form if index in probe.layers else None
            run = _layer_runner(form, self.config.remat)
            kv = None if cache is None else cache["layers"][index]
            layer_hooks = hooks if hooks is not None and index in hooks.layers else None
            # Only the kept positions of the last layer's output are read: its queries, attention
            # output and MLP run there (keys and values, which the cache keeps, for every token).
            # Not under hooks or an "image_last" probe, which are defined on every query.
            query_rows = None
            if index == num_layers - 1 and layer_hooks is None and form != "image_last":
                query_rows = output_positions
            with jax.named_scope(f"decoder_layer_{index}"):
                x, layer_probe, kv = run(layer, x, inputs, kv, layer_hooks, query_rows)
            new_layers.append(kv)
            if layer_probe is not None:
                probes[index] = layer_probe
        if output_positions is not None and query_rows is None:
            x = jnp.take_along_axis(x, output_positions[..., None], axis=1)
        with jax.named_scope("final_norm"):
            x = self.norm(x)
        new_cache = None if cache is None else {"layers": new_layers, "end_index": end_index + length}
        hidden = tuple(hidden_states) + (x,) if output_hidden_states else None
        return DecoderOutput(x, hidden, probes, new_cache)


class LlamaForCausalLM(nnx.Module):
    """``LlamaModel`` plus the LM head (``lm_head``; absent when ``tie_word_embeddings``)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, config.hidden_size, config.vocab_size, ("embed", "vocab"), use_bias=False,
                                   rngs=rngs)

    def __call__(self, input_ids: jax.Array, **kwargs) -> tuple[jax.Array, DecoderOutput]:
        """``input_ids [B, T]`` -> ``(logits [B, T, V] float32, DecoderOutput)``.

        Keywords are those of ``LlamaModel.__call__``; with ``output_positions [B, P]`` the logits
        are ``[B, P, V]``.
        """
        output = self.model(self.model.embed_tokens(input_ids), **kwargs)
        return self.logits(output.last_hidden_state), output

    def lm_head_table(self) -> jax.Array:
        """The LM head as ``[D, V]`` (the embedding table, transposed, when tied)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [..., D]`` (after the final norm) -> float32 logits ``[..., V]``."""
        return head_logits(hidden.astype(jnp.dtype(self.config.dtype)), self.lm_head_table())
