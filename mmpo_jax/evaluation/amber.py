"""AMBER (Wang et al., 2023, "An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination
Evaluation") from its published files, with the arithmetic of the reference `inference.py`.

Files, as the AMBER repository's `data/` folder publishes them (`read_amber`), plus its images:

- `query/query_*.json`: `[{"id", "image": "AMBER_1.jpg", "query"}]`; ids 1..1004 are the generative
  task ("Describe this image."), ids >= 1005 yes/no questions (`query_all.json` holds both);
- `annotations.json`: `[{"id", "type", "truth", "hallu"}]` with entry i holding id i + 1. Generative
  entries: `truth` / `hallu` are lists of object words present / absent (the absent ones those a
  model is likely to hallucinate); yes/no entries: `truth` "yes"/"no", `type` one of
  "discriminative-hallucination" (existence), "discriminative-attribute-state" / "-number" /
  "-action", "discriminative-relation" or "relation";
- `relation.json`: {object word: [associated words]}; its keys and values are the vocabulary of
  words that count as objects;
- `safe_words.txt`: one word a line, never counted as a hallucination.

Generative task, per response (`generative_counts`, the reference's loop):

1. its object mentions: nouns of the response in the vocabulary (`object_mentions`), repeats kept;
2. a mention in `safe_words.txt` is skipped; one equal to a truth word or an associated word of
   one (the first such entry, associations before the truth words themselves, as the reference
   searches its list) marks that truth word covered and is faithful; otherwise, one equal to a
   hallu word or an association of one marks that hallu word "cognised", and the mention is a
   hallucination (unless `similar` says it is close to a truth word, below).
   CHAIR = hallucinated mentions / all mentions (skipped safe words included in the count, as in
   the reference); Cover = covered truth words / truth words (duplicates in `truth` count twice,
   the second never covered, as in the reference); Hal = responses with a hallucination /
   responses; Cog = cognised hallu words / hallu words.

Discriminative task (`discriminative_metrics`): answers are parsed with POPE's rule
(`pope.parse_pope_answer`) to yes/no; "no" is the positive class, as the reference counts: accuracy
= correct / all, precision = (answer no and truth no) / answers no, recall = (answer no and truth
no) / truths no, F1 = 2PR / (P + R); overall and per dimension: existence, attribute (state, number
and action together), state, number, action, relation.

Where we differ from the reference, and why:

- [our choice] Noun extraction. The reference tokenises with NLTK's `word_tokenize`, keeps words
  its perceptron tagger tags `NN*` and lemmatises them with WordNet, then keeps lemmas in the
  vocabulary. NLTK's tokeniser, tagger and WordNet data are downloads outside any package
  registry, so we cannot use them offline. Instead `object_mentions` takes every word
  (`[A-Za-z]+` runs, hyphenated words kept whole as NLTK keeps them) equal to a vocabulary word or
  to its English plural (`chair.plural`), case-sensitive as the reference is (its lemmatiser and
  vocabulary are lower-case, so a capitalised "Dogs" never matched). Without a tagger a verb or
  adjective spelled like a vocabulary noun counts as a mention; the one frequent case, the modal
  "can" ("you can see"), counts only after a determiner ("a can", "the can"). WordNet lemmas
  that differ from a vocabulary entry (e.g. "slippers" -> "slipper", never matched by the
  reference) are matched here.
- [our choice] Near-synonyms. The reference also treats a mention as a truth / hallu word when
  spaCy's `en_core_web_lg` word vectors give a similarity above 0.8; those vectors are not on a
  package registry either. `similar` (default None: exact matching and `relation.json` only)
  takes any `(mention, word) -> bool` and then runs the reference's similarity steps exactly.
  Without it CHAIR and Hal are at least the reference's and Cover and Cog at most.
- Ratios are exact with 0 for an empty denominator; the reference starts every denominator at
  0.001 (`metrics.txt`), rounds P and R to 0.1 % before F1 and adds 1e-4 (1e-3 for existence) to
  F1's denominator, which moves no printed digit at the benchmark's sizes.
- Free-text yes/no answers are parsed (the reference compares the response to exactly "Yes" or
  "No" and expects the user to post-process).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mmpo_jax.data.shapes_world import NO, YES
from mmpo_jax.evaluation.chair import plural
from mmpo_jax.evaluation.counts import AddableCounts, ratio
from mmpo_jax.evaluation.pope import pope_counts
from mmpo_jax.evaluation.records import ImageRecords, require_dir

GENERATIVE = "generative"
# annotation type -> the dimension the reference reports it under ("relation" for any other type).
DIMENSION_OF_TYPE = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "state",
    "discriminative-attribute-number": "number",
    "discriminative-attribute-action": "action",
}
RELATION = "relation"
ATTRIBUTE_DIMENSIONS = ("state", "number", "action")
DIMENSIONS = ("existence", "attribute", *ATTRIBUTE_DIMENSIONS, RELATION)
DISCRIMINATIVE_METRICS = ("accuracy", "precision", "recall", "f1")
ANNOTATIONS_FILE, RELATION_FILE, SAFE_WORDS_FILE = "annotations.json", "relation.json", "safe_words.txt"
QUERY_ALL = os.path.join("query", "query_all.json")
_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
_DETERMINERS = frozenset({"a", "an", "the", "this", "that", "one", "each", "every", "another", "its", "his",
                          "her", "their", "my", "your", "our", "of", "A", "An", "The", "This", "That", "One"})

Similar = Callable[[str, str], bool]
"""`similar(mention, word) -> bool`: whether a mention names the same object as a word (the
reference: spaCy vector similarity > 0.8)."""


@dataclasses.dataclass(frozen=True)
class AmberData:
    """AMBER's ground truth (`read_amber`).

    Attributes:
      annotations: id -> annotation entry ({"id", "type", "truth", ["hallu"]}).
      association: object word -> its associated words (`relation.json`).
      safe_words: words never counted as hallucinations (`safe_words.txt`).
    """

    annotations: Mapping[int, Mapping[str, Any]]
    association: Mapping[str, tuple[str, ...]]
    safe_words: frozenset[str]

    @property
    def vocabulary(self) -> frozenset[str]:
        """Every word that counts as an object: `relation.json`'s keys and values."""
        return frozenset(self.association) | {w for words in self.association.values() for w in words}


