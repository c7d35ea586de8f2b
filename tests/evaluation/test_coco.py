"""COCO ground truth from the published annotation files, and the caption records CHAIR reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmpo_jax.evaluation import coco
from mmpo_jax.evaluation.coco_synonyms import COCO_SYNONYMS
from mmpo_jax.evaluation.runner import caption_metrics
from tests.evaluation import real_fixtures

# COCO's 80 instance categories, as `instances_val2014.json` names them.
COCO_80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def test_the_synonym_table_is_keyed_by_coco_category_names():
    assert len(COCO_80) == 80 and set(COCO_SYNONYMS) == set(COCO_80)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return real_fixtures.write_coco(tmp_path_factory.mktemp("coco"))


def test_objects_from_instances_and_captions(files):
    instances_only = coco.read_coco_objects(files["instances"])
    assert instances_only.objects == {42: {"dog", "frisbee"}, 73: {"person", "bicycle"}, 74: frozenset(), 133: {"bus"}}
    assert instances_only.file_names[133] == "COCO_val2014_000000000133.jpg"
    with_captions = coco.read_coco_objects(files["instances"], files["captions"])
    # "Two men ride bikes." adds nothing new; "A bowl of fruit next to a cup." adds bowl and cup.
    assert with_captions.objects[74] == {"bowl", "cup"} and with_captions.objects[73] == {"person", "bicycle"}


@pytest.mark.parametrize("name, expected", [
    ("COCO_val2014_000000000042.jpg", 42),
    ("train/images/COCO_val2014_000000000073.jpg", 73),  # a path: matched by base name
    ("000000000133.jpg", 133),  # the 2017 naming of the same image
    ("000000000999.jpg", None),  # not in the file
    ("llava_instruct/abc.png", None),
    (None, None),
])
def test_image_ids_from_file_names(files, name, expected):
    assert coco.read_coco_objects(files["instances"]).image_id(name) == expected


def test_caption_records_all_or_a_seeded_sample(files):
    objects = coco.read_coco_objects(files["instances"])
    records = coco.coco_caption_records(objects, files["images"], prompt="Describe.")
    assert [r["id"] for r in records.fields] == ["42", "73", "74", "133"]
    first = records[0]
    assert first["prompt"] == "Describe." and json.loads(first["objects"]) == ["dog", "frisbee"]
    assert first["image"].shape == (30, 40, 3) and first["image"].dtype == np.uint8
    sample = coco.coco_caption_records(objects, files["images"], num_images=2, seed=3)
    again = coco.coco_caption_records(objects, files["images"], num_images=2, seed=3)
    assert sample.fields == again.fields and len(sample) == 2
    assert [int(r["id"]) for r in sample.fields] == sorted(int(r["id"]) for r in sample.fields)
    assert caption_metrics("coco", ["A dog and a cat.", "A man."], records.fields[:2]) == {
        "chair_s": 0.5, "chair_i": pytest.approx(1 / 3), "recall": pytest.approx(2 / 4)}
    with pytest.raises(ValueError, match="num_images=5; the annotation file has 4 images"):
        coco.coco_caption_records(objects, files["images"], num_images=5)
    with pytest.raises(FileNotFoundError, match="COCO image folder .* is not a directory"):
        coco.coco_caption_records(objects, files["images"] / "missing")


def test_heldout_records_are_matched_by_the_metadata_file_name(files):
    objects = coco.read_coco_objects(files["instances"])
    image = np.zeros((3, 4, 3), np.uint8)
    source = [
        {"id": "7", "image": image, "prompt": "What is the dog doing?",
         "metadata": json.dumps({"image_path": "coco/COCO_val2014_000000000042.jpg"})},
        {"id": "8", "image": image, "prompt": "q", "metadata": json.dumps({"image_path": "vg/123.jpg"})},
        {"id": "9", "image": image + 1, "prompt": "Who rides?",
         "metadata": json.dumps({"image_path": "000000000073.jpg"})},
    ]
    records = coco.heldout_caption_records(source, objects)
    assert len(records) == 2 and records.unmatched == 1
    assert [f["id"] for f in records.fields] == ["7", "9"] and records[1]["image"][0, 0, 0] == 1
    assert records.fields[0]["prompt"] == coco.DEFAULT_CAPTION_PROMPT
    own = coco.heldout_caption_records(source, objects, prompt=None)
    assert own.fields[1]["prompt"] == "Who rides?" and json.loads(own.fields[1]["objects"]) == ["bicycle", "person"]
    assert len(records.head(1)) == 1
    with pytest.raises(ValueError, match=r"none of the 1 records names a COCO image .*\['vg/123.jpg'\]"):
        coco.heldout_caption_records(source[1:2], objects)


def test_files_not_in_the_published_format_are_named(tmp_path, files):
    content = json.loads(files["instances"].read_text())
    bad = tmp_path / "instances_lvis.json"
    bad.write_text(json.dumps({**content, "categories": [{"id": 1, "name": "aerosol_can"}]}))
    with pytest.raises(ValueError, match="category 'aerosol_can' is not a COCO category"):
        coco.read_coco_objects(bad)
    bad.write_text(json.dumps({k: v for k, v in content.items() if k != "annotations"}))
    with pytest.raises(ValueError, match="instances_lvis.json: the file lacks 'annotations'"):
        coco.read_coco_objects(bad)
    bad.write_text(json.dumps({**content, "annotations": [{"id": 3, "image_id": 5, "category_id": 1}]}))
    with pytest.raises(ValueError, match="annotation 3 names image 5 / category 1, which the file does not list"):
        coco.read_coco_objects(bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="a JSON list, expected the COCO instances object"):
        coco.read_coco_objects(bad)


def test_a_heldout_slice_of_prepared_rlhf_v_is_captioned_against_coco(files, tmp_path):
    """RLHF-V's parquet (image_path naming COCO files) -> load_split("train[50%:]") -> records."""
    from mmpo_jax.evaluation import suite
    from tests.data import fixtures

    pairs = fixtures.make_pairs(4)
    rows = [fixtures.rlhf_v_row(pair) for pair in pairs]
    for row, name in zip(rows, ["x.jpg", "COCO_val2014_000000000042.jpg", "y.jpg", "000000000133.jpg"]):
        row["image_path"] = f"coco/{name}"
    fixtures.write_rlhf_v(str(tmp_path / "manual"), rows)
    spec = suite.EvaluationSpec(coco_instances=str(files["instances"]), heldout_dataset="rlhf_v",
                                heldout_split="train[50%:]", heldout_data_dir=str(tmp_path / "data"),
                                heldout_manual_dir=str(tmp_path / "manual"))
    heldout = suite.load_benchmarks(spec).heldout
    assert len(heldout) == 1 and heldout.unmatched == 1  # rows 2 and 3; row 2's image is not COCO's
    record = heldout[0]
    assert record["id"] == "3" and json.loads(record["objects"]) == ["bus"]
    np.testing.assert_array_equal(record["image"], fixtures.decode_rgb(pairs[3].image))
