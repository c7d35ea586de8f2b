"""Generation prompts: templated prompt ids, left-padded into batches of few distinct shapes.

``generate`` appends on the right, so prompts are left-padded; their length is rounded up to a
multiple of ``LENGTH_MULTIPLE`` so that the jitted decode loop compiles for few prompt lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from mmpo_jax.data.template import DropReason, encode_prompt
from mmpo_jax.data.tokenizer import pad_token_id

LENGTH_MULTIPLE = 8


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
               num_image_tokens: int, template: str = "llava_1_5", num_images: int = 1
               ) -> list[np.ndarray]:
    """The generation prompts (BOS + template up to the assistant's turn, ``num_images`` images)
    as id rows.

    Raises:
      ValueError: a prompt the template cannot encode (naming the first few).
    """
    encoded = [encode_prompt(tokenizer, prompt, num_image_tokens=num_image_tokens,
                             template=template, num_images=num_images) for prompt in prompts]
    dropped = [(i, e) for i, e in enumerate(encoded) if isinstance(e, DropReason)]
    if dropped:
        raise ValueError(f"{len(dropped)} prompts could not be encoded, e.g. "
                         f"{[(i, prompts[i][:40], e) for i, e in dropped[:3]]}")
    return [np.asarray(e.input_ids, np.int32) for e in encoded]


def pad_rows(sequences: Sequence[np.ndarray], pad_id: int, *, side: str, min_length: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Pads 1-D id rows to ``[len, T]``, ``T`` the longest (or ``min_length`` when longer) rounded
    up to ``LENGTH_MULTIPLE``.

    Args:
      side: ``"left"`` (prompts to generate from: real tokens at the right end) or ``"right"``
        (sequences to score: real tokens from position 0).
      min_length: pad to at least this length, so that batches of different prompt sets share one
        shape (and one compiled decode loop).

    Returns:
      ``(input_ids int32 [B, T], attention_mask bool [B, T])``.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r} is not 'left' or 'right'")
    longest = max(min_length, *(len(row) for row in sequences))
    length = -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    input_ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for row, ids in enumerate(sequences):
        where = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[row, where] = ids
        mask[row, where] = True
    return input_ids, mask


def left_pad(sequences: Sequence[np.ndarray], pad_id: int, *, min_length: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """``pad_rows(sequences, pad_id, side="left")``: a batch of prompts for ``generate``."""
    return pad_rows(sequences, pad_id, side="left", min_length=min_length)


def left_padded_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                        num_image_tokens: int, template: str = "llava_1_5"
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``left_pad(prompt_ids(...))`` with the tokenizer's pad id: ``(input_ids, mask)`` ``[P, T]``."""
    return left_pad(prompt_ids(tokenizer, prompts, num_image_tokens=num_image_tokens,
                               template=template), pad_token_id(tokenizer))
