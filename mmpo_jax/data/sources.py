"""Prepared datasets as random-access sources: `load_split(name, split, ...)`.

`load_split` builds the dataset on first use (`download_and_prepare` with the user's `manual_dir`;
nothing is ever downloaded) and returns a `DatasetSource`: `len()`, `source[i]`,
`source.__getitems__(indices)` — the random-access protocol grain's `MapDataset.source` and
`DataLoader` take. Items are dicts of `str` and `np.uint8 [H, W, 3]` RGB images with exactly the
fields of the split (see `mmpo_jax.data.builders`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mmpo_jax.data.builders import BUILDERS

FILE_FORMAT = "array_record"


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """One prepared split, read record by record.

    Attributes:
      records: the TFDS ArrayRecord data source of the split.
      fields: the fields each item has.
      text_fields: those stored as text (decoded from UTF-8 here).
      data_dir: the prepared dataset's directory (`<data_dir>/<name>/<config>/<version>`).
      metadata: the dataset metadata (e.g. "bad_records" counts of each split, "manual_dir",
        shapes world's "world" spec and "tokenizer" folder).
    """

    records: Sequence[Any]
    fields: tuple[str, ...]
    text_fields: frozenset[str]
    data_dir: str
    metadata: dict[str, Any]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, str | np.ndarray]:
        return self._decode(self.records[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, str | np.ndarray]]:
        return [self._decode(record) for record in self.records.__getitems__(list(indices))]

    def _decode(self, record: dict[str, Any]) -> dict[str, str | np.ndarray]:
        return {name: record[name].decode("utf-8") if name in self.text_fields else record[name]
                for name in self.fields}

    @property
    def bad_records(self) -> dict[str, Any]:
        """{split: {"kept", "skipped": {reason: n}, "converted": {reason: n}, "skipped_examples"}}."""
        return self.metadata.get("bad_records", {})

    @property
    def tokenizer_path(self) -> str | None:
        """Folder of the tokenizer saved with the data (shapes world), or None."""
        folder = self.metadata.get("tokenizer")
        return os.path.join(self.data_dir, folder) if folder else None


def get_builder(name: str, *, data_dir: str | os.PathLike[str], **builder_config: Any
                ) -> tfds.core.DatasetBuilder:
    """The builder `name` with the config for `builder_config` options, rooted at `data_dir`.

    Raises:
      ValueError: unknown dataset name or option.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; valid: {sorted(BUILDERS)}")
    builder_class = BUILDERS[name]
    config = builder_class.config_from_options(**builder_config)
    return builder_class(config=config, data_dir=os.fspath(data_dir), file_format=FILE_FORMAT)


def load_split(name: str, split: str, *, data_dir: str | os.PathLike[str],
               manual_dir: str | os.PathLike[str] | None = None, **builder_config: Any) -> DatasetSource:
    """Random access to `split` of dataset `name`, preparing it first if needed.

    Args:
      name: a registered builder (`mmpo_jax.data.builders.BUILDERS`).
      split: a split name, optionally TFDS-sliced ("train[:90%]", "train[90%:]").
      data_dir: root folder of prepared datasets.
      manual_dir: folder holding the published files of a real dataset; needed to prepare it.
        Preparing a dataset already prepared from another `manual_dir` raises (builders with a
        `prepared_data_dir(data_dir, manual_dir)` classmethod choose a folder per source instead).
      **builder_config: the builder's options (e.g. `strict=True`, shapes world's `p=0.5`).

    Returns:
      A `DatasetSource` whose items hold the split's fields.
    """
    keyed = getattr(BUILDERS.get(name), "prepared_data_dir", None)
    if keyed is not None and manual_dir is not None:  # e.g. one prepared copy per generation
        data_dir = keyed(data_dir, manual_dir)
    builder = get_builder(name, data_dir=data_dir, **builder_config)
    if builder.is_prepared():
        _check_same_manual_dir(builder, manual_dir)
        builder.check_prepared()
    elif manual_dir is None and builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        raise ValueError(f"{name} is not prepared under {builder.data_dir}; pass manual_dir= the folder "
                         f"holding its published files ({builder.MANUAL_DOWNLOAD_INSTRUCTIONS})")
    else:
        download_config = tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(manual_dir))
        builder.download_and_prepare(download_config=download_config, file_format=FILE_FORMAT)
    split_names = set(re.findall(r"[A-Za-z_]\w*", split))
    unknown = split_names - set(builder.info.splits)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)} of {name}; valid: {sorted(builder.info.splits)}")
    per_split = getattr(builder, "SPLIT_FIELDS", None)
    all_fields = tuple(builder.info.features)
    fields = all_fields if per_split is None else tuple(
        f for f in all_fields if any(f in per_split[s] for s in split_names))
    text_fields = frozenset(f for f in fields if isinstance(builder.info.features[f], tfds.features.Text))
    return DatasetSource(records=builder.as_data_source(split=split), fields=fields, text_fields=text_fields,
                         data_dir=os.fspath(builder.data_dir), metadata=dict(builder.info.metadata or {}))


def _check_same_manual_dir(builder: tfds.core.DatasetBuilder, manual_dir) -> None:
    prepared_from = (builder.info.metadata or {}).get("manual_dir")
    if manual_dir is None or prepared_from is None:
        return
    if os.path.abspath(os.fspath(manual_dir)) != prepared_from:
        raise ValueError(
            f"{builder.name} at {builder.data_dir} was prepared from manual_dir={prepared_from!r}, "
            f"not {os.fspath(manual_dir)!r}; use another data_dir for other source files, or pass "
            "manual_dir=None to read the prepared data")
