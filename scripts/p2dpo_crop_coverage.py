"""Does P2-DPO's adaptive crop find the object a question asks about? (shapes world v2)

    python scripts/p2dpo_crop_coverage.py --data-dir DIR --base MODEL_DIR \
        [--split validation_caption] [--num-records 300] [--base-box-fraction 0.5] \
        [--threshold 0.5]

For every question about a present object in the first ``--num-records`` records of a v2 split
(``metadata["questions"]`` with boxes; the validation split by default, where settings are
chosen), the crop box of ``pipelines.p2dpo_pairs.crop_boxes`` from each saliency reading
(``attention`` / ``grad_attention`` at every decoder layer of the SFT base in ``--base``) and from
two references that need no model:

- ``oracle``: the saliency each patch would get if it were exactly the asked objects' share of
  that patch (the crop algorithm's own ceiling: window sizes, centring, clamping);
- ``random``: a uniform random saliency map (the crop algorithm fed noise: chance level).

Prints one JSON object: per reading the coverage rate (box holds >= ``--threshold`` of the asked
objects' union box, as the generation counts it), per question kind, and the saliency precision
(mean share of the saliency mass on the patches the asked objects touch, beside the mean share of
the grid those patches are), with the machine load and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
from collections import defaultdict
from typing import Any

import numpy as np

from mmpo_jax.data import image_processing
from mmpo_jax.data.sources import load_split
from mmpo_jax.data.tokenizer import load_tokenizer
from mmpo_jax.engine import model_io
from mmpo_jax.generation.prompts import left_pad, prompt_ids
from mmpo_jax.pipelines import p2dpo_pairs as pairs

WORLD = {"world": "v2"}
RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


def object_share(boxes: list[list[int]], grid: int, image_side: int) -> np.ndarray:
    """``[G, G]``: the fraction of each patch covered by the union of ``boxes`` (pixels)."""
    mask = np.zeros((image_side, image_side), np.float64)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 1.0
    block = image_side // grid
    return mask.reshape(grid, block, grid, block).mean(axis=(1, 3))


def question_rows(records, num_records: int) -> list[tuple[int, dict[str, Any]]]:
    """``(record index, question)`` for every question about a present object."""
    return [(index, question) for index in range(min(num_records, len(records)))
            for question in pairs.record_questions(records[index])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="~/mmpo_data")
    parser.add_argument("--base", required=True, help="SFT base model directory (model_io.save_model)")
    parser.add_argument("--split", default="validation_caption")
    parser.add_argument("--num-records", type=int, default=300)
    parser.add_argument("--base-box-fraction", type=float, default=0.5,
                        help="the crop's base side / the image side (configs/p2dpo.py's)")
    parser.add_argument("--threshold", type=float, default=pairs.COVERAGE_THRESHOLD)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data_dir = pathlib.Path(os.path.expanduser(args.data_dir))
    records = load_split("shapes_world", args.split, data_dir=data_dir, **WORLD)
    tokenizer = load_tokenizer(records.tokenizer_path)
    world = records.metadata["world"]
    image_config = image_processing.for_shapes_world(world)
    model = model_io.load_model(os.path.expanduser(args.base))[0]
    layers = model.config.text_config.num_hidden_layers
    side = int(world["image_size"])
    grid = int(round(model.config.num_image_tokens ** 0.5))
    rows = question_rows(records, args.num_records)
    readings = [f"{mode}@{layer}" for mode in ("attention", "grad_attention") for layer in range(layers)]
    rng = np.random.default_rng(args.seed)
    encode = dict(num_image_tokens=model.config.num_image_tokens, template="llava_1_5")
    longest = max(len(ids) for ids in prompt_ids(tokenizer, [q["question"] for _, q in rows], **encode))
    covers: dict[str, list[float]] = defaultdict(list)
    precision: dict[str, list[float]] = defaultdict(list)
    area_share, kinds, box_sides = [], [], []
    report: dict[str, Any] = {"load_before": os.getloadavg(), "base": args.base, "split": args.split,
                              "base_box_fraction": args.base_box_fraction, "threshold": args.threshold,
                              "grid": grid, "image_size": side}
    start = time.perf_counter()
    crop = dict(image_config=image_config, base_box=0.0, base_box_fraction=args.base_box_fraction,
                ratios=RATIOS)
    for first in range(0, len(rows), args.batch_size):
        chunk = rows[first:first + args.batch_size]
        chunk = chunk + [chunk[-1]] * (args.batch_size - len(chunk))  # one compiled shape
        real = min(args.batch_size, len(rows) - first)
        images = [np.asarray(records[i]["image"], np.uint8) for i, _ in chunk]
        pixels = np.stack([image_config(image) for image in images])
        ids, mask = left_pad(prompt_ids(tokenizer, [q["question"] for _, q in chunk], **encode),
                             tokenizer.pad_token_id, min_length=longest)  # one compiled shape
        targets = [q for _, q in chunk][:real]
        shares = np.stack([object_share(q["boxes"], grid, side) for q in targets])
        touched = shares > 0
        maps = {"oracle": shares, "random": rng.random((real, grid, grid))}
        for reading in readings:
            mode, layer = reading.split("@")
            maps[reading] = np.asarray(pairs.saliency_maps(model, ids, mask, pixels, layer=int(layer),
                                                           mode=mode))[:real]
        sizes = [(side, side)] * real
        for name, saliency in maps.items():
            boxes = pairs.crop_boxes(saliency, sizes, **crop)
            for box, target in zip(boxes, targets):
                covers[name].append(pairs.box_coverage(box, target["box"]) >= args.threshold)
            if name == readings[0]:
                box_sides.extend(int(b[2] - b[0]) for b in boxes)
            mass = np.clip(saliency, 0, None).reshape(real, -1)
            precision[name].extend(((mass * touched.reshape(real, -1)).sum(1)
                                    / np.maximum(mass.sum(1), 1e-12)).tolist())
        area_share.extend(touched.reshape(real, -1).mean(1).tolist())
        kinds.extend(q["kind"] for q in targets)
    kinds_array = np.asarray(kinds)
    report["questions"] = len(rows)
    report["questions_per_kind"] = {k: int((kinds_array == k).sum()) for k in sorted(set(kinds))}
    report["asked_patches_share_of_grid"] = float(np.mean(area_share))
    report["box_side_hist"] = {str(k): int(v) for k, v in zip(*np.unique(box_sides, return_counts=True))}
    report["coverage"] = {
        name: {"all": float(np.mean(c)),
               **{kind: float(np.mean(np.asarray(c)[kinds_array == kind])) for kind in sorted(set(kinds))}}
        for name, c in covers.items()}
    report["saliency_on_asked_patches"] = {name: float(np.mean(p)) for name, p in precision.items()}
    report["seconds"] = time.perf_counter() - start
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
