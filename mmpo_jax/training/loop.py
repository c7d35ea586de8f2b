"""The training loop: data, sharded state, reference, jitted step, checkpoints and logs of one run.

``train(config, model=..., tokenizer=..., source=..., image_config=...)`` trains ``model`` (the
initial policy, e.g. the SFT base) with ``config.method`` for ``config.train.num_steps`` optimizer
steps and returns the final policy. Everything the run writes lives under its workdir:
``checkpoints/`` (orbax; a rerun with ``checkpoint.resume`` continues from the latest complete
one, data position and PRNG included), ``metrics.jsonl``, ``tensorboard/``, ``summary.json`` and,
with ``checkpoint.export_hf``, ``hf/`` (the final policy in the transformers layout).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmpo_jax.config import checks as config_checks
from mmpo_jax.data import pipeline
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.engine import optimizer as optimizer_lib
from mmpo_jax.engine import reference as reference_lib
from mmpo_jax.engine import reference_cache, sharding
from mmpo_jax.engine import state as state_lib
from mmpo_jax.engine.checkpointing import Checkpointer, abstract_target, export_policy
from mmpo_jax.engine.scoring import ScoringPlan, plan_scoring, reference_scores
from mmpo_jax.engine.step import make_train_step
from mmpo_jax.models.llava import Llava
from mmpo_jax.training.logging import MetricLogger

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """The final policy (eval mode) and what the run measured."""

    model: Llava
    steps: int
    summary: dict[str, Any]
    workdir: pathlib.Path


def is_sft(method_config: Mapping[str, Any]) -> bool:
    return method_config["name"] == "sft"


def make_iterator(config: Any, source: Any, *, tokenizer: Any, image_config: ImageProcessorConfig,
                  num_image_tokens: int, plan: ScoringPlan, num_epochs: int | None = None,
                  shuffle: bool | None = None, shard_by_process: bool = True,
                  drop_remainder: bool | None = None) -> pipeline.PipelineIterator:
    """The run's batch iterator (per process: ``data.batch_size / process_count`` rows); None
    arguments come from ``config.data``."""
    data = config.data
    per_process, remainder = divmod(int(data.batch_size), jax.process_count())
    if remainder:
        raise ValueError(f"data.batch_size={data.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    common = dict(
        tokenizer=tokenizer, image_config=image_config, num_image_tokens=num_image_tokens,
        batch_size=per_process, buckets=tuple(data.buckets), seed=int(config.seed),
        num_epochs=(int(data.num_epochs) or None) if num_epochs is None else num_epochs,
        shuffle=bool(data.shuffle) if shuffle is None else shuffle,
        max_length=int(data.max_length) or None, template=data.template,
        shard_by_process=shard_by_process, too_long=data.too_long,
        drop_remainder=bool(data.drop_remainder) if drop_remainder is None else drop_remainder)
    if is_sft(config.method):
        field = "response" if "response" in source[0] else "chosen"
        return pipeline.sft_pipeline(source, response_field=field, **common)
    return pipeline.preference_pipeline(source, extras=plan.pipeline_extras, **common)


def _global(tree: Any, mesh: Mesh, rules: Any) -> Any:
    """Process-local NumPy batch leaves -> global arrays sharded over the batch axes."""
    def put(x):
        return jax.make_array_from_process_local_data(
            sharding.batch_sharding(mesh, np.ndim(x), rules), np.asarray(x))
    return jax.tree.map(put, tree)


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


class _Reference:
    """The reference of a run: its mode, the copy's state, or the on-disk cache."""

    def __init__(self, config: Any, plan: ScoringPlan, model: Llava, *, mesh: Mesh, rules: Any,
                 make_batches: Any, source_length: int, tokenizer: Any,
                 image_config: ImageProcessorConfig, eos_token_id: int, workdir: pathlib.Path):
        self.mode = config.reference.mode if plan.reference_rows else "none"
        self.graphdef, self.state, self.cache = None, None, None
        if self.mode in ("copy", "cache"):
            self.graphdef, self.state = reference_lib.placed_copy(model, mesh, rules)
        if self.mode == "cache":
            self._build_cache(config, plan, mesh=mesh, make_batches=make_batches,
                              source_length=source_length, tokenizer=tokenizer,
                              image_config=image_config, eos_token_id=eos_token_id,
                              workdir=workdir)
            self.graphdef, self.state, self.mode = None, None, "cache"

    def _build_cache(self, config, plan, *, mesh, make_batches, source_length, tokenizer,
                     image_config, eos_token_id, workdir):
        graphdef = self.graphdef

        @jax.jit
        def compute(ref_state, batch):
            return reference_scores(plan, nnx.merge(graphdef, ref_state), batch,
                                    image_config=image_config, eos_token_id=eos_token_id,
                                    vision_frozen=bool(config.model.freeze_vision))

        rules = tuple(tuple(r) for r in config.mesh_rules)
        key = reference_cache.cache_key(
            params=reference_cache.params_digest(self.state),
            tokenizer=reference_cache.tokenizer_digest(tokenizer),
            model=config.model.to_dict(), data=config.data.to_dict(), seed=int(config.seed),
            method=config.method.to_dict(), names=[s.key for s in plan.reference_outputs])
        directory = pathlib.Path(os.path.expanduser(config.reference.cache_dir
                                                    or workdir / "reference_cache"))
        self.cache = reference_cache.open_or_build(
            directory, key, names=[s.key for s in plan.reference_outputs],
            num_records=source_length,
            max_length=max(config.data.buckets), batches_fn=make_batches,
            compute_fn=lambda batch: compute(self.state, _global(batch, mesh, rules)),
            progress=bool(config.train.progress_bar))

    def cached(self, host_batch: Any) -> dict[str, np.ndarray]:
        return {} if self.cache is None else self.cache.lookup(host_batch)


