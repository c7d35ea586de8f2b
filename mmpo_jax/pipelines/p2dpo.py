"""P2-DPO pair generation (METHODS.md §5): a resumable driver writing the ``p2dpo_pairs`` dataset.

``generate_pairs(model, tokenizer, source, ...)`` turns prompt records (image, prompt) into
P2-DPO training records with the reference model ``M_ref``:

- focus prompt ``P``: the record's prompt, or for a fraction ``question_fraction`` of shapes-world
  records a question about one object of the image (v2: one of the record's exact questions
  about a present object, "what colour is the circle?"; v1: "is there a circle in the image?")
  [our choice: a question names the region that matters, so the crop has a target and its
  coverage is measurable]; the choice and the question are drawn from ``(seed, record index)``
  (``p2dpo_pairs.focus_prompt``);
- saliency of ``(I, P)`` at the layer at ``saliency_depth`` of the decoder, adaptive crop box
  (base side ``base_box`` pixels, or ``base_box_fraction`` of the image side [our choice for
  small synthetic images: 336 px is about half the side of LLaVA-1.5's typical padded input]),
  ``I_aug`` (``combine_mode``: "stitch", one canvas, or "two_images", the prompt ``P_enh``
  holding the image then the crop), ``I_deg = Erase(I, box)``; focus pair
  ``y_w = greedy(M_ref, I_aug, P_enh)``, ``y_l = greedy(M_ref, I_deg, P)``; ``P_enh`` is stored
  with the pair (``focus_aug_prompt``: the trainer reads ``y_w`` after it on the two images);
- ``I_noise`` (``data.example_randomness.noise_image``: diffusion noise at step ``noise_step``, keyed by
  ``(seed, record index)``; the key is stored with the pair as ``noise_key``, from which the
  training pipeline rebuilds the bit-identical image to score the pair on); robustness pair
  ``y_l`` sampled from ``M_ref(I_noise, P_rob)``, ``y_w`` by contrastive amplification decoding
  (``a``, ``b``), both at temperature 0.2 / top-p 0.9 with the "strictly answer ... facts"
  prompt ``P_rob``, as the released code (``Data_gen/rob_pair/gen/gendata_llava.py``); METHODS'
  "sample" is read as that sampling;
- filtering (``rewards.p2dpo.pair_filter``) of the pairs in ``filter_pairs`` (the focus pair, as
  the released ``filter_pairs.py`` sees only its scores), by default on each greedy reply's own
  generation log-probs (``y_w | I_aug, P_enh``, ``y_l | I_deg, P``: the released code) or, with
  ``filter_scores="training"``, on ``M_ref``'s log-probs of the pair as the trainer scores it;
  pairs with identical replies are counted (and dropped with ``drop_identical``). A record is
  kept when all its filtered pairs pass. Both pairs are always scored by ``M_ref`` exactly as the
  trainer scores them (template, truncation, buckets; focus pair on ``I``, robustness pair on
  the generation's ``I_noise``): those sums of the focus pair are stored as ``ref_chosen_logps``
  / ``ref_rejected_logps``, and every verdict and mean log-prob goes to the record's metadata;
- DDW's CLIP scores from an optional ``clip_scorer(images, prompts) -> [N]`` (NaN and hidden
  from ``load_split`` without one: the tiny model has no CLIP text tower).

Output (``output_dir``, the ``manual_dir`` of the ``p2dpo_pairs`` builder): ``shard-NNNNN.jsonl``
files of ``shard_size`` source records each (records as JSON lines, images as base64 PNG),
``manifest.json`` (settings fingerprint, per-shard counts, drop counts, sha256 of each shard)
and the tokenizer. Each shard is written atomically and only then entered in the manifest; a
rerun with the same fingerprint skips finished shards, and because every random draw is keyed
by ``(seed, record index)`` or ``(seed, first record of its batch)`` it writes byte-identical
shards. A different fingerprint (model, tokenizer, settings, layout, seed, source size) is an
error; the fingerprint covers inputs, not this code: regenerate into a new folder after changing
it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mmpo_jax.data.builders.p2dpo_pairs import (MANIFEST, TOKENIZER_DIR, encode_record, read_manifest,
                                                 shard_file)
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.data.interventions import COMBINE_MODES, crop_to_box
from mmpo_jax.data.example_randomness import noise_image, noise_key
from mmpo_jax.models.llava import Llava
from mmpo_jax.generation.prompts import left_pad, prompt_ids
from mmpo_jax.objectives.logprobs import sequence_logps
from mmpo_jax.objectives.p2dpo import PAIRS
from mmpo_jax.pipelines import p2dpo_pairs as pairs
from mmpo_jax.engine.reference_cache import cache_key, params_digest, tokenizer_digest

FORMAT_VERSION = 2  # 2: records carry noise_key
FILTER_SCORES = ("generation", "training")

ClipScorer = Callable[[Sequence[np.ndarray], Sequence[str]], np.ndarray]
"""``clip_scorer(images uint8 [H, W, 3] each, prompts) -> [N]`` CLIPScore(prompt, image)."""


@dataclasses.dataclass(frozen=True)
class PairSettings:
    """Everything that determines the generated pairs besides model, tokenizer, seed and layout.

    Attributes:
      source_dataset, source_split, source_builder, source_manual_dir: the prompt records
        (``data.sources.load_split`` arguments; ``source_builder`` holds builder options).
      num_records: source records used (the first ones), 0 for all.
      question_fraction: shapes-world records whose prompt becomes a question about one of
        their objects (records without ground-truth objects keep their prompt).
      enhanced_prompt: ``P_enh`` with ``{prompt}`` standing for ``P``.
      combine_mode: ``Combine`` mode of ``I_aug``: "stitch" (one canvas, stored as
        ``focus_aug_image``) or "two_images" (a prompt with the image and the crop, the crop
        stored as ``focus_aug_image``; train with ``method.combine_mode="two_images"``).
      saliency: "grad_attention" or "attention"; saliency_depth: layer = round(depth * L).
      base_box: the crop's base side in record-image pixels (336 for LLaVA-1.5 on its inputs);
        base_box_fraction: if > 0, the base side as this fraction of the side of the square
        the model sees of each record image instead (``base_box`` is then unused) [our option:
        the paper's 336 px is about half the side of LLaVA-1.5's typical input, a COCO photo
        ~640 px on its long side padded to a square, so 0.5 keeps that proportion at any
        resolution: 32 px on v1's 64-px images, 64 px on v2's 128-px ones];
        crop_ratios: the window scales tried.
      focus_max_new_tokens / robust_max_new_tokens: decode budgets (paper: 150 / 256).
      robust_prompt: the prompt both robustness replies are generated with, ``{prompt}`` = P
        (the released code's "strictly answer ... according to the facts" prefix); the trainer
        scores them with P.
      robust_temperature, robust_top_p: sampling of both robustness replies (released code: 0.2
        and 0.9 for the plain reply on ``I_noise`` and the contrastive one alike).
      contrast_alpha, contrast_plausibility: contrastive amplification ``a``, ``b`` (0.1, 0.1).
      noise_step: diffusion step t of ``I_noise`` (of 1000).
      max_perplexity, margin_low, margin_high: ``pair_filter`` thresholds.
      filter_pairs: the pairs filtered ("focus"; "robust" too is [our option]: the released code
        records no scores of the robustness pair, so its filter sees the focus pair only).
      filter_scores: the log-probs the filter reads for the focus pair: "generation" (released
        code: each greedy reply's own log-probs under ``M_ref`` on the input it was generated
        from, ``y_w | I_aug, P_enh`` and ``y_l | I_deg, P``) or "training" (``M_ref`` on ``I, P``
        as the trainer scores the pair). The robustness pair is always judged on "training"
        scores (its replies are sampled from tempered distributions).
      drop_identical: also drop pairs whose two replies are the same text (counted either way).
      batch_size: records per jitted batch; shard_size: source records per output shard (a
        multiple of ``batch_size``).
    """

    source_dataset: str = "shapes_world"
    source_split: str = "preference"
    source_builder: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source_manual_dir: str = ""
    num_records: int = 0
    question_fraction: float = 0.5
    enhanced_prompt: str = ("Answer the question mainly based on the left part of the image, refer "
                            "to the zoomed-in detail on its right if necessary: {prompt}")
    combine_mode: str = "stitch"
    saliency: str = "grad_attention"
    saliency_depth: float = 14 / 32
    base_box: float = 336.0
    base_box_fraction: float = 0.0
    crop_ratios: tuple[float, ...] = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
    focus_max_new_tokens: int = 150
    robust_max_new_tokens: int = 256
    robust_prompt: str = ("Strictly answer the following question according to the facts of the "
                          "image, and control the length of the output. Based on this, answer the "
                          "question: {prompt}")
    robust_temperature: float = 0.2
    robust_top_p: float = 0.9
    contrast_alpha: float = 0.1
    contrast_plausibility: float = 0.1
    noise_step: int = 600
    max_perplexity: float = 2.5
    margin_low: float = -0.174
    margin_high: float = 0.208
    filter_pairs: tuple[str, ...] = ("focus",)
    filter_scores: str = "generation"
    drop_identical: bool = False
    batch_size: int = 16
    shard_size: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_builder", dict(self.source_builder))
        object.__setattr__(self, "crop_ratios", tuple(float(r) for r in self.crop_ratios))
        object.__setattr__(self, "filter_pairs", tuple(self.filter_pairs))
        problems = []
        if self.batch_size < 1 or self.shard_size < 1 or self.shard_size % self.batch_size:
            problems.append(f"shard_size={self.shard_size} must be a positive multiple of "
                            f"batch_size={self.batch_size}")
        unknown = sorted(set(self.filter_pairs) - set(PAIRS))
        if unknown:
            problems.append(f"filter_pairs has unknown pairs {unknown}; valid: {sorted(PAIRS)}")
        if self.combine_mode not in COMBINE_MODES:
            problems.append(f"combine_mode={self.combine_mode!r} is not one of {COMBINE_MODES}")
        if self.filter_scores not in FILTER_SCORES:
            problems.append(f"filter_scores={self.filter_scores!r} is not one of {FILTER_SCORES}")
        for name in ("enhanced_prompt", "robust_prompt"):
            if "{prompt}" not in getattr(self, name):
                problems.append(f"{name}={getattr(self, name)!r} must contain '{{prompt}}'")
        if not 0.0 <= self.base_box_fraction <= 1.0:
            problems.append(f"base_box_fraction={self.base_box_fraction} must lie in [0, 1] "
                            "(0: use base_box pixels)")
        if not 0.0 <= self.question_fraction <= 1.0:
            problems.append(f"question_fraction={self.question_fraction} must lie in [0, 1]")
        if self.margin_low > self.margin_high:
            problems.append(f"margin_low={self.margin_low} exceeds margin_high={self.margin_high}")
        if problems:
            raise ValueError("invalid P2-DPO pair settings: " + "; ".join(problems))

    @property
    def images_per_augmented(self) -> int:
        """Images in the ``I_aug`` prompt: 2 for "two_images", else 1."""
        return 2 if self.combine_mode == "two_images" else 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | ml_collections.ConfigDict) -> PairSettings:
        """From a config's ``pairs`` section (or a plain mapping); unknown keys raise."""
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown P2-DPO pair settings {unknown}; valid: {sorted(names)}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class TrainingLayout:
    """How the trainer encodes records (``config.data``): scoring for the filter matches it.

    Attributes:
      buckets: padded lengths; max_length: the template's truncation length (0 = largest
        bucket); template: conversation template name.
    """

    buckets: tuple[int, ...]
    max_length: int = 0
    template: str = "llava_1_5"

    @property
    def truncation_length(self) -> int:
        return int(self.max_length) or int(self.buckets[-1])


def _fingerprint(model: Llava, tokenizer: Any, settings: PairSettings, layout: TrainingLayout,
                 seed: int, num_records: int, clip_scorer: ClipScorer | None) -> str:
    return cache_key(
        format_version_pairs=FORMAT_VERSION, settings=dataclasses.asdict(settings),
        layout=dataclasses.asdict(layout), seed=int(seed), num_records=num_records,
        params=params_digest(nnx.state(model, nnx.Param)), tokenizer=tokenizer_digest(tokenizer),
        clip_scorer=None if clip_scorer is None else getattr(clip_scorer, "__name__", repr(clip_scorer)))


def _batch_key(seed: int, stream: str, first_index: int) -> jax.Array:
    """The PRNG key of one batch's sampling: ``(seed, stream, first record index)``."""
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(stream.encode()))
    return jax.random.fold_in(key, first_index)


