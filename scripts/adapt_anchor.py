"""Where ADAPT's VAG-DPO mask keeps the image and where it whitens it, on the shapes world.

    python scripts/adapt_anchor.py [--set data.data_dir=/tmp/data] [--num-records 512]
    python scripts/adapt_anchor.py --set "data.builder={'world': 'v2'}" --oracle-only
    python scripts/adapt_anchor.py --set "data.builder={'world': 'v2'}" --checkpoint DIR/model

Reads the first preference records of ``configs/adapt.py``'s data and computes the refined mask
``m`` of ``I_VE = I*m + white*(1-m)`` from two anchors:

- the **oracle** anchor: each patch's true object coverage (the objects' filled pixels averaged over
  the patch, on a ``--grid`` x ``--grid`` grid, default image side / 16), through
  ``rewards.adapt.refined_mask`` and ``data.interventions.upsample_mask`` as training applies them:
  what the chain does to a perfect anchor;
- the **model's** anchor, exactly as training computes it (``training.scoring.enhancement_mask``:
  the reference reads the chosen caption, anchor from its first K tokens): the SFT base of the
  config (``training.experiment.initial_model``), or the model saved at ``--checkpoint`` (e.g. by
  ``scripts/shapes_world_sft.py``; its images are preprocessed as the world's metadata says).

Each with the configured percentile threshold (``method.mask_threshold_percentile``) and without it
(METHODS.md's chain), the oracle also with the unscaled chain (``scale_to_grid=False``: the 24x24
sizes on any grid). Prints, over the objects of those images:

- ``objects_kept``: share of objects whose box keeps a mean mask >= 0.5 (visible in ``I_VE``);
- ``object_kept``: mean of ``m`` over each object's box (1 = fully visible in ``I_VE``);
- ``background_whitened``: mean of ``1 - m`` over the pixels no object covers;
- ``image_kept``: mean of ``m`` over whole images, what a mask blind to the objects keeps of them
  on average (the baseline ``object_kept`` must beat for the anchor to have found the objects).

A chosen caption scored on an ``I_VE`` that whitened one of its objects names an object the image
no longer shows: DPO then rewards describing what is not visible.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging
from flax import nnx

from mmpo_jax.data import image_processing, interventions
from mmpo_jax.data.fields import ORIGINAL
from mmpo_jax.data.pipeline import preference_pipeline
from mmpo_jax.data.shapes_world import ShapeObject
from mmpo_jax.data.shapes_world_v2 import object_coverage, patch_coverage
from mmpo_jax.pipelines.p2dpo_pairs import record_objects
from mmpo_jax.rewards.adapt import refined_mask
from mmpo_jax.engine import model_io
from mmpo_jax.training import experiment
from mmpo_jax.config.loading import load_config
from mmpo_jax.engine.scoring import enhancement_mask


def _objects(record: dict) -> list[ShapeObject]:
    return [ShapeObject(o["shape"], o["color"], tuple(o["bbox"])) for o in record_objects(record)]


def coverage(masks: list[np.ndarray], objects: list[list[ShapeObject]]) -> dict[str, float]:
    """The module docstring's figures of pixel masks ``[S, S]`` against their images' objects."""
    kept, whitened = [], []
    for mask, scene in zip(masks, objects):
        kept += [float(mask[o.bbox[1]:o.bbox[3], o.bbox[0]:o.bbox[2]].mean()) for o in scene]
        background = object_coverage(scene, mask.shape[0]) == 0
        whitened.append(float((1.0 - mask[background]).mean()))
    kept = np.asarray(kept)
    return {"objects_kept": float(np.mean(kept >= 0.5)), "object_kept": float(kept.mean()),
            "background_whitened": float(np.mean(whitened)),
            "image_kept": float(np.mean([m.mean() for m in masks])), "num_objects": int(kept.size)}


def oracle_report(records: list[dict], grid: int, percentile: float | None) -> dict[str, dict]:
    """Coverage of the oracle anchor's masks: scaled / unscaled chain, with / without threshold."""
    objects = [_objects(r) for r in records]
    size = records[0]["image"].shape[0]
    anchors = jnp.asarray(np.stack([patch_coverage(o, size, grid) for o in objects]))
    report = {}
    for scale in (True, False):
        for threshold in (percentile, None):
            grid_masks = refined_mask(anchors, threshold_percentile=threshold, scale_to_grid=scale)
            masks = np.asarray(interventions.upsample_mask(grid_masks, (size, size)))
            name = f"oracle {'scaled' if scale else 'unscaled'} chain (percentile {threshold})"
            report[name] = coverage(list(masks), objects)
    return report


def model_report(config, model, tokenizer, image_config, records, percentile) -> dict[str, dict]:
    """Coverage of the masks of ``model``'s own anchor, as training computes them."""
    batches = functools.partial(
        preference_pipeline, records, tokenizer=tokenizer, image_config=image_config,
        num_image_tokens=model.config.num_image_tokens, batch_size=64,
        buckets=tuple(config.data.buckets), seed=0, shuffle=False, template=config.data.template)
    report = {}
    for threshold in (percentile, None):
        mask_fn = nnx.jit(functools.partial(enhancement_mask, anchor_steps=int(config.method.anchor_steps),
                                            threshold_percentile=threshold))
        masks, objects = [], []
        for batch in batches():
            visual = {ORIGINAL: model.multi_modal_projector(model.image_features(batch.pixel_values))}
            batch_masks = np.asarray(mask_fn(model, batch, visual))
            for row, index in enumerate(np.asarray(batch.example_index)):
                if index >= 0:
                    if records[index]["image"].shape[:2] != batch_masks.shape[1:]:
                        raise ValueError("the record images must be the model's input size")
                    masks.append(batch_masks[row])
                    objects.append(_objects(records[index]))
        report[f"model anchor (percentile {threshold})"] = coverage(masks, objects)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/adapt.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--num-records", type=int, default=512)
    parser.add_argument("--grid", type=int, default=None, help="oracle grid side (default: image side / 16)")
    parser.add_argument("--oracle-only", action="store_true", help="skip the model's anchor")
    parser.add_argument("--checkpoint", default=None, help="a saved model instead of the config's SFT base")
    args = parser.parse_args()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("mmpo_jax").setLevel(logging.INFO)
    config = load_config(args.config, args.set)
    source, tokenizer, image_config = experiment.load_data(config)
    world = source.metadata.get("world")
    if world is not None:
        image_config = image_processing.for_shapes_world(world)
    records = [source[i] for i in range(min(args.num_records, len(source)))]
    percentile = float(config.method.mask_threshold_percentile) or None
    grid = args.grid or records[0]["image"].shape[0] // 16
    report = {"world": world, "records": len(records), "grid": grid, **oracle_report(records, grid, percentile)}
    if not args.oracle_only:
        if args.checkpoint:
            model = model_io.load_model(pathlib.Path(os.path.expanduser(args.checkpoint)))[0]
        else:
            model = experiment.initial_model(config, tokenizer)
        report.update(model_report(config, model, tokenizer, image_config, records, percentile))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
