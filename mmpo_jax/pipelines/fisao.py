"""FiSAO rollouts: on-policy samples, the object words they mention, verifier token rewards and
their calibration (METHODS.md §6, [our choice] design).

One rollout batch, for ``P`` prompts and ``n`` samples each (``B = P n`` rows):

1. ``sample_rollouts``: ``generate`` from the current policy at ``temperature`` (1.0 in FiSAO),
   the image placeholder banned (``BanTokens``), each prompt repeated ``n`` times with group id
   ``p``; the result is a ``RolloutBatch`` of fixed shapes (prompts left-padded to a multiple of
   8, ``M = max_new_tokens`` response slots), so every jitted piece compiles once per shape.
2. ``find_object_words``: the object words of each response, found in its decoded text with an
   ``ObjectVocabulary`` (longest phrase first, plurals and synonyms included) and mapped back to
   the index of the token that ends the word: ``ObjectWords`` ``[B, W]``, ``W = M``.
3. ``rollout_rewards`` (jitted): ``S(o)`` from the verifier's image embedding and the embedding
   of ``"a photo of a {o}."`` (``o`` the vocabulary's canonical name, e.g. "red circle" for "two
   red circles"), ``r(o) = clip(2 (S - mu_h) / (mu_c - mu_h) - 1, -1, 1)`` on the last sub-token
   of the word, 0 elsewhere; or, with ``reward_granularity="sentence"``, the mean object reward
   of the response on every response token; plus an optional sequence-end reward.
4. ``calibrate_policy``: ``mu_c`` and ``mu_h`` are the mean verifier scores of correct and of
   hallucinated mentions in captions the initial policy samples on a calibration split with
   ground truth; computed once and cached on disk (``cached_calibration``).

Labels. Shapes world: "red circle" is correct when a red circle is in the scene (attribute
level), a bare "circle" when any circle is; counts are not judged (the verifier cannot see
them) [our choice]. COCO: a category is correct when the record's ground-truth list holds it.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from transformers import PreTrainedTokenizerBase

from mmpo_jax.data import shapes_world
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.data.tokenizer import pad_token_id
from mmpo_jax.evaluation import chair
from mmpo_jax.evaluation.shapes import objects_from_json
from mmpo_jax.generation import BanTokens, generate
from mmpo_jax.generation.prompts import left_padded_prompts
from mmpo_jax.models.llava import Llava
from mmpo_jax.objectives.metrics import Metric, mean_metric
from mmpo_jax.pipelines.verifier import Verifier
from mmpo_jax.rewards import fisao as fisao_rewards

Record = Mapping[str, Any]
VOCABULARIES = ("shapes_world", "coco")


# ----------------------------------------------------------------------------- object words


@dataclasses.dataclass(frozen=True)
class ObjectVocabulary:
    """Object words with their surface forms, and how a record says which objects are present.

    Attributes:
      name: "shapes_world" or "coco" (or any label).
      forms: lower-case word tuple of a surface form -> its canonical object name (what the
        verifier scores), or None for a phrase that names no object although a word in it does
        ("train track").
      truth: record -> the canonical names of the objects in its image.
    """

    name: str
    forms: Mapping[tuple[str, ...], str | None]
    truth: Callable[[Record], frozenset[str]]

    @functools.cached_property
    def objects(self) -> tuple[str, ...]:
        """The canonical names, sorted: row ``k`` of the verifier's object table."""
        return tuple(sorted({name for name in self.forms.values() if name is not None}))

    @functools.cached_property
    def _longest(self) -> int:
        return max(len(form) for form in self.forms)

    def mentions(self, text: str) -> list[tuple[int, str]]:
        """``(end character, canonical name)`` of every object mention in ``text``.

        The scan is CHAIR's (``evaluation.chair.phrase_mentions``): the longest surface form
        starting at each word wins ("red circle" over "circle").
        """
        return [(end, name) for end, _, name in chair.phrase_mentions(text, self.forms,
                                                                        self._longest)
                if name is not None]


def _shapes_truth(record: Record) -> frozenset[str]:
    objects = objects_from_json(record["objects"])
    return frozenset([f"{o.color} {o.shape}" for o in objects] + [o.shape for o in objects])


def shapes_world_vocabulary() -> ObjectVocabulary:
    """Shapes ("circle", "circles") and coloured shapes ("red circle", "red circles")."""
    forms: dict[tuple[str, ...], str] = {}
    for shape in shapes_world.SHAPES:
        for noun in (shape, shapes_world.PLURALS[shape]):
            forms[(noun,)] = shape
            forms.update({(color, noun): f"{color} {shape}" for color in shapes_world.COLORS})
    return ObjectVocabulary("shapes_world", forms, _shapes_truth)


