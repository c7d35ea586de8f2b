"""The shapes-world TFDS builder: generated data, no download, the word tokenizer saved alongside.

Splits and fields (see `mmpo_jax.data.shapes_world` for what they contain):
- `sft`: id, image, prompt, response, objects, metadata;
- `preference`: id, image, prompt, chosen, rejected, metadata;
- `test_caption`: id, image, prompt, objects, metadata;
- `test_pope`: id, image, question, answer, object, category, metadata.
TFDS keeps one feature set per dataset, so every split stores the union with empty strings in
fields it does not use; `SPLIT_FIELDS` says which are real and `load_split` returns only those.

Options (keyword arguments of `load_split`) are the fields of `WorldSpec`; non-default options get
their own config directory. The dataset metadata holds the spec (`"world"`) and the tokenizer's
folder relative to the prepared dataset (`"tokenizer"`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from mmpo_jax.data import shapes_world
from mmpo_jax.data.builders.base import DEFAULT_CONFIG_NAME, Builder, own_options
from mmpo_jax.data.builders.records import PREFERENCE_FIELDS, encode_png
from mmpo_jax.data.tokenizer import build_word_tokenizer

TOKENIZER_SUBDIR = "tokenizer"
TOKENIZER_MAX_LENGTH = 512
SPLIT_FIELDS = {
    "sft": ("id", "image", "prompt", "response", "objects", "metadata"),
    "preference": PREFERENCE_FIELDS,
    "test_caption": ("id", "image", "prompt", "objects", "metadata"),
    "test_pope": ("id", "image", "question", "answer", "object", "category", "metadata"),
}
_TEXT_FIELDS = tuple(dict.fromkeys(f for fields in SPLIT_FIELDS.values() for f in fields if f != "image"))


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """A shapes-world config: the full `WorldSpec` of the generated data."""

    world: shapes_world.WorldSpec = dataclasses.field(default_factory=shapes_world.WorldSpec)



class ShapesWorld(Builder):
    """Procedural shapes-world benchmark: SFT captions with co-occurrence bias, preference pairs,
    caption and POPE test sets."""

    name = "shapes_world"
    SPLIT_FIELDS = SPLIT_FIELDS
    SHIPS_TOKENIZER = True
    BUILDER_CONFIGS = [ShapesWorldConfig(name=DEFAULT_CONFIG_NAME)]

    OPTIONS = own_options(shapes_world.WorldSpec)

    @classmethod
    def _config(cls, name: str, options: dict[str, Any]) -> ShapesWorldConfig:
        return ShapesWorldConfig(name=name, world=shapes_world.WorldSpec(**options))

    def _features(self) -> tfds.features.FeaturesDict:
        features = {name: tfds.features.Text() for name in _TEXT_FIELDS}
        features["image"] = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
        return tfds.features.FeaturesDict(features)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        world = self.builder_config.world
        self.info.metadata.update(world=dataclasses.asdict(world), tokenizer=TOKENIZER_SUBDIR)
        tokenizer = build_word_tokenizer(shapes_world.vocabulary(), model_max_length=TOKENIZER_MAX_LENGTH)
        tokenizer.save_pretrained(str(self.data_path / TOKENIZER_SUBDIR))
        return {split: self._generate_examples(world, split) for split in shapes_world.SPLITS}

    def _generate_examples(self, world: shapes_world.WorldSpec, split: str
                           ) -> Iterator[tuple[int, dict[str, Any]]]:
        for key, record in enumerate(shapes_world.generate_split(world, split)):
            stored = {name: record.get(name, "") for name in _TEXT_FIELDS}
            stored["image"] = encode_png(record["image"])
            yield key, stored
