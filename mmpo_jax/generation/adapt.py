"""ADAPT's attention-supervised inference (METHODS.md §4) as a `DecodeController` of `generate`.

Inside the one jitted decode loop:

1. steps `0 .. K-1` (the first `K = anchor_steps` generated tokens): every decoder layer's
   head-mean text->image attention of the query that chooses the token is recorded (the model's
   `ProbeSpec(all layers, "image_last")` on each forward: the prefill keeps one query row per
   layer, not `T`) into a `[R, L, K, N_img]` history;
2. after step `K - 1` is observed, the history becomes the visual anchor
   (`rewards.adapt.visual_anchor`), its refined mask (`rewards.adapt.refined_mask`) and the HHI
   baseline (`rewards.adapt_modes.hhi` of the anchor);
3. from step `K` on, the selected mode edits the attention of the hooked layers in every decode
   step, as a post-softmax edit (`AttentionHooks`) reading the anchor from the loop carry:
   `"steer"` (`adapt_modes.steer`: exactly the softmax of the logits plus
   `alpha * log(w + 1e-9)` on the image keys where `S_AMC < tau`, without a second softmax),
   `"blend"` (`adapt_modes.blend`), `"mask"` (`adapt_modes.mask` with the refined anchor).

Decisions:

- Which layers are edited: METHODS.md is silent; the released code registers its hook on every
  layer (`DEFAULT_LAYER_INDICES = range(32)`), so `layers=None` means all layers; any tuple of
  indices (negative from the end) can be given. The anchor always reads every layer.
- The "first K tokens" are the tokens chosen by the prompt's last query (step 0) and the next
  `K - 1` single-token forwards, as the trainer's ADAPT scoring reads them (the queries that
  generate the first K response tokens) [our choice; the released hook counts its first K
  single-query calls, i.e. tokens 1..K].
- The prompt prefill is never edited (the released hooks act on single-query forwards only).
- One image per example whose `N_img = G * G` tokens form the patch grid.
- The probe's structure is static, so every forward of the loop probes every layer, also after
  step K (a gather of the image columns of probabilities that the hooked layers compute anyway).

Shapes: `R` model rows, `L` decoder layers, `K` anchor steps, `N` image tokens (`G * G`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mmpo_jax.generation.decode import DecodeController
from mmpo_jax.generation.sampling import PromptInputs
from mmpo_jax.models.attention import AttentionHooks, ProbeSpec, resolve_layer_indices
from mmpo_jax.rewards import adapt as adapt_rewards
from mmpo_jax.rewards import adapt_modes

ADAPT_MODES = ("steer", "blend", "mask")


@struct.dataclass
class AdaptState:
    """The ADAPT controller's loop carry.

    Attributes:
      history: `[R, L, K, N]` float32 head-mean text->image attention of every layer for each of the
        first K tokens (zeros until recorded).
      anchor: `[R, N]` float32 fused visual anchor, row-major over the grid (zeros before step K-1).
      refined_anchor: `[R, N]` float32 refined mask of the anchor in [0, 1].
      hhi_base: `[R]` float32 HHI of the anchor's grid map (the blend's baseline).
    """

    history: jax.Array
    anchor: jax.Array
    refined_anchor: jax.Array
    hhi_base: jax.Array


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@struct.dataclass
class AdaptDecoding(DecodeController):
    """ADAPT attention-supervised decoding: pass as `generate(..., controller=AdaptDecoding("steer"))`.

    Attributes:
      mode: one of `ADAPT_MODES` (static).
      anchor_steps: `K >= 1`, tokens whose attention builds the anchor; edits start at step K (static).
      tau: steer's S_AMC threshold (0.6); the mode fires where `S_AMC < tau` (0 never fires).
      alpha: steer's log-prior strength (0.5).
      blend_strength: blend's `w = clip(blend_strength * d, 0, 1)` (0.4).
      mask_percentile: mask's quantile of the refined anchor below which image columns are zeroed (0.4).
      layers: decoder layers the mode edits, None for every layer (the released code's default;
        static).

    The float fields are traced: new values do not recompile `generate`.
    """

    mode: str = struct.field(pytree_node=False, default="steer")
    anchor_steps: int = struct.field(pytree_node=False, default=5)
    tau: float | jax.Array = 0.6
    alpha: float | jax.Array = 0.5
    blend_strength: float | jax.Array = 0.4
    mask_percentile: float | jax.Array = 0.4
    layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if self.mode not in ADAPT_MODES:
            raise ValueError(f"ADAPT mode {self.mode!r} is not one of {ADAPT_MODES}")
        if isinstance(self.anchor_steps, bool) or not isinstance(self.anchor_steps, int) or self.anchor_steps < 1:
            raise ValueError(f"anchor_steps must be an int >= 1 (the anchor needs a token); got {self.anchor_steps!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        # Checked only on Python numbers: pytree unflattening rebuilds the object with tracers.
        for name in ("blend_strength", "mask_percentile"):
            value = getattr(self, name)
            if _is_number(value) and not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1]; got {value}")

    def probe(self, num_layers: int) -> ProbeSpec:
        """Every layer's head-mean image attention of the last query, on every forward."""
        return ProbeSpec(tuple(range(num_layers)), "image_last")

    @property
    def yields_hooks(self) -> bool:
        return True

    def init_state(self, model, prompt: PromptInputs) -> AdaptState:
        """Zeros of the shapes above (`N` from the prompts' image positions)."""
        num_layers = model.config.text_config.num_hidden_layers
        if self.layers is not None:
            resolve_layer_indices(self.layers, num_layers, "ADAPT")  # fail at trace time, naming the index
        rows, num_image = prompt.image_positions.shape
        adapt_rewards.grid_side(num_image)  # one square patch grid per example
        zeros = jnp.zeros((rows, num_image), jnp.float32)
        return AdaptState(
            history=jnp.zeros((rows, num_layers, self.anchor_steps, num_image), jnp.float32),
            anchor=zeros,
            refined_anchor=zeros,
            hhi_base=jnp.zeros((rows,), jnp.float32),
        )

    def observe(self, state: AdaptState, probes: dict[int, jax.Array], step: jax.Array) -> AdaptState:
        """Records the last query's maps while `step < K`; builds the anchor at step `K - 1`."""
        maps = jnp.stack([probes[layer][:, -1] for layer in sorted(probes)], axis=1)  # [R, L, N]
        slot = jnp.minimum(step, self.anchor_steps - 1)
        recorded = jax.lax.dynamic_update_slice_in_dim(state.history, maps[:, :, None], slot, axis=2)
        state = state.replace(history=jnp.where(step < self.anchor_steps, recorded, state.history))
        return jax.lax.cond(step == self.anchor_steps - 1, _with_anchor, lambda s: s, state)

    def hooks(self, state: AdaptState, step: jax.Array) -> AttentionHooks:
        """A post-softmax edit of the configured layers, the identity before step K."""
        active = step >= self.anchor_steps

        def edit(probs: jax.Array, key_is_image: jax.Array, layer_index: int) -> jax.Array:
            del layer_index  # one anchor for every layer, as in METHODS.md
            return jnp.where(active, self.edit_rows(probs, key_is_image, state), probs)

        layers = tuple(range(state.history.shape[1])) if self.layers is None else self.layers
        return AttentionHooks(layers=layers, post_softmax_edit=edit)

    def edit_rows(self, probs: jax.Array, key_is_image: jax.Array, state: AdaptState) -> jax.Array:
        """The mode on one layer's `probs [R, H, T_q, S]` (`key_is_image [R, S]`), always applied."""
        if self.mode == "steer":
            return adapt_modes.steer(probs, key_is_image, state.anchor, tau=self.tau, alpha=self.alpha)
        if self.mode == "blend":
            return adapt_modes.blend(probs, key_is_image, state.anchor, state.hhi_base, strength=self.blend_strength)
        return adapt_modes.mask(probs, key_is_image, state.refined_anchor, percentile=self.mask_percentile)


def _with_anchor(state: AdaptState) -> AdaptState:
    """The state with the anchor, refined anchor and HHI baseline built from the full history."""
    rows, _, _, num_image = state.history.shape
    anchor = adapt_rewards.visual_anchor(state.history)  # [R, G, G]
    return state.replace(
        anchor=anchor.reshape(rows, num_image),
        refined_anchor=adapt_rewards.refined_mask(anchor).reshape(rows, num_image),
        hhi_base=adapt_modes.hhi(anchor),
    )
