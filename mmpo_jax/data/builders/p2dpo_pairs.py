"""The `p2dpo_pairs` TFDS builder, and the generation folder's file format it reads.

`manual_dir` is a generation folder written by `python -m mmpo_jax.generate_pairs`
(`mmpo_jax.pipelines.p2dpo`): `manifest.json`, one `shard-NNNNN.jsonl` per finished shard (JSON
lines, `encode_record`), the tokenizer. Preparing reads every shard in order (each checked against
its sha256 in the manifest; an unfinished generation is an error) into one "train" split:

- `id`, `prompt`, `chosen`, `rejected` (the focus pair), `robust_chosen`, `robust_rejected`,
  `noise_key` (JSON `{"seed", "index", "step"}` of the `I_noise` the robustness pair was
  generated on, `data.example_randomness.noise_image`), `metadata` (JSON: source record, crop box, saliency
  layer, mean log-probs, filter verdicts);
- `focus_aug_prompt`: `P_enh`, the prompt of `I_aug` (with two images for "two_images");
- `image`, `focus_aug_image` (the stitched `I_aug`, or the crop for "two_images"),
  `focus_deg_image` (PNG);
- `ref_chosen_logps`, `ref_rejected_logps` (float32 sums of the focus pair's reference
  log-probs, as the trainer computes them), `ddw_clip_crop`, `ddw_clip_full` (float32; listed by
  `load_split` only when the generation had a CLIP scorer, else NaN and hidden).

The dataset metadata carries the generation summary and fingerprint, the tokenizer folder (copied
next to the prepared data, so `DatasetSource.tokenizer_path` works) and the source's metadata
(the shapes world's `world` spec when the prompts came from it). Each generation is prepared
under its own folder, keyed by its fingerprint (`P2dpoPairs.prepared_data_dir`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mmpo_jax.data.builders.base import DEFAULT_CONFIG_NAME, Builder
from mmpo_jax.data.builders.records import encode_png

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TEXT_FIELDS = ("id", "prompt", "chosen", "rejected", "robust_chosen", "robust_rejected", "noise_key",
               "focus_aug_prompt", "metadata")
IMAGE_FIELDS = ("image", "focus_aug_image", "focus_deg_image")
FLOAT_FIELDS = ("ref_chosen_logps", "ref_rejected_logps", "ddw_clip_crop", "ddw_clip_full")
DDW_FIELDS = ("ddw_clip_crop", "ddw_clip_full")


def shard_file(index: int) -> str:
    """The file name of shard ``index``."""
    return f"shard-{index:05d}.jsonl"


def encode_record(record: Mapping[str, Any]) -> str:
    """One record as a JSON line: images (uint8 ``[H, W, 3]``) as base64 PNG, floats as JSON
    numbers (NaN allowed), keys sorted (the same record always gives the same bytes)."""
    line = {name: record[name] for name in TEXT_FIELDS}
    line.update({name: float(record[name]) for name in FLOAT_FIELDS})
    line.update({name: base64.b64encode(encode_png(np.asarray(record[name], np.uint8))).decode()
                 for name in IMAGE_FIELDS})
    return json.dumps(line, sort_keys=True)


def decode_record(line: str) -> dict[str, Any]:
    """Inverse of ``encode_record``, images left as PNG bytes (what TFDS' Image feature takes)."""
    record = json.loads(line)
    record.update({name: base64.b64decode(record[name]) for name in IMAGE_FIELDS})
    return record


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a generation folder, or None when there is none yet."""
    path = pathlib.Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def missing_shards(manifest: Mapping[str, Any]) -> list[int]:
    """Indices of the shards not finished yet."""
    return [k for k in range(manifest["num_shards"]) if str(k) not in manifest["shards"]]


def summarize(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Totals over the finished shards: ``candidates``, ``kept``, drops as ``{pair}/{reason}``
    (and ``dropped/{template reason}``), ``crop_coverage_rate`` of the question prompts
    (``questions_box_covers_object / questions``) and, for prompts with ground-truth objects, the
    kept replies' ``truth/{reply}/chair_i`` (captions) and ``truth/{reply}/accuracy`` (questions)
    from the ``truth/*`` counts of ``pipelines.p2dpo_pairs.truth_counts``."""
    totals: Counter = Counter()
    for shard in manifest["shards"].values():
        totals.update(shard["stats"])
    summary: dict[str, Any] = dict(sorted(totals.items()))
    summary["shards_done"] = f"{len(manifest['shards'])}/{manifest['num_shards']}"
    if totals["questions"]:
        summary["crop_coverage_rate"] = totals["questions_box_covers_object"] / totals["questions"]
    rates = {"chair_i": ("hallucinated", "mentions"), "accuracy": ("correct", "answers")}
    for key in sorted(k for k in totals if k.startswith("truth/")):
        reply, count = key.rsplit("/", 1)
        for rate, (numerator, denominator) in rates.items():
            if count == denominator and totals[key]:
                summary[f"{reply}/{rate}"] = totals[f"{reply}/{numerator}"] / totals[key]
    return summary


class P2dpoPairs(Builder):
    """P2-DPO focus and robustness pairs generated on-policy (read from manual_dir)."""

    name = "p2dpo_pairs"
    SHIPS_TOKENIZER = True  # the generation's (its prompt source's) tokenizer
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=DEFAULT_CONFIG_NAME)]
    OPTIONS: dict[str, Any] = {}
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Generate the pairs with `python -m mmpo_jax.generate_pairs "
                                    "--config=configs/p2dpo.py` and pass its output folder.")

    @classmethod
    def _config(cls, name: str, options: dict[str, Any]) -> tfds.core.BuilderConfig:
        raise ValueError(f"p2dpo_pairs has no options; got {options}")

    @classmethod
    def prepared_data_dir(cls, data_dir: str | os.PathLike[str],
                          manual_dir: str | os.PathLike[str]) -> str:
        """Where the generation in ``manual_dir`` is prepared (read by ``sources.load_split``):
        ``<data_dir>/p2dpo_pairs_generations/<fingerprint[:16]>``, so that each generation (other
        settings, model or seed; the same folder regenerated) gets its own prepared copy;
        ``data_dir`` itself while the folder has no manifest (preparing will say why)."""
        manifest = read_manifest(manual_dir)
        if manifest is None:
            return os.fspath(data_dir)
        return os.path.join(os.fspath(data_dir), f"{cls.name}_generations",
                            manifest["fingerprint"][:16])

    @property
    def SPLIT_FIELDS(self) -> dict[str, tuple[str, ...]]:  # noqa: N802 (read by load_split)
        """The fields `load_split` returns: without the DDW scores when none were computed."""
        fields = tuple(self.info.features)
        if not self.info.metadata.get("ddw_scored"):
            fields = tuple(f for f in fields if f not in DDW_FIELDS)
        return {"train": fields}

    def _features(self) -> tfds.features.FeaturesDict:
        features: dict[str, Any] = {name: tfds.features.Text() for name in TEXT_FIELDS}
        features.update({name: tfds.features.Image(shape=(None, None, 3), encoding_format="png")
                         for name in IMAGE_FIELDS})
        features.update({name: tfds.features.Scalar(dtype=np.float32) for name in FLOAT_FIELDS})
        return tfds.features.FeaturesDict(features)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.path.abspath(os.fspath(dl_manager.manual_dir))
        manifest = read_manifest(manual_dir)
        if manifest is None:
            raise FileNotFoundError(f"{manual_dir} has no {MANIFEST}; it is not a P2-DPO pair "
                                    "generation folder (python -m mmpo_jax.generate_pairs writes one)")
        missing = missing_shards(manifest)
        if missing:
            raise ValueError(f"the generation in {manual_dir} is unfinished: shards {missing} of "
                             f"{manifest['num_shards']} are missing; rerun generate_pairs to finish it")
        summary = summarize(manifest)
        if not summary.get("kept"):
            drops = {k: v for k, v in summary.items() if isinstance(v, int) and k != "kept"}
            raise ValueError(f"the generation in {manual_dir} kept no pair of its "
                             f"{summary.get('candidates', 0)} candidates (counts: {drops}); a model "
                             "this weak gives no usable pairs: start from a trained SFT base, or "
                             "relax pairs.filter_pairs / pairs.drop_identical")
        shutil.copytree(os.path.join(manual_dir, manifest["tokenizer"]),
                        str(self.data_path / TOKENIZER_DIR), dirs_exist_ok=True)
        self.info.metadata.update(
            {key: value for key, value in manifest["source"].items() if key != "manual_dir"})
        self.info.metadata.update(
            manual_dir=manual_dir, tokenizer=TOKENIZER_DIR, ddw_scored=bool(manifest["ddw_scored"]),
            combine_mode=manifest["settings"]["combine_mode"],
            generation=summary, fingerprint=manifest["fingerprint"])
        return {"train": self._generate_examples(manual_dir, manifest)}

    def _generate_examples(self, manual_dir: str, manifest: Mapping[str, Any]
                           ) -> Iterator[tuple[int, dict[str, Any]]]:
        key = 0
        for index in range(manifest["num_shards"]):
            entry = manifest["shards"][str(index)]
            with open(os.path.join(manual_dir, entry["file"]), "rb") as handle:
                data = handle.read()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError(f"{entry['file']} in {manual_dir} does not match its sha256 in "
                                 f"{MANIFEST}; the shard was changed after it was written")
            for line in data.decode("utf-8").splitlines():
                yield key, decode_record(line)
                key += 1
