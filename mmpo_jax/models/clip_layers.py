"""The pre-LayerNorm transformer encoder shared by CLIP's vision and text towers.

Module and attribute names follow transformers' `CLIPEncoder`
(`layers[i].self_attn.{q,k,v,out}_proj`, `layer_norm1`, `mlp.{fc1, fc2}`, `layer_norm2`) so that
checkpoint conversion maps names, not structures. Linear kernels are stored `[in, out]`. Every
parameter carries logical axis names from the project vocabulary (`embed`, `mlp`, `heads`,
`vocab`, `None`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mmpo_jax.models.layers import activation, partitioned_layer_norm, partitioned_linear

Array = jax.Array


class CLIPAttention(nnx.Module):
    """Multi-head self-attention, biased q/k/v/out projections, fused `dot_product_attention`."""

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by "
                f"num_attention_heads={num_attention_heads}"
            )
        self.num_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = partitioned_linear(hidden_size, hidden_size, ("embed", "heads"), **kwargs)
        self.k_proj = partitioned_linear(hidden_size, hidden_size, ("embed", "heads"), **kwargs)
        self.v_proj = partitioned_linear(hidden_size, hidden_size, ("embed", "heads"), **kwargs)
        self.out_proj = partitioned_linear(hidden_size, hidden_size, ("heads", "embed"), **kwargs)

    def __call__(self, hidden: Array, key_mask: Array | None, is_causal: bool) -> Array:
        """hidden [B, T, D]; key_mask [B, T] bool (True = attend) or None -> [B, T, D]."""
        batch, length, _ = hidden.shape
        split = (batch, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden).reshape(split)
        key = self.k_proj(hidden).reshape(split)
        value = self.v_proj(hidden).reshape(split)
        # [B, 1, 1, T_kv], broadcast over heads and queries.
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal)
        return self.out_proj(attended.reshape(batch, length, -1))


class CLIPMLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.activation = activation(hidden_act)
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = partitioned_linear(hidden_size, intermediate_size, ("embed", "mlp"), **kwargs)
        self.fc2 = partitioned_linear(intermediate_size, hidden_size, ("mlp", "embed"), **kwargs)

    def __call__(self, hidden: Array) -> Array:
        """hidden [..., D] -> [..., D]."""
        return self.fc2(self.activation(self.fc1(hidden)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_attention_heads: int,
        hidden_act: str,
        layer_norm_eps: float,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(hidden_size, num_attention_heads, **kwargs)
        self.layer_norm1 = partitioned_layer_norm(hidden_size, epsilon=layer_norm_eps, **kwargs)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act, **kwargs)
        self.layer_norm2 = partitioned_layer_norm(hidden_size, epsilon=layer_norm_eps, **kwargs)

    def __call__(self, hidden: Array, key_mask: Array | None, is_causal: bool) -> Array:
        """hidden [B, T, D]; key_mask [B, T] bool or None -> [B, T, D]."""
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), key_mask, is_causal)
        return hidden + self.mlp(self.layer_norm2(hidden))


def _apply_layer(
    layer: CLIPEncoderLayer, hidden: Array, key_mask: Array | None, is_causal: bool
) -> Array:
    return layer(hidden, key_mask, is_causal)


_apply_layer_remat = nnx.remat(_apply_layer, static_argnums=(3,))


class CLIPEncoder(nnx.Module):
    """A stack of `CLIPEncoderLayer`s in `layers`; optionally rematerialises each layer."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        hidden_act: str,
        layer_norm_eps: float,
        *,
        remat: bool = False,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.remat = remat
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(
                    hidden_size,
                    intermediate_size,
                    num_attention_heads,
                    hidden_act,
                    layer_norm_eps,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for _ in range(num_hidden_layers)
            ]
        )

    def __call__(
        self, hidden: Array, *, key_mask: Array | None = None, is_causal: bool = False
    ) -> tuple[Array, ...]:
        """hidden [B, T, D] -> the L+1 hidden states: the input, then each layer's output."""
        apply = _apply_layer_remat if self.remat else _apply_layer
        states = [hidden]
        for layer in self.layers:
            hidden = apply(layer, hidden, key_mask, is_causal)
            states.append(hidden)
        return tuple(states)
