"""A model directory that transformers and the tools built on it load as a llava-hf checkpoint.

`export_pretrained` writes, beside the weights and `config.json` of `convert.save_hf_llava`, what a
llava-hf hub repository holds so that `AutoProcessor`, `AutoTokenizer` and
`LlavaForConditionalGeneration.from_pretrained(directory)` (and lmms-eval's `llava_hf`, VLMEvalKit)
need nothing else:

    tokenizer.json, tokenizer_config.json, ...   the tokenizer's own `save_pretrained`
    preprocessor_config.json                      our image preprocessing as transformers'
                                                  `LlavaImageProcessor` (pad-to-square as `do_pad`)
    processor_config.json                         the `LlavaProcessor` fields (patch size, feature
                                                  strategy, image token), flat as transformers 4
                                                  writes it; transformers 5 reads this layout too
    chat_template.jinja, chat_template.json       the conversation template the model was trained
                                                  with (the .json for transformers < 4.47)
    generation_config.json                        BOS / EOS / pad ids

`save_processor` writes those files alone, e.g. into an orbax model directory so that loading the
model for evaluation finds its tokenizer and preprocessing beside it.

[our choice] The processor files are written as JSON here rather than by transformers'
`LlavaProcessor.save_pretrained`: importing transformers' processors imports torch, which the
package does not need at run time; the tests load the result with transformers.
"""

from __future__ import annotations

import copy
import json
import pathlib

from transformers import PreTrainedTokenizerBase

from mmpo_jax.data.image_processing import (
    PREPROCESSOR_CONFIG,
    PROCESSOR_CONFIG,
    ImageProcessorConfig,
    to_hf_image_processor_dict,
)
from mmpo_jax.data.template import IMAGE_TOKEN, image_token_id
from mmpo_jax.models.convert import save_hf_llava
from mmpo_jax.models.llava import Llava, LlavaConfig

GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"

# The `data.template` conversation templates as transformers chat templates: for a user turn of
# images + text and `add_generation_prompt`, `llava_1_5` renders exactly
# `template.TEMPLATES["llava_1_5"].prompt_text` ("USER: <image>\n{prompt} ASSISTANT:", a system
# message's text first, followed by a space); the processor prepends BOS. Messages hold either a
# string or a list of {"type": "image"} / {"type": "text", "text": ...} items (images first).
CHAT_TEMPLATES = {
    "llava_1_5": (
        "{%- for message in messages -%}"
        "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
        "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}{%- else -%}"
        "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
        "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] + ' ' }}{%- endfor -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    ),
}
# CLIP towers put one class token before the patch tokens (transformers' `num_additional_image_tokens`).
CLIP_ADDITIONAL_IMAGE_TOKENS = 1


def processor_fields(config: LlavaConfig) -> dict:
    """The `LlavaProcessor` fields of `processor_config.json` (transformers 4 layout) for `config`."""
    return {
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": CLIP_ADDITIONAL_IMAGE_TOKENS,
        "patch_size": config.vision_config.patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }


def check_compatible(config: LlavaConfig, tokenizer: PreTrainedTokenizerBase,
                     image_config: ImageProcessorConfig) -> None:
    """Raises ValueError when `tokenizer` or `image_config` cannot drive a model of `config`."""
    image_id = image_token_id(tokenizer)
    if image_id != config.image_token_id:
        raise ValueError(f"the tokenizer's {IMAGE_TOKEN} id is {image_id} but the model's image_token_id is "
                         f"{config.image_token_id}; export with the tokenizer the model was trained with")
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                         f"({config.text_config.vocab_size}); export with the tokenizer the model was trained with")
    if image_config.crop_size != config.vision_config.image_size:
        raise ValueError(f"the image preprocessing crops to {image_config.crop_size} px but the vision tower "
                         f"takes {config.vision_config.image_size} px images")


def save_processor(directory: str | pathlib.Path, *, config: LlavaConfig, tokenizer: PreTrainedTokenizerBase,
                   image_config: ImageProcessorConfig, template: str = "llava_1_5") -> None:
    """Writes the tokenizer, processor, chat template and generation config of a model of `config`
    into `directory` (created); the files of the module docstring other than the weights.

    Raises:
      ValueError: an unknown template, or a tokenizer / preprocessing that does not fit `config`.
    """
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"template={template!r} has no chat template; valid: {sorted(CHAT_TEMPLATES)}")
    check_compatible(config, tokenizer, image_config)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chat_template = CHAT_TEMPLATES[template]
    tokenizer = copy.deepcopy(tokenizer)  # the chat template is set on a copy, not the caller's
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    _write_json(directory / PREPROCESSOR_CONFIG, to_hf_image_processor_dict(image_config))
    _write_json(directory / PROCESSOR_CONFIG, processor_fields(config))
    (directory / CHAT_TEMPLATE_FILE).write_text(chat_template)
    _write_json(directory / LEGACY_CHAT_TEMPLATE_FILE, {"chat_template": chat_template})
    pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    _write_json(directory / GENERATION_CONFIG, {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id,
        "pad_token_id": pad_id,
    })


def export_pretrained(model: Llava, directory: str | pathlib.Path, *, tokenizer: PreTrainedTokenizerBase,
                      image_config: ImageProcessorConfig, template: str = "llava_1_5",
                      max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `model` as a complete llava-hf directory (module docstring): float32 safetensors and
    `config.json` (with `text_config.bos_token_id`), plus `save_processor`'s files.

    Args:
      model: the model to export (LoRA already merged into its weights).
      directory: output directory (created).
      tokenizer: the tokenizer the model was trained with.
      image_config: its image preprocessing (`image_processing.from_pretrained_dir`).
      template: the conversation template it was trained with (`data.template.TEMPLATES`).
      max_shard_bytes: largest safetensors file; larger models are sharded with an index.
    """
    save_processor(directory, config=model.config, tokenizer=tokenizer, image_config=image_config,
                   template=template)
    save_hf_llava(model, model.config, directory, max_shard_bytes=max_shard_bytes,
                  bos_token_id=tokenizer.bos_token_id)


def _write_json(path: pathlib.Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
