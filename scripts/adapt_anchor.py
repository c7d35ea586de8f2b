"""Where ADAPT's VAG-DPO mask keeps the image and where it whitens it, on the shapes world.

    python scripts/adapt_anchor.py [--set data.data_dir=/tmp/data] [--num-records 512]

Loads (or trains, cached) the SFT base of ``configs/adapt.py`` and computes the refined mask
``m`` of ``I_VE = I*m + white*(1-m)`` exactly as training does
(``training.scoring.enhancement_mask``: the reference reads the chosen caption, anchor from its
first K tokens) for the first preference records. Prints, over the objects of those images:

- ``object_kept``: mean of ``m`` over each object's box (1 = fully visible in ``I_VE``);
- ``objects_mostly_whitened``: fraction of objects whose box keeps < 0.5;
- ``image_kept``: mean of ``m`` over whole images, what a mask blind to the objects keeps of them
  on average (the baseline ``object_kept`` must beat for the anchor to have found the objects);
- the same with the percentile threshold off (``mask_threshold_percentile=0``: METHODS.md's chain).

A chosen caption scored on an ``I_VE`` that whitened one of its objects names an object the image
no longer shows: DPO then rewards describing what is not visible.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging

import numpy as np
from absl import logging as absl_logging
from flax import nnx

from mmpo_jax.data.pipeline import preference_pipeline
from mmpo_jax.pipelines.p2dpo_pairs import record_objects
from mmpo_jax.training import experiment
from mmpo_jax.config.loading import load_config
from mmpo_jax.engine.scoring import enhancement_mask


def _coverage(masks: list[np.ndarray], objects: list[list[dict]]) -> dict[str, float]:
    kept = [float(mask[o["bbox"][1]:o["bbox"][3], o["bbox"][0]:o["bbox"][2]].mean())
            for mask, scene in zip(masks, objects) for o in scene]
    return {"object_kept": float(np.mean(kept)),
            "objects_mostly_whitened": float(np.mean(np.asarray(kept) < 0.5)),
            "image_kept": float(np.mean([m.mean() for m in masks])), "num_objects": len(kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/adapt.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--num-records", type=int, default=512)
    args = parser.parse_args()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("mmpo_jax").setLevel(logging.INFO)
    config = load_config(args.config, args.set)
    source, tokenizer, image_config = experiment.load_data(config)
    base = experiment.initial_model(config, tokenizer)
    records = [source[i] for i in range(min(args.num_records, len(source)))]
    batches = functools.partial(
        preference_pipeline, records, tokenizer=tokenizer, image_config=image_config,
        num_image_tokens=base.config.num_image_tokens, batch_size=64,
        buckets=tuple(config.data.buckets), seed=0, shuffle=False, template=config.data.template)
    percentile = float(config.method.mask_threshold_percentile)
    report = {}
    for name, threshold in (("configured", percentile or None), ("no_percentile", None)):
        mask_fn = nnx.jit(functools.partial(enhancement_mask,
                                            anchor_steps=int(config.method.anchor_steps),
                                            threshold_percentile=threshold))
        masks, objects = [], []
        for batch in batches():
            visual = {"pixel_values": base.multi_modal_projector(
                base.image_features(batch.pixel_values))}
            batch_masks = np.asarray(mask_fn(base, batch, visual))
            for row, index in enumerate(np.asarray(batch.example_index)):
                if index >= 0:
                    if records[index]["image"].shape[:2] != batch_masks.shape[1:]:
                        raise ValueError("the record images must be the model's input size")
                    masks.append(batch_masks[row])
                    objects.append(record_objects(records[index]))
        report[f"{name} (percentile {threshold})"] = _coverage(masks, objects)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
