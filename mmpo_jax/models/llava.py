"""LLaVA (Flax NNX): CLIP vision tower -> 2-layer MLP projector -> Llama decoder.

A port of transformers' `LlavaForConditionalGeneration` whose attribute names follow it
(`vision_tower`, `multi_modal_projector.linear_{1,2}`, `language_model.{model,lm_head}`), so that
`convert.py` maps names, not structures. The input ids already hold one placeholder
(`image_token_id`) per visual token; projected image features replace the placeholders' embeddings
in order of appearance over the flattened `[B, T]` batch, exactly as transformers v5's
`masked_scatter`, so an example may hold several images.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mmpo_jax.models.attention import AttentionHooks, ProbeSpec
from mmpo_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer, merge_tokens
from mmpo_jax.models.layers import activation, partitioned_linear
from mmpo_jax.models.llama import Cache, LlamaConfig, LlamaForCausalLM

Array = jax.Array

SELECT_STRATEGIES = ("default", "full")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """transformers' `LlavaConfig` fields (`image_token_id` is its `image_token_index`).

    `vision_feature_layer`: index (or indices, concatenated along features) into the vision
    tower's L+1 hidden states; `vision_feature_select_strategy`: "default" drops the class token,
    "full" keeps it. The projector computes in the text config's dtypes.
    """

    vision_config: CLIPVisionConfig
    text_config: LlamaConfig
    image_token_id: int
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    pad_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}; "
                f"expected one of {SELECT_STRATEGIES}"
            )
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        num_states = self.vision_config.num_hidden_layers + 1
        for layer in self.feature_layers:
            if not -num_states <= layer < num_states:
                raise ValueError(
                    f"vision_feature_layer {layer} is out of range for {num_states} vision hidden states "
                    f"(valid: {-num_states}..{num_states - 1})"
                )
        if self.vision_config.token_merge > 1 and self.vision_feature_select_strategy == "full":
            raise ValueError(
                f"token_merge={self.vision_config.token_merge} merges the patch grid and cannot keep the "
                "class token; use vision_feature_select_strategy='default'"
            )
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is outside the vocabulary [0, {self.text_config.vocab_size})"
            )
        activation(self.projector_hidden_act)  # fail early on an unknown name

    def to_dict(self) -> dict:
        """All fields as plain JSON-able values (nested configs as dicts)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> LlavaConfig:
        """Inverse of `to_dict` (accepts lists where tuples were, as JSON returns them)."""
        vision = dict(fields["vision_config"])
        if "conv_channels" in vision:
            vision["conv_channels"] = tuple(vision["conv_channels"])
        text = LlamaConfig(**fields["text_config"])
        return cls(**{**fields, "vision_config": CLIPVisionConfig(**vision), "text_config": text})

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The selected vision hidden-state indices, always as a tuple."""
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens (placeholders) per image after feature selection and token merging."""
        merge = self.vision_config.token_merge
        patches = self.vision_config.num_patches // merge**2
        return patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def projector_input_size(self) -> int:
        """Width of one visual token entering the projector."""
        return self.vision_config.hidden_size * len(self.feature_layers) * self.vision_config.token_merge**2


@struct.dataclass
class LlavaOutput:
    """logits [B, T, V] float32 (or None when not asked for); last_hidden_state [B, T, D] after the
    final norm; probes {layer: [B, T, N_img] | [B, H, T, N_img] | [B, H, T, T_kv]}; visual_tokens
    [N_images, n, D] or None; input_embeddings [B, T, D] (after image scattering); image_positions
    [B, N_img] int32 or None; hidden_states: L+1 arrays [B, T, D] or None; cache: the updated KV
    cache or None. With `output_positions [B, P]`, logits, last_hidden_state and the probes' query
    axis hold P positions instead of T."""

    logits: Array | None
    last_hidden_state: Array
    probes: dict
    visual_tokens: Array | None
    input_embeddings: Array
    image_positions: Array | None
    hidden_states: tuple | None
    cache: Cache | None


class LlavaMultiModalProjector(nnx.Module):
    """linear_1 -> activation -> linear_2: visual tokens [.., D_vis'] -> [.., D_text]."""

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        text = config.text_config
        dtypes = dict(dtype=jnp.dtype(text.dtype), param_dtype=jnp.dtype(text.param_dtype))
        bias = config.multimodal_projector_bias
        # [our choice] the hidden axis is sharded like an MLP's, the output like the residual stream.
        self.linear_1 = partitioned_linear(
            config.projector_input_size, text.hidden_size, (None, "mlp"), use_bias=bias, **dtypes, rngs=rngs
        )
        self.linear_2 = partitioned_linear(
            text.hidden_size, text.hidden_size, ("mlp", "embed"), use_bias=bias, **dtypes, rngs=rngs
        )
        self.act_name = config.projector_hidden_act

    def __call__(self, features: Array) -> Array:
        """features [.., projector_input_size] -> [.., D_text]."""
        return self.linear_2(activation(self.act_name)(self.linear_1(features)))


