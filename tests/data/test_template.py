"""LLaVA-1.5 template encoding with the word-level tokenizer and LLaVA-shaped Llama BPE ones."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from mmpo_jax.data import template as tp
from mmpo_jax.data.tokenizer import build_word_tokenizer
from tests.models.hf_fixtures import CORPUS, llama_bpe_tokenizer

PROMPT = "What is in the image?"
RESPONSE = "there is a red circle and a blue square"  # decodes back verbatim with every tokenizer
NUM_IMAGE_TOKENS = 5


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """The shapes-world tokenizer (word level, lower-case, punctuation split) on CORPUS's words."""
    spaced = " ".join(CORPUS).lower()
    for mark in "?.,:":
        spaced = spaced.replace(mark, f" {mark} ")
    return build_word_tokenizer(sorted(set(spaced.split())), model_max_length=512)


TOKENIZERS = {
    "word_level": word_level_tokenizer(),
    "llama_bpe": llama_bpe_tokenizer(legacy=False),
    "llama_bpe_legacy": llama_bpe_tokenizer(legacy=True),
}


@pytest.fixture(params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]


def _joint_ids(tokenizer, text: str, num_image_tokens: int) -> list[int]:
    """BOS + the joint tokenisation of `text`, image ids expanded: the reference sequence."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = [tokenizer.bos_token_id]
    for token in tokenizer.encode(text, add_special_tokens=False):
        ids.extend([token] * (num_image_tokens if token == image_id else 1))
    return ids


def _encode(tokenizer, **kwargs) -> tp.EncodedExample:
    args = dict(prompt=PROMPT, response=RESPONSE, num_image_tokens=NUM_IMAGE_TOKENS, max_length=512)
    encoded = tp.encode_prompt_response(tokenizer, **{**args, **kwargs})
    assert isinstance(encoded, tp.EncodedExample)
    return encoded


def test_sequence_equals_joint_tokenisation_of_the_llava_template(tokenizer):
    encoded = _encode(tokenizer)
    text = f"USER: <image>\n{PROMPT} ASSISTANT: {RESPONSE}"
    expected = _joint_ids(tokenizer, text, NUM_IMAGE_TOKENS) + [tokenizer.eos_token_id]
    assert encoded.input_ids.dtype == np.int32 and encoded.loss_mask.dtype == np.int32
    assert encoded.input_ids.tolist() == expected


def test_loss_mask_covers_exactly_response_and_eos(tokenizer):
    encoded = _encode(tokenizer)
    ids, mask, start = encoded.input_ids, encoded.loss_mask, encoded.num_prompt_tokens
    assert mask.tolist() == [0] * start + [1] * (len(ids) - start)
    supervised = ids[mask == 1].tolist()
    assert supervised[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(supervised[:-1]).strip() == RESPONSE
    prompt_only = tp.encode_prompt(tokenizer, PROMPT, num_image_tokens=NUM_IMAGE_TOKENS)
    assert prompt_only.input_ids.tolist() == ids[:start].tolist()
    assert not encoded.truncated


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_image_placeholders_count_and_stay_in_the_prompt(tokenizer, num_images):
    encoded = _encode(tokenizer, num_images=num_images)
    is_image = encoded.input_ids == tp.image_token_id(tokenizer)
    assert is_image.sum() == NUM_IMAGE_TOKENS * num_images
    assert not (is_image & (encoded.loss_mask == 1)).any()
    text = "USER: " + "<image>\n" * num_images + f"{PROMPT} ASSISTANT:"
    assert encoded.input_ids[: encoded.num_prompt_tokens].tolist() == _joint_ids(
        tokenizer, text, NUM_IMAGE_TOKENS
    )


def test_system_prompt_precedes_user_turn(tokenizer):
    encoded = _encode(tokenizer, system_prompt="A chat between a curious human and an assistant.")
    text = (
        f"A chat between a curious human and an assistant. USER: <image>\n{PROMPT} "
        f"ASSISTANT: {RESPONSE}"
    )
    assert encoded.input_ids.tolist() == _joint_ids(tokenizer, text, NUM_IMAGE_TOKENS) + [
        tokenizer.eos_token_id
    ]


def test_empty_response_supervises_only_eos(tokenizer):
    encoded = _encode(tokenizer, response="")
    prompt_only = tp.encode_prompt(tokenizer, PROMPT, num_image_tokens=NUM_IMAGE_TOKENS)
    assert encoded.input_ids.tolist() == prompt_only.input_ids.tolist() + [tokenizer.eos_token_id]
    assert encoded.loss_mask.sum() == 1


def test_truncation_cuts_only_the_response(tokenizer):
    full = _encode(tokenizer)
    start, length = full.num_prompt_tokens, len(full.input_ids)
    exact = _encode(tokenizer, max_length=length)
    assert exact.input_ids.tolist() == full.input_ids.tolist() and not exact.truncated
    for keep in (1, 3, length - start - 1):
        cut = _encode(tokenizer, max_length=start + keep)
        assert cut.truncated and len(cut.input_ids) == start + keep
        assert cut.input_ids.tolist() == full.input_ids[: start + keep].tolist()
        assert cut.loss_mask.sum() == keep and cut.input_ids[-1] != tokenizer.eos_token_id
        assert (cut.input_ids == tp.image_token_id(tokenizer)).sum() == NUM_IMAGE_TOKENS


def test_over_long_prompt_is_dropped_with_a_named_reason(tokenizer):
    start = _encode(tokenizer).num_prompt_tokens
    dropped = tp.encode_prompt_response(
        tokenizer, PROMPT, RESPONSE, num_image_tokens=NUM_IMAGE_TOKENS, max_length=start
    )
    assert isinstance(dropped, tp.DropReason) and dropped.name == tp.PROMPT_TOO_LONG
    assert str(start) in dropped.detail
    prompt_drop = tp.encode_prompt(
        tokenizer, PROMPT, num_image_tokens=NUM_IMAGE_TOKENS, max_length=start - 1
    )
    assert isinstance(prompt_drop, tp.DropReason) and prompt_drop.name == tp.PROMPT_TOO_LONG
    fits = tp.encode_prompt(tokenizer, PROMPT, num_image_tokens=NUM_IMAGE_TOKENS, max_length=start)
    assert len(fits.input_ids) == start and fits.loss_mask.sum() == 0


def test_decode_response_stops_at_eos_and_drops_specials(tokenizer):
    encoded = _encode(tokenizer)
    generated = encoded.input_ids[encoded.num_prompt_tokens :].tolist()
    after_eos = [tokenizer.pad_token_id] * 3 + tokenizer.encode(" red", add_special_tokens=False)
    padded = generated + after_eos
    assert tp.decode_response(tokenizer, np.asarray(padded)) == RESPONSE
    with_image = [tp.image_token_id(tokenizer)] + generated
    assert tp.decode_response(tokenizer, with_image) == RESPONSE


def test_llama_tokenizer_keeps_punctuation_and_newlines_in_the_response():
    tokenizer = TOKENIZERS["llama_bpe"]
    response = "Yes, there is a cat.\nIt sits on the mat!"
    encoded = _encode(tokenizer, response=response)
    text = f"USER: <image>\n{PROMPT} ASSISTANT: {response}"
    assert encoded.input_ids.tolist() == _joint_ids(tokenizer, text, NUM_IMAGE_TOKENS) + [2]
    assert tp.decode_response(tokenizer, encoded.input_ids[encoded.num_prompt_tokens :]) == response


def test_boundary_stays_exact_when_the_tokenizer_merges_across_it():
    """A BPE with the merge ':' + '▁' glues "ASSISTANT:" to the response's leading space."""
    chars = sorted(set(f"USER: {PROMPT} ASSISTANT: yes".replace(" ", "▁")) | {"\n"}) + [":▁"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[(":", "▁")])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    encoded = _encode(tokenizer, response="yes")
    start = encoded.num_prompt_tokens
    prompt_ids = _joint_ids(tokenizer, f"USER: <image>\n{PROMPT} ASSISTANT:", NUM_IMAGE_TOKENS)
    joint = _joint_ids(tokenizer, f"USER: <image>\n{PROMPT} ASSISTANT: yes", NUM_IMAGE_TOKENS)
    assert joint[: len(prompt_ids)] != prompt_ids  # the merge really crosses the boundary here
    assert encoded.input_ids[:start].tolist() == prompt_ids
    response_ids = encoded.input_ids[start:-1].tolist()
    assert response_ids == tokenizer.encode(" yes", add_special_tokens=False)
    assert tokenizer.decode(response_ids).strip() == "yes"
    assert encoded.loss_mask.tolist() == [0] * start + [1] * (len(response_ids) + 1)


def test_errors_name_the_offending_value():
    tokenizer = TOKENIZERS["word_level"]
    with pytest.raises(ValueError, match="already contains '<image>'"):
        tp.encode_prompt(tokenizer, "<image>\nWhat?", num_image_tokens=4)
    with pytest.raises(ValueError, match="template='vicuna'"):
        tp.encode_prompt(tokenizer, PROMPT, num_image_tokens=4, template="vicuna")
    with pytest.raises(ValueError, match="num_image_tokens must be >= 1, got 0"):
        tp.encode_prompt(tokenizer, PROMPT, num_image_tokens=0)
    no_image = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(
            models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")
        ),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    with pytest.raises(ValueError, match="encodes '<image>' as"):
        tp.image_token_id(no_image)
