"""The shapes world v2: a finer world where hallucination has several causes (NumPy/PIL only).

v1 (`mmpo_jax.data.shapes_world`) has a 4x4 visual-token grid, mean = std = 0.5 normalisation
and one hallucination source, a co-occurrence prior. v2 keeps v1's text grammar, caption parser
and partner bias and adds what methods that act on *where* a model looks need:

- images of `image_size` (128) px holding `min_objects..max_objects` (2-5) shapes of varied size:
  a fraction `small_fraction` is small (`small_size_range`, ~1 visual token of the tiny v2 preset's
  8x8 grid), a fraction `faint_fraction` low-contrast (the fill blended into the background at
  opacity `faint_alpha_range`), and in a fraction `occlusion_fraction` of scenes the last object
  hides part (`occluded_visible_range` stays visible) of another; small, faint or occluded objects
  are *hard* (`SceneObject.hard`);
- CLIP normalisation constants recorded with the world (`image_mean`, `image_std`), so the noise
  interventions (METHODS.md §5, defined in CLIP-normalised units) have the paper's pixel strength;
- three hallucination sources in the SFT captions, each with its rate (`shapes_world_v2_splits`):
  the co-occurrence prior (`p`, as v1), visual uncertainty (every hard object is still named, and
  with probability `misname_rate` by a shape the scene does not hold) and attribute binding
  (with probability `binding_swap_rate` two objects' colours are swapped);
- questions about one object (`Question`: presence, colour, count) with exact answers and the
  boxes of the object(s) they are about;
- two-image prompts for the SFT (`sft_focus`, `sft_focus_size` records): the image, then a crop
  around one object (a side of `focus_crop_scale` times the object's larger side), with P2-DPO's
  instruction to answer mainly from the first image (`FOCUS_PROMPT`), so a base can read the
  two-image `I_aug` of P2-DPO's focus pairs;
- a validation split pair (captions, POPE) disjoint from the test splits.

Every generator parameter is a field of `WorldSpecV2` (a builder option; the prepared dataset's
metadata records them all). Shapes and colours are chosen from the catalogues of
`shapes_world` (`SHAPE_CATALOGUE`, `COLOR_CATALOGUE`), whose words the one caption parser knows, so
CHAIR and POPE read every world exactly.

[our choice] defaults, fixed before any model was trained on v2 and not tuned toward a method:
128 px and normal sizes 18-36 px (objects span 1-3 of the 16-px cells of an 8x8 token grid, as
v1's span 2-3.5 of its 16-px cells); small objects 10-14 px (below one cell); faint opacity
0.3-0.5 (60-120 grey levels from the background in the most different channel, against 195-235
at full colour; background noise std 6);
occluded objects keep 50-80 % visible; rates p = 0.35 (v1's), misname 0.2, binding swap 0.15,
each object small / faint with 0.25 / 0.2, occlusion in 0.2 of scenes, questions 0.3 of SFT records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmpo_jax.data import shapes_world as sw
from mmpo_jax.data.image_processing import CLIP_MEAN, CLIP_STD

WORLD = "v2"
QUESTION_KINDS = ("presence", "colour", "count")
PREFERENCE_KINDS = ("object", "attribute", "count", "binding")
PRESENCE_TEMPLATE = sw.QUESTION_TEMPLATE  # "is there a {shape} in the image?"
COLOUR_TEMPLATE = "what colour is the {shape}?"
COUNT_TEMPLATE = "how many {plural} are there?"
# P2-DPO's two-image instruction (METHODS.md §5), in the vocabulary so a pipeline can pose it.
FOCUS_INSTRUCTION = "answer mainly from the first image, use the crop for details."
FOCUS_PROMPT = FOCUS_INSTRUCTION.rstrip(".") + ": {prompt}"  # P_enh, `{prompt}` the plain prompt
_PLACEMENT_ATTEMPTS = 50  # positions tried per object
_SCENE_ATTEMPTS = 100  # placements tried per scene


@dataclasses.dataclass(frozen=True)
class WorldSpecV2:
    """Everything that determines a generated v2 world (see the module docstring).

    Sizes are pixels, `*_range` inclusive `(low, high)`, opacities and fractions in [0, 1].
    `*_size` count examples, except `*_pope_images` (each image gives `pope_pairs` "yes" and as
    many "no" questions per POPE category, fewer where it holds fewer distinct present or absent
    shapes). Sequences may be given as lists (builder options from a
    config); they are stored as tuples, `partners` as `((trigger, partner), ...)`.
    """

    seed: int = 0
    image_size: int = 128
    shapes: tuple[str, ...] = sw.SHAPES
    shape_weights: tuple[float, ...] = sw.SHAPE_WEIGHTS
    colors: tuple[str, ...] = tuple(sw.COLORS)
    partners: tuple[tuple[str, str], ...] = tuple(sw.PARTNERS.items())
    min_objects: int = 2
    max_objects: int = 5
    size_range: tuple[int, int] = (18, 36)
    small_fraction: float = 0.25
    small_size_range: tuple[int, int] = (10, 14)
    faint_fraction: float = 0.2
    faint_alpha_range: tuple[float, float] = (0.3, 0.5)
    occlusion_fraction: float = 0.2
    occluded_visible_range: tuple[float, float] = (0.5, 0.8)
    background_level: float = sw.BACKGROUND_LEVEL
    background_noise_std: float = sw.BACKGROUND_NOISE_STD
    p: float = 0.35
    misname_rate: float = 0.2
    binding_swap_rate: float = 0.15
    question_fraction: float = 0.3
    question_kinds: tuple[str, ...] = QUESTION_KINDS
    preference_kinds: tuple[str, ...] = PREFERENCE_KINDS
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    extra_words: tuple[str, ...] = (FOCUS_INSTRUCTION,)
    sft_size: int = 10_000
    sft_focus_size: int = 1_000
    focus_crop_scale: tuple[float, float] = (1.2, 2.0)
    preference_size: int = 2_000
    validation_caption_size: int = 300
    validation_pope_images: int = 150
    test_caption_size: int = 300
    test_pope_images: int = 150
    pope_pairs: int = 1

    def __post_init__(self):
        pairs = self.partners.items() if isinstance(self.partners, Mapping) else self.partners
        fixed = {"partners": tuple((str(a), str(b)) for a, b in pairs)}
        for name in ("shapes", "shape_weights", "colors", "size_range", "small_size_range",
                     "faint_alpha_range", "occluded_visible_range", "focus_crop_scale",
                     "question_kinds", "preference_kinds", "image_mean", "image_std", "extra_words"):
            fixed[name] = tuple(getattr(self, name))
        for name, value in fixed.items():
            object.__setattr__(self, name, value)
        problems = self._problems()
        if problems:
            raise ValueError("invalid shapes-world v2 option(s): " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        _choices(problems, "shapes", self.shapes, sw.SHAPE_CATALOGUE, minimum=2)
        _choices(problems, "colors", self.colors, tuple(sw.COLOR_CATALOGUE), minimum=2)
        _choices(problems, "question_kinds", self.question_kinds, QUESTION_KINDS, minimum=1)
        _choices(problems, "preference_kinds", self.preference_kinds, PREFERENCE_KINDS, minimum=1)
        if len(self.shape_weights) != len(self.shapes) or min(self.shape_weights, default=0) < 0 \
                or sum(self.shape_weights) <= 0:
            problems.append(f"shape_weights={self.shape_weights} must give one weight >= 0 per "
                            f"shape of {self.shapes}, not all 0")
        for trigger, partner in self.partners:
            if trigger not in self.shapes or partner not in self.shapes or trigger == partner:
                problems.append(f"partners pair {(trigger, partner)} must join two different "
                                f"shapes of {self.shapes}")
        if len({t for t, _ in self.partners}) != len(self.partners):
            problems.append(f"partners={self.partners} names a trigger twice")
        if not 1 <= self.min_objects <= self.max_objects:
            problems.append(f"min_objects={self.min_objects}, max_objects={self.max_objects} "
                            "need 1 <= min_objects <= max_objects")
        if self.max_objects + len(self.partners) > max(sw.NUMBER_WORDS):
            problems.append(f"max_objects={self.max_objects} + {len(self.partners)} partners "
                            f"could need a count above {max(sw.NUMBER_WORDS)}, which has no word")
        for name in ("size_range", "small_size_range"):
            low, high = getattr(self, name)
            if not 2 <= low <= high <= self.image_size // 2:
                problems.append(f"{name}={getattr(self, name)} needs 2 <= low <= high <= "
                                f"image_size / 2 = {self.image_size // 2}")
        for name in ("faint_alpha_range", "occluded_visible_range"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                problems.append(f"{name}={getattr(self, name)} needs 0 < low <= high <= 1")
        for name in ("small_fraction", "faint_fraction", "occlusion_fraction", "p", "misname_rate",
                     "binding_swap_rate", "question_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} is not a probability in [0, 1]")
        if not 0 <= self.background_level <= 255 or self.background_noise_std < 0:
            problems.append(f"background_level={self.background_level} must lie in [0, 255] and "
                            f"background_noise_std={self.background_noise_std} be >= 0")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            problems.append(f"image_mean={self.image_mean}, image_std={self.image_std} need 3 "
                            "values each, std > 0")
        low, high = self.focus_crop_scale
        if not 1.0 <= low <= high:
            problems.append(f"focus_crop_scale={self.focus_crop_scale} needs 1 <= low <= high")
        for name in ("sft_size", "sft_focus_size", "preference_size", "validation_caption_size",
                     "validation_pope_images", "test_caption_size", "test_pope_images"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.pope_pairs < 1:
            problems.append(f"pope_pairs={self.pope_pairs} must be >= 1")
        # Placement must succeed: the largest scene's boxes (plus gaps) take <= half the image.
        side = self.size_range[1] + 2
        if self.max_objects * side * side > 0.5 * self.image_size**2:
            problems.append(f"image_size={self.image_size} is too small for {self.max_objects} "
                            f"objects of up to {self.size_range[1]} px")
        return problems

    @property
    def partner_map(self) -> dict[str, str]:
        """{trigger: partner}."""
        return dict(self.partners)

    @property
    def count_words(self) -> dict[int, str]:
        """The count words captions may write (2 .. 9)."""
        return sw.ALL_COUNT_WORDS

    def metadata(self) -> dict[str, Any]:
        """The spec as JSON-able metadata, `"world": "v2"` first (the builder stores it)."""
        return {"world": WORLD, **{k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}}


def _choices(problems: list[str], name: str, values: Sequence[str], valid: Sequence[str], *,
             minimum: int) -> None:
    unknown = [v for v in values if v not in valid]
    if unknown or len(set(values)) != len(values) or len(values) < minimum:
        problems.append(f"{name}={tuple(values)} must hold >= {minimum} distinct values of {tuple(valid)}")


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


# ----------------------------------------------------------------------------- scenes


@dataclasses.dataclass(frozen=True)
class SceneObject(sw.ShapeObject):
    """A v2 object: v1's (shape, colour, bbox) plus how hard it is to see.

    Attributes:
      alpha: fill opacity over the background level (1 = full colour; < 1 = faint).
      visible: fraction of its pixels not hidden by an object drawn later (1 = not occluded).
      small: its size was drawn from `small_size_range`.
    """

    alpha: float = 1.0
    visible: float = 1.0
    small: bool = False

    @property
    def hard(self) -> bool:
        """Small, faint or partly hidden: what the SFT captions may misname."""
        return self.small or self.alpha < 1.0 or self.visible < 1.0

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "alpha": round(self.alpha, 4), "visible": round(self.visible, 4),
                "small": self.small, "hard": self.hard}


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects left to right (by bbox centre x) and the order they were drawn in.

    Attributes:
      objects: the scene's objects, left to right (captions list them in this order).
      draw_order: indices into `objects`, first drawn first (an occluder is drawn last).
      occluded: index into `objects` of the partly hidden object, or None.
    """

    objects: tuple[SceneObject, ...]
    draw_order: tuple[int, ...]
    occluded: int | None


