"""The shapes world v2: pixels vs ground truth, the three hallucination sources read back from the
metadata, questions, preference edits, POPE, validation/test disjointness, options and the builder."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import numpy as np
import pytest

from mmpo_jax.data import shapes_world as sw
from mmpo_jax.data import shapes_world_v2 as w2
from mmpo_jax.data import shapes_world_v2_splits as s2
from mmpo_jax.data.builders.shapes_world import ShapesWorld
from mmpo_jax.data.sources import load_split
from mmpo_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from tests.data.fixtures import same_records

SMALL = dict(sft_size=30, sft_focus_size=10, preference_size=30, validation_caption_size=10,
             validation_pope_images=6, test_caption_size=10, test_pope_images=6)


def _objects(record) -> list[w2.SceneObject]:
    return [w2.SceneObject(o["shape"], o["color"], tuple(o["bbox"]), alpha=o["alpha"], visible=o["visible"],
                           small=o["small"]) for o in json.loads(record["objects"])]


@pytest.fixture(scope="module")
def sft_records():
    """1500 sft examples (the rate tests need a few hundred eligible captions per source)."""
    return list(s2.generate_split(w2.WorldSpecV2(sft_size=1500), "sft"))


def test_splits_are_deterministic_and_scenes_do_not_depend_on_the_rates():
    spec = w2.WorldSpecV2(**SMALL)
    for split in s2.SPLITS:
        first = list(s2.generate_split(spec, split))
        assert same_records(first, list(s2.generate_split(spec, split)))
        assert not same_records(first, list(s2.generate_split(w2.WorldSpecV2(**SMALL, seed=1), split)))
    never = w2.WorldSpecV2(**SMALL, p=0.0, misname_rate=0.0, binding_swap_rate=0.0)
    always = w2.WorldSpecV2(**SMALL, p=1.0, misname_rate=1.0, binding_swap_rate=1.0)
    pairs = list(zip(s2.generate_split(never, "sft"), s2.generate_split(always, "sft")))
    assert all(np.array_equal(a["image"], b["image"]) and a["objects"] == b["objects"] for a, b in pairs)
    assert any(a["response"] != b["response"] for a, b in pairs)


def test_validation_and_test_splits_are_disjoint():
    spec = w2.WorldSpecV2(validation_caption_size=60, test_caption_size=60)
    validation = list(s2.generate_split(spec, "validation_caption"))
    test = list(s2.generate_split(spec, "test_caption"))
    test_images = {r["image"].tobytes() for r in test}
    assert not any(r["image"].tobytes() in test_images for r in validation)
    assert {r["id"] for r in validation}.isdisjoint(r["id"] for r in test)
    pope_ids = {json.loads(r["metadata"])["image_id"] for r in s2.generate_split(spec, "validation_pope")}
    assert all(i.startswith("validation_pope-") for i in pope_ids)


def test_ground_truth_matches_the_pixels():
    spec = w2.WorldSpecV2(test_caption_size=120)
    level = spec.background_level
    counts = Counter()
    for record in s2.generate_split(spec, "test_caption"):
        image, objects = record["image"].astype(np.int32), _objects(record)
        assert image.shape == (128, 128, 3) and 2 <= len(objects) <= 5
        centers = [o.bbox[0] + o.bbox[2] for o in objects]
        assert centers == sorted(centers) and len(set(centers)) == len(centers)
        drawn = np.zeros((128, 128), bool)
        masks = [w2.shape_mask(o.shape, o.bbox, 128) for o in objects]
        for obj, mask in zip(objects, masks):
            side = obj.bbox[2] - obj.bbox[0]
            assert side == obj.bbox[3] - obj.bbox[1]
            low, high = spec.small_size_range if obj.small else spec.size_range
            assert low <= side <= high
            fill = np.all(image == w2.fill_color(spec, obj), axis=-1)
            own = fill & mask
            # every visible pixel of the object has its (possibly faint) fill colour
            assert own.sum() / mask.sum() == pytest.approx(obj.visible, abs=0.02), (record["id"], obj)
            counts["small"] += obj.small
            counts["faint"] += obj.alpha < 1
            counts["occluded"] += obj.visible < 1
            counts["objects"] += 1
            if obj.alpha < 1:
                assert spec.faint_alpha_range[0] <= obj.alpha <= spec.faint_alpha_range[1]
            drawn |= mask
        background = image[~drawn]
        assert np.abs(background - level).max() <= 40, record["id"]
        metadata = json.loads(record["metadata"])
        assert metadata["caption"] == sw.caption(objects, sw.ALL_COUNT_WORDS)
    n = counts["objects"]
    assert abs(counts["small"] / n - spec.small_fraction) < 4 * math.sqrt(0.25 * 0.75 / n)
    assert abs(counts["faint"] / n - spec.faint_fraction) < 4 * math.sqrt(0.2 * 0.8 / n)
    assert counts["occluded"] > 0


def _rebuild_caption(spec, objects, metadata):
    """The SFT caption from the metadata's record of what was done to the true objects."""
    mentions = [(o.color, o.shape) for o in objects]
    for event in metadata["misnamed"]:
        assert objects[event["object"]].hard and event["said"] not in {o.shape for o in objects}
        mentions[event["object"]] = (mentions[event["object"]][0], event["said"])
    if metadata["binding_swap"]:
        i, j = metadata["binding_swap"]
        (ci, si), (cj, sj) = mentions[i], mentions[j]
        assert ci != cj and si != sj
        mentions[i], mentions[j] = (cj, si), (ci, sj)
    if metadata["mentions_absent_partner"]:
        triggers = sw.unpaired_triggers(objects, spec.partner_map)
        assert metadata["partners"] == [spec.partner_map[t.shape] for t in triggers]
        mentions += [(t.color, spec.partner_map[t.shape]) for t in triggers]
    return sw.caption_text(sw.caption_groups(mentions), sw.ALL_COUNT_WORDS)


