"""KV-cache generation for `Llava`: one prefill, then one jitted `while_loop` over decode steps.

`generate` is transformers' `generate` for left-padded prompts (greedy or temperature / top-p
sampling, EOS handling, `pad_token_id` after EOS), written as a single jitted program: the prompt
and its images go through the model once, filling a KV cache of `T + max_new_tokens - 1` slots, and
a `jax.lax.while_loop` feeds one token per step until `max_new_tokens` or until every row has
emitted EOS. RoPE positions come from the attention mask (`cumsum(mask) - 1`, left pads at 1), as
transformers derives them. It compiles once per input shapes and static options (`max_new_tokens`,
greedy vs sampling, whether top-p filters, the static structure of the processor, hooks, row groups
and controller); the rng, prompts, images, temperature, top-p, EOS and pad ids, and every array
field of those objects are traced.

Two extension points run inside the same loop:

* `RowGroups` ("paired rows"): the model forwards `G * B` rows per step (group `g` = rows
  `[g B, (g + 1) B)`, e.g. the same prompts on a clean and on a noisy image); `combine` turns their
  next-token logits into `B` rows, tokens are chosen on those, and each chosen token is fed to all
  `G` rows of its example. Contrastive decoding (`generation.contrastive`) is `G = 2`.
* `DecodeController`: per-step attention interventions whose arrays live in the loop carry. It
  requests probes (a static `ProbeSpec`) on every forward, observes them after each forward, and
  yields the hooks of each decode step from its state. ADAPT (`generation.adapt`) is one.

Shapes: `B` examples, `G` row groups (`R = G * B` model rows), `T` prompt length, `M`
`max_new_tokens`, `S = T + M - 1` cache window, `V` vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mmpo_jax.generation.sampling import LogitsProcessor, PromptInputs, StepInputs, select_tokens
from mmpo_jax.models.attention import AttentionHooks, ProbeSpec
from mmpo_jax.models.llama import init_cache
from mmpo_jax.models.llava import Llava, default_image_positions

PyTree = Any


@struct.dataclass
class GenerationOutput:
    """What `generate` returns (all int32 but `token_logps` and `controller_state`).

    Attributes:
      sequences: `[B, T + M]`, the prompts followed by the new tokens (the first row group's
        prompts when row groups are used).
      new_tokens: `[B, M]`; `pad_token_id` after a row's EOS (and in steps skipped once every row
        had finished).
      lengths: `[B]`, new tokens up to and including the first EOS (`M` for a row without EOS).
      token_logps: `[B, M]` float32, each chosen token's log-probability under the distribution it
        was chosen from (after row combination and the processors; with sampling also after
        temperature and top-p); 0 after EOS.
      controller_state: the decode controller's final state (e.g. ADAPT's anchor), `()` without one.
    """

    sequences: jax.Array
    new_tokens: jax.Array
    lengths: jax.Array
    token_logps: jax.Array
    controller_state: PyTree = ()


@struct.dataclass
class RowGroups:
    """Base of row groupings, and the identity: one model row per example (`groups = 1`).

    A subclass is a `flax.struct.dataclass` with a static `groups` and array fields (traced, so new
    values do not recompile); `combine` must be a pure `jnp` function.
    """

    groups: int = struct.field(pytree_node=False, default=1)

    def combine(self, logits: jax.Array) -> jax.Array:
        """`logits [G * B, V]` float32 of the model rows -> `[B, V]` logits to choose tokens from."""
        return logits


@struct.dataclass
class DecodeController:
    """Base of decode controllers, and the identity: no probes, no hooks, empty state.

    The loop calls, inside one jitted program (`R` model rows, `step` = 0-based index of the token
    that the forward's last query chooses):

    * `probe(num_layers)` once, at trace time: the static `ProbeSpec` every forward reports;
    * `init_state(model, prompt)` once, after the prefill forward (`prompt`: a `PromptInputs` of
      all `R` rows, `image_positions` set when the probe or hooks need them);
    * `observe(state, probes, step)` after every forward: the prefill (`step = 0`, probes over all
      `T` prompt queries) and each decode step (`step >= 1`, one query); `probes` maps each probed
      layer to its probe (`[R, T_q, N]` for the `"image"` form);
    * `hooks(state, step)` before each decode step's forward (never the prefill's: the prompt's
      own attention is not edited, as the released ADAPT hooks act on single-query forwards only).
      The hooks' `layers` and structure must not depend on `step`; their edit may close over
      `state`'s arrays (it runs inside the same trace).

    `state` is a pytree of fixed structure, shapes and dtypes (a `while_loop` carry).
    """

    def probe(self, num_layers: int) -> ProbeSpec | None:
        """The probe every forward reports (static), or None."""
        del num_layers
        return None

    @property
    def yields_hooks(self) -> bool:
        """Static: whether `hooks` returns hooks (the loop then derives the image positions)."""
        return False

    def init_state(self, model, prompt: PromptInputs) -> PyTree:
        """The state before the prefill; `()` for a stateless controller."""
        del model, prompt
        return ()

    def observe(self, state: PyTree, probes: dict[int, jax.Array], step: jax.Array) -> PyTree:
        """Advances `state` by the probes of the forward whose last query chooses token `step`."""
        del probes, step
        return state

    def hooks(self, state: PyTree, step: jax.Array) -> AttentionHooks | None:
        """The attention hooks of the decode-step forward that chooses token `step` (>= 1)."""
        del state, step
        return None


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
    cache: dict  # over the R model rows
    processor_state: PyTree
    controller_state: PyTree


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
    controller: DecodeController | None = None,
    row_groups: RowGroups | None = None,
) -> GenerationOutput:
    """Generates up to `max_new_tokens` tokens after each left-padded prompt.

    Args:
      model: the `Llava` to decode with (its parameters are read, never changed).
      input_ids: `[R, T]` int, LEFT-padded prompts holding one image placeholder per visual token;
        `R = B` (or `G * B` with `row_groups`).
      pixel_values: `[N_images, H, W, 3]` normalised images, consumed in order of appearance over
        the `R` rows; or None (text-only, or `visual_tokens` given).
      attention_mask: `[R, T]` (1/True on real tokens, zeros only on the left); default all ones.
      max_new_tokens: `M >= 1`, the number of decode steps at most (static).
      eos_token_id: id(s) that end a row, or None to always run `M` steps.
      pad_token_id: emitted by a row after its EOS.
      temperature: 0 for greedy decoding, > 0 to sample from `softmax(logits / temperature)`.
      top_p: in (0, 1]; with sampling, draw only from the nucleus (`sampling.top_p_filter`).
      rng: PRNG key, required when `temperature > 0`; step `t` uses `fold_in(rng, t)`.
      logits_processor: a `LogitsProcessor` (see `sampling`), applied to the `B` combined rows
        before token selection (its `PromptInputs` / `StepInputs` hold the first row group).
        transformers does not keep the image placeholder out of the output and neither does this;
        pass `BanTokens` of `image_token_id` when a weak model's outputs are re-scored with images.
      hooks: attention interventions applied in every forward of the generation, the prompt prefill
        included (as a patched attention would in transformers). Their arrays are traced; their
        layers and edit function are part of the compile key (reuse the same function object).
        Exclusive with `controller`.
      visual_tokens: `[N_images, n, D]` from `model.encode_images`, instead of `pixel_values`.
      controller: a `DecodeController` (e.g. `generation.adapt.AdaptDecoding`): probes observed
        after every forward, hooks from its carried state in every decode step.
      row_groups: a `RowGroups` with `groups = G`; `input_ids` then holds `G * B` rows.

    Returns:
      a `GenerationOutput` of `B` rows.
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
    if hooks is not None and controller is not None:
        raise ValueError("pass at most one of hooks (fixed per call) and controller (per decode step), got both")
    row_groups = RowGroups() if row_groups is None else row_groups
    if row_groups.groups < 1 or input_ids.shape[0] % row_groups.groups:
        raise ValueError(
            f"{input_ids.shape[0]} prompt rows cannot form {row_groups.groups} row groups; "
            "input_ids must hold groups * B rows, group g being rows [g B, (g + 1) B)"
        )
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
        DecodeController() if controller is None else controller,
        row_groups,
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
    controller: DecodeController,
    row_groups: RowGroups,
    rng: jax.Array | None,
    settings: _Settings,
    *,
    max_new_tokens: int,
    sample: bool,
    filter_top_p: bool,
) -> GenerationOutput:
    rows, prompt_length = input_ids.shape
    batch = rows // row_groups.groups
    text_config = model.config.text_config
    window = prompt_length + max_new_tokens - 1  # the last chosen token is never fed back
    window_mask = jnp.concatenate([attention_mask, jnp.ones((rows, max_new_tokens - 1), bool)], axis=1)
    cache = init_cache(text_config, rows, window, dtype=jnp.dtype(text_config.dtype))
    probe = controller.probe(text_config.num_hidden_layers)

    def choose(logits, step, processor_state):
        logits = row_groups.combine(logits.astype(jnp.float32))
        logits, processor_state = processor(logits, step, processor_state)
        step_rng = None if rng is None else jax.random.fold_in(rng, step)
        tokens, logps = select_tokens(
            logits, sample=sample, temperature=settings.temperature, top_p=settings.top_p,
            filter_top_p=filter_top_p, rng=step_rng,
        )
        return tokens, logps, processor_state

    # Hooks and probes of the decode steps read the image positions of the prompts.
    needs_positions = hooks is not None or probe is not None or controller.yields_hooks
    image_positions = _image_positions(model, input_ids, pixel_values, visual_tokens) if needs_positions else None
    # Only the last prompt token's outputs are read: the prefill's LM head (and any probe) runs there.
    last_position = jnp.full((rows, 1), prompt_length - 1, jnp.int32)
    prefill = model(
        input_ids, pixel_values=pixel_values, visual_tokens=visual_tokens, attention_mask=window_mask,
        cache=cache, image_positions=image_positions, hooks=hooks, probe=probe, output_positions=last_position,
        prefill=True,
    )
    first_rows = None if image_positions is None else image_positions[:batch]
    processor_state = processor.init_state(
        model, PromptInputs(input_ids[:batch], window_mask[:batch], first_rows))
    controller_state = controller.init_state(model, PromptInputs(input_ids, window_mask, image_positions))
    controller_state = controller.observe(controller_state, prefill.probes, jnp.int32(0))
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
        controller_state=controller_state,
    )

    def running(carry: _Carry) -> jax.Array:
        return (carry.step < max_new_tokens) & ~jnp.all(carry.finished)

    def decode_step(carry: _Carry) -> _Carry:
        fed = jnp.tile(carry.last_tokens, row_groups.groups)[:, None]  # every group continues alike
        step_hooks = hooks if hooks is not None else controller.hooks(carry.controller_state, carry.step)
        output = model(
            fed, attention_mask=window_mask, cache=carry.cache, image_positions=image_positions, hooks=step_hooks,
            probe=probe,
        )
        controller_state = controller.observe(carry.controller_state, output.probes, carry.step)
        inputs = StepInputs(fed[:batch], window_mask[:batch], first_rows, carry.step)
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
            controller_state=controller_state,
        )

    carry = jax.lax.while_loop(running, decode_step, carry)
    return GenerationOutput(
        sequences=jnp.concatenate([input_ids[:batch], carry.new_tokens], axis=1),
        new_tokens=carry.new_tokens,
        lengths=carry.lengths,
        token_logps=carry.token_logps,
        controller_state=carry.controller_state,
    )


def _image_positions(model: Llava, input_ids: jax.Array, pixel_values: jax.Array | None,
                     visual_tokens: jax.Array | None) -> jax.Array:
    """`[R, N_img]` cache slots of the image placeholders (the same count in every row)."""
    if visual_tokens is not None:
        num_visual_tokens = visual_tokens.shape[0] * visual_tokens.shape[1]
    elif pixel_values is not None:
        num_visual_tokens = pixel_values.shape[0] * model.config.num_image_tokens
    else:
        num_visual_tokens = None
    return default_image_positions(input_ids, model.config.image_token_id, num_visual_tokens, required=True)


def _is_eos(tokens: jax.Array, eos_token_ids: jax.Array) -> jax.Array:
    """`tokens [B]` -> `[B]` bool, True where the token is one of `eos_token_ids [K]` (K may be 0)."""
    return jnp.any(tokens[:, None] == eos_token_ids[None, :], axis=-1)
