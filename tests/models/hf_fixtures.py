"""Tiny random transformers models saved to disk, the parity references of the model tests.

Every builder seeds torch, re-draws every parameter from a wide distribution (transformers'
initialisers give near-zero weights and unit norm scales, under which a mis-mapped tensor can hide)
and writes the model with `save_pretrained`, so tests read exactly what transformers writes.
The checkpoint rewriters produce the other on-disk layouts (llava-hf hub names, transformers v5
module names, sharded files) from such a directory. Only tests import this module (it needs torch).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE_TOKEN_ID = 100
VOCAB_SIZE = 120


def tiny_clip_vision_config(**overrides) -> CLIPVisionConfig:
    """CLIP vision tower: 30x30 images, 6-px patches (5x5 grid), 2 layers of width 32."""
    fields = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=30, patch_size=6, projection_dim=24,
    )
    return CLIPVisionConfig(**{**fields, **overrides})


def tiny_llama_config(**overrides) -> LlamaConfig:
    """Llama decoder: 2 layers of width 64, 4 query heads, vocabulary of 120."""
    fields = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    return LlamaConfig(**{**fields, **overrides})


def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter: N(0, 0.15) for weights and biases, N(1, 0.15) for norm scales."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.15
            is_norm_scale = name.endswith("weight") and parameter.ndim == 1
            parameter.copy_(noise + (1.0 if is_norm_scale else 0.0))


def save_tiny_llava(
    directory: pathlib.Path,
    *,
    seed: int = 0,
    num_key_value_heads: int = 4,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    tie_word_embeddings: bool = False,
) -> LlavaForConditionalGeneration:
    """Builds a random tiny `LlavaForConditionalGeneration` (eager attention, eval mode) and saves it.

    Returns the torch model; `directory` then holds `config.json` and `model.safetensors` as
    transformers' `save_pretrained` writes them.
    """
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=tiny_clip_vision_config().to_dict(),
        text_config=tiny_llama_config(
            num_key_value_heads=num_key_value_heads, tie_word_embeddings=tie_word_embeddings
        ).to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    randomize_parameters(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    model.set_attn_implementation("eager")
    model.eval()
    model.save_pretrained(directory)
    return model


def save_tiny_clip(directory: pathlib.Path, *, seed: int = 0) -> CLIPModel:
    """Builds a random tiny `CLIPModel` (text: vocab 120, width 32, 2 layers) and saves it."""
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=24, eos_token_id=VOCAB_SIZE - 1,
        bos_token_id=VOCAB_SIZE - 2, pad_token_id=0,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=tiny_clip_vision_config().to_dict(), projection_dim=24
    )
    model = CLIPModel(config)
    randomize_parameters(model, seed)
    model.set_attn_implementation("eager")
    model.eval()
    model.save_pretrained(directory)
    return model


def rewrite_checkpoint(
    source: pathlib.Path,
    destination: pathlib.Path,
    rename: Callable[[str], str | None] = lambda name: name,
    *,
    num_shards: int = 1,
) -> dict[str, np.ndarray]:
    """Copies a saved checkpoint with every tensor name passed through `rename` (None drops it).

    `num_shards > 1` writes `model-0000i-of-0000n.safetensors` files plus the
    `model.safetensors.index.json` weight map, as transformers' sharded checkpoints. Returns the
    tensors written, by their new names.
    """
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "config.json", destination / "config.json")
    tensors = {}
    for name, array in load_file(source / "model.safetensors").items():
        new_name = rename(name)
        if new_name is not None:
            tensors[new_name] = array
    if num_shards == 1:
        save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
        return tensors
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        shard_names = names[shard::num_shards]
        save_file({n: tensors[n] for n in shard_names}, destination / file_name, metadata={"format": "pt"})
        weight_map.update({n: file_name for n in shard_names})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
    (destination / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return tensors


def hub_layout_name(name: str) -> str:
    """transformers' saved name -> the llava-hf hub name (CLIP tower under `vision_model`)."""
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def v5_module_name(name: str) -> str:
    """transformers' saved name -> the v5 in-memory module name (`model.language_model...`)."""
    name = hub_layout_name(name).replace("vision_tower.vision_model.", "vision_tower.", 1)
    if name.startswith("language_model.lm_head."):
        return name.removeprefix("language_model.")
    if name.startswith("language_model.model."):
        return "model.language_model." + name.removeprefix("language_model.model.")
    return "model." + name
