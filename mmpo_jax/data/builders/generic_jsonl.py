"""Preference pairs from a generic JSON-lines file.

Layout of `manual_dir`: one `*.jsonl` file (or `source_file=`); each line an object with `image`
(a path relative to the jsonl file's folder, or base64 content with or without a
`data:<mime>;base64,` prefix), `prompt`, `chosen`, `rejected`, and optionally `id` (default: the
line's name "<file>:<line>"). Other keys go to the metadata. Blank lines are ignored; a line that
is not UTF-8 or not a JSON object is a counted skip.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mmpo_jax.data.builders.base import PreferenceBuilder
from mmpo_jax.data.builders.records import RawPreference, SkipRecord, as_text, decode_base64, read_file_bytes

_FIELDS = ("id", "image", "prompt", "chosen", "rejected")


class GenericJsonl(PreferenceBuilder):
    """Preference pairs from a user's JSON-lines file (read from manual_dir)."""

    name = "generic_jsonl"
    SOURCE_PATTERN = "*.jsonl"

    def _rows(self, manual_dir: str):
        path = self.single_source_file(manual_dir)
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"{os.path.basename(path)}:{number}", (os.path.dirname(path), line)

    def _parse(self, row: tuple[str, bytes], manual_dir: str) -> RawPreference:
        folder, line = row
        try:
            entry = json.loads(as_text(line, "line"))
        except json.JSONDecodeError as error:
            raise SkipRecord("malformed_json", str(error)) from None
        if not isinstance(entry, dict):
            raise SkipRecord("malformed_entry", f"a JSON {type(entry).__name__}, expected an object")
        return RawPreference(
            id=None if entry.get("id") is None else str(entry["id"]), image=_image_bytes(entry.get("image"), folder),
            prompt=entry.get("prompt"), chosen=entry.get("chosen"), rejected=entry.get("rejected"),
            metadata={"source": self.name, **{k: v for k, v in entry.items() if k not in _FIELDS}})


def _image_bytes(value: Any, folder: str) -> bytes:
    """A value naming an existing file (relative to `folder`) is a path; a `data:` URL or a string
    of 64+ characters is base64 content; anything else is a missing file."""
    text = as_text(value, "image")
    path = os.path.join(folder, text)
    if not text.startswith("data:") and len(text) < 4096 and os.path.isfile(path):
        return read_file_bytes(path)
    if text.startswith("data:") or len(text) >= 64:
        return decode_base64(text)
    raise SkipRecord("missing_image_file", path)
