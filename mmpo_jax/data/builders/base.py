"""TFDS plumbing shared by the builders: configs from keyword options, and the preference base class.

TFDS without TensorFlow: builders are `GeneratorBasedBuilder`s written as ArrayRecord and read with
`as_data_source`. `tfds.features.Image` is given encoded bytes (encoding it from arrays would need
TF) and decodes with PIL; `Text` comes back as UTF-8 bytes (`mmpo_jax.data.sources` decodes it).
`disable_shuffling=True` keeps records in source order (record i is the i-th kept row), with
integer keys.
"""

from __future__ import annotations

import abc
import dataclasses
import glob
import inspect
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import py_utils

from mmpo_jax.data.builders.records import (DEFAULT_MAX_PIXELS, RawPreference, RecordLog, SkipRecord,
                                            make_preference_record, read_file_bytes)

VERSION = tfds.core.Version("1.0.0")
DEFAULT_CONFIG_NAME = "default"


def config_name(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    """Directory-safe config name: "default", or the non-default options as "key=value" joined by
    "-" (so different options never share a prepared dataset)."""
    changed = [f"{key}={options[key]}" for key in sorted(options) if options[key] != defaults[key]]
    return re.sub(r"[^\w.=\-]", "_", "-".join(changed)) if changed else DEFAULT_CONFIG_NAME


def check_options(builder: str, options: Mapping[str, Any], valid: Mapping[str, Any]) -> None:
    """Raises ValueError naming the unknown options and the valid ones."""
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for builder {builder!r}; valid: {sorted(valid)}")


@dataclasses.dataclass(eq=False)
class PreferenceConfig(tfds.core.BuilderConfig):
    """Options of the real-data preference builders.

    Attributes:
      strict: raise `BadRecordError` naming the first bad record instead of skipping it.
      max_pixels: images with more pixels are skipped ("image_too_large").
      source_file: the annotation file inside `manual_dir`; None = every file matching the
        builder's pattern (parquet builders) or the only one (json/jsonl builders).
      image_dir: folder inside `manual_dir` that image paths are relative to (VLFeedback).
    """

    strict: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    source_file: str | None = None
    image_dir: str = ""


def own_options(config_class: type[tfds.core.BuilderConfig]) -> dict[str, Any]:
    """{option: default} of the fields a config class adds to `tfds.core.BuilderConfig`."""
    inherited = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: f.default for f in dataclasses.fields(config_class) if f.name not in inherited}



