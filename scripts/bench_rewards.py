"""Benchmark: Cat-PO token rewards + token-weighted DPO + token KL, jitted JAX vs PyTorch eager.

Both sides compute, on the same inputs, in the same process (float32):
  band-mean of the probed layers' head-mean text->image attention -> Cat-PO token weights
  (global / local / semantic relevance, min-max, fusion, tanh mapping) for the chosen and the
  rejected responses; per-token log-probs of the labels under policy and reference logits;
  full-vocabulary token KL(policy || reference); the Cat-PO loss (weighted DPO + lambda_kl * KL).
The batch holds B sequences: the first half chosen responses, the second half the rejected
responses of the same pairs (as a concatenated chosen||rejected forward produces them).

What it measures: the loss computation downstream of the models, from given [B, T, V] logits. Both
sides are bound by passes over the two logits tensors (717 MB each at the default shapes): PyTorch
makes ~10 full-size passes and allocates ~3.5 GB; ours computes the two log-softmaxes, the label
log-probs and the KL in one chunked pass per chunk of positions (`logprobs.token_logprobs_and_kl`).
[It came out 0.77-0.88x before because the JAX side called `token_logprobs` twice and `token_kl`
once: three chunk loops, the policy and reference log-softmax each computed twice, which XLA does not
merge across loops. At 1.09x it was bound by memory traffic: 128-position chunks of [8, 128, 32000]
float32 intermediates (131 MB each) left the cache; the library's default chunk on CPU now holds
2 MiB of logits (`logprobs.AUTO`).] In training the logits are not materialised at all any more (the LM head runs on
gathered response positions, `logprobs.hidden_token_logprobs_and_kl`); this script keeps the
logits-level comparison of the formulas.

Prints the agreement (max |jax - torch| / max |torch| per output), the medians of `--repeats`
interleaved calls with the ratio torch/jax (> 1: JAX faster) beside the machine's load, and each
side's peak RSS growth for one call, each alone in a fresh process (see `benchlib`). A benchmark,
not a test: nothing is asserted about time. Run:
  python scripts/bench_rewards.py            # LLaVA-1.5-7B shapes (B=8, T=700, 576 image tokens,
                                             # 4 probed layers, V=32000, D=4096)
  python scripts/bench_rewards.py --small    # a quick run at tiny shapes
PyTorch is used here as a reference only; the package never imports it.
"""

from __future__ import annotations

import argparse
import functools
import math
from typing import Callable

import benchlib
import jax
import jax.numpy as jnp
import numpy as np
import torch

from mmpo_jax.objectives import registry, terms
from mmpo_jax.objectives.logprobs import AUTO, token_logprobs_and_kl
from mmpo_jax.objectives.terms import CHOSEN, POLICY, REFERENCE, REJECTED
from mmpo_jax.rewards.catpo import token_weights

EPS = 1e-8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences (half chosen, half rejected)")
    parser.add_argument("--tokens", type=int, default=700, help="scored positions per sequence")
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--layers", type=int, default=4, help="probed layers averaged (the band)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=4096, help="LLM embedding dimension")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-side peak memory runs")
    benchlib.add_thread_option(parser)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="log-softmax chunk (positions); default: the library's (`logprobs.AUTO`)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lambda-kl", type=float, default=0.03)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--lambda-ref", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch-threads", type=int, default=None,
        help="torch intra-op threads (default: torch's own); XLA uses every core",
    )
    parser.add_argument("--small", action="store_true", help="B=4, T=64, 16 image tokens, V=512, D=64")
    args = parser.parse_args()
    if args.small:
        args.batch, args.tokens, args.image_tokens, args.vocab, args.dim = 4, 64, 16, 512, 64
    if args.batch % 2:
        parser.error(f"--batch={args.batch} must be even (chosen and rejected halves)")
    return args