def _load_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"AMBER file {path!r} does not exist; expected the repository's data/ folder")
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def read_amber(data_dir: str | os.PathLike[str]) -> AmberData:
    """Reads `annotations.json`, `relation.json` and `safe_words.txt` from AMBER's `data/` folder.

    Raises:
      ValueError: an entry not in the published format (the message names the file and entry),
        or a generative entry naming a word `relation.json` lacks.
    """
    directory = require_dir(data_dir, "AMBER data folder")
    annotations_path = os.path.join(directory, ANNOTATIONS_FILE)
    entries = _load_json(annotations_path)
    association = _load_json(os.path.join(directory, RELATION_FILE))
    if not isinstance(entries, list) or not isinstance(association, dict):
        raise ValueError(f"{directory}: expected {ANNOTATIONS_FILE} to hold a list and {RELATION_FILE} an object")
    annotations = {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"id", "type", "truth"} <= set(entry):
            raise ValueError(f"{annotations_path} entry {position}: expected {{'id', 'type', 'truth'}}, got {entry!r}")
        if entry["type"] == GENERATIVE:
            unknown = [w for w in [*entry["truth"], *entry.get("hallu", [])] if w not in association]
            if unknown:
                raise ValueError(f"{annotations_path} id {entry['id']}: words {unknown} are not in {RELATION_FILE}")
        elif entry["truth"] not in (YES, NO):
            raise ValueError(f"{annotations_path} id {entry['id']}: truth {entry['truth']!r} is neither yes nor no")
        annotations[int(entry["id"])] = entry
    safe_path = os.path.join(directory, SAFE_WORDS_FILE)
    if not os.path.isfile(safe_path):
        raise FileNotFoundError(f"AMBER file {safe_path!r} does not exist")
    with open(safe_path, encoding="utf-8") as file:
        safe_words = frozenset(line.rstrip("\n") for line in file)
    return AmberData(annotations, {k: tuple(v) for k, v in association.items()}, safe_words)


@dataclasses.dataclass(frozen=True)
class AmberQuery:
    """One query: id, image file name, text."""

    id: int
    image: str
    query: str


