"""Tiny benchmark files in the exact published formats (COCO annotations, POPE question files,
AMBER's data folder) with small PIL-written images; nothing is downloaded."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

# COCO images: (id, file name, size (width, height), instance categories, reference captions).
COCO_IMAGES = [
    (42, "COCO_val2014_000000000042.jpg", (40, 30), ["dog", "frisbee"], ["A dog catches a frisbee on the grass."]),
    (73, "COCO_val2014_000000000073.jpg", (33, 45), ["person", "bicycle", "person"], ["Two men ride bikes."]),
    (74, "COCO_val2014_000000000074.jpg", (36, 36), [], ["A bowl of fruit next to a cup."]),
    (133, "COCO_val2014_000000000133.jpg", (50, 28), ["bus"], ["A red bus parked on a street."]),
]
COCO_CATEGORIES = [(1, "person", "person"), (2, "bicycle", "vehicle"), (6, "bus", "vehicle"), (18, "dog", "animal"),
                   (34, "frisbee", "sports"), (47, "cup", "kitchen"), (51, "bowl", "kitchen")]


def write_image(path: pathlib.Path, size: tuple[int, int], seed: int) -> None:
    """A random RGB image of `size` (width, height) as JPEG or PNG (by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_coco(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """`annotations/instances_val2014.json`, `annotations/captions_val2014.json` and `val2014/`
    images as COCO publishes them; returns their paths."""
    images = [{"license": 3, "file_name": name, "coco_url": f"http://images.cocodataset.org/val2014/{name}",
               "height": size[1], "width": size[0], "date_captured": "2013-11-14 11:18:45", "flickr_url": "",
               "id": image_id} for image_id, name, size, _, _ in COCO_IMAGES]
    by_name = {name: category_id for category_id, name, _ in COCO_CATEGORIES}
    instances, captions = [], []
    for image_id, _, _, objects, texts in COCO_IMAGES:
        for name in objects:
            instances.append({"segmentation": [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0]], "area": 8.0, "iscrowd": 0,
                              "image_id": image_id, "bbox": [1.0, 1.0, 4.0, 4.0], "category_id": by_name[name],
                              "id": 1000 + len(instances)})
        captions += [{"image_id": image_id, "id": 5000 + len(captions), "caption": text} for text in texts]
    info = {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014}
    annotations = root / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    paths = {"instances": annotations / "instances_val2014.json", "captions": annotations / "captions_val2014.json",
             "images": root / "val2014"}
    paths["instances"].write_text(json.dumps({
        "info": info, "images": images, "licenses": [], "annotations": instances,
        "categories": [{"supercategory": s, "id": i, "name": n} for i, n, s in COCO_CATEGORIES]}))
    paths["captions"].write_text(json.dumps({"info": info, "images": images, "licenses": [], "annotations": captions}))
    for seed, (_, name, size, _, _) in enumerate(COCO_IMAGES):
        write_image(paths["images"] / name, size, seed)
    return paths


def write_pope(root: pathlib.Path, image_dir: pathlib.Path) -> list[pathlib.Path]:
    """Two POPE question files (jsonl, `{"question_id", "image", "text", "label"}` a line) over the
    COCO images."""
    rows = {
        "random": [(1, "COCO_val2014_000000000042.jpg", "dog", "yes"),
                   (2, "COCO_val2014_000000000042.jpg", "car", "no"),
                   (3, "COCO_val2014_000000000133.jpg", "bus", "yes")],
        "adversarial": [(1, "COCO_val2014_000000000073.jpg", "bicycle", "yes"),
                        (2, "COCO_val2014_000000000073.jpg", "car", "no")],
    }
    paths = []
    root.mkdir(parents=True, exist_ok=True)
    for split, questions in rows.items():
        path = root / f"coco_pope_{split}.json"
        lines = [json.dumps({"question_id": qid, "image": image, "text": f"Is there a {word} in the image?",
                             "label": label}) + "\n" for qid, image, word, label in questions]
        path.write_text("".join(lines))
        paths.append(path)
    assert image_dir.is_dir()
    return paths


# AMBER: two images, the generative query of each, and one yes/no query per dimension.
AMBER_RELATION = {"sky": [], "grass": ["ground"], "ground": ["floor"], "dog": ["puppy"], "cat": ["kitten"],
                  "man": ["person"], "person": ["man", "people"], "tree": [], "car": ["vehicle"], "sign": [],
                  "shelf": ["bookshelf"], "can": []}
AMBER_SAFE_WORDS = ["orange", "snack", "line", "camera", "light", "shoe", "sign", "range", "individual"]
AMBER_GENERATIVE = [
    {"id": 1, "type": "generative", "truth": ["sky", "grass", "dog"], "hallu": ["cat", "tree", "car"]},
    {"id": 2, "type": "generative", "truth": ["man", "ground", "man"], "hallu": ["dog", "shelf"]},
]
AMBER_DISCRIMINATIVE = [
    (3, "AMBER_1.jpg", "Is the sky sunny in this image?", "discriminative-attribute-state", "yes"),
    (4, "AMBER_1.jpg", "Are there two dogs in this image?", "discriminative-attribute-number", "no"),
    (5, "AMBER_2.jpg", "Does the man run in this image?", "discriminative-attribute-action", "yes"),
    (6, "AMBER_2.jpg", "Is there a cat in this image?", "discriminative-hallucination", "no"),
    (7, "AMBER_1.jpg", "Is there direct contact between the dog and grass?", "discriminative-relation", "yes"),
    (8, "AMBER_2.jpg", "Is there direct contact between the man and tree?", "relation", "no"),
]


def write_amber(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """AMBER's `data/` folder (annotations.json, relation.json, safe_words.txt without a final
    newline, query/query_*.json) and `image/`, as the repository publishes them."""
    data = root / "data"
    (data / "query").mkdir(parents=True, exist_ok=True)
    annotations = AMBER_GENERATIVE + [{"id": i, "type": t, "truth": truth}
                                      for i, _, _, t, truth in AMBER_DISCRIMINATIVE]
    (data / "annotations.json").write_text(json.dumps(annotations, indent=4))
    (data / "relation.json").write_text(json.dumps(AMBER_RELATION, indent=4))
    (data / "safe_words.txt").write_text("\n".join(AMBER_SAFE_WORDS))
    generative = [{"id": e["id"], "image": f"AMBER_{e['id']}.jpg", "query": "Describe this image."}
                  for e in AMBER_GENERATIVE]
    discriminative = [{"id": i, "image": image, "query": query} for i, image, query, _, _ in AMBER_DISCRIMINATIVE]
    for name, queries in (("query_all", generative + discriminative), ("query_generative", generative),
                          ("query_discriminative", discriminative)):
        (data / "query" / f"{name}.json").write_text(json.dumps(queries, indent=4))
    for seed, size in enumerate([(44, 32), (32, 40)], start=1):
        write_image(root / "image" / f"AMBER_{seed}.jpg", size, seed + 10)
    return {"data": data, "images": root / "image"}