def sample_scene(spec: WorldSpecV2, rng: np.random.Generator) -> Scene:
    """Samples one scene. Every draw is made whether or not it is used (sizes, opacities, the
    occlusion coin), so one option's value does not move the others' draws."""
    count = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    occlude = bool(rng.random() < spec.occlusion_fraction) and count >= 2
    small = rng.random(count) < spec.small_fraction
    normal_sizes = rng.integers(spec.size_range[0], spec.size_range[1] + 1, size=count)
    small_sizes = rng.integers(spec.small_size_range[0], spec.small_size_range[1] + 1, size=count)
    sizes = np.where(small, small_sizes, normal_sizes)
    faint = rng.random(count) < spec.faint_fraction
    alphas = np.where(faint, rng.uniform(*spec.faint_alpha_range, size=count), 1.0)
    weights = np.asarray(spec.shape_weights, np.float64)
    shapes = [spec.shapes[i] for i in rng.choice(len(spec.shapes), size=count, p=weights / weights.sum())]
    colors = [int(c) for c in rng.integers(0, len(spec.colors), size=count)]
    if occlude:
        # The occluder (last) must not blend into its target (first) and must be large enough
        # to hide the share `occluded_visible_range` asks for: at least the target's side.
        if colors[-1] == colors[0]:
            colors[-1] = (colors[-1] + 1) % len(spec.colors)
        sizes[-1] = max(sizes[-1], sizes[0])
        small[-1] = small[-1] and sizes[-1] <= spec.small_size_range[1]
    sides = [int(s) for s in sizes]
    for _ in range(_SCENE_ATTEMPTS):  # restart the placement when a shape finds no room
        boxes = _place_all(rng, spec.image_size, sides[:1], [])
        visible = 1.0
        if occlude:  # the occluder right after its target, while there is room around it
            placed = _place_occluder(rng, spec, (shapes[0], shapes[-1]), boxes[0], sides[-1])
            if placed is None:
                continue
            occluder, visible = placed
        rest = _place_all(rng, spec.image_size, sides[1:count - occlude], boxes + ([occluder] if occlude else []))
        if rest is not None:
            boxes += rest + ([occluder] if occlude else [])
            break
    else:
        raise RuntimeError(f"found no room for {count} objects of sides {sides} px (occlusion: "
                           f"{occlude}) in a {spec.image_size}-px image after {_SCENE_ATTEMPTS} "
                           "tries; use a larger image_size or smaller sizes")
    drawn = [SceneObject(shapes[i], spec.colors[colors[i]], boxes[i], alpha=float(alphas[i]),
                         visible=visible if occlude and i == 0 else 1.0, small=bool(small[i]))
             for i in range(count)]
    order = sorted(range(count), key=lambda i: drawn[i].bbox[0] + drawn[i].bbox[2])
    return Scene(objects=tuple(drawn[i] for i in order),
                 draw_order=tuple(order.index(i) for i in range(count)),
                 occluded=order.index(0) if occlude else None)