@dataclasses.dataclass
class _Shard:
    """What one shard produced: its JSON lines and its counts."""

    lines: list[str] = dataclasses.field(default_factory=list)
    stats: Counter = dataclasses.field(default_factory=Counter)


@dataclasses.dataclass(frozen=True)
class _Candidates:
    """One batch's generated pairs (rows padded to ``batch_size`` by repeating the last record).

    ``images``/``augmented``/``degraded`` uint8 ``[H, W, 3]`` per row; ``noise`` float32
    ``[B, H', W', 3]`` the ``I_noise`` the robustness replies were generated on; ``boxes`` ``[B, 4]``;
    ``responses`` {token group: ``B`` texts}; ``targets`` the asked object per row or None;
    ``scored``: ``p2dpo_pairs.score_pairs``' arrays; ``generation_scores``: the same names for
    the focus pair from its generation (``PairSettings.filter_scores``); ``drops`` the template's
    drop reasons.
    """

    records: list[Mapping[str, Any]]
    indices: list[int]
    prompts: list[str]
    enhanced_prompts: list[str]
    targets: list[dict[str, Any] | None]
    images: list[np.ndarray]
    boxes: np.ndarray
    augmented: list[np.ndarray]
    degraded: list[np.ndarray]
    noise: np.ndarray
    responses: dict[str, list[str]]
    scored: dict[str, np.ndarray]
    generation_scores: dict[str, np.ndarray]
    drops: list[str | None]


