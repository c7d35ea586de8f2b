"""The records of every split of the shapes world v2 (scenes and questions: `shapes_world_v2`).

Splits (records as `mmpo_jax.data.builders.shapes_world` stores them; `objects` is the JSON list of
`SceneObject.to_json()`, left to right):

- `sft`: a fraction `question_fraction` of records asks a `Question` (kind drawn uniformly from
  `question_kinds`) answered exactly; the others ask for the caption, written with the three
  hallucination sources (`sft_mentions`): hard objects misnamed with probability `misname_rate`
  (each by a shape the scene does not hold), with probability `binding_swap_rate` the colours of
  two objects of different colour and shape swapped, and with probability `p` the absent partner
  of every unpaired trigger appended in its trigger's colour (v1's bias) [our choice: in this
  order, each on the true scene's objects, so their rates are independent and each is read back
  from the metadata];
- `sft_focus`: the `sft` mix of questions and captions (the same draws and hallucination
  sources), each posed as P2-DPO's two-image prompt (`FOCUS_PROMPT`): the record holds the crop
  as `focus_image` (`focus_box`: around the question's objects, or a random object for captions
  and "no" questions) and the answer is the full image's;
- `preference`: the faithful caption against one hallucination of a kind drawn from
  `preference_kinds` (`hallucinate`): v1's object / attribute / count edits, or "binding" (the
  colours of two groups swapped); the metadata also holds one exact question of each kind about
  the image (`"questions"`, with boxes), for pipelines that pose questions (P2-DPO's focus crop);
- `validation_caption` / `test_caption`: caption prompts with their objects; the metadata holds the
  faithful caption, the unpaired triggers, the world's partner map and the questions;
- `validation_pope` / `test_pope`: v1's POPE construction (random / popular / adversarial
  negatives, frequencies over the split's own images) with the world's shapes and partners, but
  balanced per image: `pope_pairs` present shapes (drawn once, the same in every category) and as
  many negatives [our choice: v1 asks every present shape and as many negatives, which on v2's
  2-5 objects of 6 shapes usually exhausts the absent shapes, so the three categories asked the
  same negatives on 71% of the default test images; with one pair, on 15%]; the metadata holds
  the boxes of the asked shape (empty for a "no").

The validation splits draw from their own random streams, so their images are disjoint from the
test splits' (and from `sft` / `preference`); choose hyper-parameters on them, report on the tests.
Each example draws from a generator seeded by `(seed, 2, split, index)` (v1 uses
`(seed, split, index)`, so v2 never repeats a v1 scene), and the draws that decide a bias, a
hallucination or a question are made whether or not they are used.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mmpo_jax.data import shapes_world as sw
from mmpo_jax.data.interventions import crop_to_box
from mmpo_jax.data.shapes_world_v2 import (
    FOCUS_PROMPT,
    QUESTION_KINDS,
    Scene,
    SceneObject,
    WorldSpecV2,
    ask,
    render,
    sample_scene,
)

SPLITS = ("sft", "preference", "validation_caption", "validation_pope", "test_caption", "test_pope",
          "sft_focus")  # appended: a split's index seeds its examples, so the others keep theirs
_STREAM = 2  # the v2 tag in every example's seed


def example_rng(spec: WorldSpecV2, split: str, index: int) -> np.random.Generator:
    """The generator of one example (its scene, pixels and text draws)."""
    return np.random.default_rng([spec.seed, _STREAM, SPLITS.index(split), index])


def scene_and_image(spec: WorldSpecV2, split: str, index: int
                    ) -> tuple[np.random.Generator, Scene, np.ndarray]:
    """`(generator after the pixels, scene, uint8 [S, S, 3] image)` of one example."""
    rng = example_rng(spec, split, index)
    scene = sample_scene(spec, rng)
    return rng, scene, render(spec, scene, rng)


def generate_split(spec: WorldSpecV2, split: str) -> Iterator[dict[str, Any]]:
    """Yields the records of one split (image as uint8 `[S, S, 3]`)."""
    if split == "sft":
        yield from (_sft_example(spec, i) for i in range(spec.sft_size))
    elif split == "sft_focus":
        yield from (_sft_focus_example(spec, i) for i in range(spec.sft_focus_size))
    elif split == "preference":
        yield from (_preference_example(spec, i) for i in range(spec.preference_size))
    elif split in ("validation_caption", "test_caption"):
        yield from (_caption_example(spec, split, i) for i in range(getattr(spec, f"{split}_size")))
    elif split in ("validation_pope", "test_pope"):
        yield from _pope_examples(spec, split)
    else:
        raise ValueError(f"unknown shapes-world v2 split {split!r}; valid: {SPLITS}")


def _objects_json(objects: Sequence[SceneObject]) -> str:
    return json.dumps([o.to_json() for o in objects])


# ----------------------------------------------------------------------------- sft


def sft_mentions(spec: WorldSpecV2, objects: Sequence[SceneObject], draws: np.ndarray
                 ) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The (colour, shape) mentions of an SFT caption with its hallucinations (module docstring).

    Args:
      objects: the scene's objects, left to right.
      draws: uniform `[2 * max_objects + 3]`: a misname coin per object slot, a shape draw per
        slot, then the swap coin, the swap pair draw and the bias coin.

    Returns:
      (mentions in caption order, {"misnamed": [{"object", "said"}], "binding_swap": [i, j] or
      None, "mentions_absent_partner", "partners": the appended partner shapes}).
    """
    slots = spec.max_objects
    misname_coins, shape_draws = draws[:slots], draws[slots:2 * slots]
    swap_coin, pair_draw, bias_coin = draws[2 * slots:2 * slots + 3]
    present = {o.shape for o in objects}
    absent = [s for s in spec.shapes if s not in present]
    mentions = [(o.color, o.shape) for o in objects]
    misnamed = []
    for i, obj in enumerate(objects):
        if obj.hard and absent and misname_coins[i] < spec.misname_rate:
            said = absent[min(int(shape_draws[i] * len(absent)), len(absent) - 1)]
            mentions[i] = (obj.color, said)
            misnamed.append({"object": i, "said": said})
    swap = None
    if swap_coin < spec.binding_swap_rate:
        pairs = [(i, j) for i in range(len(objects)) for j in range(i + 1, len(objects))
                 if mentions[i][0] != mentions[j][0] and mentions[i][1] != mentions[j][1]]
        if pairs:
            i, j = pairs[min(int(pair_draw * len(pairs)), len(pairs) - 1)]
            (color_i, shape_i), (color_j, shape_j) = mentions[i], mentions[j]
            mentions[i], mentions[j] = (color_j, shape_i), (color_i, shape_j)
            swap = [i, j]
    triggers = sw.unpaired_triggers(objects, spec.partner_map)
    biased = bool(triggers) and bool(bias_coin < spec.p)
    appended = [spec.partner_map[t.shape] for t in triggers] if biased else []
    mentions += [(t.color, spec.partner_map[t.shape]) for t in triggers] if biased else []
    return mentions, {"misnamed": misnamed, "binding_swap": swap, "mentions_absent_partner": biased,
                      "partners": appended}


