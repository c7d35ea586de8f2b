"""CHAIR counts and the COCO text parser, on hand-computed cases."""

from __future__ import annotations

import pytest

from mmpo_jax.evaluation.chair import ChairCounts, caption_chair_counts, chair_counts, coco_mentions, plural
from mmpo_jax.evaluation.coco_synonyms import COCO_SYNONYMS, PHRASE_REWRITES


def test_counts_by_hand_with_duplicates_and_an_empty_caption():
    mentions = [["dog", "dog", "cat"], [], ["car"]]
    truths = [{"dog", "person"}, {"bus"}, ["car", "car"]]
    counts = chair_counts(mentions, truths)
    # caption 1: 3 mentions (dog twice), cat hallucinated, dog of {dog, person} recalled;
    # caption 2 (empty): a caption without hallucination, its bus not recalled; caption 3: all good.
    assert counts == ChairCounts(captions=3, hallucinated_captions=1, mentions=4, hallucinated_mentions=1,
                                 truths=4, recalled_truths=2)
    assert counts.metrics() == {"chair_s": 1 / 3, "chair_i": 1 / 4, "recall": 2 / 4}
    assert counts.metrics("_x").keys() == {"chair_s_x", "chair_i_x", "recall_x"}


def test_a_repeated_hallucination_counts_every_mention():
    assert caption_chair_counts(["cat", "cat", "dog"], {"dog"}).metrics() == {
        "chair_s": 1.0, "chair_i": 2 / 3, "recall": 1.0}


def test_counts_add_and_empty_input_gives_zeros_not_nan():
    a = caption_chair_counts(["dog"], {"dog"})
    b = caption_chair_counts(["cat"], {"dog"})
    assert (a + b).metrics() == chair_counts([["dog"], ["cat"]], [{"dog"}, {"dog"}]).metrics()
    assert ChairCounts().metrics() == {"chair_s": 0.0, "chair_i": 0.0, "recall": 0.0}


def test_custom_grounding_relation():
    # a mention grounded by any truth sharing its first letter
    counts = caption_chair_counts(["apple", "banana"], {"avocado"}, lambda m, t: m[0] == t[0])
    assert counts.hallucinated_mentions == 1 and counts.recalled_truths == 1


def test_mismatched_lengths_name_both():
    with pytest.raises(ValueError, match="2 captions but 1 ground-truth"):
        chair_counts([["dog"], []], [{"dog"}])


def test_coco_table_is_the_80_categories_without_conflicts():
    assert len(COCO_SYNONYMS) == 80
    assert {"person", "toothbrush", "hair drier", "dining table", "sports ball"} <= set(COCO_SYNONYMS)
    names = [name for category, synonyms in COCO_SYNONYMS.items() for name in (category, *synonyms)]
    assert len(names) == len(set(names)), "a word may name only one category"
    assert all(name == name.lower() for name in names)
    assert PHRASE_REWRITES["baby bird"] == "bird" and PHRASE_REWRITES["passenger jet"] == "jet"


@pytest.mark.parametrize("word, expected", [
    ("dog", "dogs"), ("bus", "buses"), ("couch", "couches"), ("pony", "ponies"), ("trolley", "trolleys"),
    ("man", "men"), ("policeman", "policemen"), ("child", "children"), ("knife", "knives"), ("sheep", "sheep"),
    ("box", "boxes"), ("toothbrush", "toothbrushes"),
])
def test_plural(word, expected):
    assert plural(word) == expected


@pytest.mark.parametrize("text, expected", [
    ("", []),
    ("A dog.", ["dog"]),
    ("Two dogs chase a puppy and PUPPIES.", ["dog", "dog", "dog"]),  # plural, synonym, upper case
    ("Men and women on buses near ponies", ["person", "person", "bus", "horse"]),
    ("a teddy bear and a bear", ["teddy bear", "bear"]),  # the longest phrase wins
    ("hot dogs on a dining table", ["hot dog", "dining table"]),
    ("a baby elephant and a baby", ["elephant", "person"]),  # qualifier rule, then "baby" alone
    ("a passenger jet; a passenger", ["airplane", "person"]),
    ("people on the train track", ["person"]),  # "train track" names no object
    ("a toilet seat", ["toilet"]),
    ("a seat next to the toilet", ["toilet"]),  # "seat" is no chair when a toilet is mentioned
    ("a seat and a stool", ["chair", "chair"]),
    ("a man in a bow tie holds an iPhone", ["person", "tie", "cell phone"]),
    ("a motor bike, a traffic-light", ["motorcycle", "traffic light"]),
])
def test_coco_mentions(text, expected):
    assert coco_mentions(text) == expected


def test_coco_chair_by_hand():
    captions = ["A man rides a bike next to two buses.", "A cat sleeps on a sofa."]
    counts = chair_counts([coco_mentions(c) for c in captions], [{"person", "bicycle"}, {"cat", "couch", "remote"}])
    # caption 1: person, bicycle ok, bus hallucinated; caption 2: cat, couch ok, remote not mentioned
    assert counts.metrics() == {"chair_s": 1 / 2, "chair_i": 1 / 5, "recall": 4 / 5}
