"""Shapes-world metrics: exact CHAIR (object and attribute level), the partner-hallucination rate and
the model's probability of continuing the object list on trigger images.

Mentions come from `shapes_world.parse_caption`: one `(colour or None, shape)` per counted object,
so "two red squares" is two mentions. Ground truth is the scene's objects.

- Object level: a mention is its shape; it is hallucinated when no object has that shape.
- Attribute level: a mention is its (colour, shape) pair; it is hallucinated when no object has
  that colour and that shape. [our choice] A mention without a colour states only its shape and is
  judged by it (as at object level); recall counts a ground-truth (colour, shape) pair once some
  mention grounds it.

Every world is read the same way: the parser knows every catalogue word, and a world's records
carry their ground truth (v2's objects also say how hard they are to see, which CHAIR ignores: a
faint or half-hidden object is there). The partner-based metrics take the world's partner map
(`record_partners`: v2 caption records store it; v1's is `PARTNERS`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from mmpo_jax.data import shapes_world
from mmpo_jax.data.shapes_world import PARTNERS, ShapeObject
from mmpo_jax.data.template import DropReason, encode_prompt_response
from mmpo_jax.evaluation.chair import ChairCounts, caption_chair_counts, chair_counts

ScoreFn = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], Sequence[np.ndarray]], list[np.ndarray]]
"""`score(images, prompt_ids, continuation_ids) -> logps`: for each example i, the model's
log-probability of every token of `continuation_ids[i]` (`[C_i]` int) after `prompt_ids[i]` (`[T_i]`
int, with image placeholders) given `images[i]` (uint8 `[H, W, 3]`); returns `[C_i]` float arrays."""


def objects_from_json(text: str) -> tuple[ShapeObject, ...]:
    """The `objects` field of a shapes-world record (JSON list of {shape, color, bbox}) -> objects."""
    return tuple(ShapeObject(o["shape"], o["color"], tuple(o["bbox"])) for o in json.loads(text))


def _attribute_grounds(mention: tuple[str | None, str], truth: tuple[str, str]) -> bool:
    color, shape = mention
    return shape == truth[1] and color in (None, truth[0])


def shapes_chair_metrics(captions: Sequence[str], scenes: Sequence[Sequence[ShapeObject]]) -> dict[str, float]:
    """CHAIR of captions against their scenes, at object and attribute level.

    Args:
      captions: generated texts, one per scene.
      scenes: the objects of each caption's image.

    Returns:
      {"chair_s", "chair_i", "recall"} (object level) and the same names + "_attr" (attribute level).
    """
    mentions = [shapes_world.parse_caption(text) for text in captions]
    objects = sum(object_chair_counts(captions, scenes), ChairCounts())
    attributes = chair_counts(mentions, [{(o.color, o.shape) for o in scene} for scene in scenes],
                              _attribute_grounds)
    return {**objects.metrics(), **attributes.metrics("_attr")}


def object_chair_counts(captions: Sequence[str], scenes: Sequence[Sequence[ShapeObject]]) -> list[ChairCounts]:
    """Object-level CHAIR counts of each caption against its scene (their sum is
    `shapes_chair_metrics`' object level): what a bootstrap over images resamples."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions but {len(scenes)} scenes; give one scene per caption")
    return [caption_chair_counts([shape for _, shape in shapes_world.parse_caption(text)], {o.shape for o in scene})
            for text, scene in zip(captions, scenes)]


def record_partners(record: Mapping[str, Any]) -> dict[str, str]:
    """The partner map of a caption record's world: its metadata's `"partners"` (v2), else v1's."""
    metadata = json.loads(record.get("metadata") or "{}")
    partners = metadata.get("partners") if isinstance(metadata, dict) else None
    return dict(partners) if isinstance(partners, Mapping) else dict(PARTNERS)


def absent_partners(scene: Sequence[ShapeObject], partners: Mapping[str, str] = PARTNERS) -> set[str]:
    """The partner shapes of the scene's unpaired triggers (empty when it has none)."""
    return {partners[t.shape] for t in shapes_world.unpaired_triggers(scene, partners)}


def partner_hallucination_rate(captions: Sequence[str], scenes: Sequence[Sequence[ShapeObject]],
                               partners: Mapping[str, str] = PARTNERS) -> float:
    """Among captions of scenes holding a trigger without its partner, the fraction that mention an
    absent partner (any colour); 0 when no scene has an unpaired trigger."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions but {len(scenes)} scenes; give one scene per caption")
    hits = [bool(absent_partners(scene, partners) & {shape for _, shape in shapes_world.parse_caption(text)})
            for text, scene in zip(captions, scenes) if absent_partners(scene, partners)]
    return float(np.mean(hits)) if hits else 0.0


def continuation_targets(tokenizer: PreTrainedTokenizerBase, scene: Sequence[ShapeObject], *,
                         num_image_tokens: int, prompt: str = shapes_world.CAPTION_PROMPT,
                         max_length: int = 4096, partners: Mapping[str, str] = PARTNERS
                         ) -> tuple[np.ndarray, np.ndarray] | None:
    """Where the biased caption of a trigger scene leaves its faithful caption, as token ids.

    Tokenises the faithful caption and the biased one (absent partners appended, as the biased SFT
    data writes it) after the templated prompt, and finds the first response token where they
    differ.

    Returns:
      `(prompt_ids [T], continuation_ids [k + 1])`: the faithful response up to and including its
      first token that the biased response does not share; None for a scene without an unpaired
      trigger.
    """
    if not absent_partners(scene, partners):
        return None
    words = shapes_world.ALL_COUNT_WORDS  # v1 scenes never need more than its two and three
    faithful = shapes_world.caption(scene, words)
    biased = shapes_world.caption_text(
        shapes_world.caption_groups(shapes_world.biased_mentions(scene, True, partners)), words)
    encoded = [encode_prompt_response(tokenizer, prompt, text, num_image_tokens=num_image_tokens,
                                      max_length=max_length) for text in (faithful, biased)]
    if any(isinstance(e, DropReason) for e in encoded):
        raise ValueError(f"the captions of {faithful!r} do not fit max_length={max_length}: {encoded}")
    start = encoded[0].num_prompt_tokens
    faithful_ids, biased_ids = (e.input_ids[start:] for e in encoded)
    shared = next(i for i, (f, b) in enumerate(zip(faithful_ids, biased_ids)) if f != b)
    return encoded[0].input_ids[:start], faithful_ids[:shared + 1]


def continuation_probability(tokenizer: PreTrainedTokenizerBase, images: Sequence[np.ndarray],
                             scenes: Sequence[Sequence[ShapeObject]], score: ScoreFn, *,
                             num_image_tokens: int, prompt: str = shapes_world.CAPTION_PROMPT,
                             partners: Mapping[str, str] = PARTNERS) -> float:
    """Mean over trigger scenes of the model's probability of going on where the faithful caption
    stops and the biased one continues.

    The biased data appends absent partners after the true objects, so the two captions share a
    prefix and part at one token: for a one-phrase scene, "a red circle" + "." (faithful) vs " and"
    (biased) — the probability of continuing the list after a complete faithful caption; with more
    phrases the grammar parts earlier (", " vs " and" before the last true object), where the
    model commits to a longer list than the scene holds. The metric is
    `1 - P(faithful token | prompt, image, shared prefix)` at that point, under teacher forcing.

    Args:
      tokenizer: the model's tokenizer.
      images: uint8 `[H, W, 3]` per scene.
      scenes: the objects of each image; scenes without an unpaired trigger are skipped.
      score: a `ScoreFn` (e.g. `runner.model_scorer`).
      num_image_tokens: image placeholders per image.
      prompt: the caption request.
      partners: the world's partner map (`record_partners`).

    Returns:
      the mean probability in [0, 1]; 0 when no scene has an unpaired trigger.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes; give one scene per image")
    chosen = [(image, targets) for image, scene in zip(images, scenes)
              if (targets := continuation_targets(tokenizer, scene, num_image_tokens=num_image_tokens,
                                                  prompt=prompt, partners=partners)) is not None]
    if not chosen:
        return 0.0
    logps = score([image for image, _ in chosen], [prompt_ids for _, (prompt_ids, _) in chosen],
                  [continuation for _, (_, continuation) in chosen])
    return float(np.mean([1.0 - np.exp(row[-1]) for row in logps]))
