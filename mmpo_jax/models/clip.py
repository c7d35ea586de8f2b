"""CLIP vision and text towers (Flax NNX), a port of transformers' `CLIPModel`.

Parameter names mirror transformers (`embeddings.patch_embedding`, `pre_layrnorm` [sic],
`encoder.layers[i]...`, `post_layernorm`, `final_layer_norm`, `visual_projection`, ...) so that
conversion maps names, not structures. Pixels are channel-last `[N, H, W, C]`.

Two options exist for the tiny embedded model and are off for CLIP checkpoints: a small conv stem
in place of the patchify conv (`stem="conv"`), and `merge_tokens`, which concatenates each k x k
block of the patch grid into one token (LLaVA applies it after feature selection).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mmpo_jax.models.clip_layers import CLIPEncoder
from mmpo_jax.models.layers import partitioned_layer_norm, partitioned_linear
from mmpo_jax.models.partitioning import logical

Array = jax.Array

STEMS = ("patch", "conv")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' `CLIPVisionConfig` fields, plus our stem / token-merge options.

    `stem="conv"`: 3x3 convolutions of `conv_channels`, stride 2 for all but the last, so the
    token grid has `image_size / 2**(len(conv_channels) - 1)` cells per side; `patch_size` must
    equal that stride so `grid_size` means the same thing for both stems.
    `token_merge`: stored here for LLaVA, which applies `merge_tokens` after feature selection.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512
    stem: str = "patch"
    conv_channels: tuple[int, ...] = (32, 64, 128, 128)
    token_merge: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.stem not in STEMS:
            raise ValueError(f"stem={self.stem!r}; expected one of {STEMS}")
        if self.stem == "conv":
            if not self.conv_channels:
                raise ValueError("stem='conv' needs at least one entry in conv_channels, got ()")
            stride = 2 ** (len(self.conv_channels) - 1)
            if self.patch_size != stride:
                raise ValueError(
                    f"stem='conv' with conv_channels={self.conv_channels} downsamples by {stride}; "
                    f"set patch_size={stride} (got {self.patch_size})"
                )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by patch_size={self.patch_size}"
            )
        if self.token_merge < 1 or self.grid_size % self.token_merge:
            raise ValueError(
                f"token_merge={self.token_merge} must be >= 1 and divide the patch grid side "
                f"{self.grid_size} (image_size {self.image_size} / patch_size {self.patch_size})"
            )

    @property
    def grid_size(self) -> int:
        """Patches (tokens) per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image, excluding the class token."""
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' `CLIPTextConfig` fields.

    `eos_token_id == 2` selects transformers' legacy pooling (the position of the largest token id);
    any other value pools at the first occurrence of `eos_token_id`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512
    eos_token_id: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers' `CLIPConfig`: both towers plus the shared projection size."""

    vision_config: CLIPVisionConfig
    text_config: CLIPTextConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592


class VisionOutput(NamedTuple):
    """last_hidden_state [N, 1+P, D] (before post_layernorm, as transformers); pooler_output [N, D]
    (post_layernorm of the class token); hidden_states: L+1 arrays [N, 1+P, D] or None."""

    last_hidden_state: Array
    pooler_output: Array
    hidden_states: tuple[Array, ...] | None


class TextOutput(NamedTuple):
    """last_hidden_state [N, S, D] (after final_layer_norm); pooler_output [N, D] (EOS token)."""

    last_hidden_state: Array
    pooler_output: Array


def _dtypes(config: CLIPVisionConfig | CLIPTextConfig) -> dict:
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def _encoder(config: CLIPVisionConfig | CLIPTextConfig, rngs: nnx.Rngs) -> CLIPEncoder:
    return CLIPEncoder(
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.hidden_act,
        config.layer_norm_eps,
        remat=config.remat,
        **_dtypes(config),
        rngs=rngs,
    )


def _position_embedding(
    num_positions: int, features: int, dtypes: dict, rngs: nnx.Rngs
) -> nnx.Embed:
    return nnx.Embed(
        num_positions,
        features,
        embedding_init=logical(nnx.initializers.normal(0.02), (None, "embed")),
        **dtypes,
        rngs=rngs,
    )


