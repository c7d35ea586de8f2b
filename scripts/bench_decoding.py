"""Benchmark: tokens/s of plain greedy vs contrastive vs ADAPT (steer) decoding, side by side.

The embedded default model (`models.presets.tiny`, random weights; 16 visual tokens of a 4x4 grid,
2 decoder layers) decodes a batch of left-padded image prompts greedily with EOS disabled, so every
decoding runs exactly `--new-tokens` steps:

  greedy       `generation.generate`
  contrastive  `generation.contrastive_generate` (2B model rows per step: clean and noisy image)
  adapt_steer  `generate(..., controller=AdaptDecoding("steer"))` (every layer probed and hooked)

Each is compiled once (its first call, timed apart), then the best of `--repeats` round-robin calls
is kept; tokens/s counts the `B x M` generated tokens (not the doubled rows of contrastive
decoding), prefill (vision tower included) and decode loop together. A benchmark, not a test:
nothing is asserted about time. Run:
  python scripts/bench_decoding.py                     # batch 64, 24 new tokens
  python scripts/bench_decoding.py --batch 8 --new-tokens 8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax.generation import AdaptDecoding, GenerationOutput, contrastive_generate, generate
from mmpo_jax.models.llava import Llava
from mmpo_jax.models.presets import tiny

VOCAB = 300
IMAGE_TOKEN_ID = 299
PAD_TOKEN_ID = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--prompt-text", type=int, default=12, help="text tokens per prompt besides the image")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def prompts(config, batch: int, text_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded `[B, T]` ids (BOS, the image placeholders, 1..text_tokens words) and their mask."""
    rng = np.random.default_rng(seed)
    rows = [[1, *[IMAGE_TOKEN_ID] * config.num_image_tokens, *rng.integers(3, IMAGE_TOKEN_ID, rng.integers(1, text_tokens + 1))]
            for _ in range(batch)]
    length = max(len(row) for row in rows)
    input_ids = np.array([[PAD_TOKEN_ID] * (length - len(row)) + row for row in rows], np.int32)
    mask = np.array([[False] * (length - len(row)) + [True] * len(row) for row in rows])
    return input_ids, mask


def timed(decodings: dict[str, Callable[[], GenerationOutput]], repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (seconds of the first call, compilation included; best seconds of `repeats` later calls).

    The later calls go round-robin over the decodings, so load that drifts on a shared machine
    touches all of them alike.
    """
    first, best = {}, {name: float("inf") for name in decodings}
    for name, decode in decodings.items():
        start = time.perf_counter()
        jax.block_until_ready(decode().new_tokens)
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, decode in decodings.items():
            start = time.perf_counter()
            jax.block_until_ready(decode().new_tokens)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (first[name], best[name]) for name in decodings}


def main() -> None:
    args = parse_args()
    config = tiny(vocab_size=VOCAB, image_token_id=IMAGE_TOKEN_ID, pad_token_id=PAD_TOKEN_ID)
    model = Llava(config, rngs=nnx.Rngs(args.seed))
    input_ids, mask = prompts(config, args.batch, args.prompt_text, args.seed)
    size = config.vision_config.image_size
    pixels = jax.random.normal(jax.random.key(args.seed), (args.batch, size, size, 3))
    noisy = 0.734 * pixels + 0.679 * jax.random.normal(jax.random.key(args.seed + 1), pixels.shape)
    common = dict(attention_mask=mask, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=PAD_TOKEN_ID)
    decodings = {
        "greedy": lambda: generate(model, input_ids, pixels, **common),
        "contrastive": lambda: contrastive_generate(model, input_ids, pixels, noisy, **common),
        "adapt_steer": lambda: generate(model, input_ids, pixels, controller=AdaptDecoding("steer"), **common),
    }
    tokens = args.batch * args.new_tokens
    print(f"backend {jax.default_backend()}, batch {args.batch}, prompt length {input_ids.shape[1]}, "
          f"{args.new_tokens} new tokens, {config.num_image_tokens} image tokens, "
          f"{config.text_config.num_hidden_layers} decoder layers")
    print(f"{'decoding':<12} {'compile+run s':>13} {'run s':>8} {'tokens/s':>10} {'vs greedy':>9}")
    timings = timed(decodings, args.repeats)
    baseline = tokens / timings["greedy"][1]
    for name, (first, best) in timings.items():
        rate = tokens / best
        print(f"{name:<12} {first:>13.2f} {best:>8.3f} {rate:>10.0f} {rate / baseline:>8.2f}x")

if __name__ == "__main__":
    main()
