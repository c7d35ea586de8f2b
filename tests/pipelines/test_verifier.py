"""The CLIP verifier: scores are CLIP cosines, transformers parity, the word CLIP and its cache."""

from __future__ import annotations

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmpo_jax.data import image_processing, shapes_world
from mmpo_jax.evaluation.shapes import objects_from_json
from mmpo_jax.models.clip import CLIPModel
from mmpo_jax.pipelines import fisao, verifier
from mmpo_jax.pipelines.verifier import Verifier, WordClipSpec

IMAGE_CONFIG = image_processing.tiny(64)
VOCABULARY = fisao.shapes_world_vocabulary()
TINY_SPEC = WordClipSpec(hidden_size=32, conv_channels=(8, 8, 16, 16), num_heads=2,
                         projection_dim=16, train_steps=4, batch_size=8, holdout=8)


@functools.lru_cache(maxsize=None)
def sft_records(count: int = 24) -> tuple[dict, ...]:
    spec = shapes_world.WorldSpec(sft_size=count)
    return tuple(itertools.islice(shapes_world.generate_split(spec, "sft"), count))


@functools.lru_cache(maxsize=None)
def random_word_clip(seed: int = 0) -> Verifier:
    tokenizer = verifier.word_tokenizer(VOCABULARY.objects)
    config = verifier.word_clip_config(TINY_SPEC, image_size=64, tokenizer=tokenizer)
    return Verifier(CLIPModel(config, rngs=nnx.Rngs(seed)), verifier.word_text_encoder(tokenizer),
                    IMAGE_CONFIG)


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_object_scores_are_cosines_of_the_object_prompts():
    clip = random_word_clip()
    records = sft_records()[:3]
    pixels = clip.pixels([r["image"] for r in records])
    objects = [["red circle", "square"], [], ["blue star", "star", "green cross"]]
    scores = clip.object_scores(pixels, objects)
    images = _unit(nnx.jit(lambda m, p: m.get_image_features(p))(clip.model, pixels))
    words = sorted({w for row in objects for w in row})
    ids, mask = clip.encode_texts([f"a photo of a {word}." for word in words])
    texts = _unit(nnx.jit(lambda m, i, a: m.get_text_features(i, a))(clip.model, ids, mask))
    for row, row_words in enumerate(objects):
        assert scores[row].shape == (len(row_words),)
        expected = [images[row] @ texts[words.index(w)] for w in row_words]
        np.testing.assert_allclose(scores[row], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one list per image"):
        clip.object_scores(pixels, objects[:2])


def test_padding_does_not_change_text_embeddings():
    clip = random_word_clip()
    texts = ["a photo of a red circle.", "a photo of a star.", "a red circle and a star."]
    together = np.asarray(clip.text_embeddings(texts))
    alone = np.concatenate([np.asarray(clip.text_embeddings([t])) for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    ids, mask = clip.encode_texts(texts)
    end = ids[np.arange(3), mask.sum(-1) - 1]
    assert np.all(end == clip.model.config.text_config.eos_token_id)  # pooled at END_WORD


def test_clip_score_is_hessel_clipscore():
    clip = random_word_clip()
    records = sft_records()[:4]
    pixels = clip.pixels([r["image"] for r in records])
    texts = [shapes_world.caption(objects_from_json(r["objects"])) for r in records]
    got = clip.clip_score(pixels, texts)
    cos = np.sum(_unit(clip.image_embeddings(pixels)) * _unit(clip.text_embeddings(texts)), -1)
    np.testing.assert_allclose(got, 2.5 * np.maximum(cos, 0.0), rtol=1e-5, atol=1e-6)
    assert got.shape == (4,) and np.all(got >= 0)


def test_auc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    positive = np.round(rng.normal(0.5, 1, 40), 1)  # rounded: ties count one half
    negative = np.round(rng.normal(0, 1, 60), 1)
    pairs = np.mean((positive[:, None] > negative[None, :])
                    + 0.5 * (positive[:, None] == negative[None, :]))
    assert verifier.auc(positive, negative) == pytest.approx(pairs, abs=1e-12)


def test_hf_clip_verifier_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from tests.models import hf_fixtures

    reference = hf_fixtures.save_tiny_clip(tmp_path, seed=5)
    vocab_size = hf_fixtures.VOCAB_SIZE
    words = ["a", "photo", "of", "red", "circle", "dog", "."]
    vocab = {"<pad>": 0, **{w: i + 1 for i, w in enumerate(words)},
             "<|startoftext|>": vocab_size - 2, "<|endoftext|>": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab_size - 2), ("<|endoftext|>", vocab_size - 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<|startoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30},
         "image_mean": [0.48, 0.45, 0.40], "image_std": [0.27, 0.26, 0.28], "resample": 3}))
    clip = Verifier.from_hf_clip(tmp_path, max_length=16)
    images = [np.asarray(r["image"]) for r in sft_records()[:2]]
    pixels = clip.pixels(images)
    scores = clip.object_scores(pixels, [["red circle", "dog"], ["dog"]])
    ids, mask = clip.encode_texts(["a photo of a red circle.", "a photo of a dog."])
    with torch.no_grad():
        image = reference.get_image_features(
            pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).pooler_output.numpy()
        text = reference.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                           attention_mask=torch.tensor(mask)).pooler_output.numpy()
    expected = _unit(image) @ _unit(text).T  # [image, text]
    np.testing.assert_allclose(scores[0], expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores[1], expected[1, 1:], rtol=1e-4, atol=1e-5)