def place_policy(split: state_lib.PolicySplit, mesh: Mesh, rules: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)`` of ``split`` on ``mesh`` by their logical axis names."""
    return tuple(jax.device_put(tree, sharding.state_shardings(tree, mesh, rules))
                 for tree in (split.trainable, split.frozen))


def init_opt_state(tx: Any, trainable: Any, mesh: Mesh) -> Any:
    """``tx.init(trainable)``: moments inherit their parameter's sharding; scalars (step counts)
    are replicated over ``mesh``."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        jax.jit(tx.init)(trainable))


def open_and_resume(config: Any, workdir: pathlib.Path, trainable: Any, opt_state: Any,
                    rng: jax.Array, data_iterator: Any = None
                    ) -> tuple[Checkpointer, Any, Any, jax.Array, int]:
    """The run's ``Checkpointer`` and ``(trainable, opt_state, rng, start step)``, restored from
    its latest complete checkpoint when ``checkpoint.resume`` (``data_iterator`` repositioned)."""
    ckpt = Checkpointer(workdir / "checkpoints", save_every=int(config.checkpoint.save_every),
                        keep=int(config.checkpoint.keep) or None,
                        async_save=bool(config.checkpoint.async_save))
    if not (config.checkpoint.resume and ckpt.latest_step() is not None):
        return ckpt, trainable, opt_state, rng, 0
    restored = ckpt.restore(
        abstract_params=abstract_target(trainable, _shardings(trainable)),
        abstract_opt_state=abstract_target(opt_state, _shardings(opt_state)),
        data_iterator=data_iterator)
    logger.info("%s: resumed from step %d in %s", config.name, restored.step, ckpt.directory)
    return ckpt, restored.params, restored.opt_state, restored.rng, restored.step


def open_metric_log(config: Any, workdir: pathlib.Path, *, num_steps: int, start: int
                    ) -> MetricLogger:
    """The run's ``MetricLogger`` (bar, TensorBoard, jsonl) from ``config.train`` and its name."""
    return MetricLogger(workdir, total_steps=num_steps, initial_step=start,
                        log_every=int(config.train.log_every),
                        progress_bar=bool(config.train.progress_bar), run_name=str(config.name))


def finish_run(config: Any, *, ckpt: Checkpointer, metric_log: MetricLogger, end: int,
               split: state_lib.PolicySplit, trainable: Any, opt_state: Any, frozen: Any,
               rng: jax.Array, workdir: pathlib.Path, metadata: Mapping[str, Any],
               data_iterator: Any = None) -> TrainResult:
    """The end of a run: the final checkpoint, the summary, the merged policy (eval mode) and,
    with ``checkpoint.export_hf``, its transformers export. Closes the logger and checkpointer."""
    ckpt.save(end, params=trainable, opt_state=opt_state, rng=rng, data_iterator=data_iterator,
              metadata=metadata, force=True)
    ckpt.wait_until_finished()
    metric_log.flush()
    summary = metric_log.summary()
    metric_log.write_summary()
    logger.info("%s\n%s", config.name, metric_log.format_summary())
    metric_log.close()
    ckpt.close()
    final = nnx.merge(split.graphdef, trainable, frozen)
    final.eval()
    if config.checkpoint.export_hf:
        exported = reference_lib.merged_copy(final)
        export_policy(exported, exported.config, workdir / "hf")
    return TrainResult(model=final, steps=end, summary=summary, workdir=workdir)


def _workdir(config: Any) -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(config.workdir or f"runs/{config.name}"))


