"""Shared timing helpers of the side-by-side benchmarks in ``scripts/`` (imported as ``benchlib``;
``python scripts/bench_*.py`` puts this folder on ``sys.path``).

The machine these run on is shared, so a ratio is only meaningful next to the load it was measured
under: ``interleaved`` runs the contenders round-robin (drifting load touches all alike) and records
``os.getloadavg()`` at every round; ``report`` prints medians, the ratio of each contender to the
baseline and the load range.

Peak memory [our choice]: ``peak_rss_growth`` runs one side in a fresh ``spawn``ed process and reports
its peak resident set size during the measured calls minus the RSS it had after its setup (imports,
model build, inputs, warm-up), the peak being reset after the setup (Linux ``/proc/self/clear_refs``).
Each side is measured alone, with no allocator state left by the other, and JAX's XLA buffers
(invisible to ``tracemalloc``) count exactly like torch's allocations.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def add_thread_option(parser) -> None:
    """``--single-thread``: both sides on one thread (see ``use_threads``)."""
    parser.add_argument(
        "--single-thread", action="store_true",
        help="run XLA and torch on one thread each: on an oversubscribed machine torch's spinning OpenMP "
             "pool stalls and the default (all cores) ratio mostly measures that",
    )


def use_threads(args) -> None:
    """Applies ``--single-thread`` (call before JAX first runs anything; spawned children inherit the XLA
    flags, and each side's setup calls this again for torch)."""
    if not getattr(args, "single_thread", False):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if SINGLE_THREAD_XLA_FLAGS not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_XLA_FLAGS}".strip()
    import torch

    torch.set_num_threads(1)


def load() -> str:
    """The 1/5/15-minute load averages and the core count, e.g. ``"load 2.1/1.9/1.5 on 2 cores"``."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores"


CPU_TIMES: dict[str, list[float]] = {}
"""Process CPU seconds (all threads) of the calls of the last ``interleaved`` run, by contender."""


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int,
                sync: Callable[[Any], Any] = lambda out: out) -> tuple[dict[str, list[float]], list[float]]:
    """Wall seconds of ``repeats`` round-robin calls of each contender, and the 1-minute load per round.

    Each call's result goes through ``sync`` (e.g. ``jax.block_until_ready``) inside the timing.
    The caller warms every contender up (compiles) before. The calls' process CPU seconds go to
    ``CPU_TIMES`` (``report`` prints them: on an oversubscribed machine they vary less than wall time,
    though a spinning thread pool, as torch's OpenMP one, counts its spinning).
    """
    times = {name: [] for name in contenders}
    CPU_TIMES.clear()
    CPU_TIMES.update({name: [] for name in contenders})
    loads = []
    for _ in range(repeats):
        for name, fn in contenders.items():
            start, cpu = time.perf_counter(), time.process_time()
            sync(fn())
            times[name].append(time.perf_counter() - start)
            CPU_TIMES[name].append(time.process_time() - cpu)
        loads.append(os.getloadavg()[0])
    return times, loads


def report(times: dict[str, list[float]], loads: list[float], baseline: str, *, unit: str = "s",
           work: float | None = None, work_unit: str = "") -> dict[str, float]:
    """Prints a median (min..max) per contender and ``baseline / contender`` ratios (> 1: faster than
    the baseline), with the load range; ``work`` per call adds a throughput column. Returns medians."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        rate = f"  {work / medians[name]:10.1f} {work_unit}/s" if work else ""
        ratio = medians[baseline] / medians[name]
        cpu = f"  cpu {statistics.median(CPU_TIMES[name]):8.3f} s" if CPU_TIMES.get(name) else ""
        print(f"  {name:28s} median {medians[name]:8.3f} {unit} (min {min(values):.3f}, max {max(values):.3f})"
              f"{rate}  {baseline}/this = {ratio:5.2f}x{cpu}")
    print(f"  1-min load over the rounds: {min(loads):.1f}..{max(loads):.1f}; now {load()}")
    return medians


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(setup: Callable[[], Callable[[], Any]], repeats: int, queue) -> None:
    run = setup()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    start = _status_kib("VmRSS")
    for _ in range(repeats):
        run()
    queue.put(_status_kib("VmHWM") - start)


def peak_rss_growth(setup: Callable[[], Callable[[], Any]], repeats: int = 1) -> float:
    """MiB by which a fresh process's peak RSS grows over ``repeats`` calls of ``setup()``'s function.

    ``setup`` must be picklable (a module-level function or a ``functools.partial`` of one): it runs
    in a ``spawn``ed process, builds everything (model, inputs) and returns the zero-argument call to
    measure, already compiled / warmed up. The peak (``VmHWM``) is reset after the setup, so
    compilation and the inputs themselves are not counted; what remains is what the call allocates
    at its peak (activations, logits, temporaries, outputs).
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(setup, repeats, queue))
    process.start()
    growth = queue.get()
    process.join()
    return growth / 1024


# --- the "small but realistic" random LLaVA, built locally ------------------------------

SMALL_LLAVA = dict(
    vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                image_size=336, patch_size=14, projection_dim=256),
    text=dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5),
    image_token_id=32000,
    pad_token_id=32001,
)
"""CLIP vision 336 px / patch 14 (576 image tokens), 2 layers of width 256; a Llama decoder of 8 layers of
width 512 (8 heads of 64, MLP 1376); LLaVA-1.5's vocabulary of 32,064 with the placeholder at 32,000."""


def save_small_llava(directory, *, seed: int = 0, attn_implementation: str = "sdpa"):
    """Builds the random `SMALL_LLAVA` as transformers' `LlavaForConditionalGeneration` (its own initialisers,
    `torch.manual_seed(seed)`), saves it with `save_pretrained` to `directory` and returns it (eval mode).

    Nothing is downloaded; `mmpo_jax.models.convert.load_hf_llava(directory)` loads the same weights into ours.
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**SMALL_LLAVA["vision"]).to_dict(),
        text_config=LlamaConfig(**SMALL_LLAVA["text"], pad_token_id=SMALL_LLAVA["pad_token_id"]).to_dict(),
        image_token_index=SMALL_LLAVA["image_token_id"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=SMALL_LLAVA["pad_token_id"],
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = None  # decode exactly max_new_tokens on both sides
    model.generation_config.pad_token_id = SMALL_LLAVA["pad_token_id"]
    model.set_attn_implementation(attn_implementation)
    model.eval()
    model.save_pretrained(directory)
    return model


def load_small_llava(directory, attn_implementation: str = "sdpa"):
    """The transformers model saved by `save_small_llava`, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation=attn_implementation)
    model.generation_config.eos_token_id = None
    return model.eval()


