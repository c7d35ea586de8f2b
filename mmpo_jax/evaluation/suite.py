"""Real-data evaluation: CHAIR (COCO captions or a held-out preference split), POPE and AMBER of
a model, from the benchmarks' published files, as one flat metrics dict.

    spec = EvaluationSpec(coco_instances=".../instances_val2014.json", coco_images=".../val2014",
                          num_caption_images=500, pope_questions=(".../coco_pope_random.json",),
                          pope_images=".../val2014", amber_dir=".../AMBER/data",
                          amber_images=".../AMBER/image")
    benchmarks = load_benchmarks(spec)                   # parses the files once
    metrics = evaluate(model, tokenizer, image_config, spec, benchmarks)

`evaluate` is what `python -m mmpo_jax.evaluate` runs and what the trainer calls for in-training
evaluation (load the benchmarks once, evaluate at every evaluation step). Every benchmark is
optional; at least one must be given. Metric names:

- COCO caption set: "chair_s", "chair_i", "recall" (`chair.ChairCounts`), "caption_words" (mean
  words per caption), "chair_images" (captions scored);
- held-out preference split: the same with prefix "heldout_", plus "heldout_unmatched" (records
  whose image is not in the COCO annotation file);
- POPE: "pope_{split}_{metric}" and "pope_{metric}" (`pope.pope_metrics`);
- AMBER: "amber_chair", "amber_cover", "amber_hal", "amber_cog", "amber_{accuracy,precision,recall,
  f1}" and "amber_{dimension}_{metric}" (`amber.amber_metrics`);
- "num_samples"; with `decoding="sample"` every metric also as "<name>_std" over the passes.

Captions are generated with `caption_max_new_tokens`, yes/no answers with `answer_max_new_tokens`
(a reply is parsed from its first sentence, so a short budget changes no answer of a model that
answers first). `max_examples` keeps the first N records of each benchmark (after the caption
sample), for quick in-training evaluation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from transformers import PreTrainedTokenizerBase

from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.evaluation import amber, coco, pope
from mmpo_jax.evaluation.records import Column, ImageRecords
from mmpo_jax.evaluation.runner import (
    caption_metrics,
    decoding_options,
    generate_texts,
    longest_prompt,
    pass_rng,
    summarise_passes,
)
from mmpo_jax.models.llava import Llava

Record = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class EvaluationSpec:
    """What to evaluate on (published files) and how to decode. Paths may start with "~".

    Attributes:
      coco_instances: COCO `instances_*.json`: the ground truth of CHAIR (caption set and held-out split).
      coco_captions: optional COCO `captions_*.json`, whose reference captions add objects (as the
        CHAIR reference does).
      coco_images: folder of the annotation file's images: evaluates a caption set of them.
      caption_prompt: the caption request of the caption set and the held-out split.
      num_caption_images: a seeded sample of this many COCO images (None: all of them).
      heldout_dataset, heldout_split: a prepared preference split (`data.sources.load_split`, e.g.
        "rlhf_v", "train[95%:]") whose COCO images are captioned; needs `coco_instances`.
      heldout_data_dir, heldout_manual_dir: where that dataset is prepared / its published files.
      heldout_image_key: the record metadata field naming its image file.
      heldout_own_prompt: ask each record's own prompt instead of `caption_prompt`.
      pope_questions: POPE question files (jsonl; the split read from each file name).
      pope_images: folder of their images.
      amber_dir: AMBER's `data/` folder (annotations.json, relation.json, safe_words.txt, query/).
      amber_queries: query files, relative to `amber_dir` or absolute (default: all queries).
      amber_images: folder of AMBER's images.
      question_suffix: appended to every POPE and AMBER yes/no question (e.g. " Answer the
        question using a single word or phrase.", LLaVA-1.5's POPE prompt); "" keeps them as published.
      decoding, num_samples, temperature, seed: as `runner.evaluate_model`.
      batch_size: rows per `generate` call.
      caption_max_new_tokens, answer_max_new_tokens: decode budgets of captions / yes-no answers.
      max_examples: keep only the first N records of each benchmark (None: all).
    """

    coco_instances: str | None = None
    coco_captions: str | None = None
    coco_images: str | None = None
    caption_prompt: str = coco.DEFAULT_CAPTION_PROMPT
    num_caption_images: int | None = None
    heldout_dataset: str | None = None
    heldout_split: str | None = None
    heldout_data_dir: str | None = None
    heldout_manual_dir: str | None = None
    heldout_image_key: str = "image_path"
    heldout_own_prompt: bool = False
    pope_questions: tuple[str, ...] = ()
    pope_images: str | None = None
    amber_dir: str | None = None
    amber_queries: tuple[str, ...] = (amber.QUERY_ALL,)
    amber_images: str | None = None
    question_suffix: str = ""
    decoding: str = "greedy"
    num_samples: int = 1
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16
    caption_max_new_tokens: int = 512
    answer_max_new_tokens: int = 16
    max_examples: int | None = None

    def __post_init__(self) -> None:
        for name in ("pope_questions", "amber_queries"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        problems = []
        needs = [("coco_images", "coco_instances"), ("coco_captions", "coco_instances"),
                 ("heldout_dataset", "coco_instances"), ("heldout_dataset", "heldout_split"),
                 ("heldout_dataset", "heldout_data_dir"), ("pope_questions", "pope_images"),
                 ("amber_dir", "amber_images"), ("amber_images", "amber_dir"), ("pope_images", "pope_questions")]
        for given, needed in needs:
            if getattr(self, given) and not getattr(self, needed):
                problems.append(f"{given} needs {needed}")
        if self.coco_instances and not (self.coco_images or self.heldout_dataset):
            problems.append("coco_instances needs coco_images (a caption set) or heldout_dataset (a held-out split)")
        if not (self.coco_images or self.heldout_dataset or self.pope_questions or self.amber_dir):
            problems.append("no benchmark given: set coco_images, heldout_dataset, pope_questions or amber_dir")
        for name in ("batch_size", "caption_max_new_tokens", "answer_max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_examples is not None and self.max_examples < 1:
            problems.append(f"max_examples={self.max_examples} must be >= 1 or None")
        if problems:
            raise ValueError("evaluation spec: " + "; ".join(problems))
        decoding_options(self.decoding, self.num_samples, self.temperature)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> EvaluationSpec:
        """From a plain dict (e.g. a config section's `to_dict()`); unknown keys are named."""
        valid = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - valid)
        if unknown:
            raise ValueError(f"unknown evaluation setting(s) {unknown}; valid: {sorted(valid)}")
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Benchmarks:
    """The records of every benchmark of a spec, ground truth parsed (`load_benchmarks`)."""

    captions: ImageRecords | None = None
    heldout: coco.HeldoutRecords | None = None
    pope: ImageRecords | None = None
    amber: amber.AmberRecords | None = None
    amber_data: amber.AmberData | None = None


def _path(path: str | None) -> str | None:
    return None if path is None else os.path.expanduser(path)


def load_benchmarks(spec: EvaluationSpec) -> Benchmarks:
    """Reads every benchmark file of `spec` (once; images are read when evaluated)."""
    ground_truth = None
    if spec.coco_instances:
        ground_truth = coco.read_coco_objects(_path(spec.coco_instances), _path(spec.coco_captions))
    captions = heldout = pope_split = amber_records = amber_data = None
    if spec.coco_images:
        captions = coco.coco_caption_records(ground_truth, _path(spec.coco_images), prompt=spec.caption_prompt,
                                             num_images=spec.num_caption_images, seed=spec.seed)
    if spec.heldout_dataset:
        from mmpo_jax.data.sources import load_split  # TFDS: imported only for held-out splits

        source = load_split(spec.heldout_dataset, spec.heldout_split, data_dir=_path(spec.heldout_data_dir),
                            manual_dir=_path(spec.heldout_manual_dir))
        heldout = coco.heldout_caption_records(source, ground_truth,
                                               prompt=None if spec.heldout_own_prompt else spec.caption_prompt,
                                               image_key=spec.heldout_image_key)
    if spec.pope_questions:
        pope_split = ImageRecords.concatenate([
            pope.pope_records(_path(path), _path(spec.pope_images), question_suffix=spec.question_suffix)
            for path in spec.pope_questions])
    if spec.amber_dir:
        amber_data = amber.read_amber(_path(spec.amber_dir))
        queries = [query for name in spec.amber_queries
                   for query in amber.read_amber_queries(os.path.join(_path(spec.amber_dir), _path(name)))]
        amber_records = amber.amber_records(queries, amber_data, _path(spec.amber_images),
                                            question_suffix=spec.question_suffix)
    return Benchmarks(captions, heldout, pope_split, amber_records, amber_data)


def evaluate(model: Llava, tokenizer: PreTrainedTokenizerBase, image_config: ImageProcessorConfig,
             spec: EvaluationSpec, benchmarks: Benchmarks | None = None) -> dict[str, float]:
    """Every metric of `spec`'s benchmarks for `model` (module docstring), as one flat dict.

    Args:
      model: the model under test (any dtype/sharding; only `generate` is called).
      tokenizer: its tokenizer (BOS, EOS and an `<image>` token).
      image_config: its image preprocessing (`image_processing.from_pretrained_dir`), the same
        the model was trained with.
      spec: benchmarks and decoding settings.
      benchmarks: `load_benchmarks(spec)`, to reuse across calls; None loads them here.
    """
    benchmarks = load_benchmarks(spec) if benchmarks is None else benchmarks
    limit = lambda records: None if records is None else records.head(spec.max_examples)  # noqa: E731
    captions, heldout, pope_split = limit(benchmarks.captions), limit(benchmarks.heldout), limit(benchmarks.pope)
    shown = None
    if benchmarks.amber is not None:
        shown = amber.AmberRecords(limit(benchmarks.amber.generative), limit(benchmarks.amber.discriminative))
    options = decoding_options(spec.decoding, spec.num_samples, spec.temperature)
    asked = [(records, field) for records, field in ((captions, "prompt"), (heldout, "prompt"), (pope_split, "question"))
             if records is not None]
    if shown is not None:
        asked += [(shown.generative, "prompt"), (shown.discriminative, "question")]
    # every benchmark's prompts padded to the longest of all: one decode compilation per length cap
    prompt_length = longest_prompt(tokenizer, [[f[field] for f in records.fields] for records, field in asked],
                                   num_image_tokens=model.config.num_image_tokens)

    def reply(records: ImageRecords | coco.HeldoutRecords, prompt_field: str, max_new_tokens: int,
              rng: jax.Array | None, stream: int) -> list[str]:
        if not len(records):
            return []
        return generate_texts(model, tokenizer, Column(records, "image"), [f[prompt_field] for f in records.fields],
                              image_config=image_config, num_image_tokens=model.config.num_image_tokens,
                              batch_size=spec.batch_size, max_new_tokens=max_new_tokens,
                              rng=None if rng is None else jax.random.fold_in(rng, stream),
                              prompt_length=prompt_length, **options)

    passes = []
    for sample in range(spec.num_samples):
        rng = pass_rng(spec.decoding, spec.seed, sample)  # each benchmark draws from its own stream
        metrics: dict[str, float] = {}
        for prefix, records, stream in (("", captions, 0), ("heldout_", heldout, 1)):
            if records is not None:
                texts = reply(records, "prompt", spec.caption_max_new_tokens, rng, stream)
                metrics.update(_caption_scores(texts, records.fields, prefix))
        if heldout is not None:
            metrics["heldout_unmatched"] = float(heldout.unmatched)
        if pope_split is not None:
            answers = reply(pope_split, "question", spec.answer_max_new_tokens, rng, 2)
            metrics.update(pope.pope_metrics(answers, [f["answer"] for f in pope_split.fields],
                                             [f["category"] for f in pope_split.fields]))
        if shown is not None:
            descriptions = reply(shown.generative, "prompt", spec.caption_max_new_tokens, rng, 3)
            answers = reply(shown.discriminative, "question", spec.answer_max_new_tokens, rng, 4)
            metrics.update(amber.amber_metrics(shown, descriptions, answers, benchmarks.amber_data))
        passes.append(metrics)
    result = summarise_passes(passes, with_spread=spec.decoding == "sample")
    result["num_samples"] = float(spec.num_samples)
    return result


def _caption_scores(texts: Sequence[str], records: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, float]:
    scores = caption_metrics("coco", texts, records)
    scores["caption_words"] = sum(len(text.split()) for text in texts) / len(texts) if texts else 0.0
    scores["chair_images"] = float(len(texts))
    return {f"{prefix}{name}": value for name, value in scores.items()}
