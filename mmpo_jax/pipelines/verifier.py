"""FiSAO's verifier: CLIP image-text cosine similarity of object words (METHODS.md §6).

``Verifier`` wraps a ``models.clip.CLIPModel`` with its text encoder and image preprocessing:

- ``object_scores(pixel_values, objects)``: ``S(o) = cos(CLIP_image(I), CLIP_text("a photo of a
  {o}."))`` for every object word of every image;
- ``clip_score(pixel_values, texts)``: CLIPScore (Hessel et al., 2021), ``2.5 * max(cos, 0)``, the
  image-text score P2-DPO's dynamic weights read.

Two ways to get one:

- real LLaVA: ``Verifier.from_hf_clip(path)`` loads the transformers ``CLIPModel`` whose vision
  tower the LLaVA model carries (e.g. ``openai/clip-vit-large-patch14-336``) with its tokenizer
  and image processor, from a local directory;
- the shapes world (the embedded tiny LLaVA has no text tower): ``cached_word_clip`` trains a
  tiny CLIP (conv stem like the tiny LLaVA preset, one layer per tower, word-level tokenizer) on a
  closed vocabulary of object phrases and caches it on disk, keyed by a hash of everything that
  determines it. [our choice] It learns from the records' ground-truth objects, not from their
  captions: the ``sft`` captions carry the co-occurrence bias on purpose (absent partners are
  mentioned), and a verifier trained on them would reward the very hallucination FiSAO removes.
  [our choice] The loss is the pairwise sigmoid contrastive loss of SigLIP (Zhai et al., 2023)
  over every image of a batch against every phrase of the vocabulary, labelled by ground truth
  (several objects per image make softmax-contrastive targets ambiguous); it also fixes one
  global decision threshold, which the calibration of FiSAO's rewards relies on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import save_file

from mmpo_jax.data.image_processing import ImageProcessorConfig, from_hf_preprocessor_config
from mmpo_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from mmpo_jax.models import convert
from mmpo_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from mmpo_jax.rewards.fisao import verifier_scores

logger = logging.getLogger(__name__)

OBJECT_PROMPT = "a photo of a {}."
"""The verifier's text for object word ``o`` (METHODS.md §6)."""
CLIP_SCORE_WEIGHT = 2.5
"""CLIPScore's ``w`` (Hessel et al., 2021): ``w * max(cos, 0)``."""
END_WORD = "endoftext"
"""The word-level CLIP's end-of-text token, appended to every text; the text tower pools there."""
LENGTH_MULTIPLE = 8

Record = Mapping[str, Any]
TextEncoder = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
"""``texts -> (input_ids [K, S] int32, attention_mask [K, S] int32)`` for the CLIP text tower."""


@nnx.jit
def _image_embeddings(model: CLIPModel, pixel_values: jax.Array) -> jax.Array:
    return model.get_image_features(pixel_values)


@nnx.jit
def _text_embeddings(model: CLIPModel, input_ids: jax.Array, attention_mask: jax.Array
                     ) -> jax.Array:
    return model.get_text_features(input_ids, attention_mask)


