"""Token selection (greedy, temperature, top-p) and the logits-processor protocol of `generate`.

Order of one decode step, as transformers' `generate`: logits processors edit the model's logits,
then greedy takes the argmax, or sampling divides by the temperature, keeps the top-p nucleus and
draws. Everything here is a pure function of arrays, jittable, and runs inside the decode loop.

Shapes: `B` batch, `V` vocabulary, `S` cache window (prompt + new-token slots), `N` image tokens.

The processor protocol
----------------------
A logits processor is a pytree (write it as a `flax.struct.dataclass` subclassing `LogitsProcessor`):
its array fields are traced, so new values of them do not recompile `generate`; its static fields
and class are part of the compile key. `generate` calls, inside one jitted program:

* `state = processor.init_state(model, prompt)` once, after the prompt prefill (`prompt` is a
  `PromptInputs`). A processor that needs its own forward passes runs its prefill here and keeps
  its own KV cache in `state` (a second model call per step; contrastive decoding instead batches
  its amateur rows into the main forward, see `decode.RowGroups`).
* `state = processor.consume(model, state, inputs)` at every later step, with the tokens the
  generating model consumes at that step (`StepInputs`); a second cache advances here, on the same
  slots and mask as the main one.
* `logits, state = processor(logits, step, state)` at every step (step 0 included), before token
  selection: `logits [B, V]` float32 of the step's next token, `step` int32 scalar (0-based index of
  the token being chosen).

`state` is any pytree; its structure, shapes and dtypes must stay the same across steps (it is a
`while_loop` carry). `model` is the generating `Llava` inside the trace; processors never hold it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any


@struct.dataclass
class PromptInputs:
    """What the prompt prefill consumed.

    Attributes:
      input_ids: `[B, T]` int32, left-padded prompts (with image placeholders).
      attention_mask: `[B, S]` bool key validity over the whole cache window: the prompt mask
        followed by `True` for every new-token slot (causality hides slots not yet written).
      image_positions: `[B, N]` int32 cache slots of the image tokens, or None when no hooks asked
        for them.
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    image_positions: jax.Array | None


@struct.dataclass
class StepInputs:
    """What the generating model consumes at one decode step after the prefill.

    Attributes:
      tokens: `[B, 1]` int32, the previous step's chosen tokens (`pad_token_id` in finished rows).
      attention_mask: `[B, S]` bool, the same window mask as `PromptInputs.attention_mask`.
      image_positions: as in `PromptInputs`.
      step: int32 scalar, index of the token the logits of this forward will choose.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    image_positions: jax.Array | None
    step: jax.Array


@struct.dataclass
class LogitsProcessor:
    """Base of logits processors, and the identity processor: stateless, no extra forward passes.

    See the module docstring for the protocol. Subclasses are `flax.struct.dataclass`es.
    """

    def init_state(self, model, prompt: PromptInputs) -> PyTree:
        """The processor's state after the prompt prefill; `()` for a stateless processor."""
        del model, prompt
        return ()

    def consume(self, model, state: PyTree, inputs: StepInputs) -> PyTree:
        """Advances `state` by the tokens the generating model consumes at a decode step."""
        del model, inputs
        return state

    def __call__(self, logits: jax.Array, step: jax.Array, state: PyTree) -> tuple[jax.Array, PyTree]:
        """`logits [B, V]` float32 -> `(logits [B, V], state)`; the base returns both unchanged."""
        del step
        return logits, state


@struct.dataclass
class BanTokens(LogitsProcessor):
    """Never emit `token_ids` (`[K]` int32): their logits become `-inf`."""

    token_ids: jax.Array

    def __call__(self, logits: jax.Array, step: jax.Array, state: PyTree) -> tuple[jax.Array, PyTree]:
        """`logits [B, V]` -> the same with the banned columns at `-inf`."""
        return logits.at[:, self.token_ids].set(-jnp.inf), state


@struct.dataclass
class ProcessorChain(LogitsProcessor):
    """Runs `processors` in order; the state is the tuple of their states."""

    processors: tuple[LogitsProcessor, ...]

    def init_state(self, model, prompt: PromptInputs) -> tuple:
        return tuple(p.init_state(model, prompt) for p in self.processors)

    def consume(self, model, state: tuple, inputs: StepInputs) -> tuple:
        return tuple(p.consume(model, s, inputs) for p, s in zip(self.processors, state))

    def __call__(self, logits: jax.Array, step: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        new_state = []
        for processor, processor_state in zip(self.processors, state):
            logits, processor_state = processor(logits, step, processor_state)
            new_state.append(processor_state)
        return logits, tuple(new_state)


def top_p_filter(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Keeps the nucleus: the smallest set of most likely tokens whose probability sums to >= `top_p`.

    Args:
      logits: `[B, V]` float32.
      top_p: scalar in (0, 1]; the argmax is always kept.

    Returns:
      `[B, V]`: `logits` inside the nucleus, `-inf` outside. [our choice] Tokens tied with the
      least likely kept token are all kept, so the result does not depend on the sort order of ties.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of strictly more likely tokens
    # Rank 0 is always in: the nucleus holds at least the argmax whatever top_p is.
    in_nucleus = (mass_before < top_p).at[:, 0].set(True)
    threshold = jnp.min(jnp.where(in_nucleus, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= threshold, logits, -jnp.inf)


def sampling_logits(
    logits: jax.Array, temperature: float | jax.Array, top_p: float | jax.Array, *, filter_top_p: bool = True
) -> jax.Array:
    """The logits sampling draws from: `logits / temperature`, then the top-p nucleus.

    Args:
      logits: `[B, V]` float32 (after the processors).
      temperature: scalar > 0.
      top_p: scalar in (0, 1].
      filter_top_p: static; False skips the (sort-based) filter, as `top_p = 1` would keep everything.

    Returns:
      `[B, V]` float32 with `-inf` outside the nucleus.
    """
    scaled = logits / jnp.asarray(temperature, jnp.float32)
    return top_p_filter(scaled, top_p) if filter_top_p else scaled


def select_tokens(
    logits: jax.Array,
    *,
    sample: bool,
    temperature: float | jax.Array = 1.0,
    top_p: float | jax.Array = 1.0,
    filter_top_p: bool = False,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chooses one token per row and returns its log-probability under the distribution it came from.

    Args:
      logits: `[B, V]` float32, after the processors.
      sample: static; False takes the argmax (greedy), True draws from `sampling_logits`.
      temperature, top_p, filter_top_p: as `sampling_logits` (sampling only).
      rng: PRNG key, required when sampling.

    Returns:
      `(tokens [B] int32, logps [B] float32)`. Greedy: log-softmax of `logits` (temperature 1, no
      filter) at the argmax; sampling: log-softmax of the temperature-scaled, filtered logits at the
      drawn token.
    """
    if sample:
        if rng is None:
            raise ValueError("sampling (temperature > 0) needs an rng key; got rng=None")
        logits = sampling_logits(logits, temperature, top_p, filter_top_p=filter_top_p)
        tokens = jax.random.categorical(rng, logits, axis=-1)
    else:
        tokens = jnp.argmax(logits, axis=-1)
    tokens = tokens.astype(jnp.int32)
    logps = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logps
