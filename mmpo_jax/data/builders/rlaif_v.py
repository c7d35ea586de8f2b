"""RLAIF-V (openbmb/RLAIF-V-Dataset) from its published parquet files.

Layout of `manual_dir`: the dataset's `*.parquet` files (read sorted) with the columns `ds_name`,
`image` ({"bytes", "path"} as Hugging Face `datasets` writes images), `question`, `chosen`,
`rejected`, `origin_dataset`, `origin_split`, `idx`, `image_path`. `image`, `question`, `chosen`,
`rejected` and `idx` are required; the others go to the metadata. Record id: `idx`.
"""

from __future__ import annotations

from typing import Any

from mmpo_jax.data.builders.base import ParquetPreferenceBuilder


class RlaifV(ParquetPreferenceBuilder):
    """RLAIF-V AI-feedback preference pairs (parquet, read from manual_dir)."""

    name = "rlaif_v"
    HOMEPAGE = "https://huggingface.co/datasets/openbmb/RLAIF-V-Dataset"
    TEXT_COLUMNS = ("question", "chosen", "rejected")

    def _texts(self, row: dict[str, Any]) -> tuple[Any, Any, Any]:
        return row["question"], row["chosen"], row["rejected"]
