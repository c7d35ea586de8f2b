"""The word-level tokenizer: round trips of every generated text, one id for <image>, save/load."""

from __future__ import annotations

import itertools
import json

import pytest
from transformers import AutoTokenizer

from mmpo_jax.data import shapes_world
from mmpo_jax.data.tokenizer import SPECIAL_TOKENS, build_word_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(shapes_world.vocabulary(), model_max_length=64)


def _generated_texts() -> list[str]:
    spec = shapes_world.WorldSpec(sft_size=300, preference_size=150, test_caption_size=20, test_pope_images=10)
    texts = []
    for split in shapes_world.SPLITS:
        for record in shapes_world.generate_split(spec, split):
            texts += [record[k] for k in ("prompt", "response", "chosen", "rejected", "question", "answer")
                      if k in record]
            if split == "test_caption":
                texts.append(json.loads(record["metadata"])["caption"])
    return texts


def test_every_generated_text_round_trips_without_unknown_tokens(tokenizer):
    texts = _generated_texts()
    # Every count word, colour and plural appears in some caption.
    all_groups = [(c, col, s) for c, col, s in itertools.product((1, 2, 3), shapes_world.COLORS, shapes_world.SHAPES)]
    texts += [shapes_world.caption_text(all_groups[i:i + 3]) for i in range(0, len(all_groups), 3)]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text


def test_image_token_is_one_id_anywhere(tokenizer):
    image_id = tokenizer.image_token_id
    assert image_id == tokenizer.convert_tokens_to_ids("<image>") == SPECIAL_TOKENS.index("<image>")
    for text in ("<image>", "USER: <image>\ndescribe the image. ASSISTANT:", "x<image>y", "<image><image>"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids.count(image_id) == text.count("<image>"), text
    templated = tokenizer("USER: <image>\nDescribe the image. ASSISTANT: a red circle.").input_ids
    assert tokenizer.unk_token_id not in templated
    assert tokenizer.convert_ids_to_tokens(templated) == [
        "<s>", "user", ":", "<image>", "describe", "the", "image", ".", "assistant", ":", "a", "red", "circle", "."]


def test_special_tokens_and_bos_like_llama(tokenizer):
    special_ids = [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert special_ids == [0, 1, 2, 3]
    ids = tokenizer("a red circle.").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle."
    assert tokenizer("Is THERE a Star?", add_special_tokens=False).input_ids == tokenizer(
        "is there a star?", add_special_tokens=False).input_ids


def test_save_and_load_give_the_same_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    text = "USER: <image>\nis there a cross in the image? ASSISTANT: no"
    for loaded in (load_tokenizer(tmp_path / "tok"), AutoTokenizer.from_pretrained(tmp_path / "tok")):
        assert loaded(text).input_ids == tokenizer(text).input_ids
        assert loaded.image_token_id == tokenizer.image_token_id
        assert loaded.get_vocab() == tokenizer.get_vocab()
        assert loaded.model_max_length == 64
    with pytest.raises(FileNotFoundError, match="no saved tokenizer"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("word", ["two words", "Red", "circle.", "<s>"])
def test_bad_vocabulary_entries_are_rejected(word):
    with pytest.raises(ValueError, match="vocabulary entry"):
        build_word_tokenizer(["red", word], model_max_length=8)