def test_sft_captions_carry_each_hallucination_source_at_its_rate(sft_records):
    spec = w2.WorldSpecV2()
    tally = Counter()
    for record in sft_records:
        objects, metadata = _objects(record), json.loads(record["metadata"])
        if metadata["task"] == "question":
            tally["questions"] += 1
            continue
        assert record["response"] == _rebuild_caption(spec, objects, metadata)
        present = {o.shape for o in objects}
        if len(present) < len(spec.shapes):  # a misname needs a shape the scene does not hold
            hard = sum(o.hard for o in objects)
            tally["hard"] += hard
            tally["misnamed"] += len(metadata["misnamed"])
        tally["captions"] += 1
        tally["swapped"] += metadata["binding_swap"] is not None
        if sw.unpaired_triggers(objects, spec.partner_map):
            tally["eligible"] += 1
            tally["biased"] += metadata["mentions_absent_partner"]
        else:
            assert not metadata["mentions_absent_partner"]
    n = len(sft_records)
    assert abs(tally["questions"] / n - 0.3) <= 4 * math.sqrt(0.3 * 0.7 / n)
    for hits, total, rate in (("misnamed", "hard", spec.misname_rate), ("biased", "eligible", spec.p)):
        assert tally[total] > 300
        assert abs(tally[hits] / tally[total] - rate) <= 4 * math.sqrt(rate * (1 - rate) / tally[total]), hits
    # a swap needs two objects of different colour and shape: nearly every 2-5 object scene
    swap_rate = tally["swapped"] / tally["captions"]
    assert 0.8 * spec.binding_swap_rate <= swap_rate <= spec.binding_swap_rate + 4 * math.sqrt(0.15 * 0.85 / n)


def _expected_answer(question, objects):
    same = [o for o in objects if o.shape == question["shape"]]
    if question["kind"] == "presence":
        return sw.YES if same else sw.NO
    if question["kind"] == "colour":
        assert len({o.color for o in same}) == 1
        return same[0].color
    return sw.NUMBER_WORDS[len(same)]


def test_questions_have_exact_answers_and_the_boxes_they_are_about(sft_records):
    kinds = Counter()
    for record in sft_records:
        objects, metadata = _objects(record), json.loads(record["metadata"])
        questions = [metadata] if metadata["task"] == "question" else []
        for question in questions:
            kinds[question["kind"]] += 1
            assert record["prompt"] == question["question"] and record["response"] == question["answer"]
            assert question["answer"] == _expected_answer(question, objects)
            boxes = [list(o.bbox) for o in objects if o.shape == question["shape"]]
            assert question["boxes"] == boxes
            if boxes:
                box = np.asarray(boxes)
                assert question["box"] == [*box[:, :2].min(0).tolist(), *box[:, 2:].max(0).tolist()]
            else:
                assert question["answer"] == sw.NO and question["box"] is None
    assert set(kinds) == set(w2.QUESTION_KINDS) and min(kinds.values()) > 100
    # every caption and preference record lists one question of each kind, also exact
    for split in ("preference", "test_caption"):
        for record in s2.generate_split(w2.WorldSpecV2(preference_size=40, test_caption_size=40), split):
            metadata = json.loads(record["metadata"])
            objects = [w2.SceneObject(o["shape"], o["color"], tuple(o["bbox"])) for o in metadata["objects"]] \
                if split == "preference" else _objects(record)
            assert len(metadata["questions"]) == len(w2.QUESTION_KINDS)  # a colour one may fall back
            assert all(q["answer"] == _expected_answer(q, objects) for q in metadata["questions"])