def _coco_truth(record: Record) -> frozenset[str]:
    return frozenset(json.loads(record["objects"]))


def coco_vocabulary() -> ObjectVocabulary:
    """The COCO-80 categories with CHAIR's synonyms, plurals and two-word rules
    (``evaluation.chair``'s phrase table; the canonical name is the category)."""
    index, _ = chair.coco_phrase_index()  # one phrase table for CHAIR and FiSAO
    return ObjectVocabulary("coco", dict(index), _coco_truth)


def object_vocabulary(name: str) -> ObjectVocabulary:
    """``"shapes_world"`` or ``"coco"`` (``rollout.vocabulary``)."""
    if name == "shapes_world":
        return shapes_world_vocabulary()
    if name == "coco":
        return coco_vocabulary()
    raise ValueError(f"unknown object vocabulary {name!r}; valid: {VOCABULARIES}")


@struct.dataclass
class ObjectWords:
    """The object words of a batch of responses, padded to ``W`` per row.

    Attributes:
      object_index: ``[B, W]`` int32 row of ``ObjectVocabulary.objects`` (0 on padding).
      last_token: ``[B, W]`` int32 response position of the word's last token (0 on padding).
      mask: ``[B, W]`` bool, true on real words.
    """

    object_index: jax.Array
    last_token: jax.Array
    mask: jax.Array


def token_mentions(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int],
                   vocabulary: ObjectVocabulary) -> list[tuple[int, str]]:
    """``(index of the word's last token, canonical name)`` of each mention in a response.

    The response is decoded once whole and once per prefix; a mention ending at character ``c``
    of the text ends on the first token whose prefix decodes to at least ``c`` characters. This
    works for word-level and sub-word tokenizers alike.

    Args:
      token_ids: the response tokens up to its end (special tokens are skipped in decoding).
    """
    ids = [int(i) for i in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    ends = np.maximum.accumulate(
        [len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) for k in range(len(ids))]
        or [0]).tolist()
    return [(min(bisect.bisect_left(ends, end), len(ids) - 1), name)
            for end, name in vocabulary.mentions(text)]


def find_object_words(tokenizer: PreTrainedTokenizerBase, new_tokens: np.ndarray,
                      lengths: np.ndarray, vocabulary: ObjectVocabulary
                      ) -> tuple[ObjectWords, list[list[str]]]:
    """The ``ObjectWords`` of sampled responses, and their canonical names per row.

    Args:
      new_tokens: ``[B, M]`` generated tokens; lengths: ``[B]`` tokens up to and including EOS.

    Returns:
      ``(ObjectWords with W = M, names)``: a word ends on a token of its own unless a sub-word
      tokenizer merges words, so ``M`` slots hold every word in practice; any beyond are dropped.
    """
    new_tokens, lengths = np.asarray(new_tokens), np.asarray(lengths)
    batch, width = new_tokens.shape
    row_of = {name: k for k, name in enumerate(vocabulary.objects)}
    object_index = np.zeros((batch, width), np.int32)
    last_token = np.zeros((batch, width), np.int32)
    mask = np.zeros((batch, width), bool)
    names = []
    for b in range(batch):
        found = token_mentions(tokenizer, new_tokens[b, :lengths[b]], vocabulary)[:width]
        names.append([name for _, name in found])
        for w, (token, name) in enumerate(found):
            object_index[b, w], last_token[b, w], mask[b, w] = row_of[name], token, True
    return ObjectWords(object_index, last_token, mask), names


# ----------------------------------------------------------------------------- rollouts


@struct.dataclass
class RolloutBatch:
    """Sampled responses of ``P`` prompts, ``n`` each: every array has ``B = P n`` rows.

    Attributes:
      sequences: ``[B, T + M]`` int32, the left-padded prompt then the ``M`` response slots
        (``pad_token_id`` after EOS).
      attention_mask: ``[B, T + M]`` bool, real prompt tokens and response tokens up to EOS.
      pixel_values: ``[B, H, W, 3]`` the policy's normalised image of each row.
      response_mask: ``[B, M]`` bool, response tokens (EOS included).
      group_ids: ``[B]`` int32, the prompt of each row (0..P-1).
      example_mask: ``[B]`` float32, 1 on every row (FiSAO's batches are never padded).
      sampler_logps: ``[B, M]`` float32, the log-probability each token was drawn with
        (``GenerationOutput.token_logps``), 0 off the response; at temperature 1 it equals the
        policy's teacher-forced log-prob, a check the training loop logs.
      prompt_length: ``T`` (static).
    """

    sequences: jax.Array
    attention_mask: jax.Array
    pixel_values: jax.Array
    response_mask: jax.Array
    group_ids: jax.Array
    example_mask: jax.Array
    sampler_logps: jax.Array
    prompt_length: int = struct.field(pytree_node=False)

    @property
    def new_tokens(self) -> jax.Array:
        """``[B, M]`` the response slots."""
        return self.sequences[:, self.prompt_length:]


