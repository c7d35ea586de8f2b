"""LLaVA-1.5 conversation template: prompt/response text -> ids, loss mask, image placeholders.

Sequence layout (`llava_1_5`, the llava-hf chat template):

    <s> [{system} ]USER: <image>\\n{prompt} ASSISTANT: {response}</s>
    |------------------ prompt, loss 0 ------------------||-- loss 1 ---|

Each `<image>` is tokenised as one id and then expanded to `num_image_tokens` copies of that id
(one placeholder per visual token, as transformers v5 does); with several images the prompt holds
one `<image>\\n` per image. BOS and EOS are inserted as ids, never tokenised from text.

Boundary rule. The prompt is tokenised on its own, and the response ids are the ids that
tokenising `prompt + " " + response` adds after the prompt's ids; so the sequence is exactly the
joint tokenisation and the loss-mask boundary falls between two tokens. If a tokenizer merges
across that boundary (the prompt's ids are then not a prefix of the joint ids), the response
`" " + response` is tokenised separately instead: the boundary stays exact, the ids differ from
the joint tokenisation only at the seam.

Truncation happens only inside the supervised part (response + EOS), from its end; a truncated
example therefore carries no EOS [our choice: the model is not taught to stop mid-sentence]. A
prompt that leaves no room for a single supervised token is dropped (`DropReason`), not truncated.
Works with any transformers tokenizer that has BOS/EOS and an `<image>` token encoding to one id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

IMAGE_TOKEN = "<image>"
# LLaVA-1.5's `conv_vicuna_v1` system prompt, for callers that want the original training format.
LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
PROMPT_TOO_LONG = "prompt_too_long"


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """The literal text around one single-turn exchange.

    Prompt text = `[system + system_separator] + user_prefix + (image_token + image_separator) *
    num_images + prompt + assistant_prefix`; response text = `response_prefix + response`.
    """

    user_prefix: str
    image_separator: str
    assistant_prefix: str
    response_prefix: str
    system_separator: str

    def prompt_text(
        self, prompt: str, *, num_images: int, system_prompt: str | None, image_token: str
    ) -> str:
        """The prompt as text, with one `image_token` per image (not yet expanded)."""
        system = "" if system_prompt is None else system_prompt + self.system_separator
        images = (image_token + self.image_separator) * num_images
        return f"{system}{self.user_prefix}{images}{prompt}{self.assistant_prefix}"


TEMPLATES: dict[str, ConversationTemplate] = {
    "llava_1_5": ConversationTemplate(
        user_prefix="USER: ",
        image_separator="\n",
        assistant_prefix=" ASSISTANT:",
        response_prefix=" ",
        system_separator=" ",
    ),
}


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    """One tokenised example.

    Attributes:
      input_ids: int32 `[T]`, BOS + prompt (image placeholders expanded) [+ response [+ EOS]].
      loss_mask: int32 `[T]`, 1 exactly on the response tokens and the EOS, 0 elsewhere.
      num_prompt_tokens: length of the prompt part (BOS included); the response starts here.
      truncated: whether the response (or its EOS) was cut to fit `max_length`.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    num_prompt_tokens: int
    truncated: bool


@dataclasses.dataclass(frozen=True)
class DropReason:
    """Why an example was not encoded; callers count drops by `name` (e.g. `PROMPT_TOO_LONG`)."""

    name: str
    detail: str


