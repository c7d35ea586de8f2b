"""The shapes world: determinism, pixels vs ground truth, bias rate, hallucination kinds, POPE rules."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from mmpo_jax.data import shapes_world as sw
from mmpo_jax.data.sources import load_split
from mmpo_jax.data.tokenizer import load_tokenizer
from tests.data.fixtures import same_records

SMALL = dict(sft_size=30, preference_size=30, test_caption_size=10, test_pope_images=12)


def _objects(record) -> list[sw.ShapeObject]:
    return [sw.ShapeObject(o["shape"], o["color"], tuple(o["bbox"])) for o in json.loads(record["objects"])]


@pytest.fixture(scope="module")
def sft_records():
    """2000 sft examples at p=0.35 (the bias-rate test needs a few hundred eligible captions)."""
    return list(sw.generate_split(sw.WorldSpec(p=0.35, sft_size=2000), "sft"))


def test_splits_are_deterministic_by_seed_and_scenes_do_not_depend_on_p():
    spec = sw.WorldSpec(**SMALL)
    for split in sw.SPLITS:
        first, again = list(sw.generate_split(spec, split)), list(sw.generate_split(spec, split))
        assert same_records(first, again)
        other_seed = list(sw.generate_split(sw.WorldSpec(**SMALL, seed=1), split))
        assert not same_records(first, other_seed)
    never = list(sw.generate_split(sw.WorldSpec(**SMALL, p=0.0), "sft"))
    always = list(sw.generate_split(sw.WorldSpec(**SMALL, p=1.0), "sft"))
    assert all(np.array_equal(a["image"], b["image"]) and a["objects"] == b["objects"] for a, b in zip(never, always))
    assert any(a["response"] != b["response"] for a, b in zip(never, always))


def _silhouette(mask: np.ndarray) -> str:
    """Names a shape from its filled mask in its box: fill fraction, and for the two half-filled
    shapes the share of pixels in the top half (a triangle's apex is up). Ranges measured on 600
    rendered objects; they do not overlap."""
    fill, top_share = mask.mean(), mask[: mask.shape[0] // 2].sum() / mask.sum()
    if fill >= 0.98:
        return "square"
    if 0.72 <= fill <= 0.84:
        return "circle"
    if 0.55 <= fill <= 0.66:
        return "cross"
    if 0.48 <= fill <= 0.56:
        return "triangle" if top_share <= 0.32 else "diamond"
    if 0.28 <= fill <= 0.42:
        return "star"
    return f"unknown (fill {fill:.3f})"


@pytest.mark.parametrize("image_size,count", [(64, 150), (96, 30)])
def test_ground_truth_matches_the_pixels(image_size, count):
    spec = sw.WorldSpec(image_size=image_size, test_caption_size=count)
    background = np.array([sw.BACKGROUND_LEVEL] * 3)
    for record in sw.generate_split(spec, "test_caption"):
        image, objects = record["image"].astype(np.int32), _objects(record)
        assert image.shape == (image_size, image_size, 3) and 1 <= len(objects) <= 3
        inside_any = np.zeros((image_size, image_size), bool)
        for obj in objects:
            x0, y0, x1, y1 = obj.bbox
            assert sw.SIZE_RANGE[0] <= x1 - x0 == y1 - y0 <= sw.SIZE_RANGE[1]
            inside_any[y0:y1, x0:x1] = True
            patch = image[y0:y1, x0:x1].reshape(-1, 3)
            own = np.all(patch == sw.COLORS[obj.color], axis=-1)
            near_background = np.abs(patch - background).max(axis=-1) <= 40
            # The object's colour covers a good part of its box (the star is the thinnest, ~1/3)
            # and everything else in the box is background: no other colour.
            assert own.mean() >= 0.25, (record["id"], obj)
            assert np.all(own | near_background), (record["id"], obj)
            assert _silhouette(own.reshape(y1 - y0, x1 - x0)) == obj.shape, (record["id"], obj)
        outside = image[~inside_any]
        assert np.abs(outside - background).max() <= 40, record["id"]
        centers = [o.bbox[0] + o.bbox[2] for o in objects]
        assert centers == sorted(centers)


def test_captions_follow_the_grammar_and_parse_back():
    objects = [sw.ShapeObject("circle", "red", (0, 0, 20, 20)), sw.ShapeObject("star", "orange", (22, 0, 42, 20)),
               sw.ShapeObject("circle", "red", (44, 0, 64, 20))]
    assert sw.caption(objects) == "two red circles and an orange star."
    assert sw.caption(objects[:1]) == "a red circle."
    assert sw.caption_text([(1, "blue", "cross"), (3, "green", "square"), (1, "red", "star")]) == \
        "a blue cross, three green squares and a red star."
    assert sw.parse_caption("two red circles and an orange star.") == [("red", "circle"), ("red", "circle"),
                                                                       ("orange", "star")]
    # Lenient on model output: missing colours, bare plurals, repeated nouns.
    assert sw.parse_caption_groups("a red circle circle and stars, the blue") == [
        (1, "red", "circle"), (1, None, "circle"), (2, None, "star")]
    with pytest.raises(ValueError, match="count 4"):
        sw.caption_text([(4, "red", "circle")])
    for record in sw.generate_split(sw.WorldSpec(test_caption_size=60), "test_caption"):
        objects = _objects(record)
        text = json.loads(record["metadata"])["caption"]
        assert Counter(sw.parse_caption(text)) == Counter((o.color, o.shape) for o in objects)


def test_sft_bias_rate_matches_p(sft_records):
    p = 0.35
    eligible = mentioned = questions = 0
    for record in sft_records:
        objects, metadata = _objects(record), json.loads(record["metadata"])
        triggers = sw.unpaired_triggers(objects)
        if metadata["task"] == "question":
            questions += 1
            shape = record["prompt"].split()[3]
            assert record["response"] == (sw.YES if shape in {o.shape for o in objects} else sw.NO)
            continue
        truth = [(o.color, o.shape) for o in objects]
        said = sw.parse_caption(record["response"])
        if metadata["mentions_absent_partner"]:
            # The true objects come first (grouped as captions group them), then each absent
            # partner in the colour of its trigger.
            extra = [(t.color, sw.PARTNERS[t.shape]) for t in triggers]
            assert record["response"] == sw.caption_text(sw.caption_groups(truth + extra))
            assert said[-len(extra):] == extra
        else:
            assert record["response"] == sw.caption(objects)
        if triggers:
            eligible += 1
            mentioned += metadata["mentions_absent_partner"]
        else:
            assert not metadata["mentions_absent_partner"]
    assert abs(questions / len(sft_records) - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / len(sft_records))
    assert eligible > 300
    assert abs(mentioned / eligible - p) <= 4 * math.sqrt(p * (1 - p) / eligible), (mentioned, eligible)


def test_each_rejection_differs_in_exactly_the_recorded_kind():
    kinds = Counter()
    for record in sw.generate_split(sw.WorldSpec(preference_size=300), "preference"):
        metadata = json.loads(record["metadata"])
        objects = [sw.ShapeObject(o["shape"], o["color"], tuple(o["bbox"])) for o in metadata["objects"]]
        present_shapes = {o.shape for o in objects}
        present_pairs = {(o.color, o.shape) for o in objects}
        chosen, rejected = sw.parse_caption_groups(record["chosen"]), sw.parse_caption_groups(record["rejected"])
        assert record["chosen"] == sw.caption(objects) and record["prompt"] == sw.CAPTION_PROMPT
        kinds[metadata["kind"], metadata["edit"]] += 1
        if metadata["edit"] == "insert":
            assert rejected[:-1] == chosen
            count, color, shape = rejected[-1]
            assert count == 1 and shape not in present_shapes
            continue
        assert len(rejected) == len(chosen)
        changed = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        assert changed == [metadata["group"]]
        (count_a, color_a, shape_a), (count_b, color_b, shape_b) = chosen[changed[0]], rejected[changed[0]]
        if metadata["kind"] == "object":
            assert (count_a, color_a) == (count_b, color_b) and shape_b not in present_shapes
        elif metadata["kind"] == "attribute":
            assert (count_a, shape_a) == (count_b, shape_b) and (color_b, shape_b) not in present_pairs
        else:
            assert metadata["kind"] == "count"
            assert (color_a, shape_a) == (color_b, shape_b) and count_a != count_b
    assert set(kinds) == {("object", "insert"), ("object", "replace_shape"), ("attribute", "replace_color"),
                          ("count", "replace_count")}


def test_pope_negatives_follow_their_sampling_rules():
    records = list(sw.generate_split(sw.WorldSpec(test_pope_images=80), "test_pope"))
    images: dict[str, list[dict]] = {}
    for record in records:
        images.setdefault(json.loads(record["metadata"])["image_id"], []).append(record)
    present_of = {image_id: list(dict.fromkeys(o["shape"] for o in json.loads(rs[0]["metadata"])["objects"]))
                  for image_id, rs in images.items()}
    frequency = Counter(s for present in present_of.values() for s in present)
    cooccurrence = Counter((a, b) for present in present_of.values() for a in present for b in present if a != b)
    random_differs_from_popular = False
    for image_id, image_records in images.items():
        present = present_of[image_id]
        absent = [s for s in sw.SHAPES if s not in present]
        by_category = {c: [r for r in image_records if r["category"] == c] for c in sw.POPE_CATEGORIES}
        for category, questions in by_category.items():
            yes = [r["object"] for r in questions if r["answer"] == sw.YES]
            no = [r["object"] for r in questions if r["answer"] == sw.NO]
            assert yes == present and len(no) == len(present) and set(no) <= set(absent)
            assert all(r["question"] == sw.QUESTION_TEMPLATE.format(shape=r["object"]) for r in questions)
        popular = [r["object"] for r in by_category["popular"] if r["answer"] == sw.NO]
        ranked = sorted(absent, key=lambda s: (-frequency[s], sw.SHAPES.index(s)))
        assert popular == ranked[:len(present)]
        adversarial = [r["object"] for r in by_category["adversarial"] if r["answer"] == sw.NO]
        partners = [sw.PARTNERS[s] for s in present if sw.PARTNERS.get(s) in absent]
        rest = sorted((s for s in absent if s not in partners),
                      key=lambda s: (-sum(cooccurrence[(q, s)] for q in present), -frequency[s], sw.SHAPES.index(s)))
        assert adversarial == (partners + rest)[:len(present)]
        random = [r["object"] for r in by_category["random"] if r["answer"] == sw.NO]
        random_differs_from_popular |= set(random) != set(popular)
    assert random_differs_from_popular
    # Shape frequencies are unequal by design, so "popular" is not just "random".
    assert frequency.most_common(1)[0][0] == "circle"


def test_world_spec_validation_names_the_value():
    with pytest.raises(ValueError, match=r"p=1.5"):
        sw.WorldSpec(p=1.5)
    with pytest.raises(ValueError, match=r"image_size=32"):
        sw.WorldSpec(image_size=32)
    with pytest.raises(ValueError, match="unknown hallucination kind 'color'"):
        sw.hallucinate([sw.ShapeObject("circle", "red", (0, 0, 20, 20))], "color", np.random.default_rng(0))


def test_builder_round_trip_metadata_and_tokenizer(tmp_path):
    spec = sw.WorldSpec(**SMALL, p=0.5)
    fields = {"sft": {"id", "image", "prompt", "response", "objects", "metadata"},
              "preference": {"id", "image", "prompt", "chosen", "rejected", "metadata"},
              "test_caption": {"id", "image", "prompt", "objects", "metadata"},
              "test_pope": {"id", "image", "question", "answer", "object", "category", "metadata"}}
    for split in sw.SPLITS:
        source = load_split("shapes_world", split, data_dir=tmp_path / "a", **SMALL, p=0.5)
        items = [source[i] for i in range(len(source))]
        assert all(set(item) == fields[split] for item in items)
        assert same_records(items, list(sw.generate_split(spec, split)))
    assert source.metadata["world"] == {**SMALL, "p": 0.5, "image_size": 64, "seed": 0, "question_fraction": 0.25}
    again = load_split("shapes_world", "preference", data_dir=tmp_path / "b", **SMALL, p=0.5)
    assert same_records([again[i] for i in range(len(again))], list(sw.generate_split(spec, "preference")))
    tokenizer = load_tokenizer(source.tokenizer_path)
    assert tokenizer.image_token_id == 4 and tokenizer.decode(tokenizer(items[0]["question"]).input_ids[1:]) == \
        items[0]["question"]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bias'\].*'p'"):
        load_split("shapes_world", "sft", data_dir=tmp_path / "a", bias=0.5)