def _generate_candidates(model: Llava, tokenizer: Any, records: Sequence[Mapping[str, Any]],
                         indices: Sequence[int], *, settings: PairSettings, layout: TrainingLayout,
                         image_config: ImageProcessorConfig, seed: int, layer: int) -> _Candidates:
    """Focus and robustness pairs of one batch, with the reference's scores of both."""
    size = settings.batch_size
    padded = list(records) + [records[-1]] * (size - len(records))
    padded_indices = [int(i) for i in indices] + [int(indices[-1])] * (size - len(records))
    focus = [pairs.focus_prompt(r, i, question_fraction=settings.question_fraction, seed=seed)
             for r, i in zip(padded, padded_indices)]
    prompts = [prompt for prompt, _ in focus]
    images = [np.asarray(r["image"], np.uint8) for r in padded]
    pixels = np.stack([image_config(image) for image in images])
    encode = dict(num_image_tokens=model.config.num_image_tokens, template=layout.template)
    plain_ids = prompt_ids(tokenizer, prompts, **encode)
    input_ids, mask = left_pad(plain_ids, tokenizer.pad_token_id)

    saliency = pairs.saliency_maps(model, input_ids, mask, pixels, layer=layer, mode=settings.saliency)
    boxes = pairs.crop_boxes(np.asarray(saliency), [(i.shape[1], i.shape[0]) for i in images],
                             image_config=image_config, base_box=settings.base_box,
                             base_box_fraction=settings.base_box_fraction,
                             ratios=settings.crop_ratios)
    augmented, degraded = pairs.focus_images(images, boxes, combine_mode=settings.combine_mode)
    noise = np.stack([noise_image(image, seed=seed, record_index=index, step=settings.noise_step,
                                  image_config=image_config)
                      for image, index in zip(pixels, padded_indices)])

    # Both focus replies in one call: [I_aug with P_enh; I_deg with P], padded to one length.
    enhanced = [settings.enhanced_prompt.format(prompt=p) for p in prompts]
    enhanced_ids = prompt_ids(tokenizer, enhanced, num_images=settings.images_per_augmented,
                              **encode)
    focus_ids, focus_mask = left_pad(enhanced_ids + plain_ids, tokenizer.pad_token_id)
    focus_pixels = np.concatenate([
        pairs.augmented_pixels(pixels, augmented, combine_mode=settings.combine_mode,
                               image_config=image_config),
        np.stack([image_config(image) for image in degraded])])
    focus_chosen, focus_rejected = pairs.sample_replies(
        model, tokenizer, focus_ids, focus_mask, focus_pixels,
        max_new_tokens=settings.focus_max_new_tokens).split(2)
    robust = [settings.robust_prompt.format(prompt=p) for p in prompts]
    robust_ids, robust_mask = left_pad(prompt_ids(tokenizer, robust, **encode),
                                             tokenizer.pad_token_id)
    first = padded_indices[0]
    sampling = dict(max_new_tokens=settings.robust_max_new_tokens,
                    temperature=settings.robust_temperature, top_p=settings.robust_top_p)
    robust_rejected = pairs.sample_replies(
        model, tokenizer, robust_ids, robust_mask, noise,
        rng=_batch_key(seed, "p2dpo/robust_rejected", first), **sampling)
    robust_chosen = pairs.contrastive_replies(
        model, tokenizer, robust_ids, robust_mask, pixels, noise, alpha=settings.contrast_alpha,
        plausibility=settings.contrast_plausibility,
        rng=_batch_key(seed, "p2dpo/robust_chosen", first), **sampling)
    responses = {"chosen": focus_chosen.texts, "rejected": focus_rejected.texts,
                 "robust_chosen": robust_chosen.texts, "robust_rejected": robust_rejected.texts}
    generation_scores = {"focus_chosen/token_logps": focus_chosen.token_logps,
                         "focus_chosen/mask": focus_chosen.mask,
                         "focus_rejected/token_logps": focus_rejected.token_logps,
                         "focus_rejected/mask": focus_rejected.mask}

    batch, drops = pairs.pair_batch(
        tokenizer, prompts, responses, pixels, noise, num_image_tokens=model.config.num_image_tokens,
        buckets=layout.buckets, max_length=layout.truncation_length, template=layout.template)
    scored = jax.device_get(pairs.score_pairs(model, batch, image_config=image_config,
                                              eos_token_id=tokenizer.eos_token_id))
    return _Candidates(padded, padded_indices, prompts, enhanced, [target for _, target in focus],
                       images, boxes, augmented, degraded, noise, responses, scored,
                       generation_scores, drops)