def sample_rollouts(model: Llava, tokenizer: PreTrainedTokenizerBase,
                    images: Sequence[np.ndarray], prompts: Sequence[str], *,
                    image_config: ImageProcessorConfig, num_samples: int, max_new_tokens: int,
                    temperature: float, rng: jax.Array) -> tuple[RolloutBatch, np.ndarray]:
    """Samples ``num_samples`` responses per (image, prompt) from ``model``.

    Args:
      model: the policy (read only).
      images: ``P`` uint8 ``[H, W, 3]`` images; prompts: ``P`` requests without template.
      image_config: the policy's image preprocessing.
      num_samples: ``n``; rows ``p n .. p n + n - 1`` hold prompt ``p``.
      max_new_tokens: ``M``; temperature: of sampling (> 0); rng: the PRNG key of this batch.

    Returns:
      ``(RolloutBatch, lengths [B])``: ``lengths`` counts response tokens up to and including EOS.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one per image")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: FiSAO samples, use a temperature > 0")
    pad = pad_token_id(tokenizer)
    prompt_ids, prompt_mask = left_padded_prompts(
        tokenizer, prompts, num_image_tokens=model.config.num_image_tokens)
    input_ids = np.repeat(prompt_ids, num_samples, axis=0)
    mask = np.repeat(prompt_mask, num_samples, axis=0)
    pixels = np.repeat(np.stack([image_config(image) for image in images]), num_samples, axis=0)
    output = generate(model, input_ids, pixels, attention_mask=mask,
                      max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=pad, temperature=temperature, rng=rng,
                      logits_processor=BanTokens(jnp.asarray([model.config.image_token_id])))
    lengths = np.asarray(output.lengths)
    response_mask = np.arange(max_new_tokens)[None, :] < lengths[:, None]
    batch = RolloutBatch(
        sequences=np.asarray(output.sequences, np.int32),
        attention_mask=np.concatenate([mask, response_mask], axis=1),
        pixel_values=pixels,
        response_mask=response_mask,
        group_ids=np.repeat(np.arange(len(prompts), dtype=np.int32), num_samples),
        example_mask=np.ones(len(input_ids), np.float32),
        sampler_logps=np.where(response_mask, np.asarray(output.token_logps), 0.0),
        prompt_length=int(input_ids.shape[1]))
    return batch, lengths


# ----------------------------------------------------------------------------- rewards


@functools.partial(jax.jit, static_argnames=("reward_granularity",))
def rollout_rewards(image_embeds: jax.Array, object_embeds: jax.Array, words: ObjectWords,
                    response_mask: jax.Array, mu_c: jax.Array, mu_h: jax.Array, *,
                    reward_granularity: str = "token",
                    sequence_end_reward: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, dict[str, Metric]]:
    """Calibrated token rewards of a rollout batch.

    Args:
      image_embeds: ``[B, D]`` verifier image embedding of each row's image.
      object_embeds: ``[K, D]`` verifier embeddings of ``"a photo of a {o}."`` per vocabulary
        object (``Verifier.object_embeddings(vocabulary.objects)``).
      words: the rows' ``ObjectWords`` ``[B, W]``.
      response_mask: ``[B, M]``; mu_c, mu_h: the calibration (traced: no recompile).
      reward_granularity: "token" or "sentence" (``rewards.fisao.place_word_rewards``).
      sequence_end_reward: ``[B]`` optional reward added on each response's last token.

    Returns:
      ``(token_rewards [B, M], word_rewards [B, W], metrics)``; metrics (sum, count):
      ``rollout/verifier_score`` and ``rollout/object_reward`` (mean over words),
      ``rollout/positive_fraction`` (words rewarded > 0), ``rollout/objects_per_sample``,
      ``rollout/response_length``.
    """
    scores = fisao_rewards.verifier_scores(image_embeds, object_embeds[words.object_index])
    word_rewards = jnp.where(words.mask, fisao_rewards.object_reward(scores, mu_c, mu_h), 0.0)
    token_rewards = fisao_rewards.place_word_rewards(
        word_rewards, words.last_token, response_mask.shape[1], word_mask=words.mask,
        response_mask=response_mask, reward_granularity=reward_granularity,
        sequence_end_reward=sequence_end_reward)
    metrics = {
        "rollout/verifier_score": mean_metric(scores, words.mask),
        "rollout/object_reward": mean_metric(word_rewards, words.mask),
        "rollout/positive_fraction": mean_metric((word_rewards > 0).astype(jnp.float32),
                                                 words.mask),
        "rollout/objects_per_sample": mean_metric(jnp.sum(words.mask, -1).astype(jnp.float32)),
        "rollout/response_length": mean_metric(
            jnp.sum(response_mask, -1).astype(jnp.float32)),
    }
    return token_rewards, word_rewards, metrics


# ----------------------------------------------------------------------------- calibration


@dataclasses.dataclass(frozen=True)
class Calibration:
    """``mu_c`` / ``mu_h``: mean verifier scores of correct / hallucinated mentions, and how many
    mentions of each kind they average."""

    mu_c: float
    mu_h: float
    num_correct: int
    num_hallucinated: int


def mention_scores(model: Llava, tokenizer: PreTrainedTokenizerBase, verifier: Verifier,
                   vocabulary: ObjectVocabulary, records: Sequence[Record], *,
                   image_config: ImageProcessorConfig, num_samples: int, max_new_tokens: int,
                   temperature: float = 1.0, prompts_per_batch: int = 16, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Verifier scores of the correct and of the hallucinated object mentions in captions that
    ``model`` samples for ``records`` (each with "image", "prompt", "objects").

    Returns:
      ``(correct [N_c], hallucinated [N_h])`` float32 scores.
    """
    object_embeds = verifier.object_embeddings(vocabulary.objects)
    correct, hallucinated = [], []
    for number, start in enumerate(range(0, len(records), prompts_per_batch)):
        chunk = [records[i] for i in range(start, min(start + prompts_per_batch, len(records)))]
        images = [r["image"] for r in chunk]
        rollout, lengths = sample_rollouts(
            model, tokenizer, images, [r["prompt"] for r in chunk], image_config=image_config,
            num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
            rng=jax.random.fold_in(jax.random.key(seed), number))
        words, names = find_object_words(tokenizer, np.asarray(rollout.new_tokens), lengths,
                                         vocabulary)
        image_embeds = jnp.repeat(verifier.image_embeddings(verifier.pixels(images)),
                                  num_samples, axis=0)
        scores = np.asarray(fisao_rewards.verifier_scores(
            image_embeds, object_embeds[words.object_index]))
        for row, row_names in enumerate(names):
            present = vocabulary.truth(chunk[row // num_samples])
            for w, name in enumerate(row_names):
                (correct if name in present else hallucinated).append(scores[row, w])
    return np.asarray(correct, np.float32), np.asarray(hallucinated, np.float32)


def calibrate_policy(model: Llava, tokenizer: PreTrainedTokenizerBase, verifier: Verifier,
                     vocabulary: ObjectVocabulary, records: Sequence[Record], **kwargs: Any
                     ) -> Calibration:
    """``mu_c``, ``mu_h`` (``rewards.fisao.calibrate``) of ``mention_scores(...)``."""
    correct, hallucinated = mention_scores(model, tokenizer, verifier, vocabulary, records,
                                           **kwargs)
    mu_c, mu_h = fisao_rewards.calibrate(correct, hallucinated)
    return Calibration(mu_c, mu_h, int(correct.size), int(hallucinated.size))


def calibration_key(**parts: Any) -> str:
    """sha256 of everything that determines a calibration (JSON-able parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached_calibration(directory: str | os.PathLike[str], key: str,
                       compute: Callable[[], Calibration]) -> Calibration:
    """``compute()`` once per ``key``, stored as ``<directory>/<key[:16]>.json`` (written
    atomically); later calls read it."""
    directory = pathlib.Path(os.path.expanduser(directory))
    path = directory / f"{key[:16]}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return Calibration(**stored["calibration"])
    calibration = compute()
    directory.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps({"key": key, "calibration": dataclasses.asdict(calibration)},
                                  indent=2))
    os.replace(staging, path)
    return calibration
