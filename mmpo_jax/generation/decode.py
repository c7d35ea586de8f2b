"""KV-cache generation for `Llava`: one prefill, then one jitted `while_loop` over decode steps.

`generate` is transformers' `generate` for left-padded prompts (greedy or temperature / top-p
sampling, EOS handling, `pad_token_id` after EOS), written as a single jitted program: the prompt
and its images go through the model once, filling a KV cache of `T + max_new_tokens - 1` slots, and
a `jax.lax.while_loop` feeds one token per step until `max_new_tokens` or until every row has
emitted EOS. RoPE positions come from the attention mask (`cumsum(mask) - 1`, left pads at 1), as
transformers derives them. It compiles once per input shapes and static options (`max_new_tokens`,
greedy vs sampling, whether top-p filters, the processor's and hooks' static structure); the rng,
prompts, images, temperature, top-p, EOS and pad ids are traced.

Shapes: `B` batch, `T` prompt length, `M` `max_new_tokens`, `S = T + M - 1` cache window.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mmpo_jax.generation.sampling import LogitsProcessor, PromptInputs, StepInputs, select_tokens
from mmpo_jax.models.attention import AttentionHooks
from mmpo_jax.models.llama import init_cache
from mmpo_jax.models.llava import Llava


@struct.dataclass
class GenerationOutput:
    """What `generate` returns (all int32 but `token_logps`).

    Attributes:
      sequences: `[B, T + M]`, the prompts followed by the new tokens.
      new_tokens: `[B, M]`; `pad_token_id` after a row's EOS (and in steps skipped once every row
        had finished).
      lengths: `[B]`, new tokens up to and including the first EOS (`M` for a row without EOS).
      token_logps: `[B, M]` float32, each chosen token's log-probability under the distribution it
        was chosen from (after the processors; with sampling also after temperature and top-p); 0
        after EOS.
    """

    sequences: jax.Array
    new_tokens: jax.Array
    lengths: jax.Array
    token_logps: jax.Array


@struct.dataclass
class _Settings:
    """Traced scalars and ids of one `generate` call (new values never recompile)."""

    eos_token_ids: jax.Array  # [K] int32, K may be 0
    pad_token_id: jax.Array  # int32 []
    temperature: jax.Array  # float32 []
    top_p: jax.Array  # float32 []


@struct.dataclass
class _Carry:
    """The `while_loop` state."""

    step: jax.Array  # int32 [], index of the token chosen next
    last_tokens: jax.Array  # [B] int32, the tokens chosen at step - 1
    new_tokens: jax.Array  # [B, M] int32
    token_logps: jax.Array  # [B, M] float32
    finished: jax.Array  # [B] bool, the row has emitted EOS
    lengths: jax.Array  # [B] int32
    cache: dict
    processor_state: object


def generate(
    model: Llava,
    input_ids: jax.Array,
    pixel_values: jax.Array | None = None,
    *,
    attention_mask: jax.Array | None = None,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    logits_processor: LogitsProcessor | None = None,
    hooks: AttentionHooks | None = None,
    visual_tokens: jax.Array | None = None,
) -> GenerationOutput:
    """Generates up to `max_new_tokens` tokens after each left-padded prompt.

    Args:
      model: the `Llava` to decode with (its parameters are read, never changed).
      input_ids: `[B, T]` int, LEFT-padded prompts holding one image placeholder per visual token.
      pixel_values: `[N_images, H, W, 3]` normalised images, consumed in order of appearance over
        the batch; or None (text-only, or `visual_tokens` given).
      attention_mask: `[B, T]` (1/True on real tokens, zeros only on the left); default all ones.
      max_new_tokens: `M >= 1`, the number of decode steps at most (static).
      eos_token_id: id(s) that end a row, or None to always run `M` steps.
      pad_token_id: emitted by a row after its EOS.
      temperature: 0 for greedy decoding, > 0 to sample from `softmax(logits / temperature)`.
      top_p: in (0, 1]; with sampling, draw only from the nucleus (`sampling.top_p_filter`).
      rng: PRNG key, required when `temperature > 0`; step `t` uses `fold_in(rng, t)`.
      logits_processor: a `LogitsProcessor` (see `sampling`), applied before token selection.
        transformers does not keep the image placeholder out of the output and neither does this;
        pass `BanTokens` of `image_token_id` when a weak model's outputs are re-scored with images.
      hooks: attention interventions applied in every forward of the generation, the prompt prefill
        included (as a patched attention would in transformers). Their arrays are traced; their
        layers and edit function are part of the compile key (reuse the same function object).
      visual_tokens: `[N_images, n, D]` from `model.encode_images`, instead of `pixel_values`.

    Returns:
      a `GenerationOutput`.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T]; got shape {input_ids.shape}")
    attention_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    _check_left_padded(attention_mask, input_ids.shape)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1]; got {top_p}")
    sample = temperature > 0
    if sample and rng is None:
        raise ValueError(f"temperature={temperature} samples and needs an rng key; got rng=None")
    eos_ids = () if eos_token_id is None else (eos_token_id,) if np.ndim(eos_token_id) == 0 else tuple(eos_token_id)
    settings = _Settings(
        eos_token_ids=jnp.asarray(eos_ids, jnp.int32).reshape(-1),
        pad_token_id=jnp.asarray(pad_token_id, jnp.int32),
        temperature=jnp.asarray(temperature if sample else 1.0, jnp.float32),
        top_p=jnp.asarray(top_p, jnp.float32),
    )
    return _generate(
        model,
        input_ids,
        attention_mask,
        pixel_values,
        visual_tokens,
        hooks,
        LogitsProcessor() if logits_processor is None else logits_processor,
        rng if sample else None,
        settings,
        max_new_tokens=int(max_new_tokens),
        sample=sample,
        filter_top_p=sample and top_p < 1,
    )


