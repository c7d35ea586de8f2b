"""COCO ground truth for CHAIR, from the published annotation files, and the caption records
CHAIR is computed on.

Files (COCO 2014/2017 `annotations/`, read as published):

- `instances_{split}.json`: {"images": [{"id", "file_name", ...}], "annotations": [{"image_id",
  "category_id", ...}], "categories": [{"id", "name", "supercategory"}]};
- `captions_{split}.json` (optional): {"images": [...], "annotations": [{"image_id", "caption", ...}]}.

An image's ground-truth objects are the categories of its instance annotations and, when a
captions file is given, the COCO objects its reference captions mention (`chair.coco_mentions`),
as the CHAIR reference (Rohrbach et al., 2018, `chair.py`) unites segmentation and caption objects.
Category names must be the 80 of `coco_synonyms.COCO_SYNONYMS` (COCO's own names).

Caption records (`chair.caption_chair_counts` reads them through `runner.caption_metrics` with task
"coco"): {"id", "image": uint8 [H, W, 3], "prompt", "objects": JSON list of category names}, from

- a caption set: COCO images with one caption prompt (`coco_caption_records`), all images of the
  annotation file or a seeded sample of them, as CHAIR evaluations sample 500 val2014 images;
- a held-out split of a preference set (`heldout_caption_records`): each record's image is found
  in the annotations by the file name its metadata keeps (RLHF-V's "image_path"); records whose
  image is not a COCO image of the file are left out and counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmpo_jax.evaluation.chair import coco_mentions
from mmpo_jax.evaluation.coco_synonyms import COCO_SYNONYMS
from mmpo_jax.evaluation.records import ImageRecords, require_dir

DEFAULT_CAPTION_PROMPT = "Please describe this image in detail."
"""The caption request of LLaVA-1.5's CHAIR evaluations (OPERA, VCD and the seeds' papers)."""
_TRAILING_NUMBER = re.compile(r"(\d+)\.[A-Za-z]+$")


@dataclasses.dataclass(frozen=True)
class CocoObjects:
    """Ground-truth COCO objects per image of one annotation file.

    Attributes:
      objects: image id -> the COCO category names it holds (possibly empty).
      file_names: image id -> its file name ("COCO_val2014_000000000042.jpg").
    """

    objects: Mapping[int, frozenset[str]]
    file_names: Mapping[int, str]
    _ids_by_name: Mapping[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids_by_name", {name: image for image, name in self.file_names.items()})

    def image_id(self, name: str | None) -> int | None:
        """The id of the image a file name or path names, or None: matched by base name, else by
        the number before its extension (2017 names are the zero-padded id; a 2014 train image
        named in a 2017 layout keeps its id)."""
        if not name:
            return None
        base = os.path.basename(str(name))
        by_name = self._ids_by_name.get(base)
        if by_name is not None:
            return by_name
        number = _TRAILING_NUMBER.search(base)
        return int(number.group(1)) if number and int(number.group(1)) in self.objects else None


def _read_json(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        content = json.load(file)
    if not isinstance(content, dict):
        raise ValueError(f"{os.fspath(path)}: a JSON {type(content).__name__}, expected the COCO {what} object")
    return content


def _field(item: Any, key: str, path: str | os.PathLike[str], where: str) -> Any:
    if not isinstance(item, dict) or key not in item:
        raise ValueError(f"{os.fspath(path)}: {where} lacks {key!r}; expected the published COCO format")
    return item[key]


def read_coco_objects(instances: str | os.PathLike[str],
                      captions: str | os.PathLike[str] | None = None) -> CocoObjects:
    """Reads `instances_*.json` (and `captions_*.json`) into the objects of every image.

    Raises:
      ValueError: a file not in the published format (the message names the file and field), a
        category that is not one of the 80 COCO names, or annotations of unknown images.
    """
    content = _read_json(instances, "instances")
    categories = {}
    for category in _field(content, "categories", instances, "the file"):
        name = _field(category, "name", instances, "a category")
        if name not in COCO_SYNONYMS:
            raise ValueError(f"{os.fspath(instances)}: category {name!r} is not a COCO category; "
                             f"valid: {sorted(COCO_SYNONYMS)}")
        categories[_field(category, "id", instances, "a category")] = name
    file_names = {int(_field(image, "id", instances, "an image")):
                  str(_field(image, "file_name", instances, "an image"))
                  for image in _field(content, "images", instances, "the file")}
    objects: dict[int, set[str]] = {image: set() for image in file_names}
    for annotation in _field(content, "annotations", instances, "the file"):
        image = int(_field(annotation, "image_id", instances, "an annotation"))
        category = _field(annotation, "category_id", instances, "an annotation")
        if image not in objects or category not in categories:
            raise ValueError(f"{os.fspath(instances)}: annotation {annotation.get('id')!r} names image {image} / "
                             f"category {category}, which the file does not list")
        objects[image].add(categories[category])
    if captions is not None:
        for annotation in _field(_read_json(captions, "captions"), "annotations", captions, "the file"):
            image = int(_field(annotation, "image_id", captions, "an annotation"))
            if image in objects:  # the CHAIR reference also ignores captions of other images
                objects[image].update(coco_mentions(str(_field(annotation, "caption", captions, "an annotation"))))
    return CocoObjects({image: frozenset(names) for image, names in objects.items()}, file_names)


def _record_fields(image_id: Any, prompt: str, objects: frozenset[str]) -> dict[str, str]:
    return {"id": str(image_id), "prompt": prompt, "objects": json.dumps(sorted(objects))}


def coco_caption_records(coco: CocoObjects, image_dir: str | os.PathLike[str], *,
                         prompt: str = DEFAULT_CAPTION_PROMPT, num_images: int | None = None,
                         seed: int = 0) -> ImageRecords:
    """Caption records of the annotation file's images (in id order) with `prompt`.

    Args:
      coco: the ground truth (`read_coco_objects`).
      image_dir: the folder holding the images under their file names (e.g. `val2014/`).
      prompt: the caption request.
      num_images: evaluate a sample of this many images, drawn without replacement with `seed`
        (then kept in id order); None takes them all.
    """
    directory = require_dir(image_dir, "COCO image folder")
    ids = sorted(coco.objects)
    if num_images is not None:
        if not 1 <= num_images <= len(ids):
            raise ValueError(f"num_images={num_images}; the annotation file has {len(ids)} images")
        ids = sorted(np.random.default_rng(seed).choice(ids, size=num_images, replace=False).tolist())
    return ImageRecords(tuple(_record_fields(i, prompt, coco.objects[i]) for i in ids),
                        tuple(os.path.join(directory, coco.file_names[i]) for i in ids))


@dataclasses.dataclass(frozen=True)
class HeldoutRecords(Sequence):
    """Records of a preference split whose images are COCO images, as caption records.

    Attributes:
      source: the split's records ("image", "prompt", "metadata" JSON).
      indices: the records kept.
      fields: per kept record, its "id", "prompt" and "objects".
      unmatched: records left out because their image is not in the annotation file.
    """

    source: Sequence[Mapping[str, Any]]
    indices: tuple[int, ...]
    fields: tuple[Mapping[str, str], ...]
    unmatched: int

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.fields[index], "image": self.source[self.indices[index]]["image"]}

    def head(self, count: int | None) -> HeldoutRecords:
        """The first `count` kept records (all when None)."""
        if count is None:
            return self
        return HeldoutRecords(self.source, self.indices[:count], self.fields[:count], self.unmatched)


def heldout_caption_records(source: Sequence[Mapping[str, Any]], coco: CocoObjects, *,
                            prompt: str | None = DEFAULT_CAPTION_PROMPT,
                            image_key: str = "image_path") -> HeldoutRecords:
    """Caption records of a preference split (`data.sources.load_split`, e.g. "train[95%:]").

    Args:
      source: the split; each record's "metadata" (JSON) names its image file under `image_key`.
      coco: the ground truth of the annotation file the images come from.
      prompt: the caption request, or None to ask each record's own prompt.
      image_key: the metadata field holding the image's file name or path.

    Raises:
      ValueError: no record of the split names an image of the annotation file.
    """
    indices, fields, names = [], [], []
    for index in range(len(source)):
        record = source[index]
        name = json.loads(record.get("metadata") or "{}").get(image_key)
        image_id = coco.image_id(name)
        if image_id is None:
            names.append(name)
            continue
        indices.append(index)
        fields.append(_record_fields(record.get("id", image_id), record["prompt"] if prompt is None else prompt,
                                     coco.objects[image_id]))
    if not indices:
        raise ValueError(f"none of the {len(source)} records names a COCO image of the annotation file in its "
                         f"metadata[{image_key!r}] (e.g. {names[:3]}); give the instances file of the split "
                         "the images come from")
    return HeldoutRecords(source, tuple(indices), tuple(fields), len(source) - len(indices))
