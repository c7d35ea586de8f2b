"""POPE answer parsing (the reference rule), metrics by hand, and question files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmpo_jax.evaluation.pope import (
    PopeCounts,
    category_from_filename,
    parse_pope_answer,
    pope_counts,
    pope_metrics,
    pope_records,
    read_pope_questions,
)


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a cat in the image.", "yes"),
    ("No, there is no cat.", "no"),
    ("no", "no"),
    ("No", "no"),
    ("no, it is not", "no"),  # the comma is removed first
    ("There is not a dog in the image.", "no"),
    ("There is no dog", "no"),
    ("Yes. There is no dog.", "yes"),  # only the first sentence counts
    ("NO", "yes"),  # case-sensitive, as the reference
    ("Not really", "yes"),
    ("no!", "yes"),
    ("Nothing like that", "yes"),
    ("", "yes"),
])
def test_parse_pope_answer(text, expected):
    assert parse_pope_answer(text) == expected


def test_metrics_by_hand():
    answers = ["Yes", "yes, there is", "No", "There is no", "yes"]
    labels = ["yes", "no", "no", "yes", "yes"]
    counts = pope_counts(answers, labels)
    assert counts == PopeCounts(true_positives=2, false_positives=1, true_negatives=1, false_negatives=1)
    metrics = counts.metrics()
    assert metrics == pytest.approx({"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                     "yes_ratio": 3 / 5})


def test_degenerate_counts_are_zero_not_nan():
    assert PopeCounts().metrics() == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    all_no = pope_counts(["no", "no"], ["yes", "no"]).metrics()
    assert all_no["precision"] == 0.0 and all_no["f1"] == 0.0 and all_no["accuracy"] == 0.5


def test_per_split_and_mean():
    answers = ["yes", "no", "yes", "yes"]
    labels = ["yes", "no", "no", "yes"]
    categories = ["random", "random", "adversarial", "adversarial"]
    metrics = pope_metrics(answers, labels, categories)
    assert metrics["pope_random_accuracy"] == 1.0 and metrics["pope_adversarial_accuracy"] == 0.5
    assert metrics["pope_adversarial_precision"] == 0.5 and metrics["pope_adversarial_yes_ratio"] == 1.0
    assert metrics["pope_accuracy"] == 0.75  # unweighted mean over the splits present
    assert not any(key.startswith("pope_popular") for key in metrics)


def test_bad_labels_and_splits_are_named():
    with pytest.raises(ValueError, match="'maybe'"):
        pope_counts(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="'hard'"):
        pope_metrics(["yes"], ["yes"], ["hard"])


def _write_question_file(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_question_file_in_the_published_format(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(pixels).save(images / "COCO_val2014_000000310196.png")
    Image.fromarray(pixels).convert("L").save(images / "gray.png")
    path = tmp_path / "coco_pope_adversarial.json"
    _write_question_file(path, [
        {"question_id": 1, "image": "COCO_val2014_000000310196.png", "text": "Is there a snowboard in the image?",
         "label": "yes"},
        {"question_id": 2, "image": "gray.png", "text": "Is there a dog in the image?", "label": "no"},
    ])
    questions = read_pope_questions(path)
    assert [(q.question_id, q.label) for q in questions] == [(1, "yes"), (2, "no")]
    records = pope_records(path, images)
    assert len(records) == 2
    first, second = records[0], records[1]
    assert first["question"] == "Is there a snowboard in the image?" and first["answer"] == "yes"
    assert first["category"] == "adversarial" and first["id"] == "1"
    np.testing.assert_array_equal(first["image"], pixels)
    assert second["image"].shape == (4, 5, 3)  # grey images come back as RGB
    suffixed = pope_records(path, images, question_suffix=" Answer yes or no.")
    assert suffixed[1]["question"] == "Is there a dog in the image? Answer yes or no."
    with pytest.raises(FileNotFoundError, match="POPE image folder .* is not a directory"):
        pope_records(path, tmp_path / "missing")


def test_no_as_the_positive_class_flips_the_confusion_counts():
    answers, labels = ["Yes", "No", "No", "Yes, there is.", "no"], ["yes", "no", "yes", "no", "no"]
    assert pope_counts(answers, labels) == PopeCounts(true_positives=1, false_positives=1, true_negatives=2,
                                                      false_negatives=1)
    assert pope_counts(answers, labels, positive="no") == PopeCounts(true_positives=2, false_positives=1,
                                                                     true_negatives=1, false_negatives=1)
    with pytest.raises(ValueError, match="positive='maybe'"):
        pope_counts(answers, labels, positive="maybe")


def test_bad_question_lines_name_file_and_line(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "q", "label": "yes"}) + "\n"
                    + json.dumps({"question_id": 2, "image": "a.jpg", "text": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: missing field\(s\) \['label'\]"):
        read_pope_questions(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1"):
        read_pope_questions(path)


def test_category_from_filename():
    assert category_from_filename("/x/coco_pope_popular.json") == "popular"
    with pytest.raises(ValueError, match="questions.json"):
        category_from_filename("questions.json")
