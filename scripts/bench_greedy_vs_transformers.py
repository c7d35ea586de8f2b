"""Benchmark: greedy decoding, `mmpo_jax.generation.generate` vs transformers' `generate(do_sample=False)`.

Both sides decode the same left-padded image prompts (B 8 by default, ~593 tokens each: 576 image
placeholders plus text) with a KV cache for exactly `--new-tokens` steps (EOS disabled), on the same random
weights: the issue's small but realistic LLaVA (`benchlib.SMALL_LLAVA`: CLIP 336 px / patch 14, 2 layers of
width 256; Llama 8 layers of width 512, vocabulary 32,064) built by transformers from its config, saved
with `save_pretrained` and loaded into ours with `load_hf_llava`. Nothing is downloaded.

Prints whether the new tokens are identical, then the medians of `--repeats` interleaved calls (prefill,
vision tower included, plus decode loop; compilation excluded), tokens/s and the ratio
transformers/ours (> 1: we are faster) beside the machine's load, and the peak RSS growth of one call
on each side, each side alone in a fresh process (see `benchlib`). transformers runs its default
attention (SDPA). A benchmark, not a test: nothing is asserted about time. Run:

  python scripts/bench_greedy_vs_transformers.py                  # B 8, 64 new tokens
  python scripts/bench_greedy_vs_transformers.py --batch 2 --new-tokens 8 --repeats 2 --no-memory
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import benchlib
import jax
import jax.numpy as jnp
import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=593, help="longest prompt (tokens, 576 of them image)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-side peak memory runs")
    benchlib.add_thread_option(parser)
    return parser.parse_args()


def inputs(args: argparse.Namespace):
    lengths = [args.prompt - (b * 3) % 9 for b in range(args.batch)]  # different lengths: left padding
    input_ids, mask, _, pixels = benchlib.image_prompts(args.batch, lengths, seed=args.seed)
    return input_ids, mask, pixels


def make_side(directory: str, side: str, args: argparse.Namespace):
    """The zero-argument greedy decode of `side` ("ours" or "transformers"), warmed up (compiled)."""
    benchlib.use_threads(args)
    input_ids, mask, pixels = inputs(args)
    pad = benchlib.SMALL_LLAVA["pad_token_id"]
    if side == "ours":
        from mmpo_jax.generation import generate
        from mmpo_jax.models.convert import load_hf_llava

        model, _ = load_hf_llava(directory)
        ids, attention, images = jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask), jnp.asarray(pixels)

        def run():
            output = generate(model, ids, images, attention_mask=attention, max_new_tokens=args.new_tokens,
                              eos_token_id=None, pad_token_id=pad)
            return np.asarray(jax.block_until_ready(output.new_tokens))
    else:
        import torch

        torch_model = benchlib.load_small_llava(directory)
        ids, attention = torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))
        images = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

        def run():
            with torch.no_grad():
                output = torch_model.generate(input_ids=ids, attention_mask=attention, pixel_values=images,
                                              do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=None,
                                              pad_token_id=pad)
            return output[:, ids.shape[1]:].numpy()
    run()
    return run


def main() -> None:
    args = parse_args()
    benchlib.use_threads(args)
    with tempfile.TemporaryDirectory() as directory:
        benchlib.save_small_llava(directory, seed=args.seed)
        sides = {side: make_side(directory, side, args) for side in ("ours", "transformers")}
        tokens = {side: run() for side, run in sides.items()}
        same = np.array_equal(tokens["ours"], tokens["transformers"])
        print(f"greedy decoding, batch {args.batch}, prompt <= {args.prompt} tokens, {args.new_tokens} new tokens; "
              f"jax {jax.__version__} on {jax.default_backend()}; {benchlib.load()}")
        print(f"new tokens identical on both sides: {same}"
              + ("" if same else f" ({np.mean(tokens['ours'] == tokens['transformers']):.3f} of them)"))
        times, loads = benchlib.interleaved(sides, args.repeats)
        benchlib.report(times, loads, baseline="transformers", work=args.batch * args.new_tokens, work_unit="tokens")
        if not args.no_memory:
            for side in sides:
                growth = benchlib.peak_rss_growth(functools.partial(make_side, directory, side, args))
                print(f"  peak RSS growth of one call, {side:12s}: {growth:8.0f} MiB")


if __name__ == "__main__":
    main()
