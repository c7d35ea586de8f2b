"""The evaluation runner: generate captions and yes/no answers with a model, score them.

`evaluate_model` decodes every caption prompt and every POPE question with `generation.generate`
(greedy once, `num_samples` sampled passes, or greedy once under ADAPT's attention-supervised
inference: `adapt_steer` / `adapt_blend` / `adapt_mask`, METHODS.md §4 defaults), computes CHAIR
(+ the shapes world's partner rate) and POPE per pass, and reports the mean and the spread
(`<name>_std`, population standard deviation over passes) of each metric. On the shapes world it
also measures, under teacher forcing, the model's probability of continuing the object list where
the biased captions do (`shapes.continuation_probability`, with the first caption record's prompt,
the shapes world's only one), which does not depend on decoding.

Records are dicts as `mmpo_jax.data.sources.load_split` returns them:
- caption records: "image" (uint8 [H, W, 3]), "prompt", "objects" — the shapes world's JSON list of
  {shape, color, bbox}, or for task "coco" a JSON list of COCO category names present;
- POPE records: "image", "question", "answer" ("yes"/"no"), "category" (random/popular/adversarial),
  as the shapes world's `test_pope` split or `pope.pope_records` give them.

Batches are padded to `batch_size` rows and prompt lengths to a multiple of 8
(`generation.prompts`), so `generate` and the scorer compile once per length bucket.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import PreTrainedTokenizerBase

from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.data.template import decode_response
from mmpo_jax.data.tokenizer import pad_token_id
from mmpo_jax.evaluation.chair import ChairCounts, caption_chair_counts, chair_counts, coco_mentions
from mmpo_jax.evaluation.coco_synonyms import COCO_SYNONYMS
from mmpo_jax.evaluation.pope import pope_counts, pope_metrics
from mmpo_jax.evaluation.shapes import (
    ScoreFn,
    continuation_probability,
    object_chair_counts,
    objects_from_json,
    partner_hallucination_rate,
    shapes_chair_metrics,
)
from mmpo_jax.generation import AdaptDecoding, DecodeController, generate
from mmpo_jax.generation.prompts import left_pad, pad_rows, prompt_ids
from mmpo_jax.models.llava import Llava
from mmpo_jax.objectives.logprobs import token_logprobs

ADAPT_DECODINGS = {"adapt_steer": "steer", "adapt_blend": "blend", "adapt_mask": "mask"}
"""Decoding name -> ADAPT mode (greedy decoding with `generation.adapt.AdaptDecoding(mode)`)."""
DECODINGS = ("greedy", "sample", *ADAPT_DECODINGS)
TASKS = ("shapes_world", "coco")

Record = Mapping[str, Any]


def _batches(count: int, batch_size: int) -> list[tuple[list[int], int]]:
    """[(row indices padded to `batch_size` by repeating the last, number of real rows)]."""
    out = []
    for start in range(0, count, batch_size):
        rows = list(range(start, min(start + batch_size, count)))
        out.append((rows + [rows[-1]] * (batch_size - len(rows)), len(rows)))
    return out


def generate_texts(model: Llava, tokenizer: PreTrainedTokenizerBase, images: Sequence[np.ndarray],
                   prompts: Sequence[str], *, image_config: ImageProcessorConfig, num_image_tokens: int,
                   batch_size: int, max_new_tokens: int, temperature: float = 0.0,
                   rng: jax.Array | None = None, controller: DecodeController | None = None,
                   prompt_length: int = 0) -> list[str]:
    """Generates one reply per (image, prompt) with the LLaVA-1.5 template.

    Every batch is left-padded to the longest prompt of the call (at least ``prompt_length``), so
    the decode loop compiles once per call however the prompts' lengths vary; callers with several
    prompt sets pass their longest prompt as ``prompt_length`` to share one compilation.

    Args:
      model: the `Llava` to decode with.
      tokenizer: its tokenizer (BOS, EOS and an `<image>` token).
      images: uint8 `[H, W, 3]` per prompt.
      prompts: the user's request per image, without template.
      image_config: how images become pixel values.
      num_image_tokens: placeholders per image (`model.config.num_image_tokens`).
      batch_size: rows per `generate` call.
      max_new_tokens: decode steps at most.
      temperature: 0 greedy; > 0 samples (needs `rng`; batch b uses `fold_in(rng, b)`).
      rng: PRNG key for sampling.
      controller: a decode controller for every `generate` call (e.g. `AdaptDecoding`), or None.
      prompt_length: pad the templated prompt ids to at least this many tokens.

    Returns:
      the decoded replies (cut at EOS, special tokens dropped), in input order.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image")
    ids = prompt_ids(tokenizer, prompts, num_image_tokens=num_image_tokens)
    pad_id = pad_token_id(tokenizer)
    length = max([prompt_length, *map(len, ids)])
    texts: list[str] = []
    for number, (rows, real) in enumerate(_batches(len(prompts), batch_size)):
        input_ids, mask = left_pad([ids[i] for i in rows], pad_id, min_length=length)
        pixels = np.stack([image_config(images[i]) for i in rows])
        output = generate(model, input_ids, pixels, attention_mask=mask, max_new_tokens=max_new_tokens,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, temperature=temperature,
                          rng=None if rng is None else jax.random.fold_in(rng, number), controller=controller)
        texts.extend(decode_response(tokenizer, row) for row in np.asarray(output.new_tokens)[:real])
    return texts


