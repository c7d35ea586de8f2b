"""P2-DPO pair generation, one batch (METHODS.md §5): saliency, crop, images, responses, scores.

The batched math of ``pipelines.p2dpo`` (which adds prompts, shards, records and resuming):

0. ``focus_prompt``: the record's prompt, or a POPE-style question about one of its objects;
1. ``saliency_maps``: one jitted forward (plus its gradient for ``grad_attention``) of the
   reference on ``(I, P)``, read at one decoder layer from the last prompt position to the image;
2. ``crop_boxes``: ``rewards.p2dpo.adaptive_crop_box`` per example, mapped from the model's
   square input view back to the record's image;
3. ``focus_images`` / ``augmented_pixels``: ``I_aug = Combine(I, crop)`` (one stitched canvas,
   or the image and the crop of a two-image prompt) and ``I_deg = Erase(I, box)`` (``I_noise``
   is ``data.example_randomness.noise_image``, the training pipeline's own function);
4. ``decode``: the reference's replies (``generation.generate``; the robustness pair's chosen
   reply by ``generation.contrastive.contrastive_generate``), as text;
5. ``score_pairs``: the reference's per-token log-probs of both pairs exactly as the trainer
   computes them (``engine.scoring.reference_scores`` on a ``Batch`` built by the training
   template and buckets), for ``rewards.p2dpo.pair_filter`` and the stored reference log-probs.

Shapes: ``B`` records, ``T`` prompt length (left-padded), ``G`` the patch grid side, ``H, W`` the
model's input image, ``N`` image tokens per image.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax.data import interventions, shapes_world
from mmpo_jax.data.batch import Batch, collate
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.data.template import DropReason, decode_response, encode_prompt_response
from mmpo_jax.evaluation.chair import caption_chair_counts
from mmpo_jax.generation import BanTokens, generate
from mmpo_jax.generation.contrastive import contrastive_generate
from mmpo_jax.models.attention import AttentionHooks, ProbeSpec
from mmpo_jax.models.llava import Llava
from mmpo_jax.objectives.logprobs import sequence_logps
from mmpo_jax.rewards.p2dpo import (FILTER_REASONS, SALIENCY_MODES, adaptive_crop_box, pair_filter,
                                    saliency_map, saliency_objective)
from mmpo_jax.engine.scoring import ScoringPlan, reference_scores, response_mask
from mmpo_jax.objectives.p2dpo import PAIRS
from mmpo_jax.objectives.terms import REFERENCE, token_logps
COVERAGE_THRESHOLD = 0.5
"""A crop box covers an object when at least this fraction of the object's bbox lies inside it."""

_SCORING_PLAN = ScoringPlan(policy=(), reference=PAIRS["focus"] + PAIRS["robust"])
"""The trainer's reference reads of both pairs: the focus pair (``objectives.p2dpo.PAIRS``) on the
clean image, the robustness pair on the noise image."""


def saliency_layer(num_layers: int, depth: float) -> int:
    """The decoder layer at fractional ``depth``: ``round(depth * L)``, clipped to ``[0, L-1]``.

    ``depth = 14/32`` gives the reference's layer 14 of LLaVA-1.5-7B's 32 and layer 1 of the
    tiny model's 2 (its last; ``round(0.875)``).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"saliency depth={depth} must lie in [0, 1] (fraction of the decoder's layers)")
    return min(num_layers - 1, int(round(depth * num_layers)))


def focus_prompt(record: Mapping[str, Any], index: int, *, question_fraction: float, seed: int
                 ) -> tuple[str, dict[str, Any] | None]:
    """The focus prompt of a record, and what it asks about (shapes world) or None.

    With probability ``question_fraction`` (drawn from ``(seed, index)``) a record with ground
    truth becomes a question about one object of its image:

    - shapes world v2 (``metadata["questions"]``: exact questions with the boxes of the objects
      they are about): one of its questions about a present object (presence "yes", colour,
      count), the target being that question with ``bbox`` = the union of its boxes [our choice:
      a "no" question names nothing the crop could show, so the crop would not matter];
    - v1 (``objects`` / ``metadata["objects"]``): "is there a {shape} in the image?" about one of
      its objects, the target being that object.
    """
    objects, questions = record_objects(record), record_questions(record)
    rng = np.random.default_rng([seed, index])
    ask, pick = rng.random(), int(rng.integers(1 << 30))
    if ask >= question_fraction:
        return record["prompt"], None
    if questions:
        question = questions[pick % len(questions)]
        return question["question"], {**question, "bbox": list(question["box"])}
    if not objects:
        return record["prompt"], None
    target = objects[pick % len(objects)]
    return shapes_world.QUESTION_TEMPLATE.format(shape=target["shape"]), target


def _metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    try:
        metadata = json.loads(record.get("metadata") or "{}")
    except json.JSONDecodeError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def record_objects(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A record's ground-truth objects (``objects`` field or ``metadata["objects"]``), or []."""
    if record.get("objects"):
        return json.loads(record["objects"])
    objects = _metadata(record).get("objects")
    return objects if isinstance(objects, list) else []


