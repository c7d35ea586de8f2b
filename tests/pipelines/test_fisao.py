"""FiSAO rollouts: object words and their tokens, sampled batches, token rewards, calibration."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmpo_jax.data import shapes_world
from mmpo_jax.evaluation.shapes import objects_from_json
from mmpo_jax.generation.prompts import left_padded_prompts
from mmpo_jax.pipelines import fisao
from mmpo_jax.rewards.fisao import object_reward
from tests.pipelines.test_verifier import random_word_clip, sft_records
from tests.engine import step_fixtures as fx

SHAPES = fisao.shapes_world_vocabulary()


def _names(found):
    return [name for _, name in found]


def test_vocabularies_find_the_longest_phrase_with_plurals_and_synonyms():
    text = "a red circle, two blue squares and a star."
    found = SHAPES.mentions(text)
    assert _names(found) == ["red circle", "blue square", "star"]
    assert [text[:end].split()[-1] for end, _ in found] == ["circle", "squares", "star"]
    coco = fisao.coco_vocabulary()
    assert _names(coco.mentions("Two dogs and a man ride bikes near the train track.")) == [
        "dog", "person", "bicycle"]  # "train track" names no object
    assert coco.truth({"objects": '["dog", "person"]'}) == {"dog", "person"}
    scene = {"objects": '[{"shape": "circle", "color": "red", "bbox": [0, 0, 20, 20]}]'}
    assert SHAPES.truth(scene) == {"red circle", "circle"}
    assert "red circle" in SHAPES.objects and len(SHAPES.objects) == 6 * 6 + 6
    with pytest.raises(ValueError, match="valid"):
        fisao.object_vocabulary("imagenet")


def _subword_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(
        ["[UNK]", "</s>", "a", "red", "cir", "##cle", "and", "star", "##s", "two", "."])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


@pytest.mark.parametrize("tokenizer", ["word", "subword"])
def test_rewards_go_on_the_last_token_of_each_word(tokenizer):
    tok = fx.tokenizer() if tokenizer == "word" else _subword_tokenizer()
    ids = tok.encode("a red circle and two stars.", add_special_tokens=False)
    ids = ids + [tok.eos_token_id]
    tokens = tok.convert_ids_to_tokens(ids)
    found = fisao.token_mentions(tok, ids, SHAPES)
    assert _names(found) == ["red circle", "star"]
    expected = ["circle", "stars"] if tokenizer == "word" else ["##cle", "##s"]
    assert [tokens[index] for index, _ in found] == expected


def test_find_object_words_pads_to_the_response_slots():
    tok = fx.tokenizer()
    rows = ["a red circle and a square.", "two stars.", "."]
    width = 9
    new_tokens = np.full((3, width), tok.pad_token_id, np.int32)
    lengths = np.zeros(3, np.int32)
    for b, text in enumerate(rows):
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        new_tokens[b, :len(ids)], lengths[b] = ids, len(ids)
    new_tokens[2, 2:4] = tok.convert_tokens_to_ids(["red", "circle"])  # after EOS: ignored
    words, names = fisao.find_object_words(tok, new_tokens, lengths, SHAPES)
    assert names == [["red circle", "square"], ["star"], []]
    assert words.mask.shape == (3, width)
    np.testing.assert_array_equal(words.mask.sum(-1), [2, 1, 0])
    np.testing.assert_array_equal(words.last_token[0, :2], [2, 5])
    assert [SHAPES.objects[k] for k in words.object_index[0, :2]] == ["red circle", "square"]


@pytest.fixture(scope="module")
def rollout():
    records = fx.records(16)[:3]
    batch, lengths = fisao.sample_rollouts(
        fx.base_model(), fx.tokenizer(), [r["image"] for r in records],
        [r["prompt"] for r in records], image_config=fx.IMAGE_CONFIG, num_samples=2,
        max_new_tokens=10, temperature=1.0, rng=jax.random.key(0))
    return batch, lengths


def test_sampled_batches_have_fixed_shapes_and_consistent_masks(rollout):
    batch, lengths = rollout
    tok = fx.tokenizer()
    prompt_ids, prompt_mask = left_padded_prompts(
        tok, [shapes_world.CAPTION_PROMPT] * 3, num_image_tokens=16)
    length = batch.prompt_length
    assert length % 8 == 0 and batch.sequences.shape == (6, length + 10)
    np.testing.assert_array_equal(batch.sequences[:, :length], np.repeat(prompt_ids, 2, axis=0))
    np.testing.assert_array_equal(batch.attention_mask[:, :length],
                                  np.repeat(prompt_mask, 2, axis=0))
    np.testing.assert_array_equal(batch.response_mask, np.arange(10)[None] < lengths[:, None])
    np.testing.assert_array_equal(batch.attention_mask[:, length:], batch.response_mask)
    new = np.asarray(batch.new_tokens)
    assert np.all(new[~batch.response_mask] == tok.pad_token_id)
    assert not np.any(new == fx.base_model().config.image_token_id)  # banned
    np.testing.assert_array_equal(batch.group_ids, [0, 0, 1, 1, 2, 2])
    assert batch.pixel_values.shape == (6, 64, 64, 3)
    assert np.all(batch.sampler_logps[batch.response_mask] < 0)
    assert np.all(batch.sampler_logps[~batch.response_mask] == 0)


def test_token_and_sentence_rewards_from_verifier_scores(rollout):
    batch, lengths = rollout
    tok, verifier = fx.tokenizer(), random_word_clip()
    words, names = fisao.find_object_words(tok, np.asarray(batch.new_tokens), lengths, SHAPES)
    records = fx.records(16)[:3]
    pixels = np.repeat(verifier.pixels([r["image"] for r in records]), 2, axis=0)
    image_embeds = verifier.image_embeddings(pixels)
    object_embeds = verifier.object_embeddings(SHAPES.objects)
    mu_c, mu_h = 0.05, -0.05
    rewards, word_rewards, metrics = fisao.rollout_rewards(
        image_embeds, object_embeds, words, batch.response_mask, mu_c, mu_h)
    expected_words = verifier.object_scores(pixels, names)
    expected = np.zeros(rewards.shape, np.float32)
    for b, scores in enumerate(expected_words):
        for w, score in enumerate(scores):
            expected[b, words.last_token[b, w]] += float(object_reward(score, mu_c, mu_h))
    np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-6)
    count = sum(len(n) for n in names)
    assert float(metrics["rollout/object_reward"][1]) == count
    positives = sum(float(object_reward(s, mu_c, mu_h)) > 0 for row in expected_words
                    for s in row)
    assert float(metrics["rollout/positive_fraction"][0]) == positives
    sentence, _, _ = fisao.rollout_rewards(image_embeds, object_embeds, words,
                                           batch.response_mask, mu_c, mu_h,
                                           reward_granularity="sentence")
    for b in range(len(names)):
        mean = np.mean(np.asarray(word_rewards)[b, :len(names[b])]) if names[b] else 0.0
        np.testing.assert_allclose(sentence[b], np.where(batch.response_mask[b], mean, 0.0),
                                   rtol=1e-5, atol=1e-6)


def _caption_records(count: int):
    return [r for r in sft_records() if r["prompt"] == shapes_world.CAPTION_PROMPT][:count]


def test_calibration_labels_mentions_by_ground_truth():
    records = _caption_records(6)  # two batches of the rollout fixture's shape: one compile
    verifier = random_word_clip()
    settings = dict(image_config=fx.IMAGE_CONFIG, num_samples=2, max_new_tokens=10,
                    temperature=1.0, prompts_per_batch=3, seed=7)
    correct, hallucinated = fisao.mention_scores(fx.base_model(), fx.tokenizer(), verifier,
                                                 SHAPES, records, **settings)
    # The same samples, labelled independently with the shapes world's caption parser.
    expected = {True: [], False: []}
    for number, start in enumerate(range(0, len(records), 3)):
        chunk = records[start:start + 3]
        batch, lengths = fisao.sample_rollouts(
            fx.base_model(), fx.tokenizer(), [r["image"] for r in chunk],
            [r["prompt"] for r in chunk], image_config=fx.IMAGE_CONFIG, num_samples=2,
            max_new_tokens=10, temperature=1.0,
            rng=jax.random.fold_in(jax.random.key(7), number))
        for row, (tokens, length) in enumerate(zip(np.asarray(batch.new_tokens), lengths)):
            text = fx.tokenizer().decode(tokens[:length], skip_special_tokens=True)
            scene = objects_from_json(chunk[row // 2]["objects"])
            names = [f"{c} {s}" if c else s for _, c, s in
                     shapes_world.parse_caption_groups(text)]
            scores = verifier.object_scores(verifier.pixels([chunk[row // 2]["image"]]),
                                            [names])[0]
            for (_, color, shape), score in zip(shapes_world.parse_caption_groups(text), scores):
                present = any(o.shape == shape and color in (None, o.color) for o in scene)
                expected[present].append(score)
    assert len(correct) + len(hallucinated) > 0
    np.testing.assert_allclose(np.sort(correct), np.sort(expected[True]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sort(hallucinated), np.sort(expected[False]), rtol=1e-5,
                               atol=1e-6)


def test_calibration_is_cached_by_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return fisao.Calibration(mu_c=0.3, mu_h=0.1, num_correct=5, num_hallucinated=2)

    key = fisao.calibration_key(policy="abc", records=[1, 2])
    first = fisao.cached_calibration(tmp_path, key, compute)
    again = fisao.cached_calibration(tmp_path, key, compute)
    assert first == again == compute() and len(calls) == 2  # the last call is ours
    other = fisao.cached_calibration(tmp_path, fisao.calibration_key(policy="abd", records=[1, 2]),
                                     compute)
    assert dataclasses.asdict(other) == dataclasses.asdict(first) and len(calls) == 3
    assert len(list(tmp_path.glob("*.json"))) == 2
