"""Attention that reports its weights on request (probes) and accepts decode-time interventions (hooks).

Two paths compute the same function:

* fused — ``jax.nn.dot_product_attention``, for layers that are neither probed nor hooked; the
  platform picks its fastest kernel (cuDNN flash attention on GPU where the dtypes allow);
* explicit — logits, float32 softmax, ``probs @ V`` spelled out, for a probed or hooked layer. It
  materialises that one layer's ``[B, H, T, S]`` probabilities transiently and returns only the
  requested probe (gathered to the image key columns inside the layer for the ``"image"`` forms).

Shapes: ``B`` batch, ``T`` queries, ``S`` keys (``T`` without a cache, the cache window with one),
``H`` query heads, ``K`` key/value heads (``H % K == 0``, grouped-query attention; query head ``h``
reads key/value head ``h // (H // K)``, as transformers' ``repeat_kv``), ``D`` head dim, ``N``
image keys.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PROBE_FORMS = ("image", "image_last", "image_heads", "full")
"""``"image"``: head-mean probabilities query -> image keys ``[B, T, N]``; ``"image_last"``: the
same for the last query only, ``[B, 1, N]`` (what a decode loop reads of its prefill, without
keeping ``T`` rows per layer); ``"image_heads"``: ``[B, H, T, N]``; ``"full"``: ``[B, H, T, S]``
(tests, debugging)."""

# Masked logits get a large finite negative (as jax.nn.dot_product_attention does), so a query with
# no visible key (a left-pad position) gets a uniform row instead of NaNs, and gradients stay finite.
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)

PostSoftmaxEdit = Callable[[jax.Array, jax.Array, int], jax.Array]
"""``edit(probs [B, H, T, S] float32, key_is_image [B, S] bool, layer_index) -> probs [B, H, T, S]``."""


def resolve_layer_indices(layers: tuple[int, ...], num_layers: int, what: str) -> tuple[int, ...]:
    """Sorted, de-duplicated, non-negative layer indices; negative ones count from the end.

    Raises ``ValueError`` naming the index and the valid range when one is out of range.
    """
    resolved = set()
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"{what} layer index {index!r} is not an int")
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"{what} layer index {index} is out of range for a decoder with {num_layers} layers; "
                f"valid indices are {-num_layers}..{num_layers - 1}"
            )
        resolved.add(int(index) % num_layers)
    return tuple(sorted(resolved))


@struct.dataclass
class ProbeSpec:
    """Which decoder layers return attention weights, and in what form.

    A frozen dataclass with no array leaves: it can be passed straight through ``jax.jit`` (its
    fields live in the pytree structure, so they are static).

    Attributes:
      layers: decoder layer indices; negative indices count from the last layer.
      form: one of ``PROBE_FORMS``.
    """

    layers: tuple[int, ...] = struct.field(pytree_node=False)
    form: str = struct.field(pytree_node=False, default="image")

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.form not in PROBE_FORMS:
            raise ValueError(f"probe form {self.form!r} is not one of {PROBE_FORMS}")

    def resolve(self, num_layers: int) -> ProbeSpec:
        """The same spec with validated, sorted, non-negative layer indices."""
        return self.replace(layers=resolve_layer_indices(self.layers, num_layers, "probe"))

    @property
    def needs_image_positions(self) -> bool:
        return self.form != "full" and bool(self.layers)


@struct.dataclass
class AttentionHooks:
    """Decode-time interventions on the attention of some layers (ADAPT plugs in here).

    Arrays are pytree leaves; ``layers`` and the callable are static.

    Attributes:
      layers: decoder layers the hooks apply to (negative indices count from the end).
      image_logit_bias: added to the pre-softmax logits of the image keys; any shape broadcastable to
        ``[B, H, T, N]`` (commonly ``[B, 1, 1, N]``).
      post_softmax_edit: ``edit(probs [B, H, T, S], key_is_image [B, S] bool, layer_index)``
        returning probabilities of the same shape; runs after the softmax and before ``probs @ V``
        and must keep every row a distribution.
    """

    layers: tuple[int, ...] = struct.field(pytree_node=False)
    image_logit_bias: jax.Array | None = None
    post_softmax_edit: PostSoftmaxEdit | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))

    def resolve(self, num_layers: int) -> AttentionHooks:
        """The same hooks with validated, sorted, non-negative layer indices."""
        return self.replace(layers=resolve_layer_indices(self.layers, num_layers, "hook"))


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    allowed: jax.Array,
    *,
    probe_form: str | None = None,
    image_positions: jax.Array | None = None,
    hooks: AttentionHooks | None = None,
    layer_index: int = 0,
) -> tuple[jax.Array, jax.Array | None]:
    """Scaled dot-product attention (scale ``D ** -0.5``), optionally probed and/or hooked.

    Args:
      query: ``[B, T, H, D]``.
      key, value: ``[B, S, K, D]``, same dtype as ``query``.
      allowed: ``[B, T, S]`` bool, True where query ``t`` may attend key ``s`` (causality and key
        validity already combined).
      probe_form: None (no probe) or one of ``PROBE_FORMS``.
      image_positions: ``[B, N]`` int32 key indices of the image tokens; needed by the ``"image"``
        forms and by hooks.
      hooks: applied to this call when given (the caller selects the hooked layers).
      layer_index: passed to ``hooks.post_softmax_edit``.

    Returns:
      ``(output [B, T, H, D], probe)``; probe is None without ``probe_form``, else ``[B, T, N]``,
      ``[B, H, T, N]`` or ``[B, H, T, S]`` float32 post-softmax probabilities (after the hooks,
      i.e. the weights the layer actually used).
    """
    if probe_form is None and hooks is None:
        return jax.nn.dot_product_attention(query, key, value, mask=allowed[:, None]), None
    if probe_form is not None and probe_form not in PROBE_FORMS:
        raise ValueError(f"probe form {probe_form!r} is not one of {PROBE_FORMS}")
    if image_positions is None and (hooks is not None or probe_form in ("image", "image_heads")):
        raise ValueError(
            f"image_positions [B, N_img] is required for probe form {probe_form!r} and for hooks"
        )
    probs = attention_probabilities(query, key, allowed, image_positions=image_positions, hooks=hooks)
    if hooks is not None and hooks.post_softmax_edit is not None:
        probs = hooks.post_softmax_edit(probs, key_is_image(image_positions, key.shape[1]), layer_index)
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    grouped = probs.reshape(batch, kv_heads, heads // kv_heads, q_len, key.shape[1])
    output = jnp.einsum("bkgts,bskd->btkgd", grouped.astype(value.dtype), value)
    output = output.reshape(batch, q_len, heads, head_dim)
    return output, _probe(probs, probe_form, image_positions)


def attention_probabilities(
    query: jax.Array,
    key: jax.Array,
    allowed: jax.Array,
    *,
    image_positions: jax.Array | None = None,
    hooks: AttentionHooks | None = None,
) -> jax.Array:
    """Float32 softmax over all keys of the scaled logits, plus ``hooks.image_logit_bias`` if set.

    Shapes as in ``attend``; returns ``[B, H, T, S]`` float32.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    grouped_query = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", grouped_query, key, preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, heads, q_len, key.shape[1]) * jnp.float32(head_dim**-0.5)
    if hooks is not None and hooks.image_logit_bias is not None:
        logits = logits + _scatter_image_bias(hooks.image_logit_bias, image_positions, logits.shape)
    logits = jnp.where(allowed[:, None], logits, _MASKED_LOGIT)
    return jax.nn.softmax(logits, axis=-1)