def image_token_id(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> int:
    """The id of `image_token`, checked to encode as exactly that one id."""
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if ids != [token_id] or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"tokenizer encodes {image_token!r} as {ids}, expected one dedicated id; add it with "
            f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}})."
        )
    return token_id


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    num_image_tokens: int,
    num_images: int = 1,
    max_length: int | None = None,
    template: str = "llava_1_5",
    system_prompt: str | None = None,
    image_token: str = IMAGE_TOKEN,
) -> EncodedExample | DropReason:
    """Encodes a prompt for generation: BOS + template up to and including "ASSISTANT:".

    Args:
      tokenizer: any transformers tokenizer with BOS and `image_token`.
      prompt: the user's question, without template or image tokens.
      num_image_tokens: visual tokens per image (from the model config, e.g. 576 for LLaVA-1.5).
      num_images: images in the prompt; one `image_token` each.
      max_length: longest allowed `T`, or None for no limit.
      template: a key of `TEMPLATES`.
      system_prompt: optional system text placed before "USER:".
      image_token: the placeholder token's text.

    Returns:
      `EncodedExample` with `input_ids` int32 `[T]` and an all-zero `loss_mask` `[T]`, or a
      `DropReason` named `PROMPT_TOO_LONG` if `T > max_length`.
    """
    prompt_text = _prompt_text(prompt, num_images, template, system_prompt, image_token)
    prompt_ids = _expand_images(
        tokenizer, _encode(tokenizer, prompt_text), num_images, num_image_tokens, image_token
    )
    if max_length is not None and len(prompt_ids) > max_length:
        return DropReason(
            PROMPT_TOO_LONG, f"prompt has {len(prompt_ids)} tokens > max_length={max_length}"
        )
    input_ids = np.asarray(prompt_ids, np.int32)
    return EncodedExample(input_ids, np.zeros_like(input_ids), len(prompt_ids), truncated=False)


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    *,
    num_image_tokens: int,
    num_images: int = 1,
    max_length: int,
    template: str = "llava_1_5",
    system_prompt: str | None = None,
    image_token: str = IMAGE_TOKEN,
) -> EncodedExample | DropReason:
    """Encodes a prompt and its response for training (SFT, or one side of a preference pair).

    Args: as `encode_prompt`, plus
      response: the assistant's answer, without template or EOS.
      max_length: longest allowed `T`; only the response (+ EOS) is truncated to meet it.

    Returns:
      `EncodedExample` with `input_ids` int32 `[T]` = BOS + prompt + " {response}" + EOS and
      `loss_mask` int32 `[T]` set on the response tokens and EOS; or a `DropReason` named
      `PROMPT_TOO_LONG` when the prompt leaves no room for one response token
      (T_prompt >= max_length).
    """
    prompt_text = _prompt_text(prompt, num_images, template, system_prompt, image_token)
    prompt_text_ids, response_ids = _split_encode(
        tokenizer, prompt_text, TEMPLATES[template].response_prefix + response
    )
    prompt_ids = _expand_images(
        tokenizer, prompt_text_ids, num_images, num_image_tokens, image_token
    )
    room = max_length - len(prompt_ids)
    if room <= 0:
        return DropReason(
            PROMPT_TOO_LONG,
            f"prompt has {len(prompt_ids)} tokens, leaving no response token within "
            f"max_length={max_length}",
        )
    supervised = response_ids + [_required_id(tokenizer, "eos")]
    input_ids = np.asarray(prompt_ids + supervised[:room], np.int32)
    loss_mask = np.zeros_like(input_ids)
    loss_mask[len(prompt_ids) :] = 1
    return EncodedExample(input_ids, loss_mask, len(prompt_ids), truncated=len(supervised) > room)


def decode_response(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes generated response ids `[T]`: cut at the first EOS, specials dropped, stripped."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    eos = _required_id(tokenizer, "eos")
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _prompt_text(
    prompt: str, num_images: int, template: str, system_prompt: str | None, image_token: str
) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is unknown; valid: {sorted(TEMPLATES)}.")
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}.")
    if image_token in prompt:
        raise ValueError(
            f"prompt {prompt[:80]!r} already contains {image_token!r}; pass the bare question and "
            "num_images instead."
        )
    return TEMPLATES[template].prompt_text(
        prompt, num_images=num_images, system_prompt=system_prompt, image_token=image_token
    )


def _split_encode(
    tokenizer: PreTrainedTokenizerBase, prompt_text: str, response_text: str
) -> tuple[list[int], list[int]]:
    """(BOS + prompt ids, response ids) following the module's boundary rule."""
    prompt_ids = _encode(tokenizer, prompt_text)
    if not response_text.strip():  # an empty response is just EOS, not a stray space token
        return prompt_ids, []
    joint_ids = _encode(tokenizer, prompt_text + response_text)
    if joint_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, joint_ids[len(prompt_ids) :]
    return prompt_ids, tokenizer.encode(response_text, add_special_tokens=False)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """BOS + ids of `text`, with the tokenizer's own special-token insertion switched off."""
    return [_required_id(tokenizer, "bos")] + tokenizer.encode(text, add_special_tokens=False)


def _expand_images(
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    num_images: int,
    num_image_tokens: int,
    image_token: str,
) -> list[int]:
    """Replaces each image-token id by `num_image_tokens` copies of it."""
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}.")
    if num_images == 0:
        return ids
    placeholder = image_token_id(tokenizer, image_token)
    found = ids.count(placeholder)
    if found != num_images:
        raise ValueError(
            f"prompt tokenised to {found} {image_token!r} ids, expected num_images={num_images}."
        )
    expanded: list[int] = []
    for token in ids:
        expanded.extend([token] * num_image_tokens if token == placeholder else [token])
    return expanded


def _required_id(tokenizer: PreTrainedTokenizerBase, which: str) -> int:
    token_id = getattr(tokenizer, f"{which}_token_id")
    if token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no {which}_token; the template needs one."
        )
    return token_id
