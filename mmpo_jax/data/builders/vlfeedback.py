"""VLFeedback pairs as used by mDPO (fwnlp/mDPO-preference-data), from a JSON list.

Layout of `manual_dir`: one `*.json` file (or `source_file=`) holding a list of
`{"img_path", "prompt", "chosen", "rejected"}` objects, and the images, with `img_path` relative
to `manual_dir/image_dir` (`image_dir` defaults to `manual_dir` itself). Other keys of an entry
go to the metadata. Record id: the entry's position, "vlfeedback-<n>" (the format has no id).
"""

from __future__ import annotations

import json
import os
from typing import Any

from mmpo_jax.data.builders.base import PreferenceBuilder
from mmpo_jax.data.builders.records import RawPreference, SkipRecord, as_text, read_file_bytes

_FIELDS = ("img_path", "prompt", "chosen", "rejected")
_TEXT_FIELDS = _FIELDS[1:]  # stored as record fields; anything else (img_path too) goes to metadata


class Vlfeedback(PreferenceBuilder):
    """VLFeedback preference pairs in mDPO's JSON format (read from manual_dir)."""

    name = "vlfeedback"
    SOURCE_PATTERN = "*.json"
    HOMEPAGE = "https://huggingface.co/datasets/fwnlp/mDPO-preference-data"

    def _rows(self, manual_dir: str):
        path = self.single_source_file(manual_dir)
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
        if not isinstance(entries, list):
            raise ValueError(f"{path} holds a JSON {type(entries).__name__}; expected a list of "
                             f"objects with keys {_FIELDS}")
        for number, entry in enumerate(entries):
            yield f"{os.path.basename(path)}:{number}", (number, entry)

    def _parse(self, row: tuple[int, Any], manual_dir: str) -> RawPreference:
        number, entry = row
        if not isinstance(entry, dict):
            raise SkipRecord("malformed_entry", f"a JSON {type(entry).__name__}, expected an object")
        image_path = os.path.join(manual_dir, self.builder_config.image_dir, as_text(entry.get("img_path"), "img_path"))
        return RawPreference(
            id=f"vlfeedback-{number}", image=read_file_bytes(image_path),
            prompt=entry.get("prompt"), chosen=entry.get("chosen"), rejected=entry.get("rejected"),
            metadata={"source": self.name, **{k: v for k, v in entry.items() if k not in _TEXT_FIELDS}})
