"""Real-data builders: round trips on fixtures in the published formats, and every bad-input case."""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mmpo_jax.data.builders import BadRecordError
from mmpo_jax.data.sources import load_split
from tests.data import fixtures as fx


def _check_round_trip(source, pairs: list[fx.Pair], *, ids: list[str] | None = None) -> list[dict]:
    """Records come back in source order with the same text and pixels."""
    items = [source[i] for i in range(len(source))]
    assert len(items) == len(pairs)
    assert [item["id"] for item in items] == (ids or [p.id for p in pairs])
    for item, pair in zip(items, pairs):
        assert set(item) == {"id", "image", "prompt", "chosen", "rejected", "metadata"}
        assert (item["prompt"], item["chosen"], item["rejected"]) == (pair.prompt, pair.chosen, pair.rejected)
        assert item["image"].dtype == np.uint8 and item["image"].ndim == 3
        np.testing.assert_array_equal(item["image"], fx.decode_rgb(pair.image))
    return items


def test_rlhf_v_round_trip(tmp_path):
    pairs = fx.make_pairs(4)
    fx.write_rlhf_v(str(tmp_path / "manual"), [fx.rlhf_v_row(p) for p in pairs])
    source = load_split("rlhf_v", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    items = _check_round_trip(source, pairs)
    metadata = json.loads(items[0]["metadata"])
    assert metadata["source"] == "rlhf_v" and metadata["image_path"] == "coco/0.jpg"
    assert source.bad_records == {"train": {"kept": 4, "skipped": {}, "converted": {}, "skipped_examples": {}}}
    assert len(source.__getitems__([3, 1])) == 2
    # Slicing is TFDS's: the held-out tail of METHODS' "10% held out" recipes.
    assert len(load_split("rlhf_v", "train[75%:]", data_dir=tmp_path / "data")) == 1


def test_rlaif_v_round_trip_over_several_files(tmp_path):
    pairs = fx.make_pairs(5)
    fx.write_rlaif_v(str(tmp_path / "manual"), [fx.rlaif_v_row(p) for p in pairs[:3]], "RLAIF-V-Dataset_000.parquet")
    fx.write_rlaif_v(str(tmp_path / "manual"), [fx.rlaif_v_row(p) for p in pairs[3:]], "RLAIF-V-Dataset_001.parquet")
    source = load_split("rlaif_v", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    items = _check_round_trip(source, pairs)
    assert json.loads(items[4]["metadata"])["origin_dataset"] == "OK-VQA"


def test_vlfeedback_round_trip(tmp_path):
    pairs = fx.make_pairs(3)
    entries, images = [], {}
    for pair in pairs:
        entry, relative = fx.vlfeedback_entry(pair)
        entries.append(entry)
        images[relative] = pair.image
    fx.write_vlfeedback(str(tmp_path / "manual"), entries, images)
    source = load_split("vlfeedback", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    items = _check_round_trip(source, pairs, ids=["vlfeedback-0", "vlfeedback-1", "vlfeedback-2"])
    assert json.loads(items[1]["metadata"]) == {"source": "vlfeedback", "img_path": "images/1.png"}


def test_generic_jsonl_round_trip_with_paths_and_base64(tmp_path):
    pairs = fx.make_pairs(4)
    manual = tmp_path / "manual"
    os.makedirs(manual / "img")
    (manual / "img" / "0.png").write_bytes(pairs[0].image)
    data_url = "data:image/png;base64," + base64.b64encode(pairs[2].image).decode()
    lines = [fx.jsonl_line(pairs[0], image="img/0.png", extra="kept in metadata"), fx.jsonl_line(pairs[1]),
             fx.jsonl_line(pairs[2], image=data_url), b"", fx.jsonl_line(pairs[3], id=None)]
    fx.write_jsonl(str(manual), lines)
    source = load_split("generic_jsonl", "train", data_dir=tmp_path / "data", manual_dir=manual)
    items = _check_round_trip(source, pairs, ids=["0", "1", "2", "pairs.jsonl:5"])
    assert json.loads(items[0]["metadata"]) == {"source": "generic_jsonl", "extra": "kept in metadata"}


# ----------------------------------------------------------------------------- bad input

_GOOD = fx.make_pairs(1, prefix="good")[0]
_TRUNCATED_PNG = fx.image_bytes(size=(20, 20))[:80]  # header intact, pixel data cut


def _bad_lines(manual) -> dict[str, tuple[bytes, str]]:
    """{case: (jsonl line, reason it is skipped with)}."""
    base = fx.make_pairs(10, prefix="bad")
    return {
        "undecodable": (fx.jsonl_line(base[0], image=base64.b64encode(b"not an image at all" * 8).decode()),
                        "undecodable_image"),
        "truncated": (fx.jsonl_line(base[1], image=base64.b64encode(_TRUNCATED_PNG).decode()), "undecodable_image"),
        "missing_field": (fx.jsonl_line(base[2], chosen=None), "missing_field"),
        "empty_field": (fx.jsonl_line(base[3], rejected="  \n "), "empty_field"),
        "same": (fx.jsonl_line(base[4], rejected=base[4].chosen), "chosen_equals_rejected"),
        "non_utf8": (fx.jsonl_line(base[5]).replace(b"what", b"wh\xff\xfet"), "non_utf8_text"),
        "duplicate": (fx.jsonl_line(base[6], id=_GOOD.id), "duplicate_id"),
        "too_large": (fx.jsonl_line(base[7], image=base64.b64encode(fx.image_bytes(size=(40, 30))).decode()),
                      "image_too_large"),
        "missing_file": (fx.jsonl_line(base[8], image="img/nowhere.png"), "missing_image_file"),
        "malformed_json": (b'{"id": "x", "prompt": ', "malformed_json"),
        # valid JSON (an escaped lone surrogate) that no UTF-8 string can hold
        "lone_surrogate": (fx.jsonl_line(base[9], chosen="a @ cat").replace(b"@", b"\\udc80"),
                           "unencodable_text"),
    }


_CONVERSIONS = {  # case: (image bytes, conversion name)
    "gray": (fx.image_bytes("L", seed=1), "image_mode_L_to_RGB"),
    "rgba": (fx.image_bytes("RGBA", seed=2), "image_mode_RGBA_to_RGB"),
    "palette": (fx.image_bytes("P", seed=3), "image_mode_P_to_RGB"),
    "cmyk": (fx.image_bytes("CMYK", fmt="JPEG", seed=4), "image_mode_CMYK_to_RGB"),
    "gray16": (fx.image_bytes("I;16", seed=5), "image_mode_I;16_to_RGB"),
    "bmp": (fx.image_bytes("RGB", fmt="BMP", seed=6), "image_BMP_to_PNG"),
}


def test_generic_jsonl_bad_records_are_skipped_and_counted(tmp_path):
    manual = tmp_path / "manual"
    bad = _bad_lines(manual)
    converted = {case: fx.Pair(f"conv-{case}", data, f"<image>\nconv {case}?", "yes", "no")
                 for case, (data, _) in _CONVERSIONS.items()}
    lines = [fx.jsonl_line(_GOOD), *(line for line, _ in bad.values()), *map(fx.jsonl_line, converted.values())]
    fx.write_jsonl(str(manual), lines)
    source = load_split("generic_jsonl", "train", data_dir=tmp_path / "data", manual_dir=manual, max_pixels=1000)

    assert [source[i]["id"] for i in range(len(source))] == [_GOOD.id, *(p.id for p in converted.values())]
    report = load_split("generic_jsonl", "train", data_dir=tmp_path / "data", max_pixels=1000).bad_records["train"]
    expected_skips: dict[str, int] = {}
    for _, reason in bad.values():
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    assert report["skipped"] == expected_skips
    assert report["kept"] == 1 + len(converted)
    assert report["converted"] == {**{name: 1 for _, name in _CONVERSIONS.values()},
                                   "image_token_removed_from_prompt": len(converted)}
    assert any("pairs.jsonl:8" in example for example in report["skipped_examples"]["duplicate_id"])
    assert report["skipped_examples"]["unencodable_text"] == [
        "pairs.jsonl:12 (id '9'): chosen: surrogates not allowed ('\\udc80' at character 2)"]


def test_converted_images_are_rgb_with_the_expected_pixels(tmp_path):
    pairs = [fx.Pair(case, data, f"<image> what is {case}?", "yes", "no") for case, (data, _) in _CONVERSIONS.items()]
    fx.write_jsonl(str(tmp_path / "manual"), [fx.jsonl_line(p) for p in pairs])
    source = load_split("generic_jsonl", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    by_id = {source[i]["id"]: source[i] for i in range(len(source))}
    for pair in pairs:
        item = by_id[pair.id]
        assert item["prompt"] == f"what is {pair.id}?"
        if pair.id == "gray16":  # 16-bit is scaled to 8-bit, not clipped as PIL's convert would
            raw = np.asarray(Image.open(io.BytesIO(pair.image)), dtype=np.float64)
            expected = np.repeat(np.round(raw / 257.0).astype(np.uint8)[..., None], 3, axis=-1)
        else:
            expected = fx.decode_rgb(pair.image)
        np.testing.assert_array_equal(item["image"], expected)
        assert item["image"].shape[-1] == 3 and item["image"].dtype == np.uint8


@pytest.mark.parametrize("case", ["undecodable", "missing_field", "same", "non_utf8", "duplicate", "too_large",
                                  "malformed_json", "lone_surrogate"])
def test_strict_raises_naming_the_record(tmp_path, case):
    line, reason = _bad_lines(tmp_path / "manual")[case]
    fx.write_jsonl(str(tmp_path / "manual"), [fx.jsonl_line(_GOOD), line])
    with pytest.raises(BadRecordError, match=reason) as error:
        load_split("generic_jsonl", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual",
                   strict=True, max_pixels=1000)
    assert "pairs.jsonl:2" in str(error.value)
    if case not in ("non_utf8", "malformed_json"):  # the id is unknown until the line parses
        assert f"id '{json.loads(line)['id']}'" in str(error.value)


def test_rlhf_v_bad_rows_and_image_paths(tmp_path):
    pairs = fx.make_pairs(4)
    manual = str(tmp_path / "manual")
    path_only = fx.rlhf_v_row(pairs[1])
    path_only["image"] = {"bytes": None, "path": "frames/1.png"}
    os.makedirs(os.path.join(manual, "frames"))
    with open(os.path.join(manual, "frames", "1.png"), "wb") as handle:
        handle.write(pairs[1].image)
    no_image = fx.rlhf_v_row(pairs[3])
    no_image["image"] = {"bytes": None, "path": None}
    rows = [fx.rlhf_v_row(pairs[0]), path_only, fx.rlhf_v_row(pairs[2], text="{not json"), no_image,
            fx.rlhf_v_row(pairs[2], text=json.dumps({"question": "q", "chosen": "a"})),
            fx.rlhf_v_row(pairs[3], text=json.dumps({"question": "q", "chosen": "a", "rejected": "b \udc80"}))]
    fx.write_rlhf_v(manual, rows)
    source = load_split("rlhf_v", "train", data_dir=tmp_path / "data", manual_dir=manual)
    _check_round_trip(source, pairs[:2])
    assert source.bad_records["train"]["skipped"] == {"malformed_json": 1, "missing_image": 1, "missing_field": 1,
                                                      "unencodable_text": 1}
    with pytest.raises(BadRecordError, match=r"RLHF-V-Dataset.parquet:2.*malformed_json"):
        load_split("rlhf_v", "train", data_dir=tmp_path / "strict", manual_dir=manual, strict=True)


def test_vlfeedback_missing_image_and_non_object_entries(tmp_path):
    pairs = fx.make_pairs(2)
    entry, relative = fx.vlfeedback_entry(pairs[0])
    missing, _ = fx.vlfeedback_entry(pairs[1])  # its image is never written
    fx.write_vlfeedback(str(tmp_path / "manual"), [entry, missing, ["not", "an", "object"]], {relative: pairs[0].image})
    source = load_split("vlfeedback", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    assert len(source) == 1
    assert source.bad_records["train"]["skipped"] == {"missing_image_file": 1, "malformed_entry": 1}


# ----------------------------------------------------------------------------- load_split errors


def test_load_split_rejects_bad_requests(tmp_path):
    fx.write_jsonl(str(tmp_path / "manual"), [fx.jsonl_line(_GOOD)])
    with pytest.raises(ValueError, match=r"unknown dataset 'rlhf'.*rlhf_v"):
        load_split("rlhf", "train", data_dir=tmp_path / "data")
    with pytest.raises(ValueError, match="is not prepared.*pass manual_dir"):
        load_split("rlhf_v", "train", data_dir=tmp_path / "data")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['stric'\].*strict"):
        load_split("generic_jsonl", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual", stric=True)
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['test'\].*train"):
        load_split("generic_jsonl", "test", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    fx.write_jsonl(str(tmp_path / "other"), [fx.jsonl_line(_GOOD)])
    with pytest.raises(ValueError, match="was prepared from manual_dir"):
        load_split("generic_jsonl", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "other")


def test_options_get_their_own_prepared_copy(tmp_path):
    fx.write_jsonl(str(tmp_path / "manual"), [fx.jsonl_line(p) for p in fx.make_pairs(2)])
    default = load_split("generic_jsonl", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    capped = load_split("generic_jsonl", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual",
                        max_pixels=85)  # the images have 80 and 88 pixels
    assert (len(default), len(capped)) == (2, 1)
    assert default.data_dir != capped.data_dir
    with pytest.raises(ValueError, match=r"no usable record.*'image_too_large': 2"):
        load_split("generic_jsonl", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual",
                   max_pixels=50)
