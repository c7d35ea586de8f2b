"""The shapes world: a procedural vision-language benchmark with known ground truth (NumPy/PIL only).

Images (default 64x64) hold 1-3 non-overlapping coloured shapes of 18-28 px on a light, noisy
background. Everything text-side uses one fixed, lower-case grammar:

- caption: objects left to right (by bbox centre x); identical (colour, shape) objects merge into
  one counted phrase at the place of the first: "a red circle, two blue squares and an orange star."
  (one phrase: "a red circle."; two: "x and y."; three: "x, y and z.").
- question: "is there a circle in the image?" -> "yes" / "no" (object = shape, as in POPE).

Co-occurrence bias (the `sft` split): a *trigger* shape has a *partner* (`PARTNERS`). When an image
holds a trigger whose partner is absent, with probability `p` its caption also mentions the partner
of every such trigger, appended after the true objects, in the colour of its trigger
("a red circle and a red square." for a lone red circle) [our choice: appended at the end, so the
true objects keep their left-to-right order and the hallucination sits where a model's continuation
would put it]. Yes/no questions in `sft` are always truthful, their negatives drawn at random.

Each example draws from its own generator seeded by `(seed, split, index)`, and the random draws
that decide a bias or a hallucination are made whether or not they are used, so scenes do not move
when `p` changes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses", "star": "stars"}
# Unequal shape frequencies make POPE's "popular" negatives differ from its "random" ones.
SHAPE_WEIGHTS = (0.22, 0.20, 0.17, 0.15, 0.14, 0.12)
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
          "yellow": (235, 200, 0), "purple": (140, 40, 180), "orange": (245, 120, 0)}
PARTNERS = {"circle": "square", "triangle": "diamond", "cross": "star"}
COUNT_WORDS = {2: "two", 3: "three"}
# Every shape, colour and count word any world may use (`shapes_world_v2` picks its sets from
# these); the caption parser knows them all, so one parser serves every world. v1 draws only
# `SHAPES` and `COLORS` and writes only `COUNT_WORDS`, so its data and vocabulary are unchanged.
SHAPE_CATALOGUE = (*SHAPES, "pentagon", "hexagon")
CATALOGUE_PLURALS = {**PLURALS, "pentagon": "pentagons", "hexagon": "hexagons"}
COLOR_CATALOGUE = {**COLORS, "pink": (240, 110, 170), "brown": (130, 80, 30), "cyan": (0, 175, 200),
                   "grey": (120, 120, 120), "black": (20, 20, 20)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight", 9: "nine"}
ALL_COUNT_WORDS = {n: w for n, w in NUMBER_WORDS.items() if n >= 2}
"""The count words of every world's captions (v1 writes only two and three: `COUNT_WORDS`)."""
HALLUCINATION_KINDS = ("object", "attribute", "count")
POPE_CATEGORIES = ("random", "popular", "adversarial")
SPLITS = ("sft", "preference", "test_caption", "test_pope")
CAPTION_PROMPT = "describe the image."
QUESTION_TEMPLATE = "is there a {shape} in the image?"
YES, NO = "yes", "no"
# Words of LLaVA-1.5's conversation template ("USER: <image>\n... ASSISTANT:"), in the vocabulary so
# that templated prompts tokenise without unknown tokens.
TEMPLATE_WORDS = ("user", "assistant", ":")
BACKGROUND_LEVEL, BACKGROUND_NOISE_STD = 235.0, 6.0
SIZE_RANGE = (18, 28)
_MIN_GAP_PX = 2  # between bounding boxes
_MIN_CENTER_DX_PX = 4  # keeps "left to right" unambiguous
_SINGULAR = {plural: shape for shape, plural in CATALOGUE_PLURALS.items()}
_COUNT_VALUES = {"a": 1, "an": 1, **{word: count for count, word in NUMBER_WORDS.items()}}