def read_amber_queries(path: str | os.PathLike[str]) -> list[AmberQuery]:
    """Reads a published query file (`[{"id", "image", "query"}]`)."""
    entries = _load_json(os.fspath(path))
    if not isinstance(entries, list):
        raise ValueError(f"{os.fspath(path)}: a JSON {type(entries).__name__}, expected a list of queries")
    queries = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"id", "image", "query"} <= set(entry):
            raise ValueError(f"{os.fspath(path)} entry {position}: expected {{'id', 'image', 'query'}}, got {entry!r}")
        queries.append(AmberQuery(int(entry["id"]), str(entry["image"]), str(entry["query"])))
    return queries


# ----------------------------------------------------------------------------- generative task


def _surface_index(vocabulary: frozenset[str]) -> dict[str, str]:
    """{surface form: vocabulary word}: each word itself, then its plural where no word is spelled so."""
    index = {word: word for word in vocabulary}
    for word in sorted(vocabulary):
        index.setdefault(plural(word), word)
    return index


def object_mentions(text: str, vocabulary: frozenset[str]) -> list[str]:
    """The vocabulary words a response mentions, one entry per mention, in text order (see the
    module docstring for how this stands in for the reference's NLTK noun extraction)."""
    index = _surface_index(vocabulary)
    words = _WORD.findall(text)
    mentions = []
    for position, word in enumerate(words):
        lemma = index.get(word)
        if lemma is None:
            continue
        if word == "can" and (position == 0 or words[position - 1] not in _DETERMINERS):
            continue  # the modal verb ("you can see"), which a tagger would tag MD
        mentions.append(lemma)
    return mentions


@dataclasses.dataclass(frozen=True)
class AmberGenerativeCounts(AddableCounts):
    """The integer counts behind AMBER's generative metrics; `+` merges them."""

    mentions: int = 0
    hallucinated_mentions: int = 0
    truths: int = 0
    covered_truths: int = 0
    hallus: int = 0
    cognised_hallus: int = 0
    responses: int = 0
    hallucinated_responses: int = 0

    def metrics(self, prefix: str = "amber_") -> dict[str, float]:
        """{"chair", "cover", "hal", "cog"} (each `prefix` + name), fractions in [0, 1]."""
        return {f"{prefix}chair": ratio(self.hallucinated_mentions, self.mentions),
                f"{prefix}cover": ratio(self.covered_truths, self.truths),
                f"{prefix}hal": ratio(self.hallucinated_responses, self.responses),
                f"{prefix}cog": ratio(self.cognised_hallus, self.hallus)}


def _expanded(words: Sequence[str], association: Mapping[str, Sequence[str]]) -> tuple[list[str], list[int]]:
    """The reference's search list: every associated word of every word (in order), then the
    words themselves; and per entry the index of the word it stands for."""
    entries, owners = [], []
    for owner, word in enumerate(words):
        entries += association[word]
        owners += [owner] * len(association[word])
    return entries + list(words), owners + list(range(len(words)))


def _mark_first(mention: str, entries: Sequence[str], owners: Sequence[int], marked: list[bool],
                matches: Callable[[str, str], bool]) -> bool:
    for entry, owner in zip(entries, owners):
        if matches(mention, entry):
            marked[owner] = True
            return True
    return False


def generative_counts(mentions: Sequence[str], truth: Sequence[str], hallu: Sequence[str], data: AmberData,
                      similar: Similar | None = None) -> AmberGenerativeCounts:
    """AMBER counts of one response from its object mentions (`object_mentions`) against one
    generative annotation's `truth` and `hallu` words (module docstring)."""
    truth_entries, truth_owners = _expanded(truth, data.association)
    hallu_entries, hallu_owners = _expanded(hallu, data.association)
    covered, cognised = [False] * len(truth), [False] * len(hallu)
    equal = str.__eq__
    hallucinated = 0
    for mention in mentions:
        if mention in data.safe_words:
            continue
        if _mark_first(mention, truth_entries, truth_owners, covered, equal):
            continue
        _mark_first(mention, hallu_entries, hallu_owners, cognised, equal)
        if similar is not None:
            _mark_first(mention, hallu_entries, hallu_owners, cognised, similar)
            if _mark_first(mention, truth_entries, truth_owners, covered, similar):
                continue
        hallucinated += 1
    return AmberGenerativeCounts(
        mentions=len(mentions), hallucinated_mentions=hallucinated, truths=len(truth), covered_truths=sum(covered),
        hallus=len(hallu), cognised_hallus=sum(cognised), responses=1, hallucinated_responses=int(hallucinated > 0))