def test_focus_records_pose_the_two_image_prompt_about_the_crop():
    """`sft_focus`: the SFT's tasks, asked with P2-DPO's two-image instruction; the crop is a square
    inside the image around what is asked (or one object) and the answer is the full image's."""
    spec = w2.WorldSpecV2(sft_focus_size=300)
    prefix = w2.FOCUS_PROMPT.format(prompt="")
    tasks, sides = Counter(), []
    for record in s2.generate_split(spec, "sft_focus"):
        objects, metadata = _objects(record), json.loads(record["metadata"])
        assert record["prompt"].startswith(prefix)
        plain = record["prompt"][len(prefix):]
        x0, y0, x1, y1 = box = metadata["focus_box"]
        assert 0 <= x0 < x1 <= spec.image_size and 0 <= y0 < y1 <= spec.image_size
        assert x1 - x0 == y1 - y0 >= spec.image_size // 4
        sides.append(x1 - x0)
        np.testing.assert_array_equal(record["focus_image"], record["image"][y0:y1, x0:x1])

        def holds(inner):
            return all(box[i] <= inner[i] for i in (0, 1)) and all(inner[i] <= box[i] for i in (2, 3))

        tasks[metadata["task"]] += 1
        if metadata["task"] == "question":
            assert plain == metadata["question"]
            assert record["response"] == _expected_answer(metadata, objects)
            if metadata["box"] is not None:
                assert holds(metadata["box"])
                continue
        else:
            assert plain == sw.CAPTION_PROMPT
        assert any(holds(o.bbox) for o in objects)
    assert abs(tasks["question"] / 300 - spec.question_fraction) < 0.1
    assert len(set(sides)) > 10  # the crop's scale varies
    with pytest.raises(ValueError, match=r"focus_crop_scale=\(0.5, 2.0\)"):
        w2.WorldSpecV2(focus_crop_scale=(0.5, 2.0))


def test_each_rejection_differs_in_exactly_the_recorded_kind():
    spec = w2.WorldSpecV2(preference_size=300)
    kinds = Counter()
    for record in s2.generate_split(spec, "preference"):
        metadata = json.loads(record["metadata"])
        objects = [w2.SceneObject(o["shape"], o["color"], tuple(o["bbox"])) for o in metadata["objects"]]
        truth = {(o.color, o.shape) for o in objects}
        chosen, rejected = sw.parse_caption_groups(record["chosen"]), sw.parse_caption_groups(record["rejected"])
        assert record["chosen"] == sw.caption(objects, sw.ALL_COUNT_WORDS)
        kinds[metadata["kind"], metadata["edit"]] += 1
        if metadata["edit"] == "insert":
            assert rejected[:-1] == chosen and rejected[-1][2] not in {o.shape for o in objects}
            continue
        assert len(rejected) == len(chosen)
        changed = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        if metadata["kind"] == "binding":
            assert changed == metadata["groups"]
            (ci, si), (cj, sj) = [(chosen[g][1], chosen[g][2]) for g in changed]
            assert [(rejected[g][1], rejected[g][2]) for g in changed] == [(cj, si), (ci, sj)]
            assert (cj, si) not in truth and (ci, sj) not in truth
            continue
        assert changed == [metadata["group"]]
        (count_a, color_a, shape_a), (count_b, color_b, shape_b) = chosen[changed[0]], rejected[changed[0]]
        if metadata["kind"] == "object":
            assert (count_a, color_a) == (count_b, color_b) and shape_b not in {o.shape for o in objects}
        elif metadata["kind"] == "attribute":
            assert (count_a, shape_a) == (count_b, shape_b) and (color_b, shape_b) not in truth
        else:
            assert (color_a, shape_a) == (color_b, shape_b) and count_a != count_b and 1 <= count_b <= 5
    assert {kind for kind, _ in kinds} == set(w2.PREFERENCE_KINDS)


