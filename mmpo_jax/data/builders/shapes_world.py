"""The shapes-world TFDS builder: generated data, no download, the word tokenizer saved alongside.

Two worlds, chosen by the option `world`: "v1" (the default, `mmpo_jax.data.shapes_world`) and
"v2" (`mmpo_jax.data.shapes_world_v2`, records by `shapes_world_v2_splits`). Splits and fields:
- `sft`: id, image, prompt, response, objects, metadata;
- `preference`: id, image, prompt, chosen, rejected, metadata;
- `test_caption` (v2 also `validation_caption`): id, image, prompt, objects, metadata;
- `test_pope` (v2 also `validation_pope`): id, image, question, answer, object, category, metadata;
- v2's `sft_focus`: id, image, focus_image (the crop of a two-image prompt), prompt, response,
  objects, metadata.
TFDS keeps one feature set per dataset, so every split stores the union with empty strings in
text fields it does not use (and, on v2, a 1x1 black `focus_image`); `SPLIT_FIELDS` says which are
real and `load_split` returns only those.

Options (keyword arguments of `load_split`): `world` plus the fields of that world's spec
(`WorldSpec`, `WorldSpecV2`); unknown ones raise, naming the valid ones. Non-default options get
their own config directory: v1 keeps its names ("default", "p=0.5"), v2's are "v2" and
"v2-<changed options>" (a digest of them when that would be long). The dataset metadata holds
the full spec (`"world"`; v2's with `"world": "v2"`, sequences as lists) and the tokenizer's folder
relative to the prepared dataset (`"tokenizer"`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mmpo_jax.data import shapes_world, shapes_world_v2, shapes_world_v2_splits
from mmpo_jax.data.builders.base import DEFAULT_CONFIG_NAME, Builder, check_options, config_name
from mmpo_jax.data.builders.records import PREFERENCE_FIELDS, encode_png
from mmpo_jax.data.tokenizer import build_word_tokenizer

TOKENIZER_SUBDIR = "tokenizer"
TOKENIZER_MAX_LENGTH = 512
_CAPTION_FIELDS = ("id", "image", "prompt", "objects", "metadata")
_POPE_FIELDS = ("id", "image", "question", "answer", "object", "category", "metadata")
SPLIT_FIELDS = {
    "sft": ("id", "image", "prompt", "response", "objects", "metadata"),
    "preference": PREFERENCE_FIELDS,
    "validation_caption": _CAPTION_FIELDS,
    "validation_pope": _POPE_FIELDS,
    "test_caption": _CAPTION_FIELDS,
    "test_pope": _POPE_FIELDS,
    "sft_focus": ("id", "image", "focus_image", "prompt", "response", "objects", "metadata"),
}
_IMAGE_FIELDS = ("image", "focus_image")
_TEXT_FIELDS = tuple(dict.fromkeys(f for fields in SPLIT_FIELDS.values() for f in fields
                                   if f not in _IMAGE_FIELDS))
_NO_IMAGE = np.zeros((1, 1, 3), np.uint8)  # an unused image field
WORLDS = {"v1": shapes_world.WorldSpec, "v2": shapes_world_v2.WorldSpecV2}
_MAX_NAME = 160  # longer v2 config names become a digest (a path component holds 255 bytes)

Spec = shapes_world.WorldSpec | shapes_world_v2.WorldSpecV2


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """A shapes-world config: the full spec of the generated data (v1 `WorldSpec` or v2
    `WorldSpecV2`)."""

    world: Spec = dataclasses.field(default_factory=shapes_world.WorldSpec)


def _metadata(world: Spec) -> dict[str, Any]:
    """The spec as the dataset metadata stores it."""
    if isinstance(world, shapes_world_v2.WorldSpecV2):
        return world.metadata()
    return dataclasses.asdict(world)


def _fields(spec_class: type) -> dict[str, Any]:
    return {f.name: getattr(spec_class(), f.name) for f in dataclasses.fields(spec_class)}


class ShapesWorld(Builder):
    """Procedural shapes-world benchmark: SFT captions with hallucination sources, preference
    pairs, caption and POPE evaluation sets."""

    name = "shapes_world"
    SPLIT_FIELDS = SPLIT_FIELDS
    SHIPS_TOKENIZER = True
    BUILDER_CONFIGS = [ShapesWorldConfig(name=DEFAULT_CONFIG_NAME),
                       ShapesWorldConfig(name="v2", world=shapes_world_v2.WorldSpecV2())]

    OPTIONS = {"world": "v1", **_fields(shapes_world.WorldSpec)}  # v2's: `WorldSpecV2`'s fields

    @classmethod
    def config_from_options(cls, **options: Any) -> ShapesWorldConfig:
        """The config of `world` ("v1" default, "v2") with that world's spec options."""
        world = options.pop("world", "v1")
        if world not in WORLDS:
            raise ValueError(f"unknown shapes world {world!r}; valid: {sorted(WORLDS)}")
        spec_class = WORLDS[world]
        defaults = _fields(spec_class)
        check_options(f"{cls.name} (world={world!r})", options, {"world": world, **defaults})
        spec = spec_class(**options)
        # Compare normalised values, so a list option equal to a tuple default is no change.
        name = config_name(dataclasses.asdict(spec), dataclasses.asdict(spec_class()))
        if world == "v1":
            return cls.BUILDER_CONFIGS[0] if name == DEFAULT_CONFIG_NAME else ShapesWorldConfig(name=name, world=spec)
        if name == DEFAULT_CONFIG_NAME:
            return cls.BUILDER_CONFIGS[1]
        if len(name) > _MAX_NAME:
            name = hashlib.sha256(json.dumps(spec.metadata(), sort_keys=True).encode()).hexdigest()[:16]
        return ShapesWorldConfig(name=f"v2-{name}", world=spec)

    @classmethod
    def _config(cls, name: str, options: dict[str, Any]) -> ShapesWorldConfig:
        return cls.config_from_options(**options)

    def _image_fields(self) -> tuple[str, ...]:
        v2 = isinstance(self.builder_config.world, shapes_world_v2.WorldSpecV2)
        return _IMAGE_FIELDS if v2 else ("image",)

    def _features(self) -> tfds.features.FeaturesDict:
        features = {name: tfds.features.Text() for name in _TEXT_FIELDS}
        for name in self._image_fields():
            features[name] = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
        return tfds.features.FeaturesDict(features)

    def check_prepared(self) -> None:
        """A config name stands for the options that differ from the defaults, so data prepared
        before a default changed would be read as today's world: refuse it, naming the fields."""
        stored = json.loads(json.dumps((self.info.metadata or {}).get("world", {})))
        wanted = json.loads(json.dumps(_metadata(self.builder_config.world)))
        differ = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
        if differ:
            raise ValueError(
                f"{self.name} at {self.data_dir} was generated from another world spec (it "
                f"differs in {', '.join(differ)}: a generator default changed since); delete that "
                "folder to generate it again, or use another data_dir")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        world = self.builder_config.world
        if isinstance(world, shapes_world_v2.WorldSpecV2):
            words = shapes_world_v2.vocabulary(world)
            splits, generate = shapes_world_v2_splits.SPLITS, shapes_world_v2_splits.generate_split
        else:
            words = shapes_world.vocabulary()
            splits, generate = shapes_world.SPLITS, shapes_world.generate_split
        self.info.metadata.update(world=_metadata(world), tokenizer=TOKENIZER_SUBDIR)
        tokenizer = build_word_tokenizer(words, model_max_length=TOKENIZER_MAX_LENGTH)
        tokenizer.save_pretrained(str(self.data_path / TOKENIZER_SUBDIR))
        return {split: self._generate_examples(generate(world, split)) for split in splits}

    def _generate_examples(self, records: Iterator[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
        image, png = None, b""
        second, no_image = self._image_fields()[1:], encode_png(_NO_IMAGE)
        for key, record in enumerate(records):
            stored = {name: record.get(name, "") for name in _TEXT_FIELDS}
            if record["image"] is not image:  # a POPE image's questions share one array: encode once
                image, png = record["image"], encode_png(record["image"])
            stored["image"] = png
            stored.update({name: encode_png(record[name]) if name in record else no_image
                           for name in second})
            yield key, stored