def _unit(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Verifier:
    """A CLIP model, its text encoder and its image preprocessing (see the module doc).

    Args:
      model: the ``CLIPModel`` (both towers and projections).
      encode_texts: its ``TextEncoder``.
      image_config: how a uint8 image becomes this CLIP's ``pixel_values``.
      object_prompt: the text of an object word, ``object_prompt.format(o)``.
    """

    def __init__(self, model: CLIPModel, encode_texts: TextEncoder,
                 image_config: ImageProcessorConfig, *, object_prompt: str = OBJECT_PROMPT):
        self.model = model
        self.encode_texts = encode_texts
        self.image_config = image_config
        self.object_prompt = object_prompt

    @classmethod
    def from_hf_clip(cls, path: str | os.PathLike[str], *, dtype: str = "float32",
                     max_length: int = 77) -> Verifier:
        """A transformers ``CLIPModel`` directory (config, safetensors, tokenizer and
        ``preprocessor_config.json``), e.g. a local copy of openai/clip-vit-large-patch14-336."""
        path = pathlib.Path(path)
        model, _ = convert.load_hf_clip(path, dtype=dtype)
        tokenizer = load_tokenizer(path)
        preprocessor = path / "preprocessor_config.json"
        if not preprocessor.is_file():
            raise FileNotFoundError(f"{path} has no preprocessor_config.json; the verifier needs "
                                    "the CLIP image processor's settings")
        image_config = from_hf_preprocessor_config(json.loads(preprocessor.read_text()),
                                                   pad_to_square=False)

        def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
            encoded = tokenizer(list(texts), padding="max_length", truncation=True,
                                max_length=max_length, return_tensors="np")
            return (encoded["input_ids"].astype(np.int32),
                    encoded["attention_mask"].astype(np.int32))

        return cls(model, encode, image_config)

    def pixels(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 ``[H, W, 3]`` images -> this CLIP's ``pixel_values`` ``[N, H', W', 3]``."""
        return np.stack([self.image_config(image) for image in images])

    def image_embeddings(self, pixel_values: jax.Array | np.ndarray) -> jax.Array:
        """``[N, H, W, 3]`` normalised pixels -> unit image embeddings ``[N, D]``."""
        return _unit(_image_embeddings(self.model, jnp.asarray(pixel_values)))

    def text_embeddings(self, texts: Sequence[str]) -> jax.Array:
        """Unit text embeddings ``[K, D]`` (texts padded to a multiple of 8 tokens)."""
        input_ids, mask = self.encode_texts(texts)
        length = -(-input_ids.shape[1] // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
        length = min(length, self.model.config.text_config.max_position_embeddings)
        pad = length - input_ids.shape[1]
        input_ids = np.pad(input_ids, ((0, 0), (0, max(pad, 0))))
        mask = np.pad(mask, ((0, 0), (0, max(pad, 0))))
        return _unit(_text_embeddings(self.model, jnp.asarray(input_ids), jnp.asarray(mask)))

    def object_embeddings(self, objects: Sequence[str]) -> jax.Array:
        """Unit embeddings ``[K, D]`` of ``object_prompt`` for each object word."""
        return self.text_embeddings([self.object_prompt.format(o) for o in objects])

    def object_scores(self, pixel_values: jax.Array | np.ndarray,
                      objects: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """``S(o)`` for the object words of each image.

        Args:
          pixel_values: ``[N, H, W, 3]``, normalised for this CLIP (``pixels``).
          objects: ``N`` lists of object words (e.g. ``["red circle", "square"]``).

        Returns:
          ``N`` float32 arrays ``[W_i]`` in [-1, 1].
        """
        if len(objects) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images but {len(objects)} object lists; give "
                             "one list per image")
        names = sorted({o for words in objects for o in words})
        if not names:
            return [np.zeros((0,), np.float32) for _ in objects]
        table = self.object_embeddings(names)
        index = {name: i for i, name in enumerate(names)}
        width = max(len(words) for words in objects)
        rows = np.zeros((len(objects), width), np.int32)
        for i, words in enumerate(objects):
            rows[i, :len(words)] = [index[o] for o in words]
        scores = np.asarray(verifier_scores(self.image_embeddings(pixel_values), table[rows]))
        return [scores[i, :len(words)] for i, words in enumerate(objects)]

    def clip_score(self, pixel_values: jax.Array | np.ndarray, texts: Sequence[str], *,
                   weight: float = CLIP_SCORE_WEIGHT) -> np.ndarray:
        """CLIPScore ``weight * max(cos(image_i, text_i), 0)`` of each pair: ``[N]`` float32."""
        if len(texts) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} images but {len(texts)} texts; give one text "
                             "per image")
        cos = verifier_scores(self.image_embeddings(pixel_values),
                              self.text_embeddings(texts)[:, None, :])[:, 0]
        return np.asarray(weight * jnp.maximum(cos, 0.0))


# ----------------------------------------------------------------------------- word-level CLIP


@dataclasses.dataclass(frozen=True)
class WordClipSpec:
    """The tiny CLIP of a closed phrase vocabulary and how it is trained ([our choice] sizes:
    about 0.14M parameters; 400 steps of 64 take a minute or two on 2 CPU cores).

    ``holdout`` records at the end of the training split are never trained on; FiSAO calibrates
    its rewards there and ``discrimination`` reports on them.
    """

    hidden_size: int = 64
    conv_channels: tuple[int, ...] = (16, 32, 64, 64)
    num_layers: int = 1
    num_heads: int = 4
    projection_dim: int = 64
    train_steps: int = 400
    batch_size: int = 64
    learning_rate: float = 3e-3
    holdout: int = 512
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def word_tokenizer(phrases: Sequence[str]):
    """The word-level tokenizer of ``OBJECT_PROMPT`` over ``phrases``, plus ``END_WORD``."""
    texts = [OBJECT_PROMPT.format(p) for p in phrases]
    words = [w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)]
    return build_word_tokenizer([*dict.fromkeys(words), END_WORD], model_max_length=64)


def word_text_encoder(tokenizer) -> TextEncoder:
    """BOS + words + ``END_WORD``, right-padded with ``<pad>``: a ``TextEncoder``."""
    end = tokenizer.convert_tokens_to_ids(END_WORD)

    def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = [tokenizer.encode(text) + [end] for text in texts]
        length = max(len(row) for row in ids)
        input_ids = np.full((len(ids), length), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(ids), length), np.int32)
        for i, row in enumerate(ids):
            input_ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return input_ids, mask

    return encode