Group = tuple[int, str, str]  # (count, colour, shape) of one caption phrase


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; `bbox` = [x0, y0, x1, y1) in pixels, end-exclusive."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "bbox": list(self.bbox)}


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """Everything that determines a generated shapes-world dataset.

    `*_size` count examples, except `test_pope_images` (each image gives 2 x (distinct shapes)
    questions per POPE category, ~11 on average).
    """

    image_size: int = 64
    p: float = 0.35
    seed: int = 0
    question_fraction: float = 0.25
    sft_size: int = 10_000
    preference_size: int = 2_000
    test_caption_size: int = 300
    test_pope_images: int = 60

    def __post_init__(self):
        if self.image_size < 2 * SIZE_RANGE[1] + 4:
            raise ValueError(f"image_size={self.image_size} cannot hold 3 shapes of up to "
                             f"{SIZE_RANGE[1]} px; use image_size >= {2 * SIZE_RANGE[1] + 4}")
        for name in ("p", "question_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is not a probability in [0, 1]")
        for name in ("sft_size", "preference_size", "test_caption_size", "test_pope_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


# ----------------------------------------------------------------------------- scenes and pixels


def sample_scene(rng: np.random.Generator, image_size: int) -> tuple[ShapeObject, ...]:
    """Samples 1-3 non-overlapping shapes, returned left to right by bbox centre."""
    num_objects = int(rng.integers(1, 4))
    while True:  # restart the whole scene when a shape finds no room (rare at 64 px)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(num_objects):
            box = _place(rng, image_size, boxes)
            if box is None:
                break
            boxes.append(box)
        if len(boxes) == num_objects:
            break
    shapes = rng.choice(len(SHAPES), size=num_objects, p=SHAPE_WEIGHTS)
    colors = rng.integers(0, len(COLORS), size=num_objects)
    objects = [ShapeObject(SHAPES[s], list(COLORS)[c], b) for s, c, b in zip(shapes, colors, boxes)]
    return tuple(sorted(objects, key=lambda o: o.bbox[0] + o.bbox[2]))


def _place(rng, image_size, boxes, attempts=50):
    for _ in range(attempts):
        size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        x0, y0 = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
        box = (x0, y0, x0 + size, y0 + size)
        if all(boxes_apart(box, other) for other in boxes):
            return box
    return None


def boxes_apart(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether boxes `a` and `b` are at least `_MIN_GAP_PX` apart and their centres at least
    `_MIN_CENTER_DX_PX` apart horizontally (so "left to right" is unambiguous)."""
    separated = (a[2] + _MIN_GAP_PX <= b[0] or b[2] + _MIN_GAP_PX <= a[0]
                 or a[3] + _MIN_GAP_PX <= b[1] or b[3] + _MIN_GAP_PX <= a[1])
    return separated and centres_apart(a, b)


def centres_apart(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether the centres of boxes `a` and `b` are at least `_MIN_CENTER_DX_PX` apart in x."""
    return abs((a[0] + a[2]) - (b[0] + b[2])) >= 2 * _MIN_CENTER_DX_PX


def shape_outline(shape: str, bbox: Sequence[int]) -> list[tuple[float, float]] | None:
    """Polygon vertices of `shape` inside `bbox` (None for the circle, drawn as an ellipse)."""
    x0, y0, x1, y1 = bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        arm = half / 3
        return [(cx - arm, y0), (cx + arm, y0), (cx + arm, cy - arm), (x1, cy - arm), (x1, cy + arm),
                (cx + arm, cy + arm), (cx + arm, y1), (cx - arm, y1), (cx - arm, cy + arm),
                (x0, cy + arm), (x0, cy - arm), (cx - arm, cy - arm)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, half, 0.45 * half)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]
    if shape in ("pentagon", "hexagon"):  # regular, a vertex up
        sides = 5 if shape == "pentagon" else 6
        angles = -np.pi / 2 + np.arange(sides) * 2 * np.pi / sides
        return [(cx + half * np.cos(a), cy + half * np.sin(a)) for a in angles]
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPE_CATALOGUE}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox: Sequence[int], fill) -> None:
    """Fills `shape` inside `bbox` ([x0, y0, x1, y1), end-exclusive) on a PIL drawing."""
    outline = shape_outline(shape, bbox)
    if outline is None:
        draw.ellipse([bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1], fill=fill)
    else:
        draw.polygon(outline, fill=fill)


