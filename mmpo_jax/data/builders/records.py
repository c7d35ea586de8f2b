"""Turning raw preference rows into clean records: image decoding, text checks, bad-record counting.

Every builder reads its own file format into a `RawPreference`; `make_preference_record` turns it
into the stored record or raises `SkipRecord` with a reason; `RecordLog` counts skips and
conversions per reason (and raises `BadRecordError` naming the record in strict mode). Nothing that
fails a check reaches a record.

Conversions (counted, record kept):
- image modes other than 8-bit RGB (grayscale, palette, RGBA, CMYK, 16-bit, ...) become RGB with
  `PIL.Image.convert("RGB")` as LLaVA's own loader does (alpha dropped, not composited); 16-bit and
  32-bit integer grayscale are first scaled from 0..65535 to 0..255;
- `<image>` tokens in the prompt are removed (a prompt is the bare user question);
- leading/trailing whitespace of text fields is stripped.
Skips (counted, record dropped): undecodable or truncated images, images above `max_pixels`
[our choice: skip rather than downscale; such files are usually corrupt or pathological and a
silent resize would hide it], missing or empty fields, non-UTF-8 text, text that cannot be
stored as UTF-8 (`unencodable_text`: a JSON-escaped lone surrogate such as "\\udc80" is valid
JSON but no UTF-8 string), chosen == rejected, duplicate ids (the first valid occurrence wins).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 40_000_000  # ~6300 x 6300; far above any image a CLIP tower is fed
PREFERENCE_FIELDS = ("id", "image", "prompt", "chosen", "rejected", "metadata")
_KEPT_FORMATS = ("JPEG", "PNG")  # stored as-is when already 8-bit RGB; anything else re-encoded as PNG
_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")
_EXAMPLES_PER_REASON = 5


class SkipRecord(Exception):
    """One raw record cannot become a record; `reason` is a short stable key for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BadRecordError(ValueError):
    """Raised in strict mode for the first record that would have been skipped."""


@dataclasses.dataclass
class RawPreference:
    """A preference row as read from a source file, before any check.

    `id` may be None (the record's position name is used); it and the text fields may be str,
    bytes or None;
    `image` is the encoded file content or None.
    """

    id: str | None
    image: bytes | None
    prompt: Any
    chosen: Any
    rejected: Any
    metadata: dict[str, Any]


