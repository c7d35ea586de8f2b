"""AMBER: the published files, object mentions, and the reference's arithmetic.

The generative counts are checked against an independent re-statement of the reference
`inference.py` loop in its own data layout (one search list per image: the associated words of
every truth word, then the truth words; a parallel list whose association entries hold the index
of their truth word and whose tail holds the 0/1 marks), on random cases, with and without a
similarity function.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmpo_jax.evaluation import amber
from tests.evaluation import real_fixtures


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return real_fixtures.write_amber(tmp_path_factory.mktemp("amber"))


@pytest.fixture(scope="module")
def data(published):
    return amber.read_amber(published["data"])


def _reference_generative(nouns, truth, hallu, association, global_safe, similar):
    """The reference's per-response arithmetic, restated: returns its metric increments."""
    def search_list(words):
        entries, marks = [], []
        for index, word in enumerate(words):
            entries += association[word]
            marks += [index] * len(association[word])
        return entries + list(words), marks + [0] * len(words), len(words)

    def mark(marks, size, j):
        if j < len(marks) - size:
            marks[marks[j] + len(marks) - size] = 1
        else:
            marks[j] = 1

    safe, safe_marks, safe_len = search_list(truth)
    ha, ha_marks, ha_len = search_list(hallu)
    flags = [0] * len(nouns)
    for position, noun in enumerate(nouns):
        if noun in global_safe:
            continue
        if noun in safe:
            mark(safe_marks, safe_len, safe.index(noun))
            continue
        if noun in ha:
            mark(ha_marks, ha_len, ha.index(noun))
        for j, word in enumerate(ha):
            if similar(noun, word):
                mark(ha_marks, ha_len, j)
                break
        saved = False
        for j, word in enumerate(safe):
            if similar(noun, word):
                saved = True
                mark(safe_marks, safe_len, j)
                break
        if not saved:
            flags[position] = 1
    return (sum(flags), len(flags), sum(safe_marks[-safe_len:]), safe_len, sum(ha_marks[-ha_len:]), ha_len,
            int(sum(flags) == 0))


def _ours(counts: amber.AmberGenerativeCounts):
    return (counts.hallucinated_mentions, counts.mentions, counts.covered_truths, counts.truths,
            counts.cognised_hallus, counts.hallus, counts.responses - counts.hallucinated_responses)


@pytest.mark.parametrize("seed", range(40))
def test_generative_counts_match_the_reference_arithmetic(seed):
    rng = np.random.default_rng(seed)
    words = ["sky", "grass", "ground", "floor", "dog", "puppy", "cat", "tree", "road", "street", "light", "sign"]
    association = {w: [str(a) for a in rng.choice(words, size=rng.integers(0, 3), replace=False) if a != w]
                   for w in words}
    truth = [str(w) for w in rng.choice(words, size=rng.integers(1, 5))]  # duplicates possible, as published
    hallu = [str(w) for w in rng.choice(words, size=rng.integers(1, 4))]
    nouns = [str(w) for w in rng.choice(words, size=rng.integers(0, 8))]
    global_safe = frozenset({"light", "sign"})
    data = amber.AmberData({}, {k: tuple(v) for k, v in association.items()}, global_safe)
    first_letter = lambda a, b: a[0] == b[0]  # noqa: E731  (a toy stand-in for vector similarity)
    assert _ours(amber.generative_counts(nouns, truth, hallu, data)) == _reference_generative(
        nouns, truth, hallu, association, global_safe, str.__eq__)
    assert _ours(amber.generative_counts(nouns, truth, hallu, data, first_letter)) == _reference_generative(
        nouns, truth, hallu, association, global_safe, first_letter)


def test_generative_metrics_by_hand(data):
    # id 1: truth sky, grass (assoc ground), dog (assoc puppy); hallu cat (kitten), tree, car (vehicle)
    # "Puppies" is capitalised: never matched (as the reference's lemmatiser); "puppy" covers dog;
    # "ground" covers grass; "kittens" cognises cat and is hallucinated; "sign" is a safe word.
    first = "Puppies play. A puppy on the ground near two kittens and a sign."
    # id 2: truth man, ground (assoc floor), man; hallu dog, shelf (assoc bookshelf)
    # "men" -> man (first "man" only), "bookshelves" -> bookshelf cognises shelf, hallucinated.
    second = "Two men stand by bookshelves; you can see the sky."
    metrics = amber.generative_metrics([first, second], [1, 2], data)
    # mentions: [puppy, ground, kitten, sign] + [man, bookshelf, sky]; hallucinated: kitten; bookshelf, sky
    assert metrics["amber_chair"] == pytest.approx(3 / 7)
    assert metrics["amber_cover"] == pytest.approx((2 + 1) / (3 + 3))  # dog, grass; the first man
    assert metrics["amber_hal"] == pytest.approx(2 / 2)
    assert metrics["amber_cog"] == pytest.approx((1 + 1) / (3 + 2))