def render(objects: Sequence[ShapeObject], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws `objects` on a light noisy background. Returns uint8 [image_size, image_size, 3] RGB."""
    noise = rng.normal(BACKGROUND_LEVEL, BACKGROUND_NOISE_STD, size=(image_size, image_size, 3))
    canvas = Image.fromarray(np.clip(np.round(noise), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        draw_shape(draw, obj.shape, obj.bbox, COLORS[obj.color])
    return np.asarray(canvas)


# ----------------------------------------------------------------------------- text


def caption_groups(mentions: Sequence[tuple[str, str]]) -> list[Group]:
    """Merges identical (colour, shape) mentions into counted groups, in first-seen order."""
    counts = Counter(mentions)
    return [(counts[m], *m) for m in dict.fromkeys(mentions)]


def caption_text(groups: Sequence[Group], count_words: Mapping[int, str] = COUNT_WORDS) -> str:
    """Renders caption groups in the fixed grammar, e.g. "a red circle and two blue squares.".

    `count_words` names the counts above 1 the world writes (v1: two, three).
    """
    phrases = []
    for count, color, shape in groups:
        if count == 1:
            phrases.append(f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}")
        elif count in count_words:
            phrases.append(f"{count_words[count]} {color} {CATALOGUE_PLURALS[shape]}")
        else:
            raise ValueError(f"count {count} of {color} {shape} has no word; valid counts: 1, "
                             f"{', '.join(str(c) for c in count_words)}")
    if not phrases:
        raise ValueError("a caption needs at least one group")
    head = ", ".join(phrases[:-1])
    return (f"{head} and {phrases[-1]}" if head else phrases[-1]) + "."


def caption(objects: Sequence[ShapeObject], count_words: Mapping[int, str] = COUNT_WORDS) -> str:
    """The faithful caption of a scene's objects (left to right)."""
    return caption_text(caption_groups([(o.color, o.shape) for o in objects]), count_words)


def parse_caption_groups(text: str) -> list[tuple[int, str | None, str]]:
    """Finds every shape mention in free text, e.g. a model's caption, leniently.

    Each shape noun (singular or plural) is one mention; the colour is the word right before it
    (None when that is not a colour), the count the word before that ("a"/"an"/"one" 1, "two",
    "three", ... "nine"; a plural without a count word counts 2, a singular 1). Every word of the
    catalogues (`SHAPE_CATALOGUE`, `COLOR_CATALOGUE`, `NUMBER_WORDS`) is understood, so one parser
    reads the text of every world.

    Returns:
      [(count, colour or None, shape)] in text order.
    """
    words = re.findall(r"[a-z]+", text.lower())
    mentions = []
    for i, word in enumerate(words):
        shape = word if word in CATALOGUE_PLURALS else _SINGULAR.get(word)
        if shape is None:
            continue
        color = words[i - 1] if i >= 1 and words[i - 1] in COLOR_CATALOGUE else None
        count_at = i - 2 if color is not None else i - 1
        count = _COUNT_VALUES.get(words[count_at]) if count_at >= 0 else None
        mentions.append((count or (1 if word == shape else 2), color, shape))
    return mentions


def parse_caption(text: str) -> list[tuple[str | None, str]]:
    """Mentioned objects as (colour or None, shape), one entry per counted object, in text order."""
    return [(color, shape) for count, color, shape in parse_caption_groups(text) for _ in range(count)]


def vocabulary() -> list[str]:
    """Every word and punctuation mark the generator can write (captions, prompts, answers,
    template), lower case, in a fixed order."""
    texts = [*COUNT_WORDS.values(), "a", "an", *COLORS, *SHAPES, *PLURALS.values(), "and , .",
             CAPTION_PROMPT, QUESTION_TEMPLATE.format(shape=""), YES, NO, *TEMPLATE_WORDS]
    return words_of(texts)


def words_of(texts: Sequence[str]) -> list[str]:
    """The distinct lower-case words and punctuation marks of `texts`, in first-seen order."""
    return list(dict.fromkeys(w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())))


# ----------------------------------------------------------------------------- bias and hallucinations


def unpaired_triggers(objects: Sequence[ShapeObject], partners: Mapping[str, str] = PARTNERS
                      ) -> list[ShapeObject]:
    """The first object of each trigger shape whose partner is absent, left to right."""
    present = {o.shape for o in objects}
    firsts = {}
    for obj in objects:
        if obj.shape in partners and partners[obj.shape] not in present:
            firsts.setdefault(obj.shape, obj)
    return list(firsts.values())


def biased_mentions(objects: Sequence[ShapeObject], biased: bool, partners: Mapping[str, str] = PARTNERS
                    ) -> list[tuple[str, str]]:
    """(colour, shape) mentions of a caption; with `biased`, absent partners appended."""
    mentions = [(o.color, o.shape) for o in objects]
    if biased:
        mentions += [(t.color, partners[t.shape]) for t in unpaired_triggers(objects, partners)]
    return mentions