def key_is_image(image_positions: jax.Array, num_keys: int) -> jax.Array:
    """``[B, S]`` bool, True at the key indices listed in ``image_positions [B, N]``."""
    batch = image_positions.shape[0]
    rows = jnp.arange(batch)[:, None]
    return jnp.zeros((batch, num_keys), bool).at[rows, image_positions].set(True)


def _scatter_image_bias(bias: jax.Array, image_positions: jax.Array, logits_shape) -> jax.Array:
    """Bias broadcastable to ``[B, H, T, N]`` -> ``[B, H or 1, T or 1, S]``, zero off the image keys."""
    batch, heads, q_len, num_keys = logits_shape
    target = (batch, heads, q_len, image_positions.shape[1])
    bias = jnp.asarray(bias, jnp.float32)
    try:
        if bias.ndim > 4 or jnp.broadcast_shapes(bias.shape, target) != target:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"image_logit_bias of shape {bias.shape} does not broadcast to [B, H, T_q, N_img] = {target}"
        ) from None
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    bias = jnp.broadcast_to(bias, (batch, *bias.shape[1:3], target[3]))
    # Advanced indices on axes (0, 1) of [B, S, h, t] take updates shaped [B, N, h, t].
    rows = jnp.arange(batch)[:, None]
    scattered = jnp.zeros((batch, num_keys, *bias.shape[1:3]), jnp.float32)
    scattered = scattered.at[rows, image_positions].add(jnp.moveaxis(bias, -1, 1))
    return jnp.moveaxis(scattered, 1, -1)


def _probe(probs: jax.Array, form: str | None, image_positions: jax.Array | None) -> jax.Array | None:
    if form is None:
        return None
    if form == "full":
        return probs
    if form == "image_last":
        probs = probs[:, :, -1:]
    image_columns = jnp.take_along_axis(probs, image_positions[:, None, None, :], axis=-1)
    return image_columns if form == "image_heads" else jnp.mean(image_columns, axis=1)