def image_prompts(batch: int, prompt_lengths: list[int], seed: int = 0, response_lengths: list[int] | None = None):
    """Left-padded rows `[BOS, text..., 576 placeholders, text..., response...]`: `(input_ids [B, T], mask [B, T],
    response_mask [B, T], pixels [B, 336, 336, 3])` as numpy (pixels channels-last; transpose for torch).

    `prompt_lengths[b]` counts the prompt's tokens with its placeholders; `response_lengths` (default none)
    appends that many random response tokens. Random ids avoid the placeholder, pad and id 0.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    image = SMALL_LLAVA["image_token_id"]
    num_image = (SMALL_LLAVA["vision"]["image_size"] // SMALL_LLAVA["vision"]["patch_size"]) ** 2
    response_lengths = response_lengths or [0] * batch
    rows, responses = [], []
    for prompt_length, response_length in zip(prompt_lengths, response_lengths):
        text = prompt_length - num_image - 1
        before = text // 3
        words = rng.integers(3, image, size=text + response_length)
        rows.append([1, *words[:before], *[image] * num_image, *words[before:]])
        responses.append(response_length)
    length = max(len(row) for row in rows)
    input_ids = np.full((batch, length), SMALL_LLAVA["pad_token_id"], np.int64)
    mask = np.zeros((batch, length), bool)
    response_mask = np.zeros((batch, length), bool)
    for b, (row, response) in enumerate(zip(rows, responses)):
        input_ids[b, length - len(row):] = row
        mask[b, length - len(row):] = True
        if response:
            response_mask[b, length - response:] = True
    size = SMALL_LLAVA["vision"]["image_size"]
    pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    return input_ids, mask, response_mask, pixels


# --- the PyTorch side of the Cat-PO comparisons ------------------------------------------------


def torch_catpo_token_weights(attention, token_embeddings, visual_tokens, mask, special, is_chosen, *,
                              alpha: float = 0.5, lambda_ref: float = 0.5, eps: float = 1e-8):
    """Cat-PO token weights (METHODS.md §3, min-max normalised) written directly in PyTorch eager.

    attention [B, T, N] (band- and head-mean text->image attention), token_embeddings [B, T, D],
    visual_tokens [B, N, D], mask / special [B, T] bool, is_chosen [B] bool -> [B, T] float32.
    """
    import math

    import torch

    def minmax(signal, valid):
        low = torch.where(valid, signal, torch.inf).amin(-1, keepdim=True)
        high = torch.where(valid, signal, -torch.inf).amax(-1, keepdim=True)
        constant = ~((high - low) > eps)
        scaled = (signal - torch.where(constant, 0.0, low)) / torch.where(constant, 1.0, high - low)
        return torch.where(valid, torch.where(constant, 0.5, scaled), 0.0)

    s_global = attention.sum(-1)
    p = attention / (attention.sum(-1, keepdim=True) + eps)
    s_local = 1 - (-(p * torch.log(p + eps)).sum(-1)) / math.log(attention.shape[-1])
    v_c = torch.einsum("btn,bnd->btd", p, visual_tokens)
    cos = (token_embeddings * v_c).sum(-1) / torch.clamp(token_embeddings.norm(dim=-1) * v_c.norm(dim=-1), min=eps)
    s_semantic = (1 + cos) / 2
    scored = mask & ~special
    s_global, s_local, s_semantic = (minmax(x, scored) for x in (s_global, s_local, s_semantic))
    fused = alpha * (0.5 * s_global + 0.5 * s_local) + (1 - alpha) * s_semantic
    relevance = torch.tanh(fused)
    weights = lambda_ref + torch.where(is_chosen[:, None], relevance, 1 - relevance)
    return torch.where(mask, torch.where(special, 1.0, weights), 0.0)
