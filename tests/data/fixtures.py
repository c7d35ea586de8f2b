"""Tiny source files in the exact published formats of the real datasets, plus bad-input images.

Every writer takes a list of `Pair`s (what should come out of the builder) and writes them the way
the dataset publishes them; `bad` rows are written raw so that a test controls exactly what is
wrong with them.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@dataclasses.dataclass
class Pair:
    """One preference pair as a source holds it; `image` is encoded file content."""

    id: str
    image: bytes
    prompt: str
    chosen: str
    rejected: str


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (12, 9), fmt: str = "PNG", seed: int = 0) -> bytes:
    """A random image of PIL `mode` ("RGB", "L", "RGBA", "CMYK", "P", "I;16"...) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """What a builder should store for `data`: uint8 [H, W, 3] of PIL's RGB conversion."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def make_pairs(count: int, prefix: str = "q") -> list[Pair]:
    """`count` distinct good pairs with unicode text and RGB images."""
    return [Pair(id=str(i), image=image_bytes(seed=i, size=(10 + i, 8)), prompt=f"{prefix} {i}: what is shown? é",
                 chosen=f"a cat {i} — on a mat", rejected=f"a dog {i} under a mat") for i in range(count)]


def _hf_image(data: bytes | None, path: str | None = None) -> dict[str, Any]:
    return {"bytes": data, "path": path}


_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_rlhf_v(folder: str, rows: list[dict[str, Any]], filename: str = "RLHF-V-Dataset.parquet") -> str:
    """RLHF-V's parquet: ds_name, image {bytes, path}, text (JSON of question/chosen/rejected),
    origin_dataset, origin_split, idx (int64), image_path. `rows` come from `rlhf_v_row`."""
    schema = pa.schema([("ds_name", pa.string()), ("image", _IMAGE_TYPE), ("text", pa.string()),
                        ("origin_dataset", pa.string()), ("origin_split", pa.string()), ("idx", pa.int64()),
                        ("image_path", pa.string())])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def rlhf_v_row(pair: Pair, text: str | None = None) -> dict[str, Any]:
    """One RLHF-V row; `text` overrides the JSON text (for malformed input)."""
    if text is None:
        text = json.dumps({"question": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
    return {"ds_name": "RLHF-V", "image": _hf_image(pair.image, f"{pair.id}.jpg"), "text": text,
            "origin_dataset": "coco", "origin_split": json.dumps({"model": "m", "type": "qa"}),
            "idx": int(pair.id), "image_path": f"coco/{pair.id}.jpg"}


def write_rlaif_v(folder: str, rows: list[dict[str, Any]], filename: str = "RLAIF-V-Dataset_000.parquet") -> str:
    """RLAIF-V's parquet: ds_name, image {bytes, path}, question, chosen, rejected, origin_dataset,
    origin_split, idx (string), image_path."""
    schema = pa.schema([("ds_name", pa.string()), ("image", _IMAGE_TYPE), ("question", pa.string()),
                        ("chosen", pa.string()), ("rejected", pa.string()), ("origin_dataset", pa.string()),
                        ("origin_split", pa.string()), ("idx", pa.string()), ("image_path", pa.string())])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def rlaif_v_row(pair: Pair, **overrides: Any) -> dict[str, Any]:
    row = {"ds_name": "RLAIF-V", "image": _hf_image(pair.image, None), "question": pair.prompt,
           "chosen": pair.chosen, "rejected": pair.rejected, "origin_dataset": "OK-VQA",
           "origin_split": "train", "idx": pair.id, "image_path": f"images/{pair.id}.png"}
    row.update(overrides)
    return row


def write_vlfeedback(folder: str, entries: list[Any], images: dict[str, bytes],
                     filename: str = "vlfeedback_llava_10k.json") -> str:
    """mDPO's VLFeedback: a JSON list of {img_path, prompt, chosen, rejected} and image files."""
    for relative, data in images.items():
        os.makedirs(os.path.dirname(os.path.join(folder, relative)), exist_ok=True)
        with open(os.path.join(folder, relative), "wb") as handle:
            handle.write(data)
    path = os.path.join(folder, filename)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(entries, handle, ensure_ascii=False)
    return path


def vlfeedback_entry(pair: Pair) -> tuple[dict[str, Any], str]:
    """(entry, relative image path) of a pair."""
    relative = f"images/{pair.id}.png"
    return {"img_path": relative, "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}, relative


def write_jsonl(folder: str, lines: list[bytes], filename: str = "pairs.jsonl") -> str:
    """A generic jsonl file from raw lines (bytes, so a test can write non-UTF-8)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    with open(path, "wb") as handle:
        handle.write(b"\n".join(lines) + b"\n")
    return path


def jsonl_line(pair: Pair, image: str | None = None, **overrides: Any) -> bytes:
    """A generic jsonl line; `image` defaults to base64 of the pair's image."""
    entry = {"id": pair.id, "image": image if image is not None else base64.b64encode(pair.image).decode(),
             "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    entry.update(overrides)
    return json.dumps(entry, ensure_ascii=False).encode("utf-8")


def same_records(a: list[dict], b: list[dict]) -> bool:
    """Whether two lists of records are equal field by field (images by their pixels)."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) if k.endswith("image") else x[k] == y[k] for k in x)
        for x, y in zip(a, b))