def record_questions(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The exact questions of a shapes-world v2 record about objects it holds (those with boxes:
    ``metadata["questions"]``, ``shapes_world_v2.Question.to_json``), or []."""
    questions = _metadata(record).get("questions")
    if not isinstance(questions, list):
        return []
    return [q for q in questions if isinstance(q, dict) and q.get("boxes")]


def truth_counts(responses: Mapping[str, str], objects: Sequence[Mapping[str, Any]],
                 target: Mapping[str, Any] | None) -> Counter:
    """How faithful one record's replies are to its ground-truth objects (shapes world).

    A caption reply counts ``truth/{name}/mentions`` and ``truth/{name}/hallucinated`` (its shapes
    that no object has: object-level CHAIR_i; repeated mentions count each time, so a caption
    that names a true object twice lowers it), ``captions`` and ``hallucinated_captions``
    (CHAIR_s), ``truths`` and ``recalled`` (the image's distinct shapes it names); a reply to the question about ``target`` counts
    ``truth/{name}/answers`` and ``truth/{name}/correct`` (v2: the question's exact ``answer``;
    v1: "yes" when the asked shape is present). Records without objects count nothing.
    Summed over the kept pairs (``summarize``), this shows whether the chosen side of each pair is
    really the more faithful one.

    Args:
      responses: reply name (``chosen``, ``robust_rejected``, ...) -> text.
      objects: the record's objects (``{shape, color, bbox}``); target: the asked object or None.
    """
    counts: Counter = Counter()
    if not objects:
        return counts
    shapes = {o["shape"] for o in objects}
    for name, text in responses.items():
        if target is None:
            chair = caption_chair_counts([s for _, s in shapes_world.parse_caption(text)], shapes)
            counts[f"truth/{name}/mentions"] += chair.mentions
            counts[f"truth/{name}/hallucinated"] += chair.hallucinated_mentions
            counts[f"truth/{name}/captions"] += 1
            counts[f"truth/{name}/hallucinated_captions"] += chair.hallucinated_captions
            counts[f"truth/{name}/truths"] += chair.truths
            counts[f"truth/{name}/recalled"] += chair.recalled_truths
        else:
            answer = target.get("answer") or (
                shapes_world.YES if target["shape"] in shapes else shapes_world.NO)
            counts[f"truth/{name}/answers"] += 1
            counts[f"truth/{name}/correct"] += int(text.strip(" .") == answer)
    return counts


def box_coverage(box: Sequence[int], bbox: Sequence[int]) -> float:
    """Fraction of ``bbox``'s area inside ``box`` (both ``[x0, y0, x1, y1)``)."""
    width = max(0, min(box[2], bbox[2]) - max(box[0], bbox[0]))
    height = max(0, min(box[3], bbox[3]) - max(box[1], bbox[1]))
    area = max(1, (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]))
    return width * height / area


@functools.partial(nnx.jit, static_argnames=("layer", "mode"))
def saliency_maps(model: Llava, input_ids: jax.Array, attention_mask: jax.Array,
                  pixel_values: jax.Array, *, layer: int, mode: str) -> jax.Array:
    """P2-DPO's saliency of each image patch for its prompt, at one decoder layer.

    The row read is the last prompt position (``T - 1``: prompts are left-padded). For
    ``grad_attention`` the gradient of ``rewards.p2dpo.saliency_objective`` w.r.t. that row's
    post-softmax attention to the image keys is taken through a zero additive edit of exactly
    those probabilities (an ``AttentionHooks.post_softmax_edit``), so only ``[B, H, N]`` gradient
    entries exist, never ``[B, H, T, T]``.

    Args:
      model: the reference.
      input_ids: ``[B, T]`` left-padded prompts with one image each.
      attention_mask: ``[B, T]``.
      pixel_values: ``[B, H, W, 3]`` normalised.
      layer: decoder layer index (static).
      mode: one of ``rewards.p2dpo.SALIENCY_MODES`` (static).

    Returns:
      ``[B, G, G]`` float32 saliency.
    """
    if mode not in SALIENCY_MODES:
        raise ValueError(f"saliency mode={mode!r} is not one of {SALIENCY_MODES}")
    batch, length = input_ids.shape
    config = model.config.text_config
    probe = ProbeSpec((layer,), "image_heads")
    query_index = jnp.full((batch,), length - 1, jnp.int32)
    visual_tokens = jax.lax.stop_gradient(model.encode_images(pixel_values))

    def forward(edit_values: jax.Array):
        def add_to_last_row(probs, key_is_image, layer_index):
            del layer_index
            order = jnp.clip(jnp.cumsum(key_is_image, axis=-1) - 1, 0, edit_values.shape[-1] - 1)
            row = jnp.take_along_axis(edit_values, order[:, None, :], axis=-1)  # [B, H, S]
            row = jnp.where(key_is_image[:, None, :], row, 0.0)
            return probs.at[:, :, -1, :].add(row)

        hooks = AttentionHooks(layers=(layer,), post_softmax_edit=add_to_last_row)
        out = model(input_ids, visual_tokens=visual_tokens, attention_mask=attention_mask,
                    probe=probe, hooks=hooks)
        return saliency_objective(out.logits[:, -1]), out.probes[layer]

    zeros = jnp.zeros((batch, config.num_attention_heads, model.config.num_image_tokens), jnp.float32)
    if mode == "attention":
        _, attention = forward(zeros)
        return saliency_map(attention, query_index, mode=mode)
    (_, attention), gradient = jax.value_and_grad(forward, has_aux=True)(zeros)
    # The gradient exists for the last row only; saliency_map reads that row.
    full_gradient = jnp.zeros_like(attention).at[:, :, -1, :].set(gradient)
    return saliency_map(attention, query_index, mode=mode, attention_grad=full_gradient)


def _input_view(width: int, height: int, image_config: ImageProcessorConfig
                ) -> tuple[int, int, int]:
    """``(side, x0, y0)``: the square of the record's image the model sees, in its pixels.

    With ``pad_to_square`` the padded square (``x0, y0 <= 0``); else the centre crop of the
    resized image, i.e. the central ``min(W, H)`` square (resizing scales it uniformly).
    """
    if image_config.pad_to_square:
        side = max(width, height)
        return side, -((side - width) // 2), -((side - height) // 2)
    side = min(width, height)
    return side, (width - side) // 2, (height - side) // 2


def crop_boxes(saliency: np.ndarray, image_sizes: Sequence[tuple[int, int]], *,
               image_config: ImageProcessorConfig, base_box: float,
               ratios: Sequence[float], base_box_fraction: float = 0.0) -> np.ndarray:
    """The adaptive crop box of every example, in pixels of its record image (NumPy).

    ``adaptive_crop_box`` runs on the model's square input view (``_input_view``: the saliency
    grid covers it), then the box is shifted into the image and clipped to it; a box left empty
    by the clipping (all in the padding) becomes the whole image.

    Args:
      saliency: ``[B, G, G]``.
      image_sizes: ``(width, height)`` of each record image.
      image_config: the model's preprocessing.
      base_box: the base box side in record-image pixels (METHODS' 336).
      ratios: the window scales tried.
      base_box_fraction: if > 0, the base side is this fraction of each image's input-view side
        (``PairSettings.base_box_fraction``) and ``base_box`` is unused.

    Returns:
      int32 ``[B, 4]`` ``(x0, y0, x1, y1)`` boxes, exclusive ends.
    """
    boxes = []
    for grid, (width, height) in zip(np.asarray(saliency), image_sizes):
        side, x_offset, y_offset = _input_view(width, height, image_config)
        base = base_box_fraction * side if base_box_fraction > 0 else base_box
        x0, y0, x1, y1 = adaptive_crop_box(grid, image_size=(side, side), base_box=base,
                                           ratios=tuple(ratios))
        box = (max(0, x0 + x_offset), max(0, y0 + y_offset), min(width, x1 + x_offset),
               min(height, y1 + y_offset))
        boxes.append(box if box[0] < box[2] and box[1] < box[3] else (0, 0, width, height))
    return np.asarray(boxes, np.int32)


@jax.jit
def _erase_all(images: jax.Array, boxes: jax.Array) -> jax.Array:
    return jax.vmap(interventions.erase_box)(images, boxes)


def focus_images(images: Sequence[np.ndarray], boxes: np.ndarray, *, combine_mode: str = "stitch"
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(augmented, I_deg)`` of each record image (uint8 ``[H, W, 3]`` each).

    ``augmented``: with ``"stitch"`` ``I_aug`` itself (``interventions.combine``'s one canvas);
    with ``"two_images"`` the crop, ``I_aug`` being the prompt's two images ``(I, crop)``.
    ``I_deg = interventions.erase_box(I, box)``, the box filled with the image's mean colour.
    """
    if combine_mode not in interventions.COMBINE_MODES:
        raise ValueError(f"combine_mode={combine_mode!r} is not one of {interventions.COMBINE_MODES}")
    augmented = [interventions.combine(image, interventions.crop_to_box(image, box),
                                       combine_mode)[-1] for image, box in zip(images, boxes)]
    degraded = []
    for image, box in zip(images, boxes):  # images may differ in size: one call per image
        degraded.append(np.asarray(_erase_all(image[None], np.asarray(box)[None]))[0])
    return augmented, degraded


def augmented_pixels(pixels: np.ndarray, augmented: Sequence[np.ndarray], *, combine_mode: str,
                     image_config: ImageProcessorConfig) -> np.ndarray:
    """The images of the ``I_aug`` prompts in the order their placeholders consume them:
    ``[B, H, W, 3]`` (stitch) or ``[2B, H, W, 3]``, each image followed by its crop (two_images).

    Args:
      pixels: ``[B, H, W, 3]`` the records' images through ``image_config``.
      augmented: ``focus_images``' first output (``B`` uint8 images).
    """
    extra = np.stack([image_config(image) for image in augmented])
    if combine_mode == "stitch":
        return extra
    return np.stack([pixels, extra], axis=1).reshape((-1,) + pixels.shape[1:])


def decode(tokenizer: Any, new_tokens: np.ndarray) -> list[str]:
    """Generated ``[B, M]`` ids -> reply texts (cut at EOS, specials dropped)."""
    return [decode_response(tokenizer, row) for row in np.asarray(new_tokens)]


@dataclasses.dataclass(frozen=True)
class Replies:
    """Generated replies: texts and the log-probs they were chosen with.

    Attributes:
      texts: ``B`` replies (cut at EOS, specials dropped).
      token_logps: float32 ``[B, M]``, each new token's log-prob under the distribution it was
        drawn from (``GenerationOutput.token_logps``; for greedy decoding the model's own
        next-token log-probs, the released code's ``compute_transition_scores``).
      mask: int32 ``[B, M]``, 1 on the new tokens up to and including EOS.
    """

    texts: list[str]
    token_logps: np.ndarray
    mask: np.ndarray

    def split(self, parts: int) -> list[Replies]:
        """``parts`` equal row blocks (e.g. the two halves of one stacked generate call)."""
        size = len(self.texts) // parts
        return [Replies(self.texts[k * size:(k + 1) * size], self.token_logps[k * size:(k + 1) * size],
                        self.mask[k * size:(k + 1) * size]) for k in range(parts)]


def _replies(tokenizer: Any, output) -> Replies:
    new_tokens = np.asarray(output.new_tokens)
    steps = np.arange(new_tokens.shape[1])[None, :]
    mask = (steps < np.asarray(output.lengths)[:, None]).astype(np.int32)
    return Replies(decode(tokenizer, new_tokens), np.asarray(output.token_logps), mask)


def _no_image_token(model: Llava) -> BanTokens:
    # The placeholder id would re-enter the training template as an image token.
    return BanTokens(jnp.asarray([model.config.image_token_id], jnp.int32))


def sample_replies(model: Llava, tokenizer: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
                   pixel_values: np.ndarray, *, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, rng: jax.Array | None = None) -> Replies:
    """The reference's replies by ``generation.generate`` (greedy, or sampled at ``temperature``
    with ``top_p``), the image placeholder banned."""
    output = generate(model, input_ids, pixel_values, attention_mask=attention_mask,
                      max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_p=top_p,
                      rng=rng, logits_processor=_no_image_token(model))
    return _replies(tokenizer, output)


def contrastive_replies(model: Llava, tokenizer: Any, input_ids: np.ndarray,
                        attention_mask: np.ndarray, pixel_values: np.ndarray,
                        noisy_pixel_values: np.ndarray, *, max_new_tokens: int, alpha: float,
                        plausibility: float, temperature: float, top_p: float,
                        rng: jax.Array) -> Replies:
    """The robustness pair's chosen replies: contrastive amplification decoding (clean vs noise);
    their ``token_logps`` are under the combined, tempered distribution, not the model's."""
    output = contrastive_generate(
        model, input_ids, pixel_values, noisy_pixel_values, attention_mask=attention_mask,
        max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, alpha=alpha, plausibility=plausibility,
        temperature=temperature, top_p=top_p, rng=rng, logits_processor=_no_image_token(model))
    return _replies(tokenizer, output)


def pair_batch(tokenizer: Any, prompts: Sequence[str], responses: Mapping[str, Sequence[str]],
               pixel_values: np.ndarray, noise_pixel_values: np.ndarray, *, num_image_tokens: int,
               buckets: Sequence[int], max_length: int, template: str
               ) -> tuple[Batch, list[str | None]]:
    """The ``Batch`` the trainer would build from these pairs (its template, truncation, buckets).

    Args:
      tokenizer: the training tokenizer.
      prompts: ``B`` prompts.
      responses: ``{"chosen", "rejected", "robust_chosen", "robust_rejected"}`` -> ``B`` texts.
      pixel_values, noise_pixel_values: ``[B, H, W, 3]`` the clean and the noise image.
      num_image_tokens, buckets, max_length, template: the training data layout
        (``max_length`` truncates the supervised part, as the training pipeline does).

    Returns:
      ``(batch, drop)``: ``drop[i]`` is the template's drop reason of record ``i`` (its row is a
      filler with an empty response and a zero ``example_mask``) or None.
    """
    rows, drops = [], []
    for i, prompt in enumerate(prompts):
        fields, drop = {}, None
        for group in ("chosen", "rejected", "robust_chosen", "robust_rejected"):
            encoded = encode_prompt_response(tokenizer, prompt, responses[group][i],
                                             num_image_tokens=num_image_tokens,
                                             max_length=max_length, template=template)
            if isinstance(encoded, DropReason):
                drop = encoded.name
                encoded = encode_prompt_response(tokenizer, "", "", num_image_tokens=num_image_tokens,
                                                 max_length=max_length, template=template)
            fields[f"{group}_input_ids"] = encoded.input_ids
            fields[f"{group}_loss_mask"] = encoded.loss_mask
        fields.update(pixel_values=pixel_values[i],
                      robust_noise_pixel_values=noise_pixel_values[i],
                      example_index=np.int32(i))
        rows.append(fields)
        drops.append(drop)
    batch = collate(Batch, rows, example_mask=[d is None for d in drops], buckets=buckets,
                    pad_id=tokenizer.pad_token_id)
    return batch, drops


@functools.partial(nnx.jit, static_argnames=("image_config", "eos_token_id"))
def score_pairs(model: Llava, batch: Batch, *, image_config: ImageProcessorConfig,
                eos_token_id: int) -> dict[str, jax.Array]:
    """The reference's per-token log-probs and masks of both pairs, as the trainer scores them.

    Returns:
      ``{"{r}/token_logps", "{r}/mask"}`` ``[B, T]`` for the responses ``r`` of
      ``objectives.p2dpo.PAIRS`` (focus pair on ``pixel_values``, robustness pair on
      ``robust_noise_pixel_values``).
    """
    scored = reference_scores(_SCORING_PLAN, model, batch, image_config=image_config,
                              eos_token_id=eos_token_id)
    out = {}
    for response in _SCORING_PLAN.reference:
        out[f"{response.name}/token_logps"] = scored[token_logps(REFERENCE, response).key]
        out[f"{response.name}/mask"] = response_mask(batch, response)
    return out


@dataclasses.dataclass(frozen=True)
class PairVerdict:
    """``pair_filter``'s verdict on one pair of every example, with the numbers behind it.

    Attributes:
      reason: int ``[B]``, an index of ``rewards.p2dpo.FILTER_REASONS`` (0 = kept).
      sums: ``([B], [B])`` chosen and rejected response log-probs (sums over response tokens).
      means: ``([B], [B])`` the same as per-token means.
      identical: bool ``[B]``, the two replies are the same text (the pair's DPO term has no
        gradient; P2-DPO's calibration term still has one).
    """

    reason: np.ndarray
    sums: tuple[np.ndarray, np.ndarray]
    means: tuple[np.ndarray, np.ndarray]
    identical: np.ndarray

    def reasons(self, *, drop_identical: bool = False) -> list[str]:
        """Why each row fails: a ``FILTER_REASONS`` name ("kept" passes), or "identical" first
        when ``drop_identical``."""
        return ["identical" if drop_identical and same else FILTER_REASONS[int(code)]
                for same, code in zip(self.identical, self.reason)]


def judge_pairs(scored: Mapping[str, Any], responses: Mapping[str, Sequence[str]], *,
                max_perplexity: float, margin_range: tuple[float, float]) -> dict[str, PairVerdict]:
    """``rewards.p2dpo.pair_filter`` on each pair of ``objectives.p2dpo.PAIRS`` (NumPy out).

    Args:
      scored: ``score_pairs``' output (``{r}/token_logps``, ``{r}/mask`` ``[B, T]``).
      responses: the reply texts by token group (``chosen``, ``rejected``, ``robust_chosen``,
        ``robust_rejected``), ``B`` each.
      max_perplexity, margin_range: the filter's thresholds.
    """
    verdicts = {}
    for pair, responses_of_pair in PAIRS.items():
        logps = [jnp.asarray(scored[f"{r.name}/token_logps"]) for r in responses_of_pair]
        masks = [jnp.asarray(scored[f"{r.name}/mask"]) for r in responses_of_pair]
        _, reason = pair_filter(logps[0], masks[0], logps[1], masks[1],
                                max_perplexity=max_perplexity, margin_range=margin_range)
        verdicts[pair] = PairVerdict(
            reason=np.asarray(reason),
            sums=tuple(np.asarray(sequence_logps(l, m)) for l, m in zip(logps, masks)),
            means=tuple(np.asarray(sequence_logps(l, m, reduction="mean"))
                        for l, m in zip(logps, masks)),
            identical=np.asarray([a == b for a, b in zip(
                *(responses[r.tokens] for r in responses_of_pair))]))
    return verdicts


def select_records(verdicts: Mapping[str, PairVerdict], drops: Sequence[str | None],
                   filter_pairs: Sequence[str], *, drop_identical: bool = False
                   ) -> tuple[list[int], Counter]:
    """The rows kept, and the counts of why the others (or their unfiltered pairs) failed.

    A row is kept when the template encoded it (``drops[i] is None``) and every pair in
    ``filter_pairs`` passed (``PairVerdict.reasons``). Counts: ``dropped/{template reason}``;
    ``{pair}/{reason}`` for every pair that failed (pairs outside ``filter_pairs`` too, for the
    record); ``{pair}/identical_texts`` for every encoded row whose replies are equal; ``kept``.
    """
    kept, stats = [], Counter()
    reasons = {pair: v.reasons(drop_identical=drop_identical) for pair, v in verdicts.items()}
    for row, drop in enumerate(drops):
        if drop is not None:
            stats[f"dropped/{drop}"] += 1
            continue
        failed = False
        for pair, verdict in verdicts.items():
            stats[f"{pair}/identical_texts"] += int(verdict.identical[row])
            if reasons[pair][row] != "kept":
                stats[f"{pair}/{reasons[pair][row]}"] += 1
                failed = failed or pair in filter_pairs
        if not failed:
            kept.append(row)
            stats["kept"] += 1
    return kept, +stats