def _sft_task(spec: WorldSpecV2, objects: Sequence[SceneObject], rng: np.random.Generator
              ) -> tuple[str, str, dict[str, Any], tuple[int, int, int, int] | None]:
    """`(prompt, response, metadata, box of the asked objects or None)` of an SFT record: a
    question with probability `question_fraction`, else a caption with its hallucinations."""
    task_coin, kind_draw, *question_draws = rng.random(4)
    caption_draws = rng.random(2 * spec.max_objects + 3)
    triggers = [t.shape for t in sw.unpaired_triggers(objects, spec.partner_map)]
    metadata: dict[str, Any] = {"world": "v2", "unpaired_triggers": triggers,
                                "hard_objects": sum(o.hard for o in objects)}
    if task_coin < spec.question_fraction:
        kind = spec.question_kinds[min(int(kind_draw * len(spec.question_kinds)), len(spec.question_kinds) - 1)]
        question = ask(spec, objects, kind, question_draws)
        metadata.update(task="question", **question.to_json())
        return question.text, question.answer, metadata, question.box
    mentions, noise = sft_mentions(spec, objects, caption_draws)
    metadata.update(task="caption", **noise)
    return (sw.CAPTION_PROMPT, sw.caption_text(sw.caption_groups(mentions), spec.count_words),
            metadata, None)


