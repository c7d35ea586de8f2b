"""One run of the study: a full training config trained from the shared SFT base, or a model
evaluated on one set of splits, each cached on disk under a hash of everything that decides it.

- ``<cache>/train/<key>/``: ``run/`` (the training loop's workdir: checkpoints, ``metrics.jsonl``,
  ``summary.json``; a run killed mid-way resumes from its last checkpoint), ``model/`` (the final
  policy, committed under a temporary name) and ``train.json`` (the config, the summary, the
  chosen / rejected log-probability change, wall time; written last: its presence means the run
  is done).
  The key hashes the config (without its workdir) and the SFT base's parameters.
- ``<cache>/eval/<key>.json``: one evaluation (``training.experiment.evaluate``: greedy,
  sampled and the requested ADAPT decodings) with its per-item details and the splits it read.
  The key hashes the model's key, the evaluation config (splits, world, decoding settings) and
  the seed.
- ``<cache>/xla/``: XLA's persistent compilation cache (`share_compilations`): a program built
  again in a later run or a resumed study is read back instead of compiled (measured on a micro
  study of three rows, repeated in a fresh process: 84 s -> 29 s).

[our choice] The cache keys hash configs, not code: after a change to the training or
evaluation code, start from an empty ``--cache``. The study runs in one process.

Training and evaluation are the main job's (``training.experiment``): the same initial model,
``train_variant`` (FiSAO's loop included), ``evaluate``, P2-DPO's pair generation.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from mmpo_jax.config import checks as config_checks
from mmpo_jax.data.template import DropReason, encode_prompt_response
from mmpo_jax.data.tokenizer import pad_token_id
from mmpo_jax.engine import model_io
from mmpo_jax.engine.disk import write_atomic
from mmpo_jax.engine.reference_cache import params_digest
from mmpo_jax.evaluation.runner import model_scorer
from mmpo_jax.evidence.protocol import Protocol, Splits
from mmpo_jax.models.llava import Llava
from mmpo_jax.training import experiment

BASE_MODEL = "base"
"""The model key of the SFT base."""


def digest(parts: Mapping[str, Any]) -> str:
    """The 16-hex-digit key of ``parts`` (JSON, sorted keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What decides a training run: the config without its workdir."""
    fields = config.to_dict()
    fields.pop("workdir", None)
    return fields


@dataclasses.dataclass
class Study:
    """What every run of one study shares: the protocol, the cache, the world's tokenizer and
    image preprocessing, the SFT base and the preference records of the log-probability check."""

    protocol: Protocol
    cache: pathlib.Path
    tokenizer: Any
    image_config: Any
    base: Llava
    base_digest: str
    logp_records: list[dict[str, Any]]
    world_spec: dict[str, Any]
    log: Callable[[str], None] = print
    trained_now: list[str] = dataclasses.field(default_factory=list)
    evaluated_now: list[str] = dataclasses.field(default_factory=list)
    run_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Each training run's and evaluation's own wall time (``train/<key>``, ``eval/<key>``), as
    recorded when it ran: the study's cost across resumed invocations."""

    @property
    def data_root(self) -> pathlib.Path:
        """Generated training data of this world and base (P2-DPO's pairs)."""
        return self.cache / "generated" / self.base_digest


COMPILATION_CACHE = "xla"
"""``<cache>/xla``: XLA's persistent compilation cache of the study's programs."""


def share_compilations(cache: pathlib.Path) -> pathlib.Path | None:
    """Turns on JAX's persistent compilation cache under ``cache / COMPILATION_CACHE``, unless
    one is configured already (``JAX_COMPILATION_CACHE_DIR``, or a test's): a study builds the
    same programs again in every run (the evaluation's decoding loop for every model, a row's
    training step for every seed), each time from a new closure that the in-memory cache does
    not match. Returns the directory in use. Executables come back bit-identical, so no number
    changes. Call it before the study's first compilation."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(cache / COMPILATION_CACHE))
    directory = jax.config.jax_compilation_cache_dir
    return pathlib.Path(directory) if directory else None


def open_study(protocol: Protocol, cache: pathlib.Path, log: Callable[[str], None] = print) -> Study:
    """Prepares the world, trains (or loads) the SFT base, reads the log-probability records."""
    share_compilations(cache)
    world = protocol.world_config()
    source, tokenizer, image_config = experiment.load_data(world)
    experiment.check_image_size(world, tokenizer, image_config)
    if world.model.init == "sft_base":
        log(f"SFT base: {int(world.sft_base.num_steps)} steps (cached after the first study)")
    base = experiment.initial_model(world, tokenizer)
    records = [source[i] for i in range(min(len(source), protocol.logp_records))]
    return Study(protocol, cache, tokenizer, image_config, base,
                 params_digest(nnx.state(base, nnx.Param))[:16], records,
                 dict(source.metadata.get("world") or {}), log)


def response_logps(model: Llava, study: Study, field: str) -> np.ndarray:
    """``[N]`` summed log-probability of each log-probability record's ``field`` response
    ("chosen" / "rejected") after its prompt and image, under ``model`` (teacher forcing)."""
    max_length = max(study.protocol.world_config().data.buckets)
    encoded = [encode_prompt_response(study.tokenizer, r["prompt"], r[field],
                                      num_image_tokens=model.config.num_image_tokens,
                                      max_length=max_length) for r in study.logp_records]
    kept = [(r, e) for r, e in zip(study.logp_records, encoded) if not isinstance(e, DropReason)]
    score = model_scorer(model, study.image_config, pad_id=pad_token_id(study.tokenizer),
                         batch_size=64)
    logps = score([r["image"] for r, _ in kept], [e.input_ids[:e.num_prompt_tokens] for _, e in kept],
                  [e.input_ids[e.num_prompt_tokens:] for _, e in kept])
    return np.asarray([float(np.sum(row)) for row in logps])


def logp_change(model: Llava, study: Study) -> dict[str, float]:
    """Mean change of the chosen and rejected responses' log-probability from the SFT base to
    ``model`` (nats per response): does the method push the chosen likelihood down?"""
    base_path = study.cache / "base_logps" / f"{study.base_digest}.json"
    if base_path.is_file():
        base = {k: np.asarray(v) for k, v in json.loads(base_path.read_text()).items()}
    else:
        base = {f: response_logps(study.base, study, f) for f in ("chosen", "rejected")}
        base_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(base_path, json.dumps({k: v.tolist() for k, v in base.items()}))
    return {f"logp_change/{field}": float(np.mean(response_logps(model, study, field) - base[field]))
            for field in ("chosen", "rejected")}


@functools.lru_cache(maxsize=1)
def _load_model(directory: pathlib.Path) -> Llava:
    """The last model loaded stays in memory: a run is scored, evaluated on validation and on
    test one after the other, and building the model is a good part of a tiny run's cost."""
    return model_io.load_model(directory)[0]


@dataclasses.dataclass(frozen=True)
class Trained:
    """A finished training run: its key, directory and ``train.json``."""

    key: str
    directory: pathlib.Path
    record: dict[str, Any]

    @property
    def workdir(self) -> pathlib.Path:
        return self.directory / "run"

    def model(self) -> Llava:
        return _load_model(self.directory / "model")


def _ensure_p2dpo_pairs(study: Study, config: ml_collections.ConfigDict) -> None:
    """P2-DPO's pairs, generated once from the SFT base (seed ``base_seed``) for every seed and
    ablation of the row (``generate_p2dpo_pairs`` skips shards already written)."""
    generating = ml_collections.ConfigDict(config.to_dict())
    generating.seed = study.protocol.base_seed
    prompts, tokenizer, image_config = experiment.load_data(experiment.world_config(generating))
    experiment.generate_p2dpo_pairs(generating, study.base, prompts, tokenizer, image_config)


def train(study: Study, config: ml_collections.ConfigDict, label: str) -> Trained:
    """The run of ``config`` from the SFT base: cached, or trained now (resuming a killed run)."""
    key = digest({"config": config_identity(config), "base": study.base_digest})
    directory = study.cache / "train" / key
    if (directory / "train.json").is_file():
        study.log(f"  {label}: cached ({directory})")
        record = json.loads((directory / "train.json").read_text())
        study.run_seconds[f"train/{key}"] = float(record.get("wall_s", 0.0))
        return Trained(key, directory, record)
    started = time.time()
    if config.data.dataset == "p2dpo_pairs":
        _ensure_p2dpo_pairs(study, config)
    source, _, image_config = experiment.load_data(config)
    config_checks.validate(config, device_count=jax.device_count(),
                           dataset_features=getattr(source, "fields", None),
                           num_records=len(source), process_count=jax.process_count(),
                           image_sizes=(image_config.crop_size,
                                        study.base.config.vision_config.image_size))
    config = experiment.with_epoch_steps(config, len(source))
    result = experiment.train_variant(config, model=study.base, tokenizer=study.tokenizer,
                                      source=source, image_config=image_config,
                                      workdir=directory / "run")
    experiment.commit_model(result.model, directory / "model")
    trained = Trained(key, directory, {})
    # scored unsharded, as loaded for evaluation (one compiled scorer for the base and every run)
    record = {"config": config_identity(config), "summary": result.summary,
              **logp_change(trained.model(), study), "wall_s": time.time() - started}
    write_atomic(directory / "train.json", json.dumps(record, indent=1, default=float))  # last
    study.trained_now.append(key)
    study.run_seconds[f"train/{key}"] = record["wall_s"]
    study.log(f"  {label}: trained in {record['wall_s']:.0f} s")
    return Trained(key, directory, record)


def evaluate(study: Study, model_key: str, model: Callable[[], Llava], splits: Splits, seed: int,
             label: str, decodings: Sequence[str] = ()) -> dict[str, Any]:
    """``model`` (loaded only when not cached) evaluated on ``splits`` with sampling seed
    ``seed``: ``{"metrics", "details", "splits", "seed", "model", "decodings"}``."""
    config = study.protocol.world_config(seed, splits.overrides())
    key = digest({"model": model_key, "eval": config.eval.to_dict(),
                  "data": config.data.to_dict(), "seed": seed, "decodings": list(decodings),
                  "splits": splits.identity()})
    path = study.cache / "eval" / f"{key}.json"
    if path.is_file():
        study.log(f"  {label}: evaluation cached")
        result = json.loads(path.read_text())
        study.run_seconds[f"eval/{key}"] = float(result.get("wall_s", 0.0))
        return result
    started = time.time()
    details: dict[str, list] = {}
    metrics = experiment.evaluate(config, model(), study.tokenizer, study.image_config,
                                  decodings=tuple(decodings), details=details)
    result = {"metrics": metrics, "details": details, "splits": splits.identity(), "seed": seed,
              "model": model_key, "decodings": list(decodings), "wall_s": time.time() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, default=float))
    study.evaluated_now.append(key)
    study.run_seconds[f"eval/{key}"] = result["wall_s"]
    study.log(f"  {label}: evaluated on {splits.role} in {result['wall_s']:.0f} s")
    return result

