"""Model size presets: the embedded tiny LLaVA and the shapes of LLaVA-1.5 7B / 13B.

The large presets reproduce the architecture of `llava-hf/llava-1.5-7b-hf` and
`llava-hf/llava-1.5-13b-hf` (CLIP ViT-L/14 at 336 px, Vicuna v1.5 7B / 13B, vocabulary 32064 with
the image placeholder at 32000); weights come from `convert.load_hf_llava`, never from here.
"""

from __future__ import annotations

import jax
from flax import nnx

from mmpo_jax.models.clip import CLIPVisionConfig
from mmpo_jax.models.llama import LlamaConfig
from mmpo_jax.models.llava import Llava, LlavaConfig

LLAVA_1_5_VOCAB_SIZE = 32064
LLAVA_1_5_IMAGE_TOKEN_ID = 32000
LLAVA_1_5_PAD_TOKEN_ID = 32001
LLAMA_EOS_TOKEN_ID = 2


def tiny(
    *,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
) -> LlavaConfig:
    """The embedded default (~0.9M parameters at a vocabulary of a few hundred words).

    64x64 images through a conv stem (3x3 convs 32/64/128/128, three of stride 2 -> 8x8 grid),
    one vision layer of width 128, 2x2 token merge (16 visual tokens per image), a 2-layer Llama of
    width 128. The vocabulary and the placeholder id come from the tokenizer of the data.
    """
    return _tiny_llava(image_size=64, conv_channels=(32, 64, 128, 128), token_merge=2, vocab_size=vocab_size,
                       image_token_id=image_token_id, pad_token_id=pad_token_id,
                       eos_token_id=eos_token_id, dtype=dtype, param_dtype=param_dtype)


def tiny_v2(
    *,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
) -> LlavaConfig:
    """`tiny` for the shapes world v2's 128x128 images: 64 visual tokens (an 8x8 grid, 16 px each).

    A conv stem of one more stride-2 conv (3x3 convs 16/32/64/128/128, four of stride 2) gives the
    8x8 grid to the vision layer (width 128) directly, without a token merge; then `tiny`'s 2-layer
    Llama of width 128 (~0.83M parameters). [our choice] Measured on 2 CPU cores against `tiny`
    (one SFT step of 32, interleaved; `scripts/shapes_world_cost.py` for this one): the design
    with `tiny`'s stride-8 stem, a 16x16 vision grid and a 2x2 merge costs 4.1x a `tiny` step,
    this one 1.5x (mostly the longer sequence: 64 image tokens instead of 16).
    """
    return _tiny_llava(image_size=128, conv_channels=(16, 32, 64, 128, 128), token_merge=1,
                       vocab_size=vocab_size, image_token_id=image_token_id,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id, dtype=dtype,
                       param_dtype=param_dtype)


TINY_PRESETS = ("tiny", "tiny_v2")
"""Presets whose vocabulary and special ids come from the data's tokenizer."""


def _tiny_llava(*, image_size: int, conv_channels: tuple[int, ...], token_merge: int, vocab_size: int,
                image_token_id: int, pad_token_id: int | None, eos_token_id: int | None, dtype: str,
                param_dtype: str) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=2 ** (len(conv_channels) - 1),
        stem="conv",
        conv_channels=conv_channels,
        token_merge=token_merge,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    # The last vision layer is the only one, so features come from it (-1, not LLaVA-1.5's -2).
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )


def _llava_1_5(
    *, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, dtype: str, param_dtype: str
) -> LlavaConfig:
    vision = CLIPVisionConfig(  # openai/clip-vit-large-patch14-336
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    text = LlamaConfig(  # lmsys/vicuna-{7,13}b-v1.5
        vocab_size=LLAVA_1_5_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=LLAVA_1_5_IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=LLAVA_1_5_PAD_TOKEN_ID,
        eos_token_id=LLAMA_EOS_TOKEN_ID,
    )


def llava_1_5_7b(*, dtype: str = "bfloat16", param_dtype: str = "float32") -> LlavaConfig:
    """Shapes of llava-hf/llava-1.5-7b-hf (7.06B parameters): Llama 32 x 4096, 32 heads, MLP 11008."""
    return _llava_1_5(
        hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, dtype=dtype, param_dtype=param_dtype
    )


def llava_1_5_13b(*, dtype: str = "bfloat16", param_dtype: str = "float32") -> LlavaConfig:
    """Shapes of llava-hf/llava-1.5-13b-hf (13.35B parameters): Llama 40 x 5120, 40 heads, MLP 13824."""
    return _llava_1_5(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, dtype=dtype, param_dtype=param_dtype
    )


def count_parameters(model: nnx.Module | LlavaConfig) -> int:
    """Number of parameter scalars of a model, or of the `Llava` a config describes.

    A config is counted from abstract shapes (`nnx.eval_shape`), so 13B presets cost no memory.
    """
    if isinstance(model, LlavaConfig):
        config = model
        model = nnx.eval_shape(lambda: Llava(config, rngs=nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