def _check_left_padded(attention_mask: jax.Array, shape: tuple[int, ...]) -> None:
    """`ValueError` unless the mask is `[B, T]` with every row `0...0 1...1` and at least one 1."""
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected input_ids' shape {shape}")
    if isinstance(attention_mask, jax.core.Tracer):
        return
    mask = np.asarray(attention_mask)
    for row, valid in enumerate(mask):
        if not valid.any():
            raise ValueError(f"prompt {row} is empty (its attention_mask is all zeros)")
        first = int(np.argmax(valid))
        if not valid[first:].all():
            raise ValueError(
                f"prompt {row} is not left-padded: its attention_mask has zeros after position {first}; "
                "generate appends new tokens on the right, so padding must be on the left"
            )


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "sample", "filter_top_p"))
def _generate(
    model: Llava,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None,
    visual_tokens: jax.Array | None,
    hooks: AttentionHooks | None,
    processor: LogitsProcessor,
    rng: jax.Array | None,
    settings: _Settings,
    *,
    max_new_tokens: int,
    sample: bool,
    filter_top_p: bool,
) -> GenerationOutput:
    batch, prompt_length = input_ids.shape
    text_config = model.config.text_config
    window = prompt_length + max_new_tokens - 1  # the last chosen token is never fed back
    window_mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens - 1), bool)], axis=1)
    cache = init_cache(text_config, batch, window, dtype=jnp.dtype(text_config.dtype))

    def choose(logits, step, processor_state):
        logits, processor_state = processor(logits.astype(jnp.float32), step, processor_state)
        step_rng = None if rng is None else jax.random.fold_in(rng, step)
        tokens, logps = select_tokens(
            logits, sample=sample, temperature=settings.temperature, top_p=settings.top_p,
            filter_top_p=filter_top_p, rng=step_rng,
        )
        return tokens, logps, processor_state

    prefill = model(
        input_ids, pixel_values=pixel_values, visual_tokens=visual_tokens, attention_mask=window_mask,
        cache=cache, hooks=hooks,
    )
    image_positions = prefill.image_positions if hooks is not None else None
    processor_state = processor.init_state(model, PromptInputs(input_ids, window_mask, image_positions))
    tokens, logps, processor_state = choose(prefill.logits[:, -1], jnp.int32(0), processor_state)
    finished = _is_eos(tokens, settings.eos_token_ids)
    carry = _Carry(
        step=jnp.int32(1),
        last_tokens=tokens,
        new_tokens=jnp.full((batch, max_new_tokens), settings.pad_token_id).at[:, 0].set(tokens),
        token_logps=jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logps),
        finished=finished,
        lengths=jnp.ones((batch,), jnp.int32),
        cache=prefill.cache,
        processor_state=processor_state,
    )

    def running(carry: _Carry) -> jax.Array:
        return (carry.step < max_new_tokens) & ~jnp.all(carry.finished)

    def decode_step(carry: _Carry) -> _Carry:
        inputs = StepInputs(carry.last_tokens[:, None], window_mask, image_positions, carry.step)
        output = model(
            inputs.tokens, attention_mask=window_mask, cache=carry.cache, image_positions=image_positions, hooks=hooks
        )
        processor_state = processor.consume(model, carry.processor_state, inputs)
        tokens, logps, processor_state = choose(output.logits[:, -1], carry.step, processor_state)
        tokens = jnp.where(carry.finished, settings.pad_token_id, tokens)
        logps = jnp.where(carry.finished, 0.0, logps)
        return _Carry(
            step=carry.step + 1,
            last_tokens=tokens,
            new_tokens=carry.new_tokens.at[:, carry.step].set(tokens),
            token_logps=carry.token_logps.at[:, carry.step].set(logps),
            finished=carry.finished | _is_eos(tokens, settings.eos_token_ids),
            lengths=carry.lengths + (~carry.finished).astype(jnp.int32),
            cache=output.cache,
            processor_state=processor_state,
        )

    carry = jax.lax.while_loop(running, decode_step, carry)
    return GenerationOutput(
        sequences=jnp.concatenate([input_ids, carry.new_tokens], axis=1),
        new_tokens=carry.new_tokens,
        lengths=carry.lengths,
        token_logps=carry.token_logps,
    )


def _is_eos(tokens: jax.Array, eos_token_ids: jax.Array) -> jax.Array:
    """`tokens [B]` -> `[B]` bool, True where the token is one of `eos_token_ids [K]` (K may be 0)."""
    return jnp.any(tokens[:, None] == eos_token_ids[None, :], axis=-1)