def _place_all(rng, image_size: int, sides: list[int], taken: list[tuple[int, int, int, int]]
               ) -> list[tuple[int, int, int, int]] | None:
    """Boxes of the given sides, apart from each other and from `taken`; None if one finds no room."""
    boxes: list[tuple[int, int, int, int]] = []
    for side in sides:
        for _ in range(_PLACEMENT_ATTEMPTS):
            x0, y0 = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if all(sw.boxes_apart(box, other) for other in taken + boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _place_occluder(rng, spec: WorldSpecV2, shapes: tuple[str, str], target: tuple[int, int, int, int],
                    side: int) -> tuple[tuple[int, int, int, int], float] | None:
    """A box of `side` for the occluder (`shapes[1]`) overlapping the target (`shapes[0]` in
    `target`) so that a share in `occluded_visible_range` of the target stays visible, centres
    apart in x: `(box, visible share)`, or None."""
    target_mask = shape_mask(shapes[0], target, spec.image_size)
    low, high = spec.occluded_visible_range
    for _ in range(_PLACEMENT_ATTEMPTS):
        x0 = int(rng.integers(max(0, target[0] - side + 1), min(spec.image_size - side, target[2] - 1) + 1))
        y0 = int(rng.integers(max(0, target[1] - side + 1), min(spec.image_size - side, target[3] - 1) + 1))
        box = (x0, y0, x0 + side, y0 + side)
        if not sw.centres_apart(box, target):
            continue
        hidden = target_mask & shape_mask(shapes[1], box, spec.image_size)
        visible = 1.0 - hidden.sum() / max(int(target_mask.sum()), 1)
        if low <= visible <= high:
            return box, float(visible)
    return None


def shape_mask(shape: str, bbox: Sequence[int], image_size: int) -> np.ndarray:
    """bool `[image_size, image_size]`: the pixels `shape` in `bbox` fills (as `render` draws it)."""
    canvas = Image.new("1", (image_size, image_size), 0)
    sw.draw_shape(ImageDraw.Draw(canvas), shape, bbox, 1)
    return np.asarray(canvas, bool)


def object_coverage(objects: Sequence[sw.ShapeObject], image_size: int) -> np.ndarray:
    """float32 `[image_size, image_size]`: 1 where some object is drawn, else 0."""
    covered = np.zeros((image_size, image_size), bool)
    for obj in objects:
        covered |= shape_mask(obj.shape, obj.bbox, image_size)
    return covered.astype(np.float32)


def patch_coverage(objects: Sequence[sw.ShapeObject], image_size: int, grid: int) -> np.ndarray:
    """float32 `[grid, grid]`: the share of each patch that objects cover (row-major patches of
    `image_size / grid` px), e.g. an oracle attention anchor."""
    if image_size % grid:
        raise ValueError(f"grid={grid} does not divide image_size={image_size}")
    cell = image_size // grid
    return object_coverage(objects, image_size).reshape(grid, cell, grid, cell).mean(axis=(1, 3))


def cell_labels(objects: Sequence[sw.ShapeObject], image_size: int, grid: int,
                shapes: Sequence[str], colors: Sequence[str], min_share: float = 0.25
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell ground truth for a vision tower's tokens: int32 `[grid * grid]` shape and colour
    indices (into `shapes` / `colors`; `len(shapes)` / `len(colors)` where no object covers
    `min_share` of the cell), row-major cells of `image_size / grid` px. A cell two objects cover
    takes the one covering more of it. [our choice] coverage of the object's drawn pixels, not of
    what stays visible (records keep no draw order), so an occluded object keeps its cells."""
    if image_size % grid:
        raise ValueError(f"grid={grid} does not divide image_size={image_size}")
    cell = image_size // grid
    shape_ids = np.full(grid * grid, len(shapes), np.int32)
    color_ids = np.full(grid * grid, len(colors), np.int32)
    best = np.full(grid * grid, min_share, np.float32)
    for obj in objects:
        share = shape_mask(obj.shape, obj.bbox, image_size).reshape(grid, cell, grid, cell).mean(axis=(1, 3))
        share = share.reshape(-1)
        wins = share >= best
        shape_ids[wins], color_ids[wins] = shapes.index(obj.shape), colors.index(obj.color)
        best = np.where(wins, share, best)
    return shape_ids, color_ids


def fill_color(spec: WorldSpecV2, obj: SceneObject) -> tuple[int, int, int]:
    """The RGB fill of `obj`: its catalogue colour blended over the background level by `alpha`."""
    rgb = np.asarray(sw.COLOR_CATALOGUE[obj.color], np.float64)
    blended = spec.background_level + obj.alpha * (rgb - spec.background_level)
    return tuple(int(v) for v in np.clip(np.round(blended), 0, 255))


def render(spec: WorldSpecV2, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draws the scene on a light noisy background, in draw order. uint8 `[S, S, 3]` RGB."""
    size = spec.image_size
    noise = rng.standard_normal((size, size, 3), dtype=np.float32)
    noise = noise * np.float32(spec.background_noise_std) + np.float32(spec.background_level)
    canvas = Image.fromarray(np.clip(np.rint(noise), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for index in scene.draw_order:
        obj = scene.objects[index]
        sw.draw_shape(draw, obj.shape, obj.bbox, fill_color(spec, obj))
    return np.asarray(canvas)


# ----------------------------------------------------------------------------- questions


@dataclasses.dataclass(frozen=True)
class Question:
    """A question about one shape of a scene, with its exact answer.

    Attributes:
      kind: "presence", "colour" or "count".
      shape: the shape asked about.
      text: the prompt, e.g. "what colour is the circle?".
      answer: "yes"/"no", a colour word, or a count word ("one" .. "nine").
      boxes: `[x0, y0, x1, y1]` of every object the answer is about (empty for a "no").
    """

    kind: str
    shape: str
    text: str
    answer: str
    boxes: tuple[tuple[int, int, int, int], ...]

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """The union of `boxes` (what a focus crop should cover), None for a "no"."""
        if not self.boxes:
            return None
        x0, y0, x1, y1 = np.asarray(self.boxes).T
        return int(x0.min()), int(y0.min()), int(x1.max()), int(y1.max())

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": self.shape, "question": self.text, "answer": self.answer,
                "boxes": [list(b) for b in self.boxes], "box": None if self.box is None else list(self.box)}


def ask(spec: WorldSpecV2, objects: Sequence[SceneObject], kind: str, draws: Sequence[float]) -> Question:
    """The question of `kind` about one shape of the scene, chosen by two uniform `draws`.

    - presence: with `draws[0] < 0.5` a present shape ("yes"), else an absent one ("no"; a present
      one when every shape is present);
    - colour: a present shape whose objects all share one colour (so the answer is unique); a
      presence question when there is none;
    - count: a present shape; the answer is how many objects have it.
    """
    present = sorted({o.shape for o in objects}, key=spec.shapes.index)
    if kind == "colour":
        single = [s for s in present if len({o.color for o in objects if o.shape == s}) == 1]
        if single:
            shape = _pick(single, draws[1])
            color = next(o.color for o in objects if o.shape == shape)
            return _question(kind, shape, COLOUR_TEMPLATE.format(shape=shape), color, objects)
        kind = "presence"
    if kind == "count":
        shape = _pick(present, draws[1])
        count = sum(o.shape == shape for o in objects)
        return _question(kind, shape, COUNT_TEMPLATE.format(plural=sw.CATALOGUE_PLURALS[shape]),
                         sw.NUMBER_WORDS[count], objects)
    if kind != "presence":
        raise ValueError(f"unknown question kind {kind!r}; valid: {QUESTION_KINDS}")
    absent = [s for s in spec.shapes if s not in present]
    shape = _pick(present if draws[0] < 0.5 or not absent else absent, draws[1])
    return _question(kind, shape, PRESENCE_TEMPLATE.format(shape=shape),
                     sw.YES if shape in present else sw.NO, objects)


def _pick(pool: Sequence[str], draw: float) -> str:
    return pool[min(int(draw * len(pool)), len(pool) - 1)]


def _question(kind: str, shape: str, text: str, answer: str, objects: Sequence[SceneObject]) -> Question:
    return Question(kind, shape, text, answer, tuple(o.bbox for o in objects if o.shape == shape))


def vocabulary(spec: WorldSpecV2) -> list[str]:
    """Every word and punctuation mark the world can write (captions, prompts, answers, template,
    `extra_words`), lower case, in a fixed order."""
    texts = [*sw.NUMBER_WORDS.values(), "a", "an", *spec.colors, *spec.shapes,
             *(sw.CATALOGUE_PLURALS[s] for s in spec.shapes), "and , .", sw.CAPTION_PROMPT,
             PRESENCE_TEMPLATE.format(shape=""), COLOUR_TEMPLATE.format(shape=""),
             COUNT_TEMPLATE.format(plural=""), sw.YES, sw.NO, *sw.TEMPLATE_WORDS, *spec.extra_words]
    return sw.words_of(texts)
