"""Attention that reports its weights on request (probes) and accepts decode-time interventions (hooks).

The output of a layer that is neither probed nor hooked comes from one of ``ATTENTION_IMPLS``
(``LlamaConfig.attention_impl``; ``"auto"`` picks per platform, ``resolve_attention_impl``):

* ``"einsum"`` — logits, float32 softmax and ``probs @ V`` written out over keys/values in the KV
  cache's ``[B, K, S, D]`` layout, which XLA's dots read in place (no cache-sized transposes);
* ``"chunked"`` — the einsum form over blocks of ``ATTENTION_CHUNK`` queries, block ``[a, e)``
  reading keys ``[0, e)`` only when the call is causal self-attention (no cache, or a prefill that
  reads its own keys): about half the
  logits and softmax of a long sequence are skipped and each block's logits stay small;
* ``"xla"`` / ``"cudnn"`` — ``jax.nn.dot_product_attention`` with that implementation (cuDNN's
  flash attention on GPU, bfloat16 / float16 only).

Every implementation computes only causal self-attention (a forward without cache, or a prefill
reading its own keys) its own way; reading a KV cache (decode steps) or a few selected queries, all
use the einsum form: ``jax.nn.dot_product_attention`` would swap the cache's axes to its
``[B, S, K, D]`` layout, a cache-sized copy per decode step.

[our choice] ``"auto"`` on CPU is ``"chunked"``: measured by ``scripts/bench_attention.py`` at
B 4, T 700, 8 heads of 64 (d 512), causal and left-padded, float32, on a shared 2-core CPU, it took
0.30 s forward and 0.64 s forward + backward (wall, load ~11) against 0.38 / 1.08 s for
``jax.nn.dot_product_attention``'s XLA form and 0.56 / 1.00 s for the unchunked einsum form; in
process CPU time 0.14 / 0.32 s against 0.20 / 0.52 s for XLA's. On GPU the cuDNN kernel where the
dtype allows it (flash attention, no ``[B, H, T, S]`` in memory), XLA otherwise and on TPU. Not
measured on an accelerator here (none was available).

A probed or hooked layer uses the explicit path: a hooked one (decode-time interventions) computes
every query's ``[B, H, T, S]`` probabilities, edits them and multiplies them by ``V``; a probed one
whose probe reads a few queries (``"image_last"``, or ``probe_queries`` from the model's
``output_positions``) computes its output by the fast implementation and the probabilities of the
probed query rows only; a probe of every query computes the probabilities once for both. Each
returns only the requested probe (gathered to the image key columns inside the layer for the
``"image"`` forms).

Shapes: ``B`` batch, ``T`` queries, ``S`` keys (``T`` without a cache, the cache window with one),
``H`` query heads, ``K`` key/value heads (``H % K == 0``, grouped-query attention; query head ``h``
reads key/value head ``h // (H // K)``, as transformers' ``repeat_kv``), ``D`` head dim, ``N``
image keys, ``Q`` probed queries.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

ATTENTION_IMPLS = ("auto", "einsum", "chunked", "xla", "cudnn")
ATTENTION_CHUNK = 128
"""Queries per block of the ``"chunked"`` implementation."""

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


def resolve_attention_impl(impl: str, dtype: jnp.dtype | str, platform: str | None = None) -> str:
    """The implementation ``impl`` stands for on ``platform`` (default: JAX's default backend).

    ``"auto"`` is ``"cudnn"`` on GPU for half-precision compute (cuDNN's flash attention takes
    bfloat16 / float16 only), ``"xla"`` on GPU in float32 and on TPU, and ``"chunked"`` on CPU (see
    the module docstring for the measurement behind each choice); an explicit name is returned as is.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    platform = jax.default_backend() if platform is None else platform
    if platform in ("gpu", "cuda", "rocm"):
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and platform != "rocm" else "xla"
    return "chunked" if platform == "cpu" else "xla"


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    allowed: jax.Array,
    *,
    impl: str = "einsum",
    causal_self: bool = False,
    probe_form: str | None = None,
    probe_queries: jax.Array | None = None,
    image_positions: jax.Array | None = None,
    hooks: AttentionHooks | None = None,
    layer_index: int = 0,
) -> tuple[jax.Array, jax.Array | None]:
    """Scaled dot-product attention (scale ``D ** -0.5``), optionally probed and/or hooked.

    Args:
      query: ``[B, T, H, D]``.
      key, value: ``[B, K, S, D]`` (the KV cache's layout), same dtype as ``query``.
      allowed: ``[B, T, S]`` bool, True where query ``t`` may attend key ``s`` (causality and key
        validity already combined).
      impl: a resolved name from ``ATTENTION_IMPLS`` (not ``"auto"``) for the output of an unhooked
        call; a hooked call always uses the explicit form.
      causal_self: static; True when ``S == T``, key ``s`` is query ``s``'s own token and ``allowed``
        includes causality (a forward without cache, or a prefill). Only such calls use ``impl``
        (``"chunked"`` then skips the keys after each query block); others use the einsum form.
      probe_form: None (no probe) or one of ``PROBE_FORMS``.
      probe_queries: ``[B, Q]`` int32 query indices the probe reports (forms ``"image"``,
        ``"image_heads"``, ``"full"``); None reports every query. Ignored by ``"image_last"``, which
        reports query ``T - 1``.
      image_positions: ``[B, N]`` int32 key indices of the image tokens; needed by the ``"image"``
        forms and by hooks.
      hooks: applied to this call when given (the caller selects the hooked layers).
      layer_index: passed to ``hooks.post_softmax_edit``.

    Returns:
      ``(output [B, T, H, D], probe)``; probe is None without ``probe_form``, else ``[B, T', N]``,
      ``[B, H, T', N]`` or ``[B, H, T', S]`` float32 post-softmax probabilities (after the hooks,
      i.e. the weights the layer actually used), ``T'`` being ``T``, ``Q`` or 1 (see above).
    """
    if probe_form is not None and probe_form not in PROBE_FORMS:
        raise ValueError(f"probe form {probe_form!r} is not one of {PROBE_FORMS}")
    if image_positions is None and (hooks is not None or probe_form in ("image", "image_last", "image_heads")):
        raise ValueError(
            f"image_positions [B, N_img] is required for probe form {probe_form!r} and for hooks"
        )
    if query.shape[2] % key.shape[1]:
        raise ValueError(f"{query.shape[2]} query heads are not a multiple of {key.shape[1]} key/value heads")
    if probe_form == "image_last":
        probe_queries = jnp.full((query.shape[0], 1), query.shape[1] - 1, jnp.int32)
    if hooks is not None or (probe_form is not None and probe_queries is None):
        # Every query's probabilities are needed: one explicit pass gives the output and the probe.
        probs = attention_probabilities(query, key, allowed, image_positions=image_positions, hooks=hooks)
        if hooks is not None and hooks.post_softmax_edit is not None:
            probs = hooks.post_softmax_edit(probs, key_is_image(image_positions, key.shape[2]), layer_index)
        if probe_queries is not None:
            probe = _probe(_take_queries(probs, probe_queries), probe_form, image_positions)
        else:
            probe = _probe(probs, probe_form, image_positions)
        return _weighted_values(probs, value, query.shape), probe
    output = _fast_attention(query, key, value, allowed, impl, causal_self)
    if probe_form is None:
        return output, None
    # The probe reads a few query rows: only those rows' probabilities are computed.
    rows = probe_queries[:, :, None]
    probs = attention_probabilities(
        jnp.take_along_axis(query, rows[..., None], axis=1),
        key,
        jnp.take_along_axis(allowed, rows, axis=1),
    )
    return output, _probe(probs, probe_form, image_positions)