def longest_prompt(tokenizer: PreTrainedTokenizerBase, prompt_sets: Sequence[Sequence[str]], *,
                   num_image_tokens: int) -> int:
    """The most templated prompt ids of any prompt in ``prompt_sets``: ``generate_texts``'
    ``prompt_length`` for prompt sets that share one decode compilation."""
    return max([0, *(len(ids) for prompts in prompt_sets
                     for ids in prompt_ids(tokenizer, prompts, num_image_tokens=num_image_tokens))])


@nnx.jit
def _next_token_logps(model: Llava, input_ids: jax.Array, attention_mask: jax.Array,
                      pixel_values: jax.Array) -> jax.Array:
    """`[B, L]` right-padded sequences -> `[B, L - 1]` log-prob of token t + 1 after tokens <= t."""
    logits = model(input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], attention_mask[:, 1:])


def model_scorer(model: Llava, image_config: ImageProcessorConfig, *, pad_id: int,
                 batch_size: int) -> ScoreFn:
    """A `shapes.ScoreFn` computed by one teacher-forced forward of `model` per batch.

    Each prompt + continuation is one right-padded row; the log-probability of continuation token j
    is read at the position that predicts it.
    """

    def score(images: Sequence[np.ndarray], prompt_ids: Sequence[np.ndarray],
              continuation_ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        sequences = [np.concatenate([p, c]).astype(np.int32) for p, c in zip(prompt_ids, continuation_ids)]
        logps: list[np.ndarray] = []
        for rows, real in _batches(len(sequences), batch_size):
            input_ids, mask = pad_rows([sequences[i] for i in rows], pad_id, side="right")
            pixels = jnp.asarray(np.stack([image_config(images[i]) for i in rows]))
            batch_logps = np.asarray(_next_token_logps(model, jnp.asarray(input_ids), jnp.asarray(mask), pixels))
            for slot, i in enumerate(rows[:real]):
                start = len(prompt_ids[i]) - 1  # the position whose next token is the first continuation token
                logps.append(batch_logps[slot, start:start + len(continuation_ids[i])])
        return logps

    return score


def _coco_truth(objects_json: str) -> set[str]:
    names = set(json.loads(objects_json))
    unknown = sorted(names - set(COCO_SYNONYMS))
    if unknown:
        raise ValueError(f"ground-truth object(s) {unknown} are not COCO categories; valid: {sorted(COCO_SYNONYMS)}")
    return names


def caption_metrics(task: str, captions: Sequence[str], records: Sequence[Record]) -> dict[str, float]:
    """CHAIR of `captions` against their records' "objects": shapes world (object and attribute level,
    plus "partner_rate") or COCO (object level, `chair.coco_mentions`)."""
    if task == "shapes_world":
        scenes = [objects_from_json(r["objects"]) for r in records]
        return {**shapes_chair_metrics(captions, scenes), "partner_rate": partner_hallucination_rate(captions, scenes)}
    if task == "coco":
        truths = [_coco_truth(r["objects"]) for r in records]
        return chair_counts([coco_mentions(c) for c in captions], truths).metrics()
    raise ValueError(f"unknown evaluation task {task!r}; valid: {TASKS}")


def caption_item_counts(task: str, captions: Sequence[str], records: Sequence[Record]) -> list[ChairCounts]:
    """Object-level CHAIR counts of each caption (`caption_metrics`' CHAIR is their sum), for
    statistics over images."""
    if task == "shapes_world":
        return object_chair_counts(captions, [objects_from_json(r["objects"]) for r in records])
    if task == "coco":
        return [caption_chair_counts(coco_mentions(c), _coco_truth(r["objects"])) for c, r in zip(captions, records)]
    raise ValueError(f"unknown evaluation task {task!r}; valid: {TASKS}")


def image_key(record: Record) -> str:
    """The image a record asks about: its metadata's "image_id" (a shapes-world POPE image has
    several questions), else the record's "id", else ""."""
    metadata = json.loads(record.get("metadata") or "{}")
    image_id = metadata.get("image_id") if isinstance(metadata, dict) else None
    return str(image_id or record.get("id", ""))


def pass_details(task: str, captions: Sequence[Record], texts: Sequence[str], questions: Sequence[Record],
                 answers: Sequence[str]) -> dict[str, list]:
    """One decoding pass, item by item: `"captions"` (the texts), `"chair"` (each caption's
    `ChairCounts` fields, `caption_item_counts`), `"answers"` (the POPE replies), `"pope"` (each
    question's `PopeCounts` fields), `"pope_images"` (each question's `image_key`)."""
    return {"captions": list(texts),
            "chair": [list(dataclasses.astuple(c)) for c in caption_item_counts(task, texts, captions)] if captions else [],
            "answers": list(answers),
            "pope": [list(dataclasses.astuple(pope_counts([a], [r["answer"]]))) for a, r in zip(answers, questions)],
            "pope_images": [image_key(r) for r in questions]}


def _records(split: Sequence[Record] | None) -> list[Record]:
    return [] if split is None else [split[i] for i in range(len(split))]


def evaluate_model(
    model: Llava,
    tokenizer: PreTrainedTokenizerBase,
    *,
    caption_split: Sequence[Record] | None,
    pope_split: Sequence[Record] | None,
    image_config: ImageProcessorConfig,
    num_image_tokens: int,
    decoding: str = "greedy",
    num_samples: int = 1,
    temperature: float = 1.0,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    seed: int = 0,
    task: str = "shapes_world",
    details: list[dict[str, list]] | None = None,
) -> dict[str, float]:
    """Hallucination metrics of `model` on a caption split and a POPE split.

    Args:
      model, tokenizer: the model under test and its tokenizer.
      caption_split: caption records (see the module docstring), or None to skip CHAIR.
      pope_split: POPE records, or None to skip POPE.
      image_config: image preprocessing of the model.
      num_image_tokens: placeholders per image.
      decoding: "greedy" (one pass; `num_samples` must be 1), "sample" (`num_samples` passes at
        `temperature`, pass s seeded by `fold_in(key(seed), s)`), or "adapt_steer" / "adapt_blend" /
        "adapt_mask" (one greedy pass with ADAPT's attention-supervised inference in that mode,
        METHODS.md §4 defaults; the model's images must form square patch grids).
      batch_size, max_new_tokens: of every `generate` call (captions and answers alike).
      task: "shapes_world" or "coco": how caption ground truth is read and text is parsed.
      details: a list to which each decoding pass appends its items (`pass_details`: texts and
        per-caption / per-question counts), for statistics over images; None keeps none.

    Returns:
      floats: caption metrics ("chair_s", "chair_i", "recall"; shapes world also "_attr" versions and
      "partner_rate"), POPE metrics ("pope_{split}_{metric}", "pope_{metric}"); with sampling each
      also as "<name>_std"; "continuation_prob" on the shapes world; "num_samples".
    """
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; valid: {TASKS}")
    captions, questions = _records(caption_split), _records(pope_split)
    prompt_length = longest_prompt(tokenizer, [[r["prompt"] for r in captions], [r["question"] for r in questions]],
                                   num_image_tokens=num_image_tokens)  # one decode compilation for both
    decode = dict(image_config=image_config, num_image_tokens=num_image_tokens, batch_size=batch_size,
                  max_new_tokens=max_new_tokens, prompt_length=prompt_length,
                  **decoding_options(decoding, num_samples, temperature))
    passes = []
    for sample in range(num_samples):
        rng = pass_rng(decoding, seed, sample)
        metrics: dict[str, float] = {}
        texts: list[str] = []
        answers: list[str] = []
        if captions:
            texts = generate_texts(model, tokenizer, [r["image"] for r in captions], [r["prompt"] for r in captions],
                                   rng=rng, **decode)
            metrics.update(caption_metrics(task, texts, captions))
        if questions:
            pope_rng = None if rng is None else jax.random.fold_in(rng, 1 << 20)
            answers = generate_texts(model, tokenizer, [r["image"] for r in questions],
                                     [r["question"] for r in questions], rng=pope_rng, **decode)
            metrics.update(pope_metrics(answers, [r["answer"] for r in questions], [r["category"] for r in questions]))
        passes.append(metrics)
        if details is not None:
            details.append(pass_details(task, captions, texts, questions, answers))
    result = summarise_passes(passes, with_spread=decoding == "sample")
    if task == "shapes_world" and captions:
        scorer = model_scorer(model, image_config, pad_id=pad_token_id(tokenizer), batch_size=batch_size)
        result["continuation_prob"] = continuation_probability(
            tokenizer, [r["image"] for r in captions], [objects_from_json(r["objects"]) for r in captions], scorer,
            num_image_tokens=num_image_tokens, prompt=captions[0]["prompt"])
    result["num_samples"] = float(num_samples)
    return result


def decoding_options(decoding: str, num_samples: int, temperature: float) -> dict[str, Any]:
    """`generate_texts`' `temperature` and `controller` for a decoding (see `evaluate_model`),
    after checking the combination."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding={decoding!r}; valid: {DECODINGS}")
    if num_samples < 1 or (decoding != "sample" and num_samples != 1):
        raise ValueError(f"num_samples={num_samples}: {decoding} decoding takes exactly 1, sampling >= 1")
    if decoding == "sample" and temperature <= 0:
        raise ValueError(f"temperature={temperature}: sampling needs a temperature > 0")
    return dict(temperature=temperature if decoding == "sample" else 0.0,
                controller=AdaptDecoding(ADAPT_DECODINGS[decoding]) if decoding in ADAPT_DECODINGS else None)


def pass_rng(decoding: str, seed: int, sample: int) -> jax.Array | None:
    """The PRNG key of decoding pass `sample` (sampling only): `fold_in(key(seed), sample)`."""
    return jax.random.fold_in(jax.random.key(seed), sample) if decoding == "sample" else None


def summarise_passes(passes: Sequence[Mapping[str, float]], *, with_spread: bool) -> dict[str, float]:
    """Mean of each metric over decoding passes, plus "<name>_std" (population std) with `with_spread`."""
    result = {}
    for name in passes[0]:
        values = np.asarray([p[name] for p in passes], np.float64)
        result[name] = float(values.mean())
        if with_spread:
            result[f"{name}_std"] = float(values.std())
    return result
