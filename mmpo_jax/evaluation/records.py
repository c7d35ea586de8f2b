"""Evaluation records read lazily from published files: images are decoded on access, so a
benchmark of thousands of questions never holds more than a batch of images in memory."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """The image file at `path` as uint8 `[H, W, 3]` RGB (other modes converted, as LLaVA's loader
    does with `convert("RGB")`).

    Raises:
      FileNotFoundError: naming the missing file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {os.fspath(path)!r} does not exist")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@dataclasses.dataclass(frozen=True)
class ImageRecords(Sequence):
    """Records whose "image" is read from a file on access.

    Attributes:
      fields: per record, every field but the image (e.g. "id", "prompt", "objects").
      image_paths: per record, its image file.
    """

    fields: tuple[Mapping[str, Any], ...]
    image_paths: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.fields) != len(self.image_paths):
            raise ValueError(f"{len(self.fields)} records but {len(self.image_paths)} image paths")

    def __len__(self) -> int:
        return len(self.fields)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.fields[index], "image": load_rgb(self.image_paths[index])}

    @classmethod
    def concatenate(cls, parts: Sequence[ImageRecords]) -> ImageRecords:
        """The records of `parts`, in order, as one."""
        return cls(tuple(f for part in parts for f in part.fields),
                   tuple(p for part in parts for p in part.image_paths))

    def head(self, count: int | None) -> ImageRecords:
        """The first `count` records (all when None)."""
        return self if count is None else ImageRecords(self.fields[:count], self.image_paths[:count])


@dataclasses.dataclass(frozen=True)
class Column(Sequence):
    """One field of every record, read on access: `Column(records, "image")[i] == records[i]["image"]`."""

    records: Sequence[Mapping[str, Any]]
    name: str

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        return self.records[index][self.name]


@dataclasses.dataclass(frozen=True)
class Head(Sequence):
    """The first `count` records of a sequence (all when `count` is None)."""

    records: Sequence[Any]
    count: int | None = None

    def __len__(self) -> int:
        return len(self.records) if self.count is None else min(self.count, len(self.records))

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.records[index]


def require_dir(path: str | os.PathLike[str], what: str) -> str:
    """`path` as a string, checked to be a directory; FileNotFoundError naming `what` otherwise."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {os.fspath(path)!r} is not a directory")
    return os.fspath(path)