def _take_queries(probs: jax.Array, queries: jax.Array) -> jax.Array:
    """``probs [B, H, T, S]``, ``queries [B, Q]`` -> ``[B, H, Q, S]``."""
    return jnp.take_along_axis(probs, queries[:, None, :, None], axis=2)


def _weighted_values(probs: jax.Array, value: jax.Array, query_shape) -> jax.Array:
    """``probs [B, H, T, S]`` float32 @ ``value [B, K, S, D]`` -> ``[B, T, H, D]`` in value's dtype."""
    batch, q_len, heads, head_dim = query_shape
    kv_heads = value.shape[1]
    grouped = probs.reshape(batch, kv_heads, heads // kv_heads, q_len, value.shape[2])
    output = jnp.einsum("bkgts,bksd->btkgd", grouped.astype(value.dtype), value)
    return output.reshape(batch, q_len, heads, head_dim)


def _fast_attention(query, key, value, allowed, impl: str, causal_self: bool) -> jax.Array:
    """The output of unprobed, unhooked attention by ``impl``: ``[B, T, H, D]``."""
    if impl not in ATTENTION_IMPLS[1:]:
        raise ValueError(f"attention impl {impl!r} is not a resolved one of {ATTENTION_IMPLS[1:]}")
    if impl in ("xla", "cudnn") and causal_self:
        # jax.nn.dot_product_attention takes [B, S, K, D]: these swaps cancel the caller's. Reading a
        # cache they would copy it, which the einsum form below reads in place.
        return jax.nn.dot_product_attention(
            query, jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2), mask=allowed[:, None],
            implementation=impl,
        )
    if impl == "chunked" and causal_self and query.shape[1] > ATTENTION_CHUNK:
        # Query block [a, e) sees keys [0, e) only (causality): the blocks skip about half the
        # logits, softmax and value products, and each block's [B, H, c, e] logits stay small.
        blocks = []
        for begin in range(0, query.shape[1], ATTENTION_CHUNK):
            end = min(begin + ATTENTION_CHUNK, query.shape[1])
            blocks.append(_einsum_attention(
                query[:, begin:end], key[:, :, :end], value[:, :, :end], allowed[:, begin:end, :end]))
        return jnp.concatenate(blocks, axis=1)
    return _einsum_attention(query, key, value, allowed)


def _einsum_attention(query, key, value, allowed) -> jax.Array:
    return _weighted_values(attention_probabilities(query, key, allowed), value, query.shape)


def attention_probabilities(
    query: jax.Array,
    key: jax.Array,
    allowed: jax.Array,
    *,
    image_positions: jax.Array | None = None,
    hooks: AttentionHooks | None = None,
) -> jax.Array:
    """Float32 softmax over all keys of the scaled logits, plus ``hooks.image_logit_bias`` if set.

    ``query [B, T, H, D]``, ``key [B, K, S, D]``, ``allowed [B, T, S]``; returns ``[B, H, T, S]``
    float32.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    grouped_query = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("btkgd,bksd->bkgts", grouped_query, key, preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, heads, q_len, key.shape[2]) * jnp.float32(head_dim**-0.5)
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
    """The probe of ``form`` from the probabilities ``[B, H, T', S]`` of the reported queries."""
    if form is None:
        return None
    if form == "full":
        return probs
    if form == "image_last" and probs.shape[2] > 1:
        probs = probs[:, :, -1:]
    image_columns = jnp.take_along_axis(probs, image_positions[:, None, None, :], axis=-1)
    return image_columns if form == "image_heads" else jnp.mean(image_columns, axis=1)