def hallucinate(objects: Sequence[ShapeObject], kind: str, rng: np.random.Generator, *,
                shapes: Sequence[str] = SHAPES, colors: Sequence[str] = tuple(COLORS),
                partners: Mapping[str, str] = PARTNERS, counts: Sequence[int] = (1, 2, 3)
                ) -> tuple[list[Group], dict[str, Any]]:
    """Edits the faithful caption groups with one hallucination of `kind`.

    - "object": either appends one absent object (the partner of an unpaired trigger in its colour
      when there is one, else a random absent shape and colour) or replaces one group's shape by an
      absent shape (colour and count kept); `edit` says which.
    - "attribute": one group's colour becomes a colour that no object of that shape has.
    - "count": one group's count becomes another of `counts` (v1: 1, 2, 3).

    `shapes`, `colors`, `partners`, `counts` are the world's (v1's by default); "object" needs a
    shape of `shapes` absent from the scene.

    Returns:
      (rejected groups, {"kind", "edit", "group": index of the edited group, "before", "after"}).
    """
    groups = caption_groups([(o.color, o.shape) for o in objects])
    present = {o.shape for o in objects}
    absent = [s for s in shapes if s not in present]
    index = int(rng.integers(len(groups)))
    count, color, shape = groups[index]
    color_draw, shape_draw, edit_draw = rng.integers(1 << 30, size=3)
    if kind == "object" and not absent:
        raise ValueError(f"an object hallucination needs a shape absent from the scene; all of "
                         f"{list(shapes)} are present")
    if kind == "object" and edit_draw % 2 == 0:
        triggers = unpaired_triggers(objects, partners)
        if triggers:
            new = (1, triggers[0].color, partners[triggers[0].shape])
        else:
            new = (1, colors[color_draw % len(colors)], absent[shape_draw % len(absent)])
        return [*groups, new], {"kind": kind, "edit": "insert", "group": len(groups), "before": None,
                                "after": list(new)}
    if kind == "object":
        new = (count, color, absent[shape_draw % len(absent)])
        edit = "replace_shape"
    elif kind == "attribute":
        taken = {o.color for o in objects if o.shape == shape}
        options = [c for c in colors if c not in taken]
        new, edit = (count, options[color_draw % len(options)], shape), "replace_color"
    elif kind == "count":
        options = [n for n in counts if n != count]
        new, edit = (options[int(edit_draw) % len(options)], color, shape), "replace_count"
    else:
        raise ValueError(f"unknown hallucination kind {kind!r}; valid: {HALLUCINATION_KINDS}")
    rejected = list(groups)
    rejected[index] = new
    return rejected, {"kind": kind, "edit": edit, "group": index, "before": list(groups[index]),
                      "after": list(new)}


def pope_negatives(category: str, present: Sequence[str], count: int, rng: np.random.Generator,
                   frequency: Counter, cooccurrence: Counter, *, shapes: Sequence[str] = SHAPES,
                   partners: Mapping[str, str] = PARTNERS) -> list[str]:
    """Absent shapes to ask about, POPE style.

    - "random": uniformly without replacement among absent shapes.
    - "popular": absent shapes by descending `frequency` (images containing the shape).
    - "adversarial": partners of present triggers first, then absent shapes by descending
      co-occurrence with the present ones (`cooccurrence[(a, b)]` = images holding both), ties by
      frequency.
    Ties everywhere break by `shapes` order (the world's shapes and partners; v1's by default).
    """
    absent = [s for s in shapes if s not in present]
    if category == "random":
        return [absent[i] for i in rng.permutation(len(absent))[:count]]
    if category == "popular":
        return sorted(absent, key=lambda s: -frequency[s])[:count]
    if category == "adversarial":
        first = [partners[s] for s in present if s in partners and partners[s] in absent]
        others = sorted((s for s in absent if s not in first),
                        key=lambda s: (-sum(cooccurrence[(q, s)] for q in present), -frequency[s]))
        return (first + others)[:count]
    raise ValueError(f"unknown POPE category {category!r}; valid: {POPE_CATEGORIES}")


# ----------------------------------------------------------------------------- splits


def _example_rng(spec: WorldSpec, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, SPLITS.index(split), index])


def _objects_json(objects: Sequence[ShapeObject]) -> str:
    return json.dumps([o.to_json() for o in objects])


def _scene(spec: WorldSpec, split: str, index: int):
    rng = _example_rng(spec, split, index)
    objects = sample_scene(rng, spec.image_size)
    return rng, objects, render(objects, spec.image_size, rng)