class ConvStem(nnx.Module):
    """3x3 convs (stride 2 for all but the last) with GELU between, then a linear to hidden_size
    if the last width differs. [N, H, W, C] -> [N, H/s, W/s, D] with s = 2**(len(channels)-1)."""

    def __init__(
        self,
        num_channels: int,
        conv_channels: tuple[int, ...],
        hidden_size: int,
        *,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        widths = (num_channels, *conv_channels)
        last = len(conv_channels) - 1
        self.convs = nnx.List(
            [
                nnx.Conv(
                    widths[i],
                    widths[i + 1],
                    kernel_size=(3, 3),
                    strides=1 if i == last else 2,
                    padding="SAME",
                    dtype=dtype,
                    param_dtype=param_dtype,
                    kernel_init=logical(
                        nnx.initializers.lecun_normal(), (None, None, None, None)
                    ),
                    bias_init=logical(nnx.initializers.zeros_init(), (None,)),
                    rngs=rngs,
                )
                for i in range(len(conv_channels))
            ]
        )
        self.projection = (
            partitioned_linear(
                conv_channels[-1],
                hidden_size,
                (None, "embed"),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if conv_channels[-1] != hidden_size
            else None
        )

    def __call__(self, pixel_values: Array) -> Array:
        """pixel_values [N, H, W, C] -> features [N, H/s, W/s, D]."""
        hidden = pixel_values
        for index, conv in enumerate(self.convs):
            if index:
                hidden = jax.nn.gelu(hidden, approximate=False)
            hidden = conv(hidden)
        return hidden if self.projection is None else self.projection(hidden)


class CLIPVisionEmbeddings(nnx.Module):
    """Patchify (or conv stem), prepend the class token, add learned positions -> [N, 1+P, D]."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        dtypes = _dtypes(config)
        self.image_size = config.image_size
        self.num_channels = config.num_channels
        self.stem = config.stem
        dim = config.hidden_size
        if config.stem == "patch":
            self.patch_embedding = nnx.Conv(
                config.num_channels,
                dim,
                kernel_size=(config.patch_size, config.patch_size),
                strides=config.patch_size,
                padding="VALID",
                use_bias=False,
                kernel_init=logical(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
                **dtypes,
                rngs=rngs,
            )
        else:
            self.conv_stem = ConvStem(
                config.num_channels, config.conv_channels, dim, **dtypes, rngs=rngs
            )
        self.class_embedding = nnx.Param(
            logical(nnx.initializers.normal(dim**-0.5), ("embed",))(
                rngs.params(), (dim,), dtypes["param_dtype"]
            )
        )
        self.position_embedding = _position_embedding(config.num_patches + 1, dim, dtypes, rngs)
        self.dtype = dtypes["dtype"]

    def __call__(self, pixel_values: Array) -> Array:
        """pixel_values [N, H, W, C] -> embeddings [N, 1+P, D]."""
        expected = (self.image_size, self.image_size, self.num_channels)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            raise ValueError(
                f"pixel_values has shape {pixel_values.shape}; expected "
                f"[N, {expected[0]}, {expected[1]}, {expected[2]}] (channel-last)"
            )
        stem = self.patch_embedding if self.stem == "patch" else self.conv_stem
        grid = stem(pixel_values.astype(self.dtype))  # [N, g, g, D]
        num, dim = grid.shape[0], grid.shape[-1]
        patches = grid.reshape(num, -1, dim)  # row-major, as torch's flatten(2)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (num, 1, dim))
        embeddings = jnp.concatenate([cls, patches], axis=1)
        return embeddings + self.position_embedding(jnp.arange(embeddings.shape[1]))


class CLIPVisionTransformer(nnx.Module):
    """CLIP ViT: embeddings -> pre_layrnorm -> encoder; pooled = post_layernorm(class token)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = _dtypes(config)
        eps = config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs)
        dim = config.hidden_size
        self.pre_layrnorm = partitioned_layer_norm(dim, epsilon=eps, **dtypes, rngs=rngs)
        self.encoder = _encoder(config, rngs)
        self.post_layernorm = partitioned_layer_norm(dim, epsilon=eps, **dtypes, rngs=rngs)

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.config.grid_size

    def __call__(self, pixel_values: Array, *, output_hidden_states: bool = True) -> VisionOutput:
        """pixel_values [N, H, W, C] float, already normalised -> VisionOutput (see its docstring).

        hidden_states[0] is the encoder input (after pre_layrnorm); hidden_states[i] is layer i's
        output.
        """
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        states = self.encoder(hidden)
        last = states[-1]
        return VisionOutput(
            last_hidden_state=last,
            pooler_output=self.post_layernorm(last[:, 0, :]),
            hidden_states=states if output_hidden_states else None,
        )


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding plus learned absolute positions."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        dtypes = _dtypes(config)
        self.token_embedding = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            embedding_init=logical(nnx.initializers.normal(0.02), ("vocab", "embed")),
            **dtypes,
            rngs=rngs,
        )
        self.position_embedding = _position_embedding(
            config.max_position_embeddings, config.hidden_size, dtypes, rngs
        )

    def __call__(self, input_ids: Array) -> Array:
        """input_ids [N, S] int -> [N, S, D]."""
        positions = jnp.arange(input_ids.shape[1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextTransformer(nnx.Module):
    """Causal text encoder; pooled output is the final-norm state at the EOS position."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs)
        self.encoder = _encoder(config, rngs)
        self.final_layer_norm = partitioned_layer_norm(
            config.hidden_size, epsilon=config.layer_norm_eps, **_dtypes(config), rngs=rngs
        )

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> TextOutput:
        """input_ids [N, S] int; attention_mask [N, S] (1/True = real token) | None.

        Returns TextOutput (see its docstring); causal attention, padded keys masked.
        """
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has length {length}; at most max_position_embeddings="
                f"{self.config.max_position_embeddings} tokens are supported"
            )
        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        states = self.encoder(self.embeddings(input_ids), key_mask=key_mask, is_causal=True)
        last = self.final_layer_norm(states[-1])
        if self.config.eos_token_id == 2:
            # transformers keeps the pre-#24773 rule for this legacy id: EOS = the largest token id.
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            eos_index = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)  # first EOS
        pooled = jnp.take_along_axis(last, eos_index[:, None, None], axis=1)[:, 0]
        return TextOutput(last_hidden_state=last, pooler_output=pooled)


class CLIPModel(nnx.Module):
    """Both towers plus bias-free projections into the shared space and the learned logit scale."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config.vision_config, rngs=rngs)
        self.text_model = CLIPTextTransformer(config.text_config, rngs=rngs)
        self.visual_projection = partitioned_linear(
            config.vision_config.hidden_size,
            config.projection_dim,
            ("embed", None),
            use_bias=False,
            **_dtypes(config.vision_config),
            rngs=rngs,
        )
        self.text_projection = partitioned_linear(
            config.text_config.hidden_size,
            config.projection_dim,
            ("embed", None),
            use_bias=False,
            **_dtypes(config.text_config),
            rngs=rngs,
        )
        self.logit_scale = nnx.Param(
            logical(nnx.initializers.constant(config.logit_scale_init_value), ())(
                rngs.params(), (), jnp.dtype(config.vision_config.param_dtype)
            )
        )

    def get_image_features(self, pixel_values: Array) -> Array:
        """pixel_values [N, H, W, C] -> image embeddings [N, projection_dim], not normalised."""
        pooled = self.vision_model(pixel_values, output_hidden_states=False).pooler_output
        return self.visual_projection(pooled)

    def get_text_features(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """input_ids [N, S], attention_mask [N, S] | None -> text embeddings [N, projection_dim]."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)


def merge_tokens(features: Array, grid_size: int, factor: int) -> Array:
    """Concatenate each `factor x factor` block of a row-major patch grid into one token.

    features [N, P, D] with P = grid_size**2 -> [N, P / factor**2, D * factor**2]. Blocks are
    ordered row-major over the coarse grid; within a block the factor**2 patches are concatenated
    row-major along the feature axis. No parameters; factor 1 is the identity.
    """
    num, patches, dim = features.shape
    if patches != grid_size**2:
        raise ValueError(
            f"features hold {patches} patches; grid_size={grid_size} needs {grid_size**2}"
        )
    if factor < 1 or grid_size % factor:
        raise ValueError(
            f"factor={factor} must be >= 1 and divide grid_size={grid_size} "
            f"(valid factors: {[f for f in range(1, grid_size + 1) if grid_size % f == 0]})"
        )
    coarse = grid_size // factor
    blocks = features.reshape(num, coarse, factor, coarse, factor, dim)
    blocks = blocks.transpose(0, 1, 3, 2, 4, 5)  # [N, row, col, row_in_block, col_in_block, D]
    return blocks.reshape(num, coarse * coarse, factor * factor * dim)