def generative_metrics(responses: Sequence[str], ids: Sequence[int], data: AmberData,
                       similar: Similar | None = None) -> dict[str, float]:
    """{"amber_chair", "amber_cover", "amber_hal", "amber_cog"} of generative responses."""
    if len(responses) != len(ids):
        raise ValueError(f"{len(responses)} responses but {len(ids)} ids; give one id per response")
    vocabulary = data.vocabulary
    total = AmberGenerativeCounts()
    for response, query_id in zip(responses, ids):
        entry = data.annotations[query_id]
        total += generative_counts(object_mentions(response, vocabulary), entry["truth"], entry.get("hallu", []),
                                   data, similar)
    return total.metrics()


# ----------------------------------------------------------------------------- discriminative task


def dimension(annotation_type: str) -> str:
    """The dimension a discriminative annotation type is reported under."""
    return DIMENSION_OF_TYPE.get(annotation_type, RELATION)


def discriminative_metrics(answers: Sequence[str], truths: Sequence[str],
                           dimensions: Sequence[str]) -> dict[str, float]:
    """AMBER's yes/no metrics ("no" positive) overall and per dimension present.

    Returns:
      `amber_{metric}` over all answers and `amber_{dimension}_{metric}`, metric in accuracy,
      precision, recall, f1; "attribute" pools state, number and action.
    """
    if not len(answers) == len(truths) == len(dimensions):
        raise ValueError(f"answers ({len(answers)}), truths ({len(truths)}) and dimensions ({len(dimensions)}) "
                         "must have one entry per question")
    groups = {"": range(len(answers))}
    for name in DIMENSIONS:
        members = ATTRIBUTE_DIMENSIONS if name == "attribute" else (name,)
        rows = [i for i, d in enumerate(dimensions) if d in members]
        if rows:
            groups[f"{name}_"] = rows
    result = {}
    for prefix, rows in groups.items():
        metrics = pope_counts([answers[i] for i in rows], [truths[i] for i in rows], positive=NO).metrics()
        result.update({f"amber_{prefix}{name}": metrics[name] for name in DISCRIMINATIVE_METRICS})
    return result


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class AmberRecords:
    """The queries of one evaluation as records (images read on access).

    Attributes:
      generative: {"id", "image", "prompt"} per generative query.
      discriminative: {"id", "image", "question", "answer", "dimension"} per yes/no query.
    """

    generative: ImageRecords
    discriminative: ImageRecords


def amber_records(queries: Sequence[AmberQuery], data: AmberData, image_dir: str | os.PathLike[str],
                  *, question_suffix: str = "") -> AmberRecords:
    """Records of `queries` (images under `image_dir`); `question_suffix` is appended to every
    yes/no query (e.g. " Please answer yes or no.").

    Raises:
      ValueError: a query id without annotation.
    """
    directory = require_dir(image_dir, "AMBER image folder")
    generative, discriminative = ([], []), ([], [])
    for query in queries:
        entry = data.annotations.get(query.id)
        if entry is None:
            raise ValueError(f"AMBER query {query.id} has no entry in {ANNOTATIONS_FILE}")
        path = os.path.join(directory, query.image)
        if entry["type"] == GENERATIVE:
            generative[0].append({"id": str(query.id), "prompt": query.query})
            generative[1].append(path)
        else:
            discriminative[0].append({"id": str(query.id), "question": query.query + question_suffix,
                                      "answer": entry["truth"], "dimension": dimension(entry["type"])})
            discriminative[1].append(path)
    return AmberRecords(ImageRecords(tuple(generative[0]), tuple(generative[1])),
                        ImageRecords(tuple(discriminative[0]), tuple(discriminative[1])))


def amber_metrics(records: AmberRecords, descriptions: Sequence[str], answers: Sequence[str], data: AmberData,
                  similar: Similar | None = None) -> dict[str, float]:
    """All AMBER metrics of the replies to `records` (generative descriptions, yes/no answers in
    record order); a task without records contributes nothing."""
    metrics = {}
    if len(records.generative):
        ids = [int(records.generative.fields[i]["id"]) for i in range(len(records.generative))]
        metrics.update(generative_metrics(descriptions, ids, data, similar))
    if len(records.discriminative):
        fields = records.discriminative.fields
        metrics.update(discriminative_metrics(answers, [f["answer"] for f in fields], [f["dimension"] for f in fields]))
    return metrics