def make_inputs(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Random inputs with the real structure (attention = image slice of a softmax, masks, EOS)."""
    rng = np.random.default_rng(args.seed)
    b, t, n = args.batch, args.tokens, args.image_tokens
    scores = rng.standard_normal((args.layers, b, t, n), dtype=np.float32) * 2.0
    image = np.exp(scores)
    text_mass = np.exp(rng.standard_normal((args.layers, b, t, 1), dtype=np.float32)) * n
    attention = image / (image.sum(-1, keepdims=True) + text_mass)
    starts = rng.integers(0, t // 4, size=b)
    lengths = rng.integers(t // 2, t - t // 4 + 1, size=b)
    positions = np.arange(t)[None]
    mask = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
    special = positions == (starts + lengths - 1)[:, None]  # EOS
    policy = rng.standard_normal((b, t, args.vocab), dtype=np.float32) * 2.0
    ref = policy + rng.standard_normal((b, t, args.vocab), dtype=np.float32) * 0.1
    return {
        "attention_layers": attention.astype(np.float32),
        "token_embeddings": rng.standard_normal((b, t, args.dim), dtype=np.float32),
        "visual_tokens": rng.standard_normal((b, n, args.dim), dtype=np.float32),
        "labels": rng.integers(0, args.vocab, size=(b, t)).astype(np.int32),
        "mask": mask,
        "special": special & mask,
        "policy_logits": policy,
        "ref_logits": ref,
    }


def jax_pipeline(args: argparse.Namespace) -> Callable[..., dict[str, jax.Array]]:
    half = args.batch // 2

    @jax.jit
    def run(attention_layers, token_embeddings, visual_tokens, labels, mask, special,
            policy_logits, ref_logits):
        attention = jnp.mean(attention_layers, axis=0)  # band mean of head-mean maps
        weights = jnp.concatenate(
            [
                token_weights(
                    attention[part], token_embeddings[part], visual_tokens[part], mask[part],
                    chosen=chosen, alpha=args.alpha, lambda_ref=args.lambda_ref,
                    special_token_mask=special[part],
                )
                for part, chosen in ((slice(None, half), True), (slice(half, None), False))
            ]
        )
        policy_logps, ref_logps, kl = token_logprobs_and_kl(policy_logits, ref_logits, labels, mask,
                                                            chunk_size=args.chunk_size or AUTO)
        scored = {}
        for response, part in ((CHOSEN, slice(None, half)), (REJECTED, slice(half, None))):
            scored.update({terms.token_logps(POLICY, response): policy_logps[part],
                           terms.token_logps(REFERENCE, response): ref_logps[part],
                           terms.token_weights(response): weights[part],
                           terms.mask(response): mask[part], terms.token_kl(response): kl[part]})
        method = {"name": "catpo", "beta": args.beta,
                  "terms": {"dpo": 1.0, "token_kl": args.lambda_kl}}
        losses, _ = registry.compute_objective(method, scored)
        return {"weights": weights, "policy_logps": policy_logps, "token_kl": kl, "losses": losses}

    return run


def torch_pipeline(args: argparse.Namespace) -> Callable[..., dict[str, torch.Tensor]]:
    """The same formulas written directly in PyTorch eager, full-size tensors, no chunking."""
    half = args.batch // 2
    is_chosen = torch.arange(args.batch) < half

    @torch.no_grad()
    def run(attention_layers, token_embeddings, visual_tokens, labels, mask, special,
            policy_logits, ref_logits):
        weights = benchlib.torch_catpo_token_weights(
            attention_layers.mean(0), token_embeddings, visual_tokens, mask, special, is_chosen,
            alpha=args.alpha, lambda_ref=args.lambda_ref, eps=EPS)

        policy_logp_all = torch.log_softmax(policy_logits, -1)
        ref_logp_all = torch.log_softmax(ref_logits, -1)
        index = labels.long().unsqueeze(-1)
        policy_logps = torch.where(mask, policy_logp_all.gather(-1, index).squeeze(-1), 0.0)
        ref_logps = torch.where(mask, ref_logp_all.gather(-1, index).squeeze(-1), 0.0)
        kl = (policy_logp_all.exp() * (policy_logp_all - ref_logp_all)).sum(-1)
        kl = torch.where(mask, kl, 0.0)

        weighted_policy = (weights * policy_logps).sum(-1)
        weighted_ref = (weights * ref_logps).sum(-1)
        h = weighted_policy - weighted_ref
        z = args.beta * (h[:half] - h[half:])
        weighted_kl = (weights * kl).sum(-1)
        losses = torch.nn.functional.softplus(-z) + args.lambda_kl * (
            weighted_kl[:half] + weighted_kl[half:]
        )
        return {"weights": weights, "policy_logps": policy_logps, "token_kl": kl, "losses": losses}

    return run


def make_side(side: str, args: argparse.Namespace) -> Callable[[], dict]:
    """The zero-argument call of ``side`` ("jax" or "torch") on fresh inputs, warmed up (compiled)."""
    benchlib.use_threads(args)
    inputs = make_inputs(args)
    if side == "jax":
        arrays, run = [jnp.asarray(inputs[k]) for k in inputs], jax_pipeline(args)
        call = lambda: jax.block_until_ready(run(*arrays))  # noqa: E731
    else:
        arrays, run = [torch.from_numpy(inputs[k]) for k in inputs], torch_pipeline(args)
        call = lambda: run(*arrays)  # noqa: E731
    del inputs
    call()
    return call


def main() -> None:
    args = parse_args()
    benchlib.use_threads(args)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    print(
        f"shapes: batch={args.batch} tokens={args.tokens} image_tokens={args.image_tokens} "
        f"layers={args.layers} vocab={args.vocab} dim={args.dim}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    if not args.no_memory:  # first, before this process holds its own copies of the inputs
        for side in ("jax", "torch"):
            growth = benchlib.peak_rss_growth(functools.partial(make_side, side, args))
            print(f"peak RSS growth of one call, {side:5s}: {growth:8.0f} MiB")
    inputs = make_inputs(args)
    names = list(inputs)
    jax_inputs = [jnp.asarray(inputs[k]) for k in names]
    torch_inputs = [torch.from_numpy(inputs[k]) for k in names]

    jax_run = jax_pipeline(args)
    jax_out = jax.block_until_ready(jax_run(*jax_inputs))
    torch_run = torch_pipeline(args)
    torch_out = torch_run(*torch_inputs)

    for key in jax_out:
        reference = torch_out[key].numpy().astype(np.float64)
        error = np.max(np.abs(np.asarray(jax_out[key], np.float64) - reference))
        print(f"agreement {key:13s}: max|jax-torch| / max|torch| = {error / np.max(np.abs(reference)):.2e}")

    # float32 KL of nearly equal distributions is ill-conditioned: which side is closer to float64?
    row = slice(0, 1)
    log_p = torch.log_softmax(torch_inputs[names.index("policy_logits")][row].double(), -1)
    log_q = torch.log_softmax(torch_inputs[names.index("ref_logits")][row].double(), -1)
    exact = torch.where(torch_inputs[names.index("mask")][row], (log_p.exp() * (log_p - log_q)).sum(-1), 0.0)
    exact = exact.numpy()
    for name, value in (("jax", np.asarray(jax_out["token_kl"][row])), ("torch", torch_out["token_kl"][row].numpy())):
        error = np.max(np.abs(value - exact)) / np.max(np.abs(exact))
        print(f"token_kl of sequence 0 vs float64: {name:5s} max rel error {error:.2e}")
    del log_p, log_q, jax_out, torch_out

    contenders = {"jax (jit)": lambda: jax_run(*jax_inputs), "torch (eager)": lambda: torch_run(*torch_inputs)}
    times, loads = benchlib.interleaved(contenders, args.repeats, sync=jax.block_until_ready)
    benchlib.report(times, loads, baseline="torch (eager)", work=args.batch * args.tokens, work_unit="tokens")


if __name__ == "__main__":
    main()