def test_pope_negatives_use_the_world_shapes_and_partners():
    shapes = ("circle", "square", "star", "hexagon", "pentagon")
    spec = w2.WorldSpecV2(shapes=shapes, shape_weights=(5, 4, 3, 2, 1), partners=(("star", "hexagon"),),
                          test_pope_images=40)
    images: dict[str, list[dict]] = {}
    for record in s2.generate_split(spec, "test_pope"):
        images.setdefault(json.loads(record["metadata"])["image_id"], []).append(record)
    partner_first = 0
    for records in images.values():
        metadata = json.loads(records[0]["metadata"])
        present = list(dict.fromkeys(o["shape"] for o in metadata["objects"]))
        for record in records:
            boxes = [o["bbox"] for o in json.loads(record["metadata"])["objects"] if o["shape"] == record["object"]]
            assert json.loads(record["metadata"])["boxes"] == boxes
        absent = [s for s in shapes if s not in present]
        asked_yes = set()
        for category in sw.POPE_CATEGORIES:
            asked = [r for r in records if r["category"] == category]
            yes = [r["object"] for r in asked if r["answer"] == sw.YES]
            no = [r["object"] for r in asked if r["answer"] == sw.NO]
            pairs = min(spec.pope_pairs, len(present), len(absent))
            assert set(yes) <= set(present) and set(no) <= set(absent)
            assert len(yes) == len(no) == pairs  # balanced, like POPE
            asked_yes.add(tuple(yes))
            if category == "adversarial" and "star" in present and "hexagon" in absent:
                assert no[0] == "hexagon"
                partner_first += 1
        assert len(asked_yes) == 1  # the same present shapes in every category
    assert partner_first > 0


def test_pope_categories_ask_different_negatives():
    """v1's rule (every present shape, as many negatives) exhausts v2's absent shapes, so the three
    categories asked the same questions on most images; one balanced pair keeps them apart."""
    def identical_fraction(spec):
        negatives: dict[str, dict[str, set]] = {}
        for record in s2.generate_split(spec, "test_pope"):
            if record["answer"] == sw.NO:
                image = negatives.setdefault(json.loads(record["metadata"])["image_id"], {})
                image.setdefault(record["category"], set()).add(record["object"])
        same = [len({frozenset(c) for c in image.values()}) == 1 for image in negatives.values()]
        return sum(same) / len(same)

    spec = w2.WorldSpecV2(test_pope_images=80)
    every_shape = dataclasses.replace(spec, pope_pairs=w2.WorldSpecV2().max_objects)
    assert identical_fraction(spec) < 0.3 < 0.5 < identical_fraction(every_shape)
    with pytest.raises(ValueError, match="pope_pairs=0"):
        w2.WorldSpecV2(pope_pairs=0)


def test_another_world_needs_no_code_changes():
    spec = w2.WorldSpecV2(shapes=("pentagon", "hexagon", "circle"), shape_weights=(1, 1, 1),
                          colors=("pink", "cyan", "black"), partners={"pentagon": "hexagon"},
                          min_objects=1, max_objects=3, image_size=96, size_range=(16, 24), **SMALL)
    words = w2.vocabulary(spec)
    assert {"pentagon", "hexagons", "pink", "cyan"} <= set(words) and "red" not in words
    tokenizer = build_word_tokenizer(words, model_max_length=64)
    for split in s2.SPLITS:
        for record in s2.generate_split(spec, split):
            assert record["image"].shape == (96, 96, 3)
            for text in (record.get("response"), record.get("chosen"), record.get("question")):
                if text:
                    assert tokenizer.unk_token_id not in tokenizer(text).input_ids, text
    for record in s2.generate_split(spec, "test_caption"):
        caption = json.loads(record["metadata"])["caption"]
        assert Counter(sw.parse_caption(caption)) == Counter((o.color, o.shape) for o in _objects(record))


def test_spec_validation_names_the_bad_values():
    for options, message in ((dict(p=1.5), r"p=1.5"), (dict(shapes=("circle", "blob")), r"shapes=\('circle', 'blob'\)"),
                             (dict(colors=("red",)), "colors"), (dict(partners=(("circle", "heart"),)), "heart"),
                             (dict(min_objects=3, max_objects=2), "min_objects=3"),
                             (dict(image_size=64), "image_size=64"), (dict(question_kinds=("why",)), "why"),
                             (dict(size_range=(30, 20)), r"size_range=\(30, 20\)")):
        with pytest.raises(ValueError, match=message):
            w2.WorldSpecV2(**options)
    with pytest.raises(ValueError, match="unknown question kind 'why'"):
        w2.ask(w2.WorldSpecV2(), [w2.SceneObject("circle", "red", (0, 0, 20, 20))], "why", (0.1, 0.1))


