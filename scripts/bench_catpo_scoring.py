"""Benchmark: Cat-PO reference scoring, our probed forward vs transformers eager with `output_attentions=True`.

Both sides score the same batch (B 4, T 700 by default: one 336-px image, i.e. 576 placeholders, a short
prompt and a 60-100 token response per row, left-padded; half the rows chosen, half rejected) with the
same random weights of the issue's small but realistic LLaVA (`benchlib.SMALL_LLAVA`, built by
transformers, loaded into ours with `load_hf_llava`; nothing downloaded), and return the same arrays:
the reference's per-token log-probs of the response tokens and Cat-PO's token weights (METHODS.md §3:
band-mean, head-mean text->image attention of the layers `rewards.catpo.layer_band` picks, global /
local / semantic relevance, min-max, tanh mapping).

* ours: one jitted forward with `ProbeSpec(band, "image")` and `output_positions` = the response
  positions padded to a bucket (`logprobs.response_positions` / `position_bucket`): the probes, the final
  norm and the LM head run at those positions only; log-probs by `logprobs.hidden_token_logprobs`,
  weights by `rewards.catpo.token_weights`.
* transformers: `model(..., output_attentions=True)` in eager attention (the only attention that returns
  weights), full logits, `log_softmax`, and the same weight formulas written in torch
  (`benchlib.torch_catpo_token_weights`) -- what a PyTorch Cat-PO implementation does.

RoPE positions are `cumsum(mask) - 1` on both sides (passed to transformers as `position_ids`).
Prints the agreement, the medians of `--repeats` interleaved calls and the ratio ours/transformers of time
(< 1: we are faster) beside the machine's load, and each side's peak RSS growth for one call, each alone
in a fresh process (see `benchlib`). A benchmark, not a test. Run:

  python scripts/bench_catpo_scoring.py
  python scripts/bench_catpo_scoring.py --batch 2 --repeats 2 --no-memory
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import benchlib
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax.models.attention import ProbeSpec
from mmpo_jax.models.llama import positions_from_mask
from mmpo_jax.objectives import logprobs
from mmpo_jax.rewards import catpo

EOS = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="rows (first half chosen, second half rejected)")
    parser.add_argument("--tokens", type=int, default=700)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-side peak memory runs")
    benchlib.add_thread_option(parser)
    return parser.parse_args()


def batch(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Shifted inputs: `inputs`, `labels`, `mask` (response tokens predicted), `attention_mask` [B, T - 1],
    `positions` (RoPE), `pixels` [B, 336, 336, 3], `chosen` [B]."""
    rng = np.random.default_rng(args.seed)
    responses = [int(r) for r in rng.integers(60, 101, args.batch)]
    prompts = [args.tokens - responses[0]] + [int(p) for p in rng.integers(590, 601, args.batch - 1)]
    prompts = [min(p, args.tokens - r) for p, r in zip(prompts, responses)]
    input_ids, mask, response_mask, pixels = benchlib.image_prompts(args.batch, prompts, args.seed, responses)
    input_ids[np.arange(args.batch), -1] = EOS  # each response ends in EOS (Cat-PO's special token)
    attention = mask[:, :-1]
    return dict(inputs=input_ids[:, :-1], labels=input_ids[:, 1:], mask=response_mask[:, 1:],
                attention_mask=attention, positions=np.asarray(positions_from_mask(attention)), pixels=pixels,
                chosen=np.arange(args.batch) < args.batch // 2)


def band(num_layers: int) -> tuple[int, ...]:
    return catpo.layer_band(num_layers)


def ours(model, data: dict[str, np.ndarray]):
    """The jitted scoring function of our side and its arguments."""
    bucket = logprobs.position_bucket(data["mask"])
    positions, valid = logprobs.response_positions(jnp.asarray(data["mask"]), bucket)
    labels = logprobs.gather_positions(jnp.asarray(data["labels"], jnp.int32), positions)
    layers = band(model.config.text_config.num_hidden_layers)
    half = len(data["chosen"]) // 2

    @nnx.jit
    def score(model, inputs, attention_mask, rope, pixels, positions, labels, valid):
        out = model(inputs, pixel_values=pixels, attention_mask=attention_mask, positions=rope,
                    probe=ProbeSpec(layers, "image"), output_positions=positions, return_logits=False)
        logps = logprobs.hidden_token_logprobs(out.last_hidden_state, model.language_model.lm_head_table(), labels,
                                               valid)
        attention = jnp.mean(jnp.stack([out.probes[layer] for layer in layers]), axis=0)  # [B, P, N]
        embeddings = model.language_model.model.embed_tokens(labels)
        weights = jnp.concatenate([
            catpo.token_weights(attention[rows], embeddings[rows], out.visual_tokens[rows], valid[rows],
                                chosen=chosen, special_token_mask=labels[rows] == EOS)
            for rows, chosen in ((slice(None, half), True), (slice(half, None), False))])
        return logps, weights

    arguments = (jnp.asarray(data["inputs"], jnp.int32), jnp.asarray(data["attention_mask"]),
                 jnp.asarray(data["positions"]), jnp.asarray(data["pixels"]), positions, labels, valid)
    return score, arguments, (np.asarray(positions), np.asarray(valid))


def transformers_score(torch_model, data: dict[str, np.ndarray]):
    """The torch side's zero-argument call: `(logps [B, T], weights [B, T])`."""
    import torch

    inputs = torch.from_numpy(data["inputs"])
    attention_mask = torch.from_numpy(data["attention_mask"].astype(np.int64))
    position_ids = torch.from_numpy(data["positions"].astype(np.int64))
    pixels = torch.from_numpy(data["pixels"].transpose(0, 3, 1, 2).copy())
    labels = torch.from_numpy(data["labels"]).long()
    mask = torch.from_numpy(data["mask"])
    chosen = torch.from_numpy(data["chosen"])
    image = (inputs == benchlib.SMALL_LLAVA["image_token_id"])
    image_positions = torch.stack([row.nonzero()[:, 0] for row in image])  # [B, N]
    layers = band(torch_model.config.text_config.num_hidden_layers)

    @torch.no_grad()
    def run():
        out = torch_model(input_ids=inputs, attention_mask=attention_mask, position_ids=position_ids,
                          pixel_values=pixels, output_attentions=True)
        logp = torch.log_softmax(out.logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        logp = torch.where(mask, logp, 0.0)
        heads = torch.stack([out.attentions[layer] for layer in layers]).mean(0).mean(1)  # [B, T, T]
        attention = torch.gather(heads, 2, image_positions[:, None, :].expand(-1, heads.shape[1], -1))
        images = out.image_outputs.pooler_output  # the projected visual tokens, one image per row
        width = images[0].shape[-1]
        visual = torch.cat([t.reshape(-1, width) for t in images]).reshape(inputs.shape[0], -1, width)
        embeddings = torch_model.get_input_embeddings()(labels)
        weights = benchlib.torch_catpo_token_weights(attention, embeddings, visual, mask, labels == EOS, chosen)
        return logp, weights

    return run


def make_side(directory: str, side: str, args: argparse.Namespace):
    """The zero-argument scoring call of `side` ("ours" or "transformers"), warmed up; returns numpy
    `(logps [B, T], weights [B, T])`."""
    benchlib.use_threads(args)
    data = batch(args)
    if side == "ours":
        from mmpo_jax.models.convert import load_hf_llava

        model, _ = load_hf_llava(directory)
        score, arguments, (positions, valid) = ours(model, data)
        length = data["mask"].shape[1]

        def run():
            logps, weights = jax.block_until_ready(score(model, *arguments))
            return tuple(np.asarray(logprobs.scatter_positions(x, positions, valid, length)) for x in (logps, weights))
    else:
        torch_model = benchlib.load_small_llava(directory, attn_implementation="eager")
        call = transformers_score(torch_model, data)

        def run():
            return tuple(x.numpy() for x in call())
    run()
    return run


def main() -> None:
    args = parse_args()
    benchlib.use_threads(args)
    with tempfile.TemporaryDirectory() as directory:
        benchlib.save_small_llava(directory, seed=args.seed, attn_implementation="eager")
        if not args.no_memory:
            for side in ("ours", "transformers"):
                growth = benchlib.peak_rss_growth(functools.partial(make_side, directory, side, args))
                print(f"peak RSS growth of one call, {side:12s}: {growth:8.0f} MiB")
        sides = {side: make_side(directory, side, args) for side in ("ours", "transformers")}
        results = {side: run() for side, run in sides.items()}
        print(f"Cat-PO scoring, batch {args.batch}, {args.tokens} tokens, band layers {band(8)}; "
              f"jax {jax.__version__} on {jax.default_backend()}; {benchlib.load()}")
        for index, name in enumerate(("ref token log-probs", "token weights")):
            mine, theirs = results["ours"][index], results["transformers"][index]
            error = np.max(np.abs(mine - theirs)) / np.max(np.abs(theirs))
            print(f"agreement {name:20s}: max|ours - transformers| / max|transformers| = {error:.2e}")
        # Scoring the timed calls without the host-side scatter of our outputs back to [B, T].
        data = batch(args)
        from mmpo_jax.models.convert import load_hf_llava

        model, _ = load_hf_llava(directory)
        score, arguments, _ = ours(model, data)
        jax.block_until_ready(score(model, *arguments))
        contenders = {"ours": lambda: score(model, *arguments), "transformers": sides["transformers"]}
        times, loads = benchlib.interleaved(contenders, args.repeats, sync=jax.block_until_ready)
        medians = benchlib.report(times, loads, baseline="transformers")
        print(f"  time ours/transformers = {medians['ours'] / medians['transformers']:.2f}")


if __name__ == "__main__":
    main()
