"""RLHF-V (openbmb/RLHF-V-Dataset) from its published parquet file.

Layout of `manual_dir`: `RLHF-V-Dataset.parquet` (any `*.parquet` files are read, sorted) with the
columns `ds_name`, `image` ({"bytes", "path"} as Hugging Face `datasets` writes images), `text`
(a JSON string with "question", "chosen", "rejected"), `origin_dataset`, `origin_split`, `idx`,
`image_path`. Only `idx`, `image` and `text` are required; the others go to the metadata.
Record id: `idx`.
"""

from __future__ import annotations

import json
from typing import Any

from mmpo_jax.data.builders.base import ParquetPreferenceBuilder
from mmpo_jax.data.builders.records import SkipRecord, as_text


class RlhfV(ParquetPreferenceBuilder):
    """RLHF-V human-corrected preference pairs (parquet, read from manual_dir)."""

    name = "rlhf_v"
    HOMEPAGE = "https://huggingface.co/datasets/openbmb/RLHF-V-Dataset"
    TEXT_COLUMNS = ("text",)

    def _texts(self, row: dict[str, Any]) -> tuple[Any, Any, Any]:
        try:
            text = json.loads(as_text(row["text"], "text"))
        except json.JSONDecodeError as error:
            raise SkipRecord("malformed_json", f"text: {error}") from None
        if not isinstance(text, dict):
            raise SkipRecord("malformed_json", f"text is a JSON {type(text).__name__}, expected an object")
        return text.get("question"), text.get("chosen"), text.get("rejected")