def preference_features() -> tfds.features.FeaturesDict:
    """The record of every preference split: id, image uint8 [H, W, 3], prompt, chosen, rejected,
    metadata (JSON text)."""
    text = tfds.features.Text
    return tfds.features.FeaturesDict({
        "id": text(), "image": tfds.features.Image(shape=(None, None, 3)), "prompt": text(),
        "chosen": text(), "rejected": text(), "metadata": text()})


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of every builder here: TF-free dataset info, records kept in generation order."""

    VERSION = VERSION
    OPTIONS: ClassVar[dict[str, Any]]  # {keyword option of load_split: default}
    SHIPS_TOKENIZER: ClassVar[bool] = False  # saves a tokenizer with the data (`tokenizer_path`)

    @classmethod
    def config_from_options(cls, **options: Any) -> tfds.core.BuilderConfig:
        """The config for keyword options: the default config object when every option has its
        default, else a new config named after the changed options. Unknown keys raise."""
        check_options(cls.name, options, cls.OPTIONS)
        full = {**cls.OPTIONS, **options}
        name = config_name(full, cls.OPTIONS)
        return cls.BUILDER_CONFIGS[0] if name == DEFAULT_CONFIG_NAME else cls._config(name, full)

    @classmethod
    @abc.abstractmethod
    def _config(cls, name: str, options: dict[str, Any]) -> tfds.core.BuilderConfig:
        """A config called `name` for the full set of `options` (invalid values raise)."""

    @py_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 resolves a package module's path through the `importlib_resources` backport,
        # which Python >= 3.9 installs do not have; the source file is what it looks for.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=(self.__doc__ or "").strip().splitlines()[0],
            features=self._features(), homepage=getattr(self, "HOMEPAGE", None) or None,
            metadata=tfds.core.MetadataDict(), disable_shuffling=True)

    @abc.abstractmethod
    def _features(self) -> tfds.features.FeaturesDict:
        """The features of every split."""

    def check_prepared(self) -> None:
        """Raise when the prepared data cannot be what this config asks for (read before use)."""


class PreferenceBuilder(Builder, skip_registration=True):
    """Base of the builders that read a user's `manual_dir` into one "train" split of preference
    records. Subclasses name the source files and parse one row."""

    BUILDER_CONFIGS = [PreferenceConfig(name=DEFAULT_CONFIG_NAME)]
    SOURCE_PATTERN: ClassVar[str]  # glob of source files inside manual_dir
    HOMEPAGE: ClassVar[str] = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place the published files in manual_dir as the builder's docstring "
                                    "describes; nothing is downloaded.")

    OPTIONS = own_options(PreferenceConfig)

    @classmethod
    def _config(cls, name: str, options: dict[str, Any]) -> PreferenceConfig:
        return PreferenceConfig(name=name, **options)

    def _features(self) -> tfds.features.FeaturesDict:
        return preference_features()

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.path.abspath(os.fspath(dl_manager.manual_dir))
        self.info.metadata["manual_dir"] = manual_dir
        return {"train": self._generate_examples(manual_dir)}

    def _generate_examples(self, manual_dir: str) -> Iterator[tuple[int, dict[str, Any]]]:
        config: PreferenceConfig = self.builder_config
        log = RecordLog(self.name, "train", strict=config.strict)
        key = 0
        for name, row in self._rows(manual_dir):
            try:
                raw = self._parse(row, manual_dir)
            except SkipRecord as error:
                log.skip(name, error)
                continue
            if raw.id is not None:
                name = f"{name} (id {raw.id!r})"
            try:
                record, conversions = make_preference_record(raw, name=name, max_pixels=config.max_pixels)
            except SkipRecord as error:
                log.skip(name, error)
                continue
            if log.accept(name, record["id"], conversions):
                yield key, record
                key += 1
        log.log()
        if not log.kept:
            raise ValueError(f"{self.name}: no usable record in {manual_dir}; skipped by reason: "
                             f"{dict(log.skipped)}, e.g. {log.summary()['skipped_examples']}")
        self.info.metadata["bad_records"] = {"train": log.summary()}

    def source_files(self, manual_dir: str) -> list[str]:
        """The configured source file, or every file matching `SOURCE_PATTERN`, sorted."""
        config: PreferenceConfig = self.builder_config
        if config.source_file is not None:
            path = os.path.join(manual_dir, config.source_file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"source_file={config.source_file!r} not found in {manual_dir}")
            return [path]
        files = sorted(glob.glob(os.path.join(manual_dir, "**", self.SOURCE_PATTERN), recursive=True))
        if not files:
            raise FileNotFoundError(f"no {self.SOURCE_PATTERN} file in manual_dir={manual_dir} for {self.name}")
        return files

    def single_source_file(self, manual_dir: str) -> str:
        """Like `source_files` but exactly one file must match."""
        files = self.source_files(manual_dir)
        if len(files) != 1:
            raise ValueError(f"{self.name}: several {self.SOURCE_PATTERN} files in {manual_dir}: {files}; "
                             "name one with source_file=...")
        return files[0]

    @abc.abstractmethod
    def _rows(self, manual_dir: str) -> Iterator[tuple[str, Any]]:
        """Yields (record name for messages, e.g. "file.jsonl:12", raw row) in source order."""

    @abc.abstractmethod
    def _parse(self, row: Any, manual_dir: str) -> RawPreference:
        """Reads one raw row; raises `SkipRecord` when the row itself is malformed."""


class ParquetPreferenceBuilder(PreferenceBuilder, skip_registration=True):
    """Base of the builders reading Hugging Face parquet exports: an `image` column of
    {"bytes", "path"}, the record id in `idx`, `METADATA_COLUMNS` kept as metadata when present.
    Subclasses name their text columns and read (prompt, chosen, rejected) from a row."""

    SOURCE_PATTERN = "*.parquet"
    TEXT_COLUMNS: ClassVar[tuple[str, ...]]
    METADATA_COLUMNS = ("ds_name", "origin_dataset", "origin_split", "image_path")

    def _rows(self, manual_dir: str) -> Iterator[tuple[str, dict[str, Any]]]:
        return parquet_rows(self.source_files(manual_dir), ("idx", "image", *self.TEXT_COLUMNS))

    def _parse(self, row: dict[str, Any], manual_dir: str) -> RawPreference:
        prompt, chosen, rejected = self._texts(row)
        return RawPreference(
            id=None if row["idx"] is None else str(row["idx"]), image=hf_image_bytes(row["image"], manual_dir),
            prompt=prompt, chosen=chosen, rejected=rejected,
            metadata={"source": self.name, **{c: row[c] for c in self.METADATA_COLUMNS if c in row}})

    @abc.abstractmethod
    def _texts(self, row: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(prompt, chosen, rejected) of a row, unchecked; `SkipRecord` if the row is malformed."""


def parquet_rows(files: list[str], columns: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ("file.parquet:row", {column: value}) for every row of the parquet files, reading in
    batches. Missing required columns raise ValueError naming the file and the columns it has."""
    for path in files:
        parquet = pq.ParquetFile(path)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"{path} lacks column(s) {missing}; it has {parquet.schema_arrow.names}")
        row_number = 0
        for batch in parquet.iter_batches(batch_size=64):
            for row in batch.to_pylist():
                yield f"{os.path.basename(path)}:{row_number}", row
                row_number += 1


def hf_image_bytes(value: Any, base_dir: str) -> bytes:
    """Encoded bytes of an image cell as Hugging Face `datasets` writes it ({"bytes", "path"}):
    the embedded bytes, else the file at `path` (relative to `base_dir`)."""
    if not isinstance(value, dict):
        raise SkipRecord("missing_image", f"image cell is {type(value).__name__}, expected {{bytes, path}}")
    if value.get("bytes"):
        return value["bytes"]
    if value.get("path"):
        return read_file_bytes(os.path.join(base_dir, value["path"]))
    raise SkipRecord("missing_image", "image cell has neither bytes nor path")
