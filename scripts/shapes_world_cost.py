"""What the shapes world v2 costs against v1, measured side by side in one process, interleaved.

    python scripts/shapes_world_cost.py [--rounds 3]

Three pieces of the README main job, each timed for v1 (``tiny`` preset, 64-px world) and v2
(``tiny_v2``, 128-px world) in alternation, so both see the same machine load:

- generation: records per second of each world's generator with the PNG encoding the builder
  does (the splits in the proportions of the default sizes);
- SFT step: one jitted optimizer step of 32 examples at the world's bucket (96 tokens for v2's 64
  image tokens, 64 for v1's 16), next-token loss through the whole model;
- decoding: greedy generation of 24 new tokens for 64 caption prompts (``evaluation.runner``).

Prints the median seconds of each and the v2 / v1 ratios with the load average; a 2-core budget
for v2 follows from v1's measured times (README: ~5 minutes for the main job from an empty data
folder) times these ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmpo_jax.data import image_processing, shapes_world, shapes_world_v2, shapes_world_v2_splits
from mmpo_jax.data.builders.records import encode_png
from mmpo_jax.data.tokenizer import build_word_tokenizer
from mmpo_jax.evaluation.runner import generate_texts
from mmpo_jax.models import presets
from mmpo_jax.models.llava import Llava

BATCH, DECODE_PROMPTS, NEW_TOKENS = 32, 64, 24


def _world(name: str):
    if name == "v1":
        spec = shapes_world.WorldSpec()
        return (spec, shapes_world.generate_split, shapes_world.SPLITS, shapes_world.vocabulary(),
                presets.tiny, image_processing.tiny(64), 64)
    spec = shapes_world_v2.WorldSpecV2()
    return (spec, shapes_world_v2_splits.generate_split, shapes_world_v2_splits.SPLITS,
            shapes_world_v2.vocabulary(spec), presets.tiny_v2, image_processing.for_shapes_world(spec.metadata()), 96)


def _generation(spec, generate, splits, count: int = 120):
    """Seconds per record, over the splits weighted by their default sizes."""
    def sizes(split):
        return getattr(spec, f"{split}_size", None) or 11 * getattr(spec, f"{split}_images")
    total = sum(sizes(s) for s in splits)
    seconds = 0.0
    for split in splits:
        start = time.perf_counter()
        for record in itertools.islice(generate(spec, split), count):
            encode_png(record["image"])
        seconds += (time.perf_counter() - start) / count * sizes(split) / total
    return seconds


def _model(preset, words):
    tokenizer = build_word_tokenizer(words, model_max_length=512)
    config = preset(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return Llava(config, rngs=nnx.Rngs(0)), tokenizer


def _sft_step(model, length: int, side: int):
    """A ready-compiled optimizer step on a fixed batch; returns the function to time."""
    n = model.config.num_image_tokens
    ids = np.full((BATCH, length), 5, np.int32)
    ids[:, 1:1 + n] = model.config.image_token_id
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, side, side, 3)), jnp.float32)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, ids, pixels):
        def loss(m):
            logits = m(ids, pixel_values=pixels, attention_mask=jnp.ones(ids.shape, bool)).logits
            logps = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
            return -jnp.take_along_axis(logps, ids[:, 1:, None], -1).mean()
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    ids = jnp.asarray(ids)
    step(model, optimizer, ids, pixels).block_until_ready()
    return lambda: step(model, optimizer, ids, pixels).block_until_ready()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    setups = {}
    for name in ("v1", "v2"):
        spec, generate, splits, words, preset, image_config, length = _world(name)
        model, tokenizer = _model(preset, words)
        images = [r["image"] for r in itertools.islice(generate(spec, "test_caption"), DECODE_PROMPTS)]
        decode = dict(image_config=image_config, num_image_tokens=model.config.num_image_tokens,
                      batch_size=DECODE_PROMPTS, max_new_tokens=NEW_TOKENS)
        generate_texts(model, tokenizer, images, [shapes_world.CAPTION_PROMPT] * len(images), **decode)
        setups[name] = {
            "generation": lambda spec=spec, generate=generate, splits=splits: _generation(spec, generate, splits),
            "sft_step": _sft_step(model, length, image_config.crop_size),
            "decode": lambda model=model, tokenizer=tokenizer, images=images, decode=decode: generate_texts(
                model, tokenizer, images, [shapes_world.CAPTION_PROMPT] * len(images), **decode)}
    times = {name: {piece: [] for piece in setup} for name, setup in setups.items()}
    for _ in range(args.rounds):
        for piece in ("generation", "sft_step", "decode"):
            for name in ("v1", "v2"):
                start = time.perf_counter()
                seconds = setups[name][piece]()
                elapsed = time.perf_counter() - start
                times[name][piece].append(seconds if piece == "generation" else elapsed)
    report = {"load": os.getloadavg(), "rounds": args.rounds}
    for piece in ("generation", "sft_step", "decode"):
        medians = {name: float(np.median(times[name][piece])) for name in times}
        report[piece] = {**{f"{name}_seconds": value for name, value in medians.items()},
                         "ratio_v2_v1": medians["v2"] / medians["v1"]}
    report["units"] = {"generation": "per record", "sft_step": f"per step of {BATCH}",
                       "decode": f"{DECODE_PROMPTS} captions x {NEW_TOKENS} tokens"}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
