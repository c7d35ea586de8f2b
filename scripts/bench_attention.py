"""Benchmark: the attention implementations of `models.attention` on this platform, forward and forward + backward.

Causal self-attention of left-padded rows (B 4, T 700, 8 heads of 64 = d 512 by default, float32; the
shapes of a Cat-PO scoring batch on the issue's small LLaVA), keys and values in the KV cache's
`[B, K, S, D]` layout, through `attention.attend(impl=...)` exactly as a decoder layer calls it:

  einsum   logits, float32 softmax, probs @ V written out
  chunked  the same over blocks of `ATTENTION_CHUNK` queries, each reading keys up to its block's end
  xla      `jax.nn.dot_product_attention(implementation="xla")`
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bfloat16 / float16 only)

plus, for scale, torch's `scaled_dot_product_attention` with the same boolean mask (forward only). Every
implementation is checked against the einsum form on the real (non-pad) queries first. Prints medians of
`--repeats` interleaved calls, the ratio to `xla`, the machine's load, and XLA's compiled temporary memory
of each. `LlamaConfig.attention_impl="auto"` picks per platform from such measurements (see the docstring
of `models/attention.py`). A benchmark, not a test. Run:

  python scripts/bench_attention.py
  python scripts/bench_attention.py --dtype bfloat16      # on a GPU: adds cudnn
"""

from __future__ import annotations

import argparse

import benchlib
import jax
import jax.numpy as jnp
import numpy as np

from mmpo_jax.models import attention


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=700)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    b, t = args.batch, args.tokens
    dtype = jnp.dtype(args.dtype)
    query = jnp.asarray(rng.normal(size=(b, t, args.heads, args.head_dim)), dtype)
    key = jnp.asarray(rng.normal(size=(b, args.kv_heads, t, args.head_dim)), dtype)
    value = jnp.asarray(rng.normal(size=(b, args.kv_heads, t, args.head_dim)), dtype)
    starts = np.linspace(0, t // 6, b).astype(int)
    valid = np.arange(t)[None] >= starts[:, None]
    allowed = jnp.asarray(valid[:, None, :] & np.tril(np.ones((t, t), bool))[None])
    weights = jnp.asarray(rng.normal(size=query.shape), dtype)
    impls = ["einsum", "chunked", "xla"]
    if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        impls.append("cudnn")

    def forward(impl):
        return jax.jit(lambda q, k, v, m: attention.attend(q, k, v, m, impl=impl, causal_self=True)[0])

    def backward(impl):
        def loss(q, k, v, m):
            output = attention.attend(q, k, v, m, impl=impl, causal_self=True)[0]
            return jnp.sum(output.astype(jnp.float32) * weights)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    print(f"attention B {b}, T {t}, {args.heads} heads ({args.kv_heads} kv) of {args.head_dim}, {args.dtype}, "
          f"causal + left padding; jax {jax.__version__} on {jax.default_backend()}; {benchlib.load()}; "
          f"'auto' here = {attention.resolve_attention_impl('auto', dtype)}")
    args_ = (query, key, value, allowed)
    reference = np.asarray(forward("einsum")(*args_), np.float32)[valid]
    for kind, build in (("forward", forward), ("forward + backward", backward)):
        functions = {impl: build(impl) for impl in impls}
        for impl, fn in functions.items():
            out = jax.block_until_ready(fn(*args_))
            if kind == "forward":
                error = np.max(np.abs(np.asarray(out, np.float32)[valid] - reference))
                print(f"  {impl:8s} max |out - einsum| on real queries: {error:.1e}")
        contenders = {impl: (lambda fn=fn: fn(*args_)) for impl, fn in functions.items()}
        if kind == "forward" and jax.default_backend() == "cpu":
            contenders["torch sdpa (reference)"] = torch_sdpa(query, key, value, allowed)
        print(f"{kind}:")
        times, loads = benchlib.interleaved(contenders, args.repeats, sync=jax.block_until_ready)
        benchlib.report(times, loads, baseline="xla", unit="s")
        for impl, fn in functions.items():
            temp = fn.lower(*args_).compile().memory_analysis().temp_size_in_bytes
            print(f"  {impl:8s} XLA temporaries {temp / 2**20:7.1f} MiB")


def torch_sdpa(query, key, value, allowed):
    import torch

    q = torch.from_numpy(np.asarray(query, np.float32)).transpose(1, 2).contiguous()
    groups = query.shape[2] // key.shape[1]
    k = torch.from_numpy(np.asarray(key, np.float32)).repeat_interleave(groups, 1)
    v = torch.from_numpy(np.asarray(value, np.float32)).repeat_interleave(groups, 1)
    mask = torch.from_numpy(np.asarray(allowed))[:, None]

    def run():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return run


if __name__ == "__main__":
    main()
