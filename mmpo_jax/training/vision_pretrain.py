"""The SFT base's vision tower trained alone first, on the shapes world v2's per-cell labels.

On v2 the SFT alone never teaches ``tiny_v2`` to see shapes: after 1300 steps the shape words'
caption NLL is the same with a record's own image and with another record's (1.81 / 1.89, the
shape distribution's entropy is 1.76) while colours and counts are read from the image; objects
cover 1-5 % of the image, so the language model cannot find an object until the tokens encode
its shape, and the tokens get no shape signal until it does (the v2 base note, issue 14). As
LLaVA starts from a pretrained CLIP, ``sft_base.vision_steps`` steps first train the tower with a
linear head (dropped afterwards) to name the shape and colour of the object in each token's cell
(`shapes_world_v2.cell_labels`); ``sft_base.freeze_vision`` then keeps the tower fixed in the
SFT. Measured (``scripts/shapes_world_sft.py`` with ``configs/shapes_world_v2.py``: 800 tower
steps, then 400 frozen-tower SFT steps): per-cell shape accuracy .87, greedy CHAIR_i .165 and
recall .635, against .469 / .475 for 1300 SFT steps alone.

The main job logs the head's per-cell accuracy on 128 validation images at the end
(``training.experiment``), and the next batch is read and labelled in a thread while a step runs.

[our choice] batches of the SFT batch size at the SFT learning rate (warmup 5 %, cosine decay),
cells no object covers weigh 0.2 (they are most cells), sampled with replacement from the SFT
split by a generator seeded with the run's seed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmpo_jax.data import shapes_world, shapes_world_v2
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.models.llava import Llava

BACKGROUND_WEIGHT = 0.2


class _CellHead(nnx.Module):
    """The vision tower with a linear head: each visual token's shape and colour logits
    (one extra class each for "no object")."""

    def __init__(self, model: Llava, num_shapes: int, num_colors: int, rngs: nnx.Rngs):
        self.tower = model.vision_tower
        self.num_shapes = num_shapes
        self.head = nnx.Linear(model.config.vision_config.hidden_size, num_shapes + num_colors + 2,
                               rngs=rngs)

    def __call__(self, pixel_values: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``[B, H, W, 3]`` -> shape logits ``[B, N, S + 1]``, colour logits ``[B, N, C + 1]``."""
        features = self.tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
        logits = self.head(features)
        return logits[..., :self.num_shapes + 1], logits[..., self.num_shapes + 1:]


def _labels(record: Mapping[str, Any], world: Mapping[str, Any], grid: int
            ) -> tuple[np.ndarray, np.ndarray]:
    objects = [shapes_world.ShapeObject(o["shape"], o["color"], tuple(o["bbox"]))
               for o in json.loads(record["objects"])]
    return shapes_world_v2.cell_labels(objects, int(world["image_size"]), grid,
                                       tuple(world["shapes"]), tuple(world["colors"]))


def _batch(source: Sequence[Mapping[str, Any]], indices: np.ndarray, image_config: ImageProcessorConfig,
           world: Mapping[str, Any], grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels ``[B, H, W, 3]`` and shape / colour ids ``[B, N]`` of ``source[indices]``."""
    records = [source[int(i)] for i in indices]
    labels = [_labels(record, world, grid) for record in records]
    return (np.stack([image_config(r["image"]) for r in records]), np.stack([s for s, _ in labels]),
            np.stack([c for _, c in labels]))


def pretrain_vision(model: Llava, source: Sequence[Mapping[str, Any]], image_config: ImageProcessorConfig,
                    world: Mapping[str, Any], *, steps: int, batch_size: int, learning_rate: float,
                    seed: int, held_out: Sequence[Mapping[str, Any]] = ()) -> dict[str, float]:
    """Trains ``model.vision_tower`` in place for ``steps`` steps on the cell labels of
    ``source``'s records (module doc); returns ``{"loss": the last step's loss}``, with
    ``held_out`` records also the head's accuracy on their object cells (``shape_accuracy``,
    ``colour_accuracy``) and on the others (``background_accuracy``: "no object" predicted).

    The next batch is read and labelled in a thread while the current step runs (the same
    batches as reading them in turn).

    Args:
      world: the split's ``metadata["world"]`` (its builder options: ``world``, ``image_size``,
        ``shapes``, ``colors``); only the v2 world has per-cell labels.
    """
    if world.get("world") != shapes_world_v2.WORLD:
        raise ValueError(f"sft_base.vision_steps={steps} needs the shapes world v2 (its objects' cells); "
                         f"data.builder's world is {world.get('world')!r}: set sft_base.vision_steps=0")
    shapes, colors = tuple(world["shapes"]), tuple(world["colors"])
    grid = model.vision_tower.grid_size
    net = _CellHead(model, len(shapes), len(colors), nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), max(steps, 2))
    optimizer = nnx.Optimizer(net, optax.adam(schedule), wrt=nnx.Param)

    @nnx.jit
    def step(net, optimizer, pixels, shape_ids, color_ids):
        def loss_fn(net):
            shape_logits, color_logits = net(pixels)
            weight = jnp.where(shape_ids < len(shapes), 1.0, BACKGROUND_WEIGHT)
            losses = (optax.softmax_cross_entropy_with_integer_labels(shape_logits, shape_ids)
                      + optax.softmax_cross_entropy_with_integer_labels(color_logits, color_ids))
            return (losses * weight).sum() / weight.sum()
        loss, grads = nnx.value_and_grad(loss_fn)(net)
        optimizer.update(net, grads)
        return loss

    rng = np.random.default_rng(seed)
    prepare = functools.partial(_batch, source, image_config=image_config, world=world, grid=grid)
    loss = float("nan")
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        pending = reader.submit(prepare, rng.integers(0, len(source), batch_size)) if steps else None
        for number in range(steps):
            pixels, shape_ids, color_ids = pending.result()
            if number + 1 < steps:
                pending = reader.submit(prepare, rng.integers(0, len(source), batch_size))
            loss = float(step(net, optimizer, jnp.asarray(pixels), jnp.asarray(shape_ids),
                              jnp.asarray(color_ids)))
    report = {"loss": loss}
    if held_out:
        report.update(_accuracy(net, _batch(held_out, np.arange(len(held_out)), image_config, world, grid),
                                len(shapes)))
    return report


def _accuracy(net: _CellHead, batch: tuple[np.ndarray, np.ndarray, np.ndarray], num_shapes: int
              ) -> dict[str, float]:
    pixels, shape_ids, color_ids = batch
    shape_logits, color_logits = nnx.jit(lambda net, pixels: net(pixels))(net, jnp.asarray(pixels))
    shape_hit = np.asarray(shape_logits.argmax(-1)) == shape_ids
    color_hit = np.asarray(color_logits.argmax(-1)) == color_ids
    covered = shape_ids < num_shapes
    return {"shape_accuracy": float(shape_hit[covered].mean()),
            "colour_accuracy": float(color_hit[covered].mean()),
            "background_accuracy": float(shape_hit[~covered].mean())}
