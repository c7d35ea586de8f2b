"""CHAIR (Rohrbach et al., 2018): object hallucination in generated captions, against ground truth.

For a set of captions, each with the objects its text mentions and the objects its image holds:

- `chair_s` = captions with at least one hallucinated mention / all captions;
- `chair_i` = hallucinated mentions / all mentions;
- `recall`  = ground-truth objects mentioned / all ground-truth objects (summed over captions).

A mention is hallucinated when no ground-truth object `grounds` it; a ground-truth object is
recalled when some mention grounds it. Every mention counts, so an object named twice is two
mentions (as the reference counts every word); ground truth is a set, so recall counts distinct
objects. An empty caption counts as a caption with no hallucination and nothing recalled (the
reference's `CHAIR_s` denominator holds every caption). Ratios with a zero denominator are 0,
as `mmpo_jax.objectives.metrics.finalize` does.

Text -> mentions is pluggable: the shapes world parses its own grammar exactly
(`mmpo_jax.evaluation.shapes`); real captions go through `coco_mentions`, the reference's COCO
word/phrase matching with our simpler plural handling (see its docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any

from mmpo_jax.evaluation.coco_synonyms import COCO_SYNONYMS, PHRASE_REWRITES
from mmpo_jax.evaluation.counts import AddableCounts, ratio

Grounds = Callable[[Hashable, Hashable], bool]
"""`grounds(mention, truth) -> bool`: whether the ground-truth object makes the mention faithful."""


@dataclasses.dataclass(frozen=True)
class ChairCounts(AddableCounts):
    """The integer counts behind CHAIR; `+` merges them across batches or shards."""

    captions: int = 0
    hallucinated_captions: int = 0
    mentions: int = 0
    hallucinated_mentions: int = 0
    truths: int = 0
    recalled_truths: int = 0

    def metrics(self, suffix: str = "") -> dict[str, float]:
        """{"chair_s", "chair_i", "recall"} (each name + `suffix`), fractions in [0, 1]."""
        return {
            f"chair_s{suffix}": ratio(self.hallucinated_captions, self.captions),
            f"chair_i{suffix}": ratio(self.hallucinated_mentions, self.mentions),
            f"recall{suffix}": ratio(self.recalled_truths, self.truths),
        }


def caption_chair_counts(mentions: Sequence[Hashable], truths: Collection[Hashable],
                         grounds: Grounds = operator.eq) -> ChairCounts:
    """CHAIR counts of one caption.

    Args:
      mentions: the objects the caption mentions, one entry per mention (repeats count).
      truths: the ground-truth objects of its image (duplicates are merged).
      grounds: `grounds(mention, truth)`; default equality.
    """
    truths = set(truths)
    hallucinated = sum(not any(grounds(m, t) for t in truths) for m in mentions)
    recalled = sum(any(grounds(m, t) for m in mentions) for t in truths)
    return ChairCounts(captions=1, hallucinated_captions=int(hallucinated > 0), mentions=len(mentions),
                       hallucinated_mentions=hallucinated, truths=len(truths), recalled_truths=recalled)


def chair_counts(mention_lists: Sequence[Sequence[Hashable]], truth_lists: Sequence[Collection[Hashable]],
                 grounds: Grounds = operator.eq) -> ChairCounts:
    """CHAIR counts summed over captions; `mention_lists[i]` and `truth_lists[i]` describe caption i."""
    if len(mention_lists) != len(truth_lists):
        raise ValueError(f"{len(mention_lists)} captions but {len(truth_lists)} ground-truth object sets; "
                         "give one set per caption")
    return sum((caption_chair_counts(m, t, grounds) for m, t in zip(mention_lists, truth_lists)), ChairCounts())


# ----------------------------------------------------------------------------- COCO text -> objects

_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "policeman": "policemen", "gentleman": "gentlemen",
    "serviceman": "servicemen", "child": "children", "grandchild": "grandchildren", "person": "people",
    "mouse": "mice", "goose": "geese", "ox": "oxen", "knife": "knives", "pocketknife": "pocketknives",
    "calf": "calves", "sheep": "sheep", "bison": "bison", "buffalo": "buffaloes",
    # AMBER's vocabulary (`amber.object_mentions`)
    "shelf": "shelves", "bookshelf": "bookshelves", "scarf": "scarves", "potato": "potatoes",
    "tomato": "tomatoes",
}


def plural(word: str) -> str:
    """English plural of a singular noun from the COCO table or AMBER's vocabulary ("bus" ->
    "buses", "pony" -> "ponies", "man" -> "men"); regular rules plus their irregular nouns."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _with_plural(phrase: str) -> tuple[str, str]:
    *head, last = phrase.split(" ")
    return phrase, " ".join([*head, plural(last)])


def phrase_mentions(text: str, index: Mapping[tuple[str, ...], Any], longest: int
                    ) -> list[tuple[int, tuple[str, ...], Any]]:
    """Every phrase of ``index`` in ``text``: ``(end character, words, index value)``, in order.

    Lower-cases the text and splits it into words (``[a-z]+``: punctuation and hyphens separate
    words), then scans left to right taking the longest phrase (at most ``longest`` words) that
    starts at each word; a matched phrase's words are consumed.
    """
    words = [(m.group(), m.end()) for m in re.finditer(r"[a-z]+", text.lower())]
    found, start = [], 0
    while start < len(words):
        for length in range(min(longest, len(words) - start), 0, -1):
            key = tuple(word for word, _ in words[start:start + length])
            if key in index:
                found.append((words[start + length - 1][1], key, index[key]))
                start += length
                break
        else:
            start += 1
    return found


@functools.cache
def coco_phrase_index() -> tuple[dict[tuple[str, ...], str | None], int]:
    """({word tuple of a surface form: its category, or None for a phrase that names none}, longest)."""
    category_of = {name: category for category, synonyms in COCO_SYNONYMS.items() for name in (category, *synonyms)}
    index: dict[tuple[str, ...], str | None] = {}
    for name, category in category_of.items():
        for form in _with_plural(name):
            index.setdefault(tuple(form.split(" ")), category)
    for phrase, target in PHRASE_REWRITES.items():  # override the single words they contain
        for form in _with_plural(phrase):
            index[tuple(form.split(" "))] = category_of.get(target)
    return index, max(len(key) for key in index)


def coco_mentions(text: str) -> list[str]:
    """The COCO categories a caption mentions, one entry per mention, in text order.

    Lower-cases the text and splits it into words (`[a-z]+`, so punctuation and hyphens separate
    words), then scans left to right taking the longest phrase of `COCO_SYNONYMS` (or of
    `PHRASE_REWRITES`) that starts at each word, singular or plural. "seat" is not a chair in a
    caption that also mentions a toilet.

    [our choice] The reference singularises every word with TextBlob and uses NLTK's tokenizer;
    we instead list the plural of each table entry (regular English rules plus the table's
    irregular nouns), which needs no NLP library and agrees on the table's words.
    """
    found = [(" ".join(words), category)  # (surface form, category)
             for _, words, category in phrase_mentions(text, *coco_phrase_index())]
    mentions_toilet = any(category == "toilet" for _, category in found)
    return [category for form, category in found
            if category is not None and not (mentions_toilet and form in ("seat", "seats"))]
