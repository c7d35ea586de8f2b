"""Building blocks shared by every model: activations by transformers' names, and linear and norm
layers whose parameters carry logical axis names (see ``partitioning``)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mmpo_jax.models.partitioning import logical

Array = jax.Array


def quick_gelu(x: Array) -> Array:
    """CLIP's activation `x * sigmoid(1.702 x)` (transformers' `QuickGELUActivation`)."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names for the activations CLIP checkpoints use.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function transformers calls `name`; `ValueError` for an unknown name."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def partitioned_linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """An `nnx.Linear` with kernel `[in, out]` named `axes` and bias named `(axes[1],)`."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(nnx.initializers.lecun_normal(), axes),
        bias_init=logical(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def partitioned_layer_norm(
    num_features: int, *, epsilon: float, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
) -> nnx.LayerNorm:
    """A torch-style LayerNorm (two-pass variance) over the `embed` axis."""
    return nnx.LayerNorm(
        num_features,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        # E[(x-mean)^2], as torch; E[x^2]-mean^2 loses digits when the mean is large.
        use_fast_variance=False,
        scale_init=logical(nnx.initializers.ones_init(), ("embed",)),
        bias_init=logical(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs,
    )


def head_logits(hidden: Array, table: Array) -> Array:
    """An LM head: ``hidden [..., D] @ table [D, V]`` -> float32 logits ``[..., V]``.

    Multiplies in ``hidden``'s dtype (the compute dtype) with float32 accumulation and output: a
    log-softmax downstream needs the logits' low bits.
    """
    return jnp.einsum("...d,dv->...v", hidden, table.astype(hidden.dtype), preferred_element_type=jnp.float32)