@pytest.mark.parametrize("text, expected", [
    ("A dog and two dogs.", ["dog", "dog"]),
    ("Dogs run.", []),  # capitalised: the reference's lower-case lemmas never match it
    ("A shelf and bookshelves, then shelves.", ["shelf", "bookshelf", "shelf"]),
    ("The people and a person.", ["people", "person"]),  # "people" is a vocabulary word of its own
    ("You can see a can of soda.", ["can"]),  # the modal is not a mention
    ("The man's car-park.", ["man"]),  # "car-park" is one token, as NLTK keeps it
])
def test_object_mentions(data, text, expected):
    vocabulary = data.vocabulary
    assert amber.object_mentions(text, vocabulary) == expected


def test_discriminative_metrics_by_hand():
    answers = ["Yes.", "No, there are three.", "No", "No.", "Yes", "no"]
    truths = ["yes", "no", "yes", "no", "yes", "no"]
    dimensions = ["state", "number", "action", "existence", "relation", "relation"]
    metrics = amber.discriminative_metrics(answers, truths, dimensions)
    # "no" positive: answered no at 1, 2, 3, 5; truth no at 1, 3, 5 -> TP 3, FP 1, FN 0, TN 2
    assert metrics["amber_accuracy"] == pytest.approx(5 / 6)
    assert metrics["amber_precision"] == pytest.approx(3 / 4)
    assert metrics["amber_recall"] == pytest.approx(1.0)
    assert metrics["amber_f1"] == pytest.approx(2 * 0.75 / 1.75)
    # attribute pools state (TN), number (TP), action (FP)
    assert metrics["amber_attribute_accuracy"] == pytest.approx(2 / 3)
    assert metrics["amber_attribute_precision"] == pytest.approx(1 / 2)
    assert metrics["amber_action_accuracy"] == 0.0 and metrics["amber_action_recall"] == 0.0
    assert metrics["amber_existence_f1"] == pytest.approx(1.0)
    assert metrics["amber_relation_accuracy"] == pytest.approx(1.0)
    assert set(metrics) == {f"amber_{p}{m}" for p in ("", "existence_", "attribute_", "state_", "number_", "action_",
                                                      "relation_") for m in amber.DISCRIMINATIVE_METRICS}


def test_published_files_become_records(published, data):
    assert data.safe_words == frozenset(real_fixtures.AMBER_SAFE_WORDS)  # last line without newline
    queries = amber.read_amber_queries(published["data"] / "query" / "query_all.json")
    records = amber.amber_records(queries, data, published["images"], question_suffix=" Answer yes or no.")
    assert len(records.generative) == 2 and len(records.discriminative) == 6
    first = records.generative[0]
    assert first["prompt"] == "Describe this image." and first["image"].shape == (32, 44, 3)
    question = records.discriminative[3]
    assert question["question"] == "Is there a cat in this image? Answer yes or no."
    assert (question["answer"], question["dimension"]) == ("no", "existence")
    assert [f["dimension"] for f in records.discriminative.fields][-2:] == ["relation", "relation"]
    metrics = amber.amber_metrics(records, ["A dog on grass under the sky.", "A man."], ["No"] * 6, data)
    assert metrics["amber_chair"] == 0.0 and metrics["amber_cover"] == pytest.approx(4 / 6)
    assert metrics["amber_recall"] == 1.0 and metrics["amber_precision"] == pytest.approx(3 / 6)


def test_bad_files_are_named(tmp_path, published):
    directory = tmp_path / "data"
    directory.mkdir()
    for name in ("relation.json", "safe_words.txt"):
        (directory / name).write_text((published["data"] / name).read_text())
    (directory / "annotations.json").write_text(json.dumps(
        [{"id": 1, "type": "generative", "truth": ["unicorn"], "hallu": []}]))
    with pytest.raises(ValueError, match=r"id 1: words \['unicorn'\] are not in relation.json"):
        amber.read_amber(directory)
    (directory / "annotations.json").write_text(json.dumps([{"id": 5, "type": "relation", "truth": "maybe"}]))
    with pytest.raises(ValueError, match="id 5: truth 'maybe' is neither yes nor no"):
        amber.read_amber(directory)
    (directory / "annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match="annotations.json' does not exist"):
        amber.read_amber(directory)
    queries = [amber.AmberQuery(99, "AMBER_1.jpg", "Describe this image.")]
    with pytest.raises(ValueError, match="AMBER query 99 has no entry in annotations.json"):
        amber.amber_records(queries, amber.read_amber(published["data"]), published["images"])