def _sft_example(spec: WorldSpecV2, index: int) -> dict[str, Any]:
    rng, scene, image = scene_and_image(spec, "sft", index)
    prompt, response, metadata, _ = _sft_task(spec, scene.objects, rng)
    return {"id": f"sft-{index:06d}", "image": image, "prompt": prompt, "response": response,
            "objects": _objects_json(scene.objects), "metadata": json.dumps(metadata)}


def focus_box(spec: WorldSpecV2, target: Sequence[int], draws: Sequence[float]
              ) -> tuple[int, int, int, int]:
    """A square crop box holding `target` `(x0, y0, x1, y1)`: side `focus_crop_scale` (by
    `draws[0]`) times the target's larger side, at least a quarter of the image, at most all of
    it; placed at random around the target (`draws[1:3]`), shifted to lie inside the image."""
    x0, y0, x1, y1 = target
    low, high = spec.focus_crop_scale
    size = spec.image_size
    side = int(round(max(x1 - x0, y1 - y0) * (low + draws[0] * (high - low))))
    side = min(size, max(side, size // 4, x1 - x0, y1 - y0))
    # the window's origin ranges over those that keep the target inside, then inside the image
    left = min(max(x1 - side + draws[1] * (side - (x1 - x0)), 0), size - side)
    top = min(max(y1 - side + draws[2] * (side - (y1 - y0)), 0), size - side)
    left, top = int(round(left)), int(round(top))
    return left, top, left + side, top + side


def _sft_focus_example(spec: WorldSpecV2, index: int) -> dict[str, Any]:
    rng, scene, image = scene_and_image(spec, "sft_focus", index)
    prompt, response, metadata, box = _sft_task(spec, scene.objects, rng)
    pick, *crop_draws = rng.random(4)
    if box is None:  # a caption or a "no": the crop shows one of the objects
        box = scene.objects[min(int(pick * len(scene.objects)), len(scene.objects) - 1)].bbox
    crop = focus_box(spec, box, crop_draws)
    metadata["focus_box"] = list(crop)
    return {"id": f"sft_focus-{index:06d}", "image": image, "focus_image": crop_to_box(image, crop),
            "prompt": FOCUS_PROMPT.format(prompt=prompt), "response": response,
            "objects": _objects_json(scene.objects), "metadata": json.dumps(metadata)}


# ----------------------------------------------------------------------------- preference


def hallucinate(spec: WorldSpecV2, objects: Sequence[SceneObject], kind: str, rng: np.random.Generator
                ) -> tuple[list[sw.Group], dict[str, Any]]:
    """One hallucination of `kind` in the faithful caption's groups, or of the next kind of
    `spec.preference_kinds` (cyclically) that the scene allows.

    - "object", "attribute", "count": `shapes_world.hallucinate` with the world's shapes, colours,
      partners and counts (needs: a shape absent from the scene / a colour that no object of each
      present shape has / two possible counts);
    - "binding": the colours of two groups of different colour and shape are swapped, both new
      (colour, shape) pairs absent from the scene (needs such a pair of groups).

    Returns:
      (rejected groups, {"kind", "edit", "group", "before", "after"}; "binding" also "groups").
    """
    groups = sw.caption_groups([(o.color, o.shape) for o in objects])
    truth = {(o.color, o.shape) for o in objects}
    swaps = [(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))
             if groups[i][1] != groups[j][1] and groups[i][2] != groups[j][2]
             and (groups[j][1], groups[i][2]) not in truth
             and (groups[i][1], groups[j][2]) not in truth]
    present = {o.shape for o in objects}
    counts = tuple(range(1, spec.max_objects + 1))
    allowed = {"object": any(s not in present for s in spec.shapes),
               "attribute": all(len({o.color for o in objects if o.shape == s}) < len(spec.colors)
                                for s in present),
               "count": len(counts) >= 2, "binding": bool(swaps)}
    if kind not in allowed:
        raise ValueError(f"unknown hallucination kind {kind!r}; valid: {tuple(allowed)}")
    kinds = spec.preference_kinds
    start = kinds.index(kind) if kind in kinds else 0
    usable = [k for k in kinds[start:] + kinds[:start] if allowed[k]]
    if not usable:
        raise ValueError(f"no hallucination of {kinds} fits the scene {[o.to_json() for o in objects]}")
    kind = usable[0]
    pair_draw = rng.integers(1 << 30)
    if kind != "binding":
        return sw.hallucinate(objects, kind, rng, shapes=spec.shapes, colors=spec.colors,
                              partners=spec.partner_map, counts=counts)
    i, j = swaps[int(pair_draw) % len(swaps)]
    (count_i, color_i, shape_i), (count_j, color_j, shape_j) = groups[i], groups[j]
    rejected = list(groups)
    rejected[i], rejected[j] = (count_i, color_j, shape_i), (count_j, color_i, shape_j)
    return rejected, {"kind": "binding", "edit": "swap_colors", "group": i, "groups": [i, j],
                      "before": [list(groups[i]), list(groups[j])],
                      "after": [list(rejected[i]), list(rejected[j])]}


def _questions(spec: WorldSpecV2, objects: Sequence[SceneObject], rng: np.random.Generator) -> list[dict]:
    """One exact question of each of the world's kinds about the scene (JSON)."""
    draws = rng.random((len(QUESTION_KINDS), 2))
    return [ask(spec, objects, kind, draws[QUESTION_KINDS.index(kind)]).to_json()
            for kind in spec.question_kinds]


def _preference_example(spec: WorldSpecV2, index: int) -> dict[str, Any]:
    rng, scene, image = scene_and_image(spec, "preference", index)
    kind = spec.preference_kinds[int(rng.integers(len(spec.preference_kinds)))]
    questions = _questions(spec, scene.objects, rng)
    rejected, edit = hallucinate(spec, scene.objects, kind, rng)
    metadata = {"source": "shapes_world", "world": "v2", "objects": [o.to_json() for o in scene.objects],
                **edit, "questions": questions}
    return {"id": f"preference-{index:06d}", "image": image, "prompt": sw.CAPTION_PROMPT,
            "chosen": sw.caption(scene.objects, spec.count_words),
            "rejected": sw.caption_text(rejected, spec.count_words), "metadata": json.dumps(metadata)}


# ----------------------------------------------------------------------------- evaluation splits


def _caption_example(spec: WorldSpecV2, split: str, index: int) -> dict[str, Any]:
    rng, scene, image = scene_and_image(spec, split, index)
    triggers = sw.unpaired_triggers(scene.objects, spec.partner_map)
    metadata = {"world": "v2", "caption": sw.caption(scene.objects, spec.count_words),
                "unpaired_triggers": [t.shape for t in triggers],
                "absent_partners": sorted({spec.partner_map[t.shape] for t in triggers}),
                "partners": spec.partner_map, "questions": _questions(spec, scene.objects, rng)}
    return {"id": f"{split}-{index:06d}", "image": image, "prompt": sw.CAPTION_PROMPT,
            "objects": _objects_json(scene.objects), "metadata": json.dumps(metadata)}


def _pope_examples(spec: WorldSpecV2, split: str) -> Iterator[dict[str, Any]]:
    scenes = [scene_and_image(spec, split, i) for i in range(getattr(spec, f"{split}_images"))]
    present_sets = [list(dict.fromkeys(o.shape for o in scene.objects)) for _, scene, _ in scenes]
    frequency = Counter(s for present in present_sets for s in present)
    cooccurrence = Counter((a, b) for present in present_sets for a in present for b in present if a != b)
    for index, ((rng, scene, image), present) in enumerate(zip(scenes, present_sets)):
        objects = [o.to_json() for o in scene.objects]
        pairs = min(spec.pope_pairs, len(present), len(spec.shapes) - len(present))
        positives = [present[i] for i in sorted(rng.permutation(len(present))[:pairs])]
        for category in sw.POPE_CATEGORIES:
            negatives = sw.pope_negatives(category, present, pairs, rng, frequency, cooccurrence,
                                          shapes=spec.shapes, partners=spec.partner_map)
            questions = [(s, sw.YES) for s in positives] + [(s, sw.NO) for s in negatives]
            for number, (shape, answer) in enumerate(questions):
                boxes = [o.bbox for o in scene.objects if o.shape == shape]
                metadata = {"image_id": f"{split}-{index:06d}", "objects": objects,
                            "boxes": [list(b) for b in boxes]}
                yield {"id": f"{split}-{index:06d}-{category}-{number}", "image": image,
                       "question": sw.QUESTION_TEMPLATE.format(shape=shape), "answer": answer,
                       "object": shape, "category": category, "metadata": json.dumps(metadata)}