def _keep_batch(candidates: _Candidates, real: int, *, settings: PairSettings, layer: int,
                seed: int, clip_scorer: ClipScorer | None, shard: _Shard) -> None:
    """Filters the first ``real`` rows of a batch and appends the kept records to ``shard``."""
    thresholds = dict(max_perplexity=settings.max_perplexity,
                      margin_range=(settings.margin_low, settings.margin_high))
    verdicts = pairs.judge_pairs(candidates.scored, candidates.responses, **thresholds)
    if settings.filter_scores == "generation":
        verdicts["focus"] = pairs.judge_pairs({**candidates.scored, **candidates.generation_scores},
                                              candidates.responses, **thresholds)["focus"]
    kept_rows, stats = pairs.select_records(verdicts, candidates.drops[:real], settings.filter_pairs,
                                            drop_identical=settings.drop_identical)
    shard.stats.update(stats)
    shard.stats["candidates"] += real
    reference_sums = [np.asarray(sequence_logps(candidates.scored[f"{r.name}/token_logps"],
                                                candidates.scored[f"{r.name}/mask"]))
                      for r in PAIRS["focus"]]
    for row, (box, target) in enumerate(zip(candidates.boxes[:real], candidates.targets[:real])):
        if target is not None and candidates.drops[row] is None:  # one-word answers agree often
            shard.stats["questions_encoded"] += 1
            for pair, verdict in verdicts.items():
                shard.stats[f"{pair}/identical_texts/questions"] += int(verdict.identical[row])
        if target is not None:
            covers = int(pairs.box_coverage(box, target["bbox"]) >= pairs.COVERAGE_THRESHOLD)
            shard.stats["questions"] += 1
            shard.stats["questions_box_covers_object"] += covers
            if "kind" in target:  # v2: per question kind too
                shard.stats[f"questions/{target['kind']}"] += 1
                shard.stats[f"questions_box_covers_object/{target['kind']}"] += covers
    clip_crop, clip_full = _clip_scores(
        clip_scorer, [candidates.images[r] for r in kept_rows],
        [candidates.boxes[r] for r in kept_rows], [candidates.prompts[r] for r in kept_rows])
    for position, row in enumerate(kept_rows):
        record, index = candidates.records[row], candidates.indices[row]
        shard.stats.update(pairs.truth_counts(
            {group: texts[row] for group, texts in candidates.responses.items()},
            pairs.record_objects(record), candidates.targets[row]))
        metadata = {
            "source_index": index, "source_id": str(record.get("id", "")),
            "box": [int(v) for v in candidates.boxes[row]], "saliency_layer": layer,
            "question_object": candidates.targets[row],
            "filter_mean_logps": {pair: [float(v[row]) for v in verdict.means]
                                  for pair, verdict in verdicts.items()},
            "filter": {pair: verdict.reasons(drop_identical=settings.drop_identical)[row]
                       for pair, verdict in verdicts.items()},
        }
        shard.lines.append(encode_record({
            "id": str(record.get("id") or f"record-{index}"), "prompt": candidates.prompts[row],
            **{group: texts[row] for group, texts in candidates.responses.items()},
            "focus_aug_prompt": candidates.enhanced_prompts[row],
            "image": candidates.images[row], "focus_aug_image": candidates.augmented[row],
            "focus_deg_image": candidates.degraded[row],
            "noise_key": noise_key(seed, index, settings.noise_step),
            "ddw_clip_crop": float(clip_crop[position]), "ddw_clip_full": float(clip_full[position]),
            "ref_chosen_logps": float(reference_sums[0][row]),
            "ref_rejected_logps": float(reference_sums[1][row]),
            "metadata": json.dumps(metadata, sort_keys=True),
        }))