def word_clip_config(spec: WordClipSpec, *, image_size: int, tokenizer) -> CLIPConfig:
    """The ``CLIPConfig`` of ``spec`` for square ``image_size`` images and ``tokenizer``."""
    vision = CLIPVisionConfig(
        hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        image_size=image_size, patch_size=2 ** (len(spec.conv_channels) - 1), stem="conv",
        conv_channels=tuple(spec.conv_channels), projection_dim=spec.projection_dim)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, max_position_embeddings=32,
        projection_dim=spec.projection_dim, eos_token_id=tokenizer.convert_tokens_to_ids(END_WORD))
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=spec.projection_dim)


def _presence(records: Sequence[Record], phrases: Sequence[str],
              truth: Callable[[Record], frozenset[str]]) -> np.ndarray:
    """``[N, K]`` float32: 1 where phrase k is present in record n's image."""
    return np.asarray([[p in truth(r) for p in phrases] for r in records], np.float32)


def train_word_clip(records: Sequence[Record], phrases: Sequence[str],
                    truth: Callable[[Record], frozenset[str]], *, image_config: ImageProcessorConfig,
                    spec: WordClipSpec = WordClipSpec()) -> Verifier:
    """Trains the tiny CLIP of ``spec`` on ``records`` (see the module doc) and wraps it.

    Args:
      records: training records with an "image" (uint8 ``[H, W, 3]``); ``truth(record)`` gives the
        phrases present in it. The last ``spec.holdout`` records are not trained on.
      phrases: the closed vocabulary (every object word the verifier will score).
      truth: record -> the phrases present in its image.
      image_config: the image preprocessing (square output of side ``crop_size``).

    Returns:
      the trained ``Verifier``.
    """
    train_count = len(records) - spec.holdout
    if train_count < 1:
        raise ValueError(f"{len(records)} records leave none to train on after holdout="
                         f"{spec.holdout}; use more records or a smaller holdout")
    tokenizer = word_tokenizer(phrases)
    encode = word_text_encoder(tokenizer)
    config = word_clip_config(spec, image_size=image_config.crop_size, tokenizer=tokenizer)
    model = CLIPModel(config, rngs=nnx.Rngs(spec.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    # SigLIP's bias, initialised at -log(K): a phrase is a priori present with probability ~1/K.
    bias = jnp.asarray(-np.log(len(phrases)), jnp.float32)
    phrase_ids, phrase_mask = (jnp.asarray(a) for a in encode(
        [OBJECT_PROMPT.format(p) for p in phrases]))
    tx = optax.adam(optax.warmup_cosine_decay_schedule(
        0.0, spec.learning_rate, max(spec.train_steps // 20, 1), max(spec.train_steps, 2)))
    state = (params, bias)
    opt_state = tx.init(state)

    def loss_fn(state, pixels, labels):
        params, bias = state
        clip = nnx.merge(graphdef, params)
        images = _unit(clip.get_image_features(pixels))
        texts = _unit(clip.get_text_features(phrase_ids, phrase_mask))
        logits = jnp.exp(clip.logit_scale[...]) * images @ texts.T + bias
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))

    @jax.jit
    def step(state, opt_state, pixels, labels):
        loss, grads = jax.value_and_grad(loss_fn)(state, pixels, labels)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    rng = np.random.default_rng(spec.seed)
    pixel_cache: dict[int, np.ndarray] = {}
    presence = _presence([records[i] for i in range(train_count)], phrases, truth)
    for number in range(spec.train_steps):
        rows = rng.integers(0, train_count, size=spec.batch_size)
        for i in set(rows.tolist()) - set(pixel_cache):
            pixel_cache[i] = image_config(records[i]["image"])
        pixels = np.stack([pixel_cache[i] for i in rows])
        state, opt_state, loss = step(state, opt_state, pixels, presence[rows])
        if (number + 1) % 100 == 0:
            logger.info("word CLIP step %d: loss %.4f", number + 1, float(loss))
    nnx.update(model, state[0])
    return Verifier(model, encode, image_config)


def discrimination(verifier: Verifier, records: Sequence[Record], phrases: Sequence[str],
                   truth: Callable[[Record], frozenset[str]], *, batch_size: int = 64
                   ) -> dict[str, float]:
    """How well ``S(o)`` separates present from absent phrases on ``records``.

    Every phrase is scored on every image. Returns ``mean_present``, ``mean_absent`` (scores),
    ``auc`` (probability that a random present (image, phrase) pair outscores a random absent
    one, ties half) and the counts ``num_present``, ``num_absent``.
    """
    table = verifier.object_embeddings(phrases)
    scores = []
    for start in range(0, len(records), batch_size):
        chunk = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        images = verifier.image_embeddings(verifier.pixels([r["image"] for r in chunk]))
        scores.append(np.asarray(images @ table.T))
    scores = np.concatenate(scores)
    present = _presence(records, phrases, truth) > 0
    positive, negative = scores[present], scores[~present]
    return {"mean_present": float(positive.mean()), "mean_absent": float(negative.mean()),
            "auc": auc(positive, negative), "num_present": float(positive.size),
            "num_absent": float(negative.size)}


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """``P(s+ > s-) + P(s+ = s-) / 2`` over all (positive, negative) pairs (Mann-Whitney U with
    average ranks for ties)."""
    positive, negative = np.ravel(positive), np.ravel(negative)
    if positive.size == 0 or negative.size == 0:
        raise ValueError(f"auc needs both kinds of scores; got {positive.size} positive and "
                         f"{negative.size} negative")
    scores = np.concatenate([positive, negative]).astype(np.float64)
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based, ties averaged
    u = ranks[:positive.size].sum() - positive.size * (positive.size + 1) / 2
    return float(u / (positive.size * negative.size))


# ----------------------------------------------------------------------------- disk cache


def _digest(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _param_name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def save_word_clip(verifier: Verifier, spec: WordClipSpec, phrases: Sequence[str],
                   directory: pathlib.Path) -> None:
    """Writes the model (safetensors), its config, phrases and image settings to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = convert.export_params(verifier.model, _param_name)
    # export_params and write_safetensors (np.ascontiguousarray) turn the 0-d logit_scale into
    # [1]; it is written 0-d here, in one file, which convert.read_safetensors reads.
    shapes = {_param_name(path): v.shape
              for path, v in nnx.to_flat_state(nnx.state(verifier.model, nnx.Param))}
    save_file({k: t.reshape(()) if shapes[k] == () else t for k, t in tensors.items()},
              directory / convert.SAFETENSORS_FILE)
    (directory / "verifier.json").write_text(json.dumps({
        "spec": spec.to_dict(), "phrases": list(phrases),
        "image_config": dataclasses.asdict(verifier.image_config)}, indent=2))


def load_word_clip(directory: pathlib.Path) -> Verifier:
    """The ``Verifier`` written by ``save_word_clip``."""
    stored = json.loads((directory / "verifier.json").read_text())
    spec = WordClipSpec(**{**stored["spec"], "conv_channels": tuple(stored["spec"]["conv_channels"])})
    image_config = ImageProcessorConfig(**stored["image_config"])
    tokenizer = word_tokenizer(stored["phrases"])
    config = word_clip_config(spec, image_size=image_config.crop_size, tokenizer=tokenizer)
    model = convert.load_params(lambda: CLIPModel(config, rngs=nnx.Rngs(0)),
                                convert.read_safetensors(directory), _param_name)
    return Verifier(model, word_text_encoder(tokenizer), image_config)


def cached_word_clip(cache_dir: str | os.PathLike[str], key_parts: Mapping[str, Any],
                     records: Sequence[Record], phrases: Sequence[str],
                     truth: Callable[[Record], frozenset[str]], *,
                     image_config: ImageProcessorConfig, spec: WordClipSpec = WordClipSpec()
                     ) -> tuple[Verifier, pathlib.Path]:
    """``train_word_clip`` once per key, then loaded from ``<cache_dir>/<key>/``.

    Args:
      key_parts: what identifies ``records`` (e.g. the shapes world's builder options and split);
        the key also hashes ``spec``, ``phrases`` and ``image_config``.

    Returns:
      ``(verifier, its directory)``. The directory is written atomically (a temporary directory
      renamed into place), so an interrupted build is rebuilt, never half-read.
    """
    key = _digest({"records": dict(key_parts), "spec": spec.to_dict(), "phrases": list(phrases),
                   "image_config": dataclasses.asdict(image_config)})
    root = pathlib.Path(os.path.expanduser(cache_dir))
    directory = root / key[:16]
    if (directory / "verifier.json").is_file():
        logger.info("FiSAO verifier: using the cached word CLIP in %s", directory)
        return load_word_clip(directory), directory
    logger.info("FiSAO verifier: training a word CLIP (%d steps) into %s", spec.train_steps,
                directory)
    verifier = train_word_clip(records, phrases, truth, image_config=image_config, spec=spec)
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=root))
    try:
        save_word_clip(verifier, spec, phrases, staging)
        os.replace(staging, directory)
    except OSError:
        if not (directory / "verifier.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return verifier, directory