def test_every_generator_parameter_is_a_builder_option_recorded_in_the_metadata(tmp_path):
    fields = {f.name for f in dataclasses.fields(w2.WorldSpecV2)}
    assert {"seed", "shapes", "colors", "partners", "p", "misname_rate", "binding_swap_rate", "size_range",
            "small_size_range", "min_objects", "max_objects", "image_size", "faint_alpha_range",
            "occlusion_fraction", "image_mean", "image_std"} <= fields
    options = dict(SMALL, world="v2", p=0.5, partners=[["circle", "star"]], size_range=[16, 30])
    source = load_split("shapes_world", "sft", data_dir=tmp_path / "a", **options)
    spec = w2.WorldSpecV2(**{k: v for k, v in options.items() if k != "world"})
    assert source.metadata["world"] == json.loads(json.dumps(spec.metadata()))
    assert set(source.metadata["world"]) == fields | {"world"}
    assert source.metadata["world"]["world"] == "v2" and source.metadata["world"]["partners"] == [["circle", "star"]]
    assert same_records([source[i] for i in range(len(source))], list(s2.generate_split(spec, "sft")))
    for split in s2.SPLITS:
        loaded = load_split("shapes_world", split, data_dir=tmp_path / "a", **options)
        items = [loaded[i] for i in range(len(loaded))]
        assert same_records(items, list(s2.generate_split(spec, split)))
    tokenizer = load_tokenizer(source.tokenizer_path)
    assert set(tokenizer.get_vocab()) >= set(w2.vocabulary(spec))
    # config names: "v2" for the defaults; a list equal to a tuple default is no change
    assert ShapesWorld.config_from_options(world="v2").name == "v2"
    assert ShapesWorld.config_from_options(world="v2", colors=list(sw.COLORS)).name == "v2"
    assert ShapesWorld.config_from_options(world="v2", p=0.5).name == "v2-p=0.5"
    assert ShapesWorld.config_from_options().name == "default"
    assert ShapesWorld.config_from_options(p=0.5).name == "p=0.5"  # v1's names are unchanged
    with pytest.raises(ValueError, match=r"unknown shapes world 'v3'"):
        ShapesWorld.config_from_options(world="v3")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['misname_rate'\].*world='v1'"):
        ShapesWorld.config_from_options(misname_rate=0.1)
    with pytest.raises(ValueError, match="unknown split.*validation_caption"):
        load_split("shapes_world", "validation_caption", data_dir=tmp_path / "b", sft_size=4, preference_size=4,
                   test_caption_size=2, test_pope_images=2)
    # data prepared before a default changed (here: before `pope_pairs` existed) is refused
    metadata_file = next((tmp_path / "a").glob("shapes_world/*/*/metadata.json"))
    stored = json.loads(metadata_file.read_text())
    del stored["world"]["pope_pairs"]
    metadata_file.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"generated from another world spec \(it differs in pope_pairs"):
        load_split("shapes_world", "sft", data_dir=tmp_path / "a", **options)


def test_cell_labels_name_the_object_covering_each_cell():
    square = sw.ShapeObject("square", "red", (0, 0, 32, 32))  # exactly cells (0, 0)..(1, 1) of 16 px
    circle = sw.ShapeObject("circle", "blue", (64, 64, 72, 72))  # 8 px: a quarter of one cell
    shapes, colors = w2.cell_labels([square, circle], 128, 8, sw.SHAPES, tuple(sw.COLORS))
    expected = np.full(64, len(sw.SHAPES))
    expected[[0, 1, 8, 9]] = sw.SHAPES.index("square")
    np.testing.assert_array_equal(shapes, expected)
    assert set(colors[[0, 1, 8, 9]]) == {tuple(sw.COLORS).index("red")}
    assert colors[4 * 8 + 4] == len(sw.COLORS)  # the circle fills ~20 % < 25 % of its cell
    bigger = sw.ShapeObject("circle", "blue", (64, 64, 80, 80))
    assert w2.cell_labels([bigger], 128, 8, sw.SHAPES, tuple(sw.COLORS))[0][4 * 8 + 4] == 0
    with pytest.raises(ValueError, match="grid=7"):
        w2.cell_labels([square], 128, 7, sw.SHAPES, tuple(sw.COLORS))