def test_word_clip_trains_saves_and_is_cached(tmp_path, monkeypatch):
    records = sft_records()
    key = {"world": "test", "count": len(records)}
    common = dict(image_config=IMAGE_CONFIG, spec=TINY_SPEC)
    trained, directory = verifier.cached_word_clip(tmp_path, key, records, VOCABULARY.objects,
                                                   VOCABULARY.truth, **common)
    assert directory.parent == tmp_path and (directory / "verifier.json").is_file()
    initial = random_word_clip(TINY_SPEC.seed)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                         nnx.state(trained.model, nnx.Param),
                                         nnx.state(initial.model, nnx.Param)))
    assert max(moved) > 0  # it trained
    pixels = trained.pixels([r["image"] for r in records[:3]])
    objects = [list(VOCABULARY.objects[:5])] * 3

    def no_training(*args, **kwargs):
        raise AssertionError("the cached verifier was retrained")

    monkeypatch.setattr(verifier, "train_word_clip", no_training)
    loaded, again = verifier.cached_word_clip(tmp_path, key, records, VOCABULARY.objects,
                                              VOCABULARY.truth, **common)
    assert again == directory
    for a, b in zip(trained.object_scores(pixels, objects), loaded.object_scores(pixels, objects)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(AssertionError, match="retrained"):  # another world is another key
        verifier.cached_word_clip(tmp_path, {**key, "world": "other"}, records,
                                  VOCABULARY.objects, VOCABULARY.truth, **common)


def test_discrimination_reports_present_and_absent_means():
    clip = random_word_clip()
    records = sft_records()[:6]
    report = verifier.discrimination(clip, records, VOCABULARY.objects, VOCABULARY.truth)
    present = sum(len(VOCABULARY.truth(r)) for r in records)
    assert report["num_present"] == present
    assert report["num_present"] + report["num_absent"] == len(records) * len(VOCABULARY.objects)
    scores = clip.object_scores(clip.pixels([r["image"] for r in records]),
                                [sorted(VOCABULARY.truth(r)) for r in records])
    assert report["mean_present"] == pytest.approx(np.mean(np.concatenate(scores)), abs=1e-5)
    with pytest.raises(ValueError, match="none to train on"):
        verifier.train_word_clip(records, VOCABULARY.objects, VOCABULARY.truth,
                                 image_config=IMAGE_CONFIG, spec=TINY_SPEC)