def scatter_visual_tokens(
    input_embeddings: Array, input_ids: Array, visual_tokens: Array, image_token_id: int
) -> Array:
    """Write visual tokens into the placeholder positions, in row-major order over [B, T].

    input_embeddings [B, T, D]; input_ids [B, T]; visual_tokens [N_images, n, D] -> [B, T, D].
    The k-th placeholder of the flattened batch receives the k-th row of the flattened visual
    tokens (transformers' `masked_scatter`). With concrete ids a count mismatch is a `ValueError`;
    under `jit` the counts cannot be read, so the caller's batch must be consistent.
    """
    is_image = input_ids == image_token_id
    flat_tokens = visual_tokens.reshape(-1, visual_tokens.shape[-1]).astype(input_embeddings.dtype)
    if not isinstance(is_image, jax.core.Tracer):
        num_placeholders = int(is_image.sum())
        if num_placeholders != flat_tokens.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match: {num_placeholders} placeholder tokens "
                f"(id {image_token_id}) in input_ids but {flat_tokens.shape[0]} image features "
                f"({visual_tokens.shape[0]} images x {visual_tokens.shape[1]} tokens)"
            )
    order = jnp.cumsum(is_image.reshape(-1)) - 1  # index of each placeholder among all placeholders
    gathered = flat_tokens[jnp.clip(order, 0, flat_tokens.shape[0] - 1)].reshape(input_embeddings.shape)
    return jnp.where(is_image[..., None], gathered, input_embeddings)


def image_token_positions(input_ids: Array, image_token_id: int, num_per_example: int | None = None) -> Array:
    """Positions of the image placeholders in each row: input_ids [B, T] -> [B, N_img] int32.

    `num_per_example=None` reads N_img from the (concrete) ids and requires every row to hold the
    same count; under `jit` pass it (static). Rows are in increasing position order.
    """
    is_image = input_ids == image_token_id
    if num_per_example is None:
        if isinstance(is_image, jax.core.Tracer):
            raise ValueError("under jit, image_token_positions needs num_per_example (the static N_img)")
        counts = sorted({int(c) for c in is_image.sum(axis=1)})
        if len(counts) != 1:
            raise ValueError(
                f"rows hold different numbers of image tokens {counts}; probes and hooks need the same "
                "N_img in every example (pass image_positions explicitly, padded consistently)"
            )
        num_per_example = counts[0]
    elif not isinstance(is_image, jax.core.Tracer):
        counts = [int(c) for c in is_image.sum(axis=1)]
        if any(c != num_per_example for c in counts):
            raise ValueError(f"expected {num_per_example} image tokens per example, rows hold {counts}")
    rows = jax.vmap(lambda row: jnp.nonzero(row, size=num_per_example, fill_value=0)[0])(is_image)
    return rows.astype(jnp.int32)


