"""POPE (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language Models").

Yes/no questions "Is there a <object> in the image?" in three splits that differ in how the absent
objects are drawn: `random`, `popular`, `adversarial`. "yes" is the positive class:

- accuracy = (TP + TN) / N, precision = TP / (TP + FP), recall = TP / (TP + FN),
- F1 = 2 P R / (P + R), yes-ratio = answers parsed as "yes" / N.

Ratios with a zero denominator are 0 (the reference would divide by zero).

Answer parsing follows the reference `evaluate.py` exactly (`parse_pope_answer`). Question files
are the published jsonl: one `{"question_id", "image", "text", "label"}` object a line
(`read_pope_questions`; `pope_records` turns one into records the evaluation runner reads, images
read on access).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from mmpo_jax.data.shapes_world import NO, POPE_CATEGORIES, YES
from mmpo_jax.evaluation.counts import AddableCounts
from mmpo_jax.evaluation.records import ImageRecords, require_dir

POPE_FIELDS = ("question_id", "image", "text", "label")


def parse_pope_answer(text: str) -> str:
    """A free-text reply -> "yes" or "no", by POPE's reference rule.

    Keep the text before the first "." (the first sentence), delete commas, split on single
    spaces; the reply is "no" when one of the pieces is exactly "No", "no" or "not", else "yes".
    The rule is case- and punctuation-sensitive as the reference is: "NO", "Not" or "no!" read as
    "yes", and so does an empty reply.
    """
    first_sentence = text.split(".")[0].replace(",", "")
    words = first_sentence.split(" ")
    return NO if ("No" in words or "not" in words or "no" in words) else YES


@dataclasses.dataclass(frozen=True)
class PopeCounts(AddableCounts):
    """Confusion counts with "yes" positive; `+` merges them."""

    true_positives: int = 0
    false_positives: int = 0
    true_negatives: int = 0
    false_negatives: int = 0

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def metrics(self) -> dict[str, float]:
        """{"accuracy", "precision", "recall", "f1", "yes_ratio"}, fractions in [0, 1]."""
        tp, fp, tn, fn = dataclasses.astuple(self)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        return {
            "accuracy": (tp + tn) / self.total if self.total else 0.0,
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (tp + fp) / self.total if self.total else 0.0,
        }


def _label(label: str) -> str:
    normalised = label.strip().lower()
    if normalised not in (YES, NO):
        raise ValueError(f"POPE label {label!r} is neither {YES!r} nor {NO!r}")
    return normalised


def pope_counts(answers: Sequence[str], labels: Sequence[str], *, positive: str = YES) -> PopeCounts:
    """Confusion counts of free-text `answers` (parsed by `parse_pope_answer`) against "yes"/"no"
    `labels`, with `positive` ("yes" for POPE; AMBER's discriminative task counts "no") the
    positive class; `yes_ratio` of the result is then the ratio of `positive` answers."""
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers but {len(labels)} labels; give one label per answer")
    if positive not in (YES, NO):
        raise ValueError(f"positive={positive!r}; valid: {YES!r}, {NO!r}")
    negative = NO if positive == YES else YES
    counts = {(YES, YES): 0, (YES, NO): 0, (NO, NO): 0, (NO, YES): 0}  # (predicted, label)
    for answer, label in zip(answers, labels):
        counts[parse_pope_answer(answer), _label(label)] += 1
    return PopeCounts(counts[positive, positive], counts[positive, negative], counts[negative, negative],
                      counts[negative, positive])


def pope_metrics(answers: Sequence[str], labels: Sequence[str], categories: Sequence[str]) -> dict[str, float]:
    """POPE metrics per split and their mean over the splits present.

    Args:
      answers: free-text replies, one per question.
      labels: "yes"/"no" per question.
      categories: the split of each question, one of `POPE_CATEGORIES`.

    Returns:
      `pope_{split}_{metric}` for each split present and `pope_{metric}` (unweighted mean over
      those splits), metric in accuracy, precision, recall, f1, yes_ratio.
    """
    if not len(answers) == len(labels) == len(categories):
        raise ValueError(f"answers ({len(answers)}), labels ({len(labels)}) and categories "
                         f"({len(categories)}) must have one entry per question")
    unknown = sorted(set(categories) - set(POPE_CATEGORIES))
    if unknown:
        raise ValueError(f"unknown POPE split(s) {unknown}; valid: {POPE_CATEGORIES}")
    per_split = {}
    for split in (c for c in POPE_CATEGORIES if c in categories):
        rows = [i for i, c in enumerate(categories) if c == split]
        per_split[split] = pope_counts([answers[i] for i in rows], [labels[i] for i in rows]).metrics()
    result = {f"pope_{split}_{name}": value for split, metrics in per_split.items() for name, value in metrics.items()}
    if per_split:
        for name in next(iter(per_split.values())):
            result[f"pope_{name}"] = float(np.mean([metrics[name] for metrics in per_split.values()]))
    return result


# ----------------------------------------------------------------------------- question files


@dataclasses.dataclass(frozen=True)
class PopeQuestion:
    """One line of a POPE question file: image file name, question text, "yes"/"no" label."""

    question_id: int | str
    image: str
    text: str
    label: str


def read_pope_questions(path: str | os.PathLike[str]) -> list[PopeQuestion]:
    """Reads a POPE question file (jsonl, `{"question_id", "image", "text", "label"}` a line).

    Raises:
      ValueError: a line that is not a JSON object with those fields, or a label not yes/no;
        the message names the file and line.
    """
    questions = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                missing = [f for f in POPE_FIELDS if f not in item] if isinstance(item, dict) else list(POPE_FIELDS)
                if missing:
                    raise ValueError(f"missing field(s) {missing}; expected {POPE_FIELDS}")
                questions.append(PopeQuestion(item["question_id"], str(item["image"]), str(item["text"]),
                                              _label(str(item["label"]))))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{os.fspath(path)} line {number}: {error}") from error
    return questions


def category_from_filename(path: str | os.PathLike[str]) -> str:
    """The POPE split named in a published file name ("coco_pope_adversarial.json" -> "adversarial")."""
    name = os.path.basename(os.fspath(path))
    found = [c for c in POPE_CATEGORIES if c in name]
    if len(found) != 1:
        raise ValueError(f"cannot tell the POPE split from file name {name!r}; name one of {POPE_CATEGORIES} "
                         "in it or pass category=")
    return found[0]


def pope_records(path: str | os.PathLike[str], image_dir: str | os.PathLike[str],
                 category: str | None = None, *, question_suffix: str = "") -> ImageRecords:
    """Evaluation records of a POPE question file whose images lie in `image_dir`.

    Item i: {"id", "image": uint8 [H, W, 3] RGB (read on access), "question" (+ `question_suffix`),
    "answer": label, "category"} — the fields of the shapes world's `test_pope` split that the
    runner reads. `category` defaults to the split named in the file name (`category_from_filename`).
    """
    category = category_from_filename(path) if category is None else category
    if category not in POPE_CATEGORIES:
        raise ValueError(f"unknown POPE split {category!r}; valid: {POPE_CATEGORIES}")
    directory = require_dir(image_dir, "POPE image folder")
    questions = read_pope_questions(path)
    return ImageRecords(
        tuple({"id": str(q.question_id), "question": q.text + question_suffix, "answer": q.label, "category": category}
              for q in questions),
        tuple(os.path.join(directory, q.image) for q in questions))
