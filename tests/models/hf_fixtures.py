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
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlamaTokenizer,
)

IMAGE_TOKEN_ID = 100
VOCAB_SIZE = 120
# The training text of `llama_bpe_tokenizer`.
CORPUS = [
    "USER: What is in the image? ASSISTANT: There is a red circle and a blue square.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "Describe the picture in detail. The green triangle is left of the yellow star.",
    "Is there a cat in the image? Yes, there is a cat on the mat. How many shapes? Three.",
]


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


def llama_bpe_tokenizer(legacy: bool) -> LlamaTokenizer:
    """A Llama tokenizer like LLaVA-1.5's: sentencepiece-style BPE over "▁"-prefixed words, byte
    fallback tokens <0x00>..<0xFF>, <unk>/<s>/</s> = 0/1/2 (BOS prepended), `<image>` as an added special
    token."""
    trainer_backend = Tokenizer(models.BPE())
    trainer_backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    trainer_backend.train_from_iterator(
        CORPUS * 4, trainers.BpeTrainer(vocab_size=150, show_progress=False)
    )
    learned = json.loads(trainer_backend.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True)  # as Llama adds BOS
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    return tokenizer


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
    vocab_size: int = VOCAB_SIZE,
    image_token_id: int = IMAGE_TOKEN_ID,
    pad_token_id: int | None = None,
) -> LlavaForConditionalGeneration:
    """Builds a random tiny `LlavaForConditionalGeneration` (eager attention, eval mode) and saves it.

    Returns the torch model; `directory` then holds `config.json` and `model.safetensors` as
    transformers' `save_pretrained` writes them.
    """
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=tiny_clip_vision_config().to_dict(),
        text_config=tiny_llama_config(
            num_key_value_heads=num_key_value_heads, tie_word_embeddings=tie_word_embeddings,
            vocab_size=vocab_size, pad_token_id=pad_token_id,
        ).to_dict(),
        image_token_index=image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
    )
    model = LlavaForConditionalGeneration(config)
    randomize_parameters(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    model.set_attn_implementation("eager")
    model.eval()
    model.save_pretrained(directory)
    return model


def tiny_llava_processor(*, do_pad: bool = False):
    """A `LlavaProcessor` for `save_tiny_llava`'s tower: `llama_bpe_tokenizer` and a CLIP image
    processor at the tower's 30 px (resize to 36, centre crop 30; `LlavaImageProcessor` with
    `do_pad`), 25 image tokens per image."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor, LlavaProcessor

    vision = tiny_clip_vision_config()
    settings = dict(size={"shortest_edge": 36}, crop_size={"height": vision.image_size, "width": vision.image_size})
    image_processor = LlavaImageProcessor(do_pad=True, **settings) if do_pad else CLIPImageProcessor(**settings)
    return LlavaProcessor(image_processor=image_processor, tokenizer=llama_bpe_tokenizer(legacy=False),
                          patch_size=vision.patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def save_tiny_llava_hf(directory: pathlib.Path, *, seed: int = 0, do_pad: bool = False,
                       layout: str = "v5") -> tuple[LlavaForConditionalGeneration, object]:
    """A tiny llava-hf checkpoint as a user has it: `save_tiny_llava` with the vocabulary and
    special ids of `tiny_llava_processor`'s tokenizer, plus the processor's files.

    `layout` "v5" keeps what transformers 5's `save_pretrained` writes (`processor_config.json`
    with the image processor nested); "v4" rewrites it as transformers 4 and the llava-hf hub
    repositories have it (`preprocessor_config.json` beside a flat `processor_config.json`).
    Returns (torch model, processor).
    """
    processor = tiny_llava_processor(do_pad=do_pad)
    tokenizer = processor.tokenizer
    model = save_tiny_llava(directory, seed=seed, vocab_size=len(tokenizer),
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id)
    processor.save_pretrained(directory)
    if layout == "v4":
        settings = json.loads((directory / "processor_config.json").read_text())
        image_processor = settings.pop("image_processor")
        (directory / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
        (directory / "processor_config.json").write_text(json.dumps(settings, indent=2))
    elif layout != "v5":
        raise ValueError(f"layout={layout!r}; valid: 'v4', 'v5'")
    return model, processor


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