def default_image_positions(
    input_ids: Array, image_token_id: int, num_visual_tokens: int | None, *, required: bool
) -> Array | None:
    """Placeholder positions [B, N_img] when derivable, else None (or an error when `required`).

    Concrete ids: the positions when every row holds the same non-zero count. Under jit the
    counts are unknown, so N_img = num_visual_tokens / B, and only when `required` (probes or
    hooks ask for them), assuming equal counts per row as those need anyway.
    """
    if not isinstance(input_ids, jax.core.Tracer):
        counts = {int(c) for c in (input_ids == image_token_id).sum(axis=1)}
        if counts == {0} and required:
            raise ValueError(
                "probes/hooks need image_positions, but input_ids hold no image tokens "
                f"(id {image_token_id}); pass image_positions (e.g. the prompt's, in decode steps)"
            )
        if (len(counts) == 1 and 0 not in counts) or required:  # unequal counts raise, naming them
            return image_token_positions(input_ids, image_token_id)
        return None
    if not required:
        return None
    if num_visual_tokens is None:
        raise ValueError("under jit without images in the call, probes/hooks need image_positions passed")
    batch = input_ids.shape[0]
    if num_visual_tokens % batch:
        raise ValueError(
            f"{num_visual_tokens} visual tokens cannot be split evenly over batch {batch}; "
            "probes need the same N_img per example (pass image_positions)"
        )
    return image_token_positions(input_ids, image_token_id, num_visual_tokens // batch)


class Llava(nnx.Module):
    """The LLaVA model: `vision_tower`, `multi_modal_projector`, `language_model`."""

    def __init__(self, config: LlavaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_tower = CLIPVisionTransformer(config.vision_config, rngs=rngs)
        self.multi_modal_projector = LlavaMultiModalProjector(config, rngs=rngs)
        self.language_model = LlamaForCausalLM(config.text_config, rngs=rngs)

    def encode_images(self, pixel_values: Array) -> Array:
        """pixel_values [N_images, H, W, 3] (channel-last, normalised) -> visual tokens [N_images, n, D_text].

        `image_features` then the projector.
        """
        features = self.image_features(pixel_values)
        with jax.named_scope("projector"):
            return self.multi_modal_projector(features)

    def image_features(self, pixel_values: Array) -> Array:
        """The vision tower's part of `encode_images`: [N_images, H, W, 3] -> [N_images, n, D_proj_in].

        Selects the configured hidden state(s), drops the class token for "default", merges
        k x k patch blocks when `token_merge > 1`. A trainer with a frozen vision tower runs this
        once per image and projects with the policy's and the reference's projectors.
        """
        config = self.config
        with jax.named_scope("vision_tower"):
            states = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        selected = [states[layer] for layer in config.feature_layers]
        if config.vision_feature_select_strategy == "default":
            selected = [state[:, 1:] for state in selected]
        features = jnp.concatenate(selected, axis=-1) if len(selected) > 1 else selected[0]
        merge = config.vision_config.token_merge
        if merge > 1:
            features = merge_tokens(features, self.vision_tower.grid_size, merge)
        return features

    def __call__(
        self,
        input_ids: Array,
        *,
        pixel_values: Array | None = None,
        visual_tokens: Array | None = None,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        cache: Cache | None = None,
        image_positions: Array | None = None,
        probe: ProbeSpec | None = None,
        hooks: AttentionHooks | None = None,
        output_hidden_states: bool = False,
        output_positions: Array | None = None,
        return_logits: bool = True,
        prefill: bool = False,
    ) -> LlavaOutput:
        """Forward pass: input_ids [B, T] int -> LlavaOutput.

        pixel_values [N_images, H, W, 3] or visual_tokens [N_images, n, D] (from `encode_images`;
        skips the vision tower), at most one of them; neither for text-only or decode steps.
        attention_mask [B, T] (no cache) or [B, S_max] (the whole cache window): key validity,
        default all valid; positions [B, T]: RoPE positions, default cumsum(mask)-1 over the new
        tokens (both defaults are the decoder's, see `LlamaModel`). image_positions [B, N_img]
        default to the placeholder positions in input_ids (probes and hooks need the same N_img in
        every row; under jit it is derived as images x tokens / B).

        output_positions [B, P] int32 (indices into the T tokens) keeps the outputs a consumer reads:
        the final norm, the LM head and the probes run at those positions only (e.g. a response's
        positions, padded to a bucket by repeating one; or the last prompt token of a decode
        prefill). return_logits=False skips the LM head (logits None): a caller that computes
        log-probabilities from `last_hidden_state` and `language_model.lm_head_table()` chunk by
        chunk (`objectives.logprobs.hidden_token_logprobs`) never holds [B, P, V]. prefill=True: the
        cache is empty and attention reads the new tokens' own keys (see `LlamaModel`).
        """
        if pixel_values is not None and visual_tokens is not None:
            raise ValueError("pass at most one of pixel_values and visual_tokens, got both")
        if pixel_values is not None:
            visual_tokens = self.encode_images(pixel_values)
        decoder = self.language_model.model
        with jax.named_scope("embed"):
            embeddings = decoder.embed_tokens(input_ids)
            if visual_tokens is not None:
                embeddings = scatter_visual_tokens(embeddings, input_ids, visual_tokens,
                                                   self.config.image_token_id)
        needs_positions = (probe is not None and probe.needs_image_positions) or hooks is not None
        if image_positions is None:
            num_visual_tokens = None if visual_tokens is None else visual_tokens.shape[0] * visual_tokens.shape[1]
            image_positions = default_image_positions(
                input_ids, self.config.image_token_id, num_visual_tokens, required=needs_positions
            )
        output = decoder(
            embeddings,
            positions=positions,
            attention_mask=attention_mask,
            cache=cache,
            probe=probe,
            image_positions=image_positions,
            hooks=hooks,
            output_hidden_states=output_hidden_states,
            output_positions=output_positions,
            prefill=prefill,
        )
        with jax.named_scope("lm_head"):
            logits = self.language_model.logits(output.last_hidden_state) if return_logits else None
        return LlavaOutput(
            logits=logits,
            last_hidden_state=output.last_hidden_state,
            probes=output.probes,
            visual_tokens=visual_tokens,
            input_embeddings=embeddings,
            image_positions=image_positions,
            hidden_states=output.hidden_states,
            cache=output.cache,
        )