def _clip_scores(clip_scorer: ClipScorer | None, images: Sequence[np.ndarray],
                 boxes: Sequence[np.ndarray], prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(CLIPScore(P, crop), CLIPScore(P, I))`` ``[N]`` each, NaN without a scorer."""
    if clip_scorer is None or not images:
        empty = np.full(len(images), np.nan, np.float32)
        return empty, empty
    crops = [crop_to_box(image, box) for image, box in zip(images, boxes)]
    return (np.asarray(clip_scorer(crops, prompts), np.float32).reshape(-1),
            np.asarray(clip_scorer(list(images), prompts), np.float32).reshape(-1))


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def generate_pairs(
    model: Llava,
    tokenizer: Any,
    source: Sequence[Mapping[str, Any]],
    *,
    image_config: ImageProcessorConfig,
    output_dir: str | os.PathLike[str],
    settings: PairSettings,
    layout: TrainingLayout,
    seed: int = 0,
    clip_scorer: ClipScorer | None = None,
    source_metadata: Mapping[str, Any] | None = None,
    stop_after_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generates (or finishes generating) the P2-DPO pairs of ``source`` into ``output_dir``.

    Args:
      model: the reference ``M_ref`` (e.g. the cached SFT base); never changed.
      tokenizer: its tokenizer (BOS, EOS, pad, ``<image>``).
      source: random-access prompt records (``image`` uint8 ``[H, W, 3]``, ``prompt``; ``id``,
        ``objects`` / ``metadata`` optional).
      image_config: the model's preprocessing.
      output_dir: the generation folder (the ``p2dpo_pairs`` builder's ``manual_dir``).
      settings: generation settings.
      layout: the trainer's data layout (buckets, truncation, template).
      seed: the experiment seed; every draw derives from it.
      clip_scorer: CLIPScore for DDW's weights, or None.
      source_metadata: stored in the manifest (e.g. the shapes world's ``world`` spec, so the
        dataset knows its image geometry).
      stop_after_shards: stop once this many shards are finished in total (a simulated
        interruption, for tests); None runs to the end.
      progress: show a tqdm bar over source records.

    Returns:
      The manifest (``shards``: per-shard ``records`` kept, ``stats`` and ``sha256``).
    """
    output = pathlib.Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    num_records = len(source) if not settings.num_records else min(settings.num_records, len(source))
    if num_records == 0:
        raise ValueError("the prompt source is empty; nothing to generate")
    fingerprint = _fingerprint(model, tokenizer, settings, layout, seed, num_records, clip_scorer)
    num_shards = -(-num_records // settings.shard_size)
    manifest = read_manifest(output)
    if manifest is not None and manifest["fingerprint"] != fingerprint:
        raise ValueError(
            f"{output} holds pairs generated with other settings, model, tokenizer, layout or "
            f"seed (fingerprint {manifest['fingerprint'][:12]}..., now {fingerprint[:12]}...); "
            "use an empty output_dir or delete it")
    if manifest is None:
        tokenizer.save_pretrained(str(output / TOKENIZER_DIR))
        manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                    "settings": dataclasses.asdict(settings), "layout": dataclasses.asdict(layout),
                    "seed": int(seed), "num_records": num_records, "num_shards": num_shards,
                    "ddw_scored": clip_scorer is not None, "tokenizer": TOKENIZER_DIR,
                    "source": dict(source_metadata or {}), "shards": {}}
        _write_atomic(output / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    layer = pairs.saliency_layer(model.config.text_config.num_hidden_layers, settings.saliency_depth)
    done = set(manifest["shards"])
    bar = tqdm(total=num_records, disable=not progress, desc="P2-DPO pairs", unit="record")
    bar.update(sum(min(settings.shard_size, num_records - int(k) * settings.shard_size)
                   for k in done))
    for shard_index in range(num_shards):
        if stop_after_shards is not None and len(done) >= stop_after_shards:
            break
        if str(shard_index) in done:
            continue
        shard = _Shard()
        start = shard_index * settings.shard_size
        stop = min(num_records, start + settings.shard_size)
        for first in range(start, stop, settings.batch_size):
            indices = list(range(first, min(stop, first + settings.batch_size)))
            candidates = _generate_candidates(
                model, tokenizer, [source[i] for i in indices], indices, settings=settings,
                layout=layout, image_config=image_config, seed=seed, layer=layer)
            _keep_batch(candidates, len(indices), settings=settings, layer=layer, seed=seed,
                        clip_scorer=clip_scorer, shard=shard)
            bar.update(len(indices))
        data = "".join(line + "\n" for line in shard.lines).encode()
        _write_atomic(output / shard_file(shard_index), data)
        manifest["shards"][str(shard_index)] = {
            "file": shard_file(shard_index), "records": len(shard.lines),
            "stats": dict(sorted(shard.stats.items())), "sha256": hashlib.sha256(data).hexdigest()}
        _write_atomic(output / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        done.add(str(shard_index))
    bar.close()
    return manifest
