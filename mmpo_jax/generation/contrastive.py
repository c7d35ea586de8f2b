"""Contrastive amplification decoding (VCD-style; P2-DPO's robustness pairs, METHODS.md §5).

At every step the expert (the model on the clean image) and the amateur (the same model on a noisy
image of the same prompt) give next-token logits, and tokens are chosen from

    l = (1 + alpha) l_clean - alpha l_noisy   on the plausible head  l_clean >= log(b) + max l_clean,
    -inf elsewhere,

then greedily or by temperature + top-p sampling (`sampling.select_tokens`). Both come from ONE
batched forward per step: the decode loop runs `2B` rows (`[:B]` clean, `[B:]` noisy, see
`decode.RowGroups`) and feeds the chosen token to both halves, so the two KV caches advance alike.

Logits or log-probabilities: the reference (VCD's `vcd_sample.py`, "version 2" of its cutoff,
which METHODS.md §5's formula transcribes) uses raw logits for the combination and the cutoff.
Both are invariant to the per-row shift between logits and log-softmax: `l - max l >= log b` is
exactly `p >= b max p` (VCD's "version 1", on probabilities), and shifting `l_clean` and
`l_noisy` by constants shifts `l` by a constant, which changes neither its softmax nor its argmax.
So raw logits are used, as there, without a log-softmax per step. Only a logits processor (applied
after the restriction, as VCD applies transformers' processors) sees the difference, and it sees
VCD's values.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mmpo_jax.generation.decode import GenerationOutput, RowGroups, generate
from mmpo_jax.generation.sampling import LogitsProcessor
from mmpo_jax.models.llava import Llava


def contrastive_logits(
    clean_logits: jax.Array, noisy_logits: jax.Array, *, alpha: float | jax.Array, plausibility: float | jax.Array
) -> jax.Array:
    """`(1 + alpha) l_clean - alpha l_noisy` on the plausible head of the clean logits, -inf elsewhere.

    Args:
      clean_logits, noisy_logits: `[B, V]` float32 next-token logits (expert, amateur).
      alpha: amplification strength `a` (0 gives `l_clean` on the head).
      plausibility: `b` in [0, 1]; a token is plausible when `l_clean >= log(b) + max l_clean`,
        i.e. `p_clean >= b * max p_clean` (`b = 0` keeps every token, `b = 1` the argmax and ties).

    Returns:
      `[B, V]` float32.
    """
    clean_logits = jnp.asarray(clean_logits, jnp.float32)
    noisy_logits = jnp.asarray(noisy_logits, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    cutoff = jnp.log(jnp.asarray(plausibility, jnp.float32)) + jnp.max(clean_logits, axis=-1, keepdims=True)
    combined = (1.0 + alpha) * clean_logits - alpha * noisy_logits
    return jnp.where(clean_logits >= cutoff, combined, -jnp.inf)


@struct.dataclass
class ContrastiveRows(RowGroups):
    """Two row groups, clean `[:B]` and noisy `[B:]`, combined by `contrastive_logits`.

    `alpha` and `plausibility` are traced (new values do not recompile).
    """

    alpha: jax.Array = 0.1
    plausibility: jax.Array = 0.1
    groups: int = struct.field(pytree_node=False, default=2)

    def combine(self, logits: jax.Array) -> jax.Array:
        """`[2B, V]` -> `[B, V]`."""
        clean, noisy = jnp.split(logits, 2, axis=0)
        return contrastive_logits(clean, noisy, alpha=self.alpha, plausibility=self.plausibility)


def contrastive_generate(
    model: Llava,
    input_ids: jax.Array,
    pixel_values: jax.Array,
    noisy_pixel_values: jax.Array,
    *,
    attention_mask: jax.Array,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    alpha: float = 0.1,
    plausibility: float = 0.1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    logits_processor: LogitsProcessor | None = None,
) -> GenerationOutput:
    """Contrastive amplification decoding of left-padded prompts against noisy images.

    Args:
      model: the `Llava` (expert and amateur alike).
      input_ids: `[B, T]` left-padded prompts with image placeholders, as for `generate`.
      pixel_values: `[N_images, H, W, 3]` the clean images (in order of appearance over the batch).
      noisy_pixel_values: the same shape, the noisy images at the same places.
      attention_mask: `[B, T]`, zeros only on the left.
      max_new_tokens, eos_token_id, pad_token_id: as `generate`.
      alpha: amplification `a` (METHODS.md: 0.1); `alpha = 0` is plain decoding on the head.
      plausibility: `b` in [0, 1] (0.1).
      temperature: 0 greedy; > 0 sampling (P2-DPO: 0.2) with `top_p` (0.9) and `rng`.
      logits_processor: applied to the combined, head-restricted logits before selection.

    Returns:
      a `GenerationOutput` of `B` rows; `token_logps` are log-probabilities under the combined
      distribution the token was chosen from (restricted, processed; tempered and top-p filtered
      when sampling).

    One batched forward of `2B` rows per step; compiles once per shapes and static options (new
    alpha, plausibility, prompts, images or keys do not recompile).
    """
    pixel_values = jnp.asarray(pixel_values)
    noisy_pixel_values = jnp.asarray(noisy_pixel_values)
    if pixel_values.shape != noisy_pixel_values.shape:
        raise ValueError(
            f"noisy_pixel_values has shape {noisy_pixel_values.shape}; expected pixel_values' shape "
            f"{pixel_values.shape} (one noisy image per clean image)"
        )
    if not 0 <= plausibility <= 1:
        raise ValueError(f"plausibility must lie in [0, 1] (p_clean >= b * max p_clean); got {plausibility}")
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite; got {alpha}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected input_ids' shape {input_ids.shape}")
    return generate(
        model,
        jnp.concatenate([input_ids, input_ids], axis=0),
        jnp.concatenate([pixel_values, noisy_pixel_values], axis=0),
        attention_mask=jnp.concatenate([attention_mask, attention_mask], axis=0),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        temperature=temperature,
        top_p=top_p,
        rng=rng,
        logits_processor=logits_processor,
        row_groups=ContrastiveRows(alpha=jnp.float32(alpha), plausibility=jnp.float32(plausibility)),
    )