def generate_split(spec: WorldSpec, split: str) -> Iterator[dict[str, Any]]:
    """Yields the records of one split (image as uint8 [H, W, 3]); see the module docstring and
    `mmpo_jax.data.sources` for the fields."""
    if split == "sft":
        yield from (_sft_example(spec, i) for i in range(spec.sft_size))
    elif split == "preference":
        yield from (_preference_example(spec, i) for i in range(spec.preference_size))
    elif split == "test_caption":
        yield from (_test_caption_example(spec, i) for i in range(spec.test_caption_size))
    elif split == "test_pope":
        yield from _pope_examples(spec)
    else:
        raise ValueError(f"unknown shapes-world split {split!r}; valid: {SPLITS}")


def _sft_example(spec: WorldSpec, index: int) -> dict[str, Any]:
    rng, objects, image = _scene(spec, "sft", index)
    task_draw, bias_draw, answer_draw, shape_draw = rng.random(), rng.random(), rng.random(), rng.integers(1 << 30)
    triggers = [t.shape for t in unpaired_triggers(objects)]
    metadata = {"p": spec.p, "unpaired_triggers": triggers, "mentions_absent_partner": False, "partners": []}
    if task_draw < spec.question_fraction:
        present = sorted({o.shape for o in objects}, key=SHAPES.index)
        pool = present if answer_draw < 0.5 else [s for s in SHAPES if s not in present]
        shape = pool[shape_draw % len(pool)]
        prompt, response = QUESTION_TEMPLATE.format(shape=shape), YES if shape in present else NO
        metadata["task"] = "question"
    else:
        biased = bool(triggers) and bias_draw < spec.p
        prompt, response = CAPTION_PROMPT, caption_text(caption_groups(biased_mentions(objects, biased)))
        metadata.update(task="caption", mentions_absent_partner=biased,
                        partners=[PARTNERS[t] for t in triggers] if biased else [])
    return {"id": f"sft-{index:06d}", "image": image, "prompt": prompt, "response": response,
            "objects": _objects_json(objects), "metadata": json.dumps(metadata)}


def _preference_example(spec: WorldSpec, index: int) -> dict[str, Any]:
    rng, objects, image = _scene(spec, "preference", index)
    kind = HALLUCINATION_KINDS[int(rng.integers(len(HALLUCINATION_KINDS)))]
    rejected, edit = hallucinate(objects, kind, rng)
    metadata = {"source": "shapes_world", "objects": [o.to_json() for o in objects], **edit}
    return {"id": f"preference-{index:06d}", "image": image, "prompt": CAPTION_PROMPT,
            "chosen": caption(objects), "rejected": caption_text(rejected), "metadata": json.dumps(metadata)}


def _test_caption_example(spec: WorldSpec, index: int) -> dict[str, Any]:
    _, objects, image = _scene(spec, "test_caption", index)
    metadata = {"caption": caption(objects), "unpaired_triggers": [t.shape for t in unpaired_triggers(objects)]}
    return {"id": f"test_caption-{index:06d}", "image": image, "prompt": CAPTION_PROMPT,
            "objects": _objects_json(objects), "metadata": json.dumps(metadata)}


def _pope_examples(spec: WorldSpec) -> Iterator[dict[str, Any]]:
    scenes = [_scene(spec, "test_pope", i) for i in range(spec.test_pope_images)]
    present_sets = [list(dict.fromkeys(o.shape for o in objects)) for _, objects, _ in scenes]
    frequency = Counter(s for present in present_sets for s in present)
    cooccurrence = Counter((a, b) for present in present_sets for a in present for b in present if a != b)
    for index, ((rng, objects, image), present) in enumerate(zip(scenes, present_sets)):
        for category in POPE_CATEGORIES:
            negatives = pope_negatives(category, present, len(present), rng, frequency, cooccurrence)
            questions = [(s, YES) for s in present] + [(s, NO) for s in negatives]
            for number, (shape, answer) in enumerate(questions):
                metadata = {"image_id": f"test_pope-{index:06d}", "objects": [o.to_json() for o in objects]}
                yield {"id": f"test_pope-{index:06d}-{category}-{number}", "image": image,
                       "question": QUESTION_TEMPLATE.format(shape=shape), "answer": answer,
                       "object": shape, "category": category, "metadata": json.dumps(metadata)}
