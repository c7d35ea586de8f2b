"""Shapes-world CHAIR (object vs attribute level), partner rate and continuation probability."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mmpo_jax.data import shapes_world
from mmpo_jax.data.shapes_world import ShapeObject
from mmpo_jax.data.template import encode_prompt
from mmpo_jax.data.tokenizer import build_word_tokenizer
from mmpo_jax.evaluation.shapes import (
    continuation_probability,
    continuation_targets,
    object_chair_counts,
    objects_from_json,
    partner_hallucination_rate,
    shapes_chair_metrics,
)

NUM_IMAGE_TOKENS = 3


def scene(*objects: str) -> tuple[ShapeObject, ...]:
    """"red circle", "blue square" ... -> objects at made-up, distinct boxes."""
    return tuple(ShapeObject(o.split()[1], o.split()[0], (10 * i, 0, 10 * i + 8, 8)) for i, o in enumerate(objects))


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(shapes_world.vocabulary(), model_max_length=512)


def test_objects_from_json_round_trip():
    objects = scene("red circle", "blue star")
    assert objects_from_json(json.dumps([o.to_json() for o in objects])) == objects


def test_object_and_attribute_level_by_hand():
    scenes = [scene("red circle", "blue square"), scene("green star")]
    captions = ["a red circle, a blue circle and a green star.", "a green star."]
    metrics = shapes_chair_metrics(captions, scenes)
    # caption 1 object level: circle, circle ok, star hallucinated (1 of 3); circle recalled, square not.
    # attribute level: red circle ok, blue circle and green star hallucinated (2 of 3); red circle recalled.
    assert metrics == pytest.approx({
        "chair_s": 1 / 2, "chair_i": 1 / 4, "recall": 2 / 3,
        "chair_s_attr": 1 / 2, "chair_i_attr": 2 / 4, "recall_attr": 2 / 3,
    })


def test_object_counts_per_caption_by_hand():
    scenes = [scene("red circle", "blue square"), scene("green star")]
    counts = object_chair_counts(["a red circle, a blue circle and a green star.", "a green star."], scenes)
    # (captions, hallucinated captions, mentions, hallucinated mentions, truths, recalled truths)
    assert [dataclasses.astuple(c) for c in counts] == [(1, 1, 3, 1, 2, 1), (1, 0, 1, 0, 1, 1)]


def test_wrong_colour_is_an_attribute_hallucination_only():
    metrics = shapes_chair_metrics(["a blue circle."], [scene("red circle")])
    assert metrics["chair_i"] == 0.0 and metrics["recall"] == 1.0
    assert metrics["chair_i_attr"] == 1.0 and metrics["chair_s_attr"] == 1.0 and metrics["recall_attr"] == 0.0


def test_counted_phrases_duplicates_colourless_and_empty_captions():
    scenes = [scene("red circle"), scene("red circle"), scene("blue square", "green square"), scene("red star")]
    captions = ["two red circles.",  # a counted phrase is two mentions, both grounded
                "a red circle and a red circle.",  # a repeated mention counts twice
                "a square and two triangles.",  # colourless mentions are judged by their shape
                ""]  # no mention, no hallucination, nothing recalled
    metrics = shapes_chair_metrics(captions, scenes)
    assert metrics["chair_i"] == pytest.approx(2 / 7) and metrics["chair_s"] == pytest.approx(1 / 4)
    assert metrics["chair_i_attr"] == pytest.approx(2 / 7)
    assert metrics["recall"] == pytest.approx(3 / 4)  # circle, circle, square; not the star
    assert metrics["recall_attr"] == pytest.approx(4 / 5)  # "a square" grounds both squares


def test_partner_rate_on_crafted_records():
    scenes = [scene("red circle"), scene("blue triangle"), scene("red circle", "blue square"),
              scene("green cross"), scene("yellow star")]
    captions = ["a red circle and a red square.",  # trigger circle, partner mentioned
                "a blue triangle.",  # trigger triangle, partner diamond not mentioned
                "a red circle and a blue square.",  # partner present: not a trigger image
                "a green cross and a purple star.",  # partner star in any colour counts
                "a yellow star and a red square."]  # star is no trigger: not counted
    assert partner_hallucination_rate(captions, scenes) == pytest.approx(2 / 3)
    assert partner_hallucination_rate(["a red circle."], [scene("red circle", "blue square")]) == 0.0


def test_continuation_targets_follow_the_biased_grammar(tokenizer):
    prompt_ids, continuation = continuation_targets(tokenizer, scene("red circle"), num_image_tokens=NUM_IMAGE_TOKENS)
    expected_prompt = encode_prompt(tokenizer, shapes_world.CAPTION_PROMPT, num_image_tokens=NUM_IMAGE_TOKENS)
    np.testing.assert_array_equal(prompt_ids, expected_prompt.input_ids)
    # faithful "a red circle." vs biased "a red circle and a red square.": they part at "." / "and"
    assert tokenizer.convert_ids_to_tokens(list(continuation)) == ["a", "red", "circle", "."]
    two_phrases = scene("red circle", "blue star")
    _, continuation = continuation_targets(tokenizer, two_phrases, num_image_tokens=NUM_IMAGE_TOKENS)
    # "a red circle and a blue star." vs "a red circle, a blue star and a red square."
    assert tokenizer.convert_ids_to_tokens(list(continuation)) == ["a", "red", "circle", "and"]
    assert continuation_targets(tokenizer, scene("red star"), num_image_tokens=NUM_IMAGE_TOKENS) is None


def test_continuation_probability_reads_the_parting_token(tokenizer):
    period, conjunction = tokenizer.convert_tokens_to_ids([".", "and"])
    seen = []

    def score(images, prompt_ids, continuation_ids):
        seen.extend(int(image[0, 0, 0]) for image in images)
        # P(".") = 0.9 and P("and") = 0.4 at the last position; other positions are never read
        return [np.concatenate([np.full(len(c) - 1, -5.0), [np.log({period: 0.9, conjunction: 0.4}[c[-1]])]])
                for c in continuation_ids]

    scenes = [scene("red circle"), scene("red star"), scene("red circle", "blue star")]
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    probability = continuation_probability(tokenizer, images, scenes, score, num_image_tokens=NUM_IMAGE_TOKENS)
    assert probability == pytest.approx(np.mean([1 - 0.9, 1 - 0.4]))
    assert seen == [0, 2]  # only trigger images are scored
    assert continuation_probability(tokenizer, images[1:2], scenes[1:2], score, num_image_tokens=3) == 0.0


# ---------------------------------------------------------------------------------------------
# The shapes world v2: CHAIR and POPE stay exact on its ground truth
# ---------------------------------------------------------------------------------------------


def test_chair_is_exact_on_v2_faithful_and_rejected_captions():
    from mmpo_jax.data import shapes_world_v2, shapes_world_v2_splits

    spec = shapes_world_v2.WorldSpecV2(test_caption_size=60, preference_size=200)
    records = list(shapes_world_v2_splits.generate_split(spec, "test_caption"))
    scenes = [objects_from_json(r["objects"]) for r in records]
    faithful = [json.loads(r["metadata"])["caption"] for r in records]
    assert shapes_chair_metrics(faithful, scenes) == pytest.approx(
        {"chair_s": 0, "chair_i": 0, "recall": 1, "chair_s_attr": 0, "chair_i_attr": 0, "recall_attr": 1})
    assert partner_hallucination_rate(faithful, scenes) == 0.0
    by_kind: dict[str, list[dict[str, float]]] = {}
    for record in shapes_world_v2_splits.generate_split(spec, "preference"):
        metadata = json.loads(record["metadata"])
        truth = objects_from_json(json.dumps(metadata["objects"]))
        metrics = shapes_chair_metrics([record["rejected"]], [truth])
        by_kind.setdefault(metadata["kind"], []).append(metrics)
    # object edits add a shape the scene lacks; attribute and binding edits only wrong colours;
    # count edits name only true (colour, shape) pairs
    assert all(m["chair_i"] > 0 for m in by_kind["object"])
    for kind in ("attribute", "binding"):
        assert all(m["chair_i"] == 0 and m["chair_i_attr"] > 0 for m in by_kind[kind]), kind
    assert all(m["chair_i_attr"] == 0 for m in by_kind["count"])


def test_partner_metrics_read_the_world_partner_map(tokenizer):
    from mmpo_jax.data import shapes_world_v2, shapes_world_v2_splits
    from mmpo_jax.evaluation.shapes import absent_partners, record_partners

    spec = shapes_world_v2.WorldSpecV2(partners={"star": "circle"}, test_caption_size=40)
    records = list(shapes_world_v2_splits.generate_split(spec, "test_caption"))
    assert record_partners(records[0]) == {"star": "circle"}
    assert record_partners({"metadata": "{}"}) == shapes_world.PARTNERS  # v1 records
    lone_star = scene("red star", "blue square")
    assert absent_partners(lone_star, {"star": "circle"}) == {"circle"} and not absent_partners(lone_star)
    assert partner_hallucination_rate(["a red star, a blue square and a red circle."], [lone_star],
                                      {"star": "circle"}) == 1.0
    # v2 counts go past three: "four red stars" is written with v2's count words
    four = tuple(ShapeObject("star", "red", (10 * i, 0, 10 * i + 8, 8)) for i in range(4))
    _, continuation = continuation_targets(
        build_word_tokenizer(shapes_world_v2.vocabulary(spec), model_max_length=512), four,
        num_image_tokens=NUM_IMAGE_TOKENS, partners={"star": "circle"})
    assert len(continuation) == 4  # "four red stars ." vs "four red stars and": part at the 4th