def train(config: Any, *, model: Llava, tokenizer: Any, source: Any,
          image_config: ImageProcessorConfig, workdir: str | os.PathLike | None = None,
          data_iterator: Iterator | None = None, stop_at: int | None = None) -> TrainResult:
    """Runs ``config`` from ``model`` (see the module doc); the caller's ``model`` is untouched.

    Args:
      config: a validated training config (``configs/*.py``).
      model: the initial policy; also the reference (``copy``/``cache``: a frozen copy of it).
      tokenizer, source, image_config: the training split and how to encode it.
      workdir: overrides ``config.workdir``.
      data_iterator: a ready iterator to read instead of building one (tests).
      stop_at: leave after this step (checkpointed) as a pre-empted run would; a later call
        resumes from it. None runs to ``train.num_steps``.
    """
    config_checks.validate(config, device_count=jax.device_count())
    workdir = pathlib.Path(workdir) if workdir is not None else _workdir(config)
    workdir.mkdir(parents=True, exist_ok=True)
    method = config.method.to_dict()
    plan = plan_scoring(method)
    num_steps = int(config.train.num_steps)
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.mesh_rules)
    num_image_tokens = model.config.num_image_tokens
    eos_token_id = int(tokenizer.eos_token_id)

    def iterator(**overrides):
        return make_iterator(config, source, tokenizer=tokenizer, image_config=image_config,
                             num_image_tokens=num_image_tokens, plan=plan, **overrides)

    policy = state_lib.prepare_policy(state_lib.copy_model(model), config.model,
                                      seed=int(config.seed))
    reference = _Reference(
        config, plan, policy, mesh=mesh, rules=rules, source_length=len(source),
        make_batches=lambda: iterator(num_epochs=1, shuffle=False, shard_by_process=False,
                                      drop_remainder=False),  # a row for every record
        tokenizer=tokenizer, image_config=image_config, eos_token_id=eos_token_id,
        workdir=workdir)
    split = state_lib.split_policy(policy, config.model)
    logger.info("%s: %d trainable parameters; replicated on this mesh: %s", config.name,
                split.num_trainable, sharding.describe_replications(split.trainable, mesh, rules))
    trainable, frozen = place_policy(split, mesh, rules)
    tx = optimizer_lib.make_optimizer(config.optimizer, num_steps)
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, num_steps)
    opt_state = init_opt_state(tx, trainable, mesh)
    it = data_iterator if data_iterator is not None else iterator()
    ckpt, trainable, opt_state, rng, start = open_and_resume(
        config, workdir, trainable, opt_state, jax.random.key(int(config.seed)), it)

    replicated = NamedSharding(mesh, PartitionSpec())
    has_dropout = bool(config.model.lora.enabled and config.model.lora.dropout > 0)
    step_fn = None
    metadata = {"config": config.to_dict(), "method": method}
    with open_metric_log(config, workdir, num_steps=num_steps, start=start) as metric_log:
        end = num_steps if stop_at is None else min(int(stop_at), num_steps)
        for step in range(start, end):
            host_batch = next(it)
            cached = reference.cached(host_batch)
            batch, cached = _global(host_batch, mesh, rules), _global(cached, mesh, rules)
            if step_fn is None:  # shardings are fixed by the first batch's structure
                step_fn = make_train_step(
                    graphdef=split.graphdef, plan=plan, method_config=method, tx=tx,
                    reference_mode=reference.mode if reference.mode != "none" else "cache",
                    reference_graphdef=reference.graphdef, image_config=image_config,
                    eos_token_id=eos_token_id, vision_frozen=bool(config.model.freeze_vision),
                    accum_steps=int(config.optimizer.grad_accum_steps), has_dropout=has_dropout,
                    in_shardings=(_shardings(trainable), _shardings(opt_state),
                                  _shardings(frozen), _shardings(reference.state),
                                  _shardings(batch), _shardings(cached), replicated),
                    out_shardings=(_shardings(trainable), _shardings(opt_state), replicated))
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen,
                                                    reference.state, batch, cached,
                                                    jax.random.fold_in(rng, step))
            metrics = dict(metrics)
            metrics["optim/learning_rate"] = float(schedule(step))
            metric_log.log(step + 1, metrics, examples=int(np.sum(host_batch.example_mask)))
            ckpt.save(step + 1, params=trainable, opt_state=opt_state, rng=rng,
                      data_iterator=it, metadata=metadata)
        return finish_run(config, ckpt=ckpt, metric_log=metric_log, end=end, split=split,
                          trainable=trainable, opt_state=opt_state, frozen=frozen, rng=rng,
                          workdir=workdir, metadata=metadata, data_iterator=it)