def as_text(value: Any, field: str) -> str:
    """Returns `value` as stripped unicode text; raises `SkipRecord` if missing, empty, not UTF-8
    bytes, or a string UTF-8 cannot encode (lone surrogates, which TFDS could not store)."""
    if value is None:
        raise SkipRecord("missing_field", field)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SkipRecord("non_utf8_text", f"{field}: {error}") from None
    if not isinstance(value, str):
        raise SkipRecord("wrong_type", f"{field} is {type(value).__name__}, expected text")
    value = value.strip()
    if not value:
        raise SkipRecord("empty_field", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise SkipRecord("unencodable_text", f"{field}: {error.reason} "
                         f"({value[error.start:error.end]!r} at character {error.start})") from None
    return value


def normalize_image(data: bytes | None, *, max_pixels: int) -> tuple[bytes, str | None]:
    """Checks and, if needed, converts an encoded image to 8-bit RGB.

    Returns:
      (encoded bytes that decode to uint8 [H, W, 3] RGB, name of the conversion made or None).
      Already-RGB JPEG/PNG files are returned unchanged; everything else is re-encoded as PNG.

    Raises:
      SkipRecord: "missing_image", "undecodable_image" or "image_too_large".
    """
    if not data:
        raise SkipRecord("missing_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own cap
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise SkipRecord("image_too_large", f"{width}x{height} > max_pixels={max_pixels}")
            image.load()  # decodes fully: truncated files fail here, not at training time
    except Image.DecompressionBombError as error:
        raise SkipRecord("image_too_large", str(error)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise SkipRecord("undecodable_image", f"{type(error).__name__}: {error}") from None
    if image.mode == "RGB" and image.format in _KEPT_FORMATS:
        return data, None
    conversion = f"image_mode_{image.mode}_to_RGB" if image.mode != "RGB" else f"image_{image.format}_to_PNG"
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return encode_png(image.convert("RGB")), conversion


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or a uint8 [H, W, 3] array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_file_bytes(path: str | os.PathLike[str]) -> bytes:
    """Reads an image file named by a record; raises `SkipRecord("missing_image_file")` if absent."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise SkipRecord("missing_image_file", f"{path}: {error.strerror}") from None


def decode_base64(text: str) -> bytes:
    """Decodes base64 image content, with or without a `data:<mime>;base64,` prefix."""
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SkipRecord("undecodable_image", f"invalid base64: {error}") from None


def make_preference_record(raw: RawPreference, *, name: str, max_pixels: int
                           ) -> tuple[dict[str, Any], list[str]]:
    """Validates and converts one raw preference row.

    Args:
      raw: the row as read.
      name: where the row came from (e.g. "data.jsonl:12"); its id when `raw.id` is None.
      max_pixels: images with more pixels are skipped.

    Returns:
      (record with `PREFERENCE_FIELDS`, names of the conversions made).

    Raises:
      SkipRecord: the row is unusable (see the module docstring).
    """
    conversions = []
    record_id = name if raw.id is None else as_text(raw.id, "id")
    prompt = as_text(raw.prompt, "prompt")
    bare_prompt = _IMAGE_TOKEN.sub(" ", prompt).strip()
    if bare_prompt != prompt:
        conversions.append("image_token_removed_from_prompt")
    if not bare_prompt:
        raise SkipRecord("empty_field", "prompt (only an <image> token)")
    chosen, rejected = as_text(raw.chosen, "chosen"), as_text(raw.rejected, "rejected")
    if chosen == rejected:
        raise SkipRecord("chosen_equals_rejected")
    image, conversion = normalize_image(raw.image, max_pixels=max_pixels)
    if conversion:
        conversions.append(conversion)
    record = {"id": record_id, "image": image, "prompt": bare_prompt, "chosen": chosen,
              "rejected": rejected, "metadata": json.dumps(raw.metadata, sort_keys=True, default=str)}
    return record, conversions


class RecordLog:
    """Counts skipped and converted records of one split; enforces unique ids and strict mode."""

    def __init__(self, dataset: str, split: str, *, strict: bool):
        self.dataset, self.split, self.strict = dataset, split, strict
        self.skipped: Counter = Counter()
        self.converted: Counter = Counter()
        self.kept = 0
        self._examples: dict[str, list[str]] = defaultdict(list)
        self._ids: set[str] = set()

    def skip(self, name: str, error: SkipRecord) -> None:
        """Counts a dropped record; in strict mode raises `BadRecordError` naming it instead."""
        if self.strict:
            raise BadRecordError(
                f"{self.dataset}/{self.split}: record {name!r} is bad ({error}); strict=True turns "
                "every skip into an error, pass strict=False to skip and count such records"
            ) from error
        self.skipped[error.reason] += 1
        if len(self._examples[error.reason]) < _EXAMPLES_PER_REASON:
            self._examples[error.reason].append(f"{name}: {error.detail}" if error.detail else name)

    def accept(self, name: str, record_id: str, conversions: list[str]) -> bool:
        """Registers a valid record; False (and a counted skip) if its id was seen before."""
        if record_id in self._ids:
            self.skip(name, SkipRecord("duplicate_id", record_id))
            return False
        self._ids.add(record_id)
        self.converted.update(conversions)
        self.kept += 1
        return True

    def summary(self) -> dict[str, Any]:
        """JSON-ready report: kept count, skip and conversion counts by reason, a few examples."""
        return {"kept": self.kept, "skipped": dict(self.skipped), "converted": dict(self.converted),
                "skipped_examples": dict(self._examples)}

    def log(self) -> None:
        level = logging.WARNING if self.skipped else logging.INFO
        logging.getLogger(__name__).log(
            level, "%s/%s: kept %d records, skipped %d %s, converted %s", self.dataset, self.split,
            self.kept, sum(self.skipped.values()), dict(self.skipped), dict(self.converted))
