"""The training loop: data, sharded state, reference, jitted step, checkpoints and logs of one run.

``train(config, model=..., tokenizer=..., source=..., image_config=...)`` trains ``model`` (the
initial policy, e.g. the SFT base) with ``config.method`` for ``config.train.num_steps`` optimizer
steps and returns the final policy. Everything the run writes lives under its workdir:
``checkpoints/`` (orbax; a rerun with ``checkpoint.resume`` continues from the latest complete
one, data position and PRNG included), ``metrics.jsonl``, ``tensorboard/``, ``summary.json`` (kept
as it is by a rerun that trains no step) and, with ``checkpoint.export_hf``, ``hf/`` (the final
policy as a complete llava-hf directory, ``engine.hf_export``). An ``evaluator``
(``training.benchmarks``: real-data CHAIR / POPE / AMBER) runs on the policy at the end and every
``benchmarks.every`` steps; its metrics are records of their own in the logs and the summary.

Several processes (``engine.distributed``): each reads its own shard of the data
(``data.batch_size / process_count`` rows, padded to the longest process's bucket) and the rows
form one global batch (``jax.make_array_from_process_local_data``: process ``k``'s rows are rows
``[k B/P, (k+1) B/P)`` of it on a mesh laid out over ``jax.devices()``); all of them save and
restore the checkpoints (which must be on a disk they share) and process 0 alone writes the
metric log, TensorBoard, the summary and the export.

Faults: the workdir and ``checkpoints/`` are probed for writability before anything is built
(``engine.disk``); a step with a NaN/inf loss or gradient norm is skipped, and
``train.max_bad_steps`` of them in a row stop the run with ``divergence.TrainingDiverged`` after
writing ``summary.json`` (``training.divergence``); a failed checkpoint write stops it with
``engine.checkpointing.CheckpointWriteError``; resuming skips (and sets aside) checkpoints that
fail their checks. ``summary.json`` counts the skipped steps (``skipped_steps``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Iterator, Mapping

import grain
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmpo_jax.config import checks as config_checks
from mmpo_jax.data import pipeline
from mmpo_jax.data.batch import pad_to_length
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.data.interleaving import Interleaved
from mmpo_jax.engine import distributed
from mmpo_jax.engine import optimizer as optimizer_lib
from mmpo_jax.engine import reference as reference_lib
from mmpo_jax.engine import reference_cache, sharding
from mmpo_jax.engine import state as state_lib
from mmpo_jax.engine.checkpointing import Checkpointer, abstract_target, export_policy
from mmpo_jax.engine.disk import require_writable
from mmpo_jax.engine.scoring import ScoringPlan, plan_scoring, reference_scores
from mmpo_jax.engine.step import make_train_step
from mmpo_jax.models.llava import Llava
from mmpo_jax.training.divergence import BadStepGuard
from mmpo_jax.training.logging import SUMMARY_FILE, MetricLogger, read_summary

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
                  drop_remainder: bool | None = None, shard: tuple[int, int] | None = None,
                  focus_source: Any = None) -> pipeline.PipelineIterator | Interleaved:
    """The run's batch iterator (per process: ``data.batch_size / process_count`` rows); None
    arguments come from ``config.data``.

    ``shard=(k, P)`` gives the iterator process ``k`` of a ``P``-process job reads, on any
    process (tests, debugging); None reads this process's shard (or everything, without
    ``shard_by_process``). ``focus_source`` (SFT only): two-image records (``image`` then
    ``focus_image``) whose batches are interleaved with ``source``'s.
    """
    data = config.data
    index, count = shard if shard is not None else (jax.process_index(), jax.process_count())
    per_process, remainder = divmod(int(data.batch_size), count)
    if remainder:
        raise ValueError(f"data.batch_size={data.batch_size} is not divisible by the "
                         f"{count} processes")
    common = dict(
        tokenizer=tokenizer, image_config=image_config, num_image_tokens=num_image_tokens,
        batch_size=per_process, buckets=tuple(data.buckets), seed=int(config.seed),
        num_epochs=(int(data.num_epochs) or None) if num_epochs is None else num_epochs,
        shuffle=bool(data.shuffle) if shuffle is None else shuffle,
        max_length=int(data.max_length) or None, template=data.template,
        shard_by_process=shard_by_process, too_long=data.too_long,
        drop_remainder=bool(data.drop_remainder) if drop_remainder is None else drop_remainder,
        shard_options=None if shard is None else grain.sharding.ShardOptions(index, count))
    if is_sft(config.method):
        field = "response" if "response" in source[0] else "chosen"
        batches = pipeline.sft_pipeline(source, response_field=field, **common)
        if focus_source is None:
            return batches
        return Interleaved([batches, pipeline.sft_pipeline(focus_source, response_field="response",
                                                           two_images=True, **common)])
    if focus_source is not None:
        raise ValueError("two-image focus records are mixed into an SFT only; "
                         f"method.name={config.method['name']!r}")
    return pipeline.preference_pipeline(source, extras=plan.pipeline_extras, **common)


def _global(tree: Any, mesh: Mesh, rules: Any) -> Any:
    """Process-local NumPy batch leaves -> global arrays sharded over the batch axes."""
    def put(x):
        return jax.make_array_from_process_local_data(
            sharding.batch_sharding(mesh, np.ndim(x), rules), np.asarray(x))
    return jax.tree.map(put, tree)


def same_length_everywhere(host_batch: Any, pad_id: int) -> Any:
    """The process's batch padded to the longest of all processes' (no-op for one process): the
    rows of one global array must share its shape. Agreed host-side, every step."""
    if jax.process_count() == 1:
        return host_batch
    length = max(distributed.all_gather("batch length", host_batch.sequence_length))
    return pad_to_length(host_batch, length, pad_id)


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
            params=reference_cache.params_digest(self.state),  # (collective over processes)
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
    return tuple(distributed.put(tree, sharding.state_shardings(tree, mesh, rules))
                 for tree in (split.trainable, split.frozen))


def open_and_resume(config: Any, workdir: pathlib.Path, trainable: Any, opt_state: Any,
                    rng: jax.Array, data_iterator: Any = None
                    ) -> tuple[Checkpointer, Any, Any, jax.Array, int]:
    """The run's ``Checkpointer`` and ``(trainable, opt_state, rng, start step)``, restored from
    its newest checkpoint that passes its checks when ``checkpoint.resume`` (``data_iterator``
    repositioned); from step 0 when there is none."""
    ckpt = Checkpointer(workdir / "checkpoints", save_every=int(config.checkpoint.save_every),
                        keep=int(config.checkpoint.keep) or None,
                        async_save=bool(config.checkpoint.async_save))
    if not (config.checkpoint.resume and ckpt.latest_step() is not None):
        return ckpt, trainable, opt_state, rng, 0
    try:
        restored = ckpt.restore(
            abstract_params=abstract_target(trainable, _shardings(trainable)),
            abstract_opt_state=abstract_target(opt_state, _shardings(opt_state)),
            data_iterator=data_iterator)
    except FileNotFoundError as error:  # every checkpoint failed its checks and was set aside
        logger.warning("%s: %s; starting from step 0", config.name, error)
        return ckpt, trainable, opt_state, rng, 0
    logger.info("%s: resumed from step %d in %s", config.name, restored.step, ckpt.directory)
    return ckpt, restored.params, restored.opt_state, restored.rng, restored.step


def open_metric_log(config: Any, workdir: pathlib.Path, *, num_steps: int, start: int
                    ) -> MetricLogger:
    """The run's ``MetricLogger`` (bar, TensorBoard, jsonl) from ``config.train`` and its name."""
    primary = distributed.is_primary()  # one log per job
    return MetricLogger(workdir, total_steps=num_steps, initial_step=start,
                        log_every=int(config.train.log_every),
                        progress_bar=bool(config.train.progress_bar) and primary,
                        run_name=str(config.name), write_files=primary)


def check_guard(config: Any, guard: BadStepGuard, *, ckpt: Checkpointer,
                metric_log: MetricLogger) -> None:
    """Reads ``guard``'s pending flags; after ``train.max_bad_steps`` bad steps in a row, writes
    the summary (with the reason), waits for pending checkpoint writes and raises
    ``TrainingDiverged``."""
    if guard.check() is None:
        return
    ckpt.wait_until_finished()  # a checkpoint in flight holds a good state: let it land
    error = guard.error(str(config.name), ckpt.latest_step(), ckpt.directory)
    metric_log.flush()
    metric_log.write_summary(extra={"skipped_steps": guard.skipped, "stopped": str(error)})
    ckpt.close()
    raise error


def finish_run(config: Any, *, ckpt: Checkpointer, metric_log: MetricLogger, end: int,
               split: state_lib.PolicySplit, trainable: Any, opt_state: Any, frozen: Any,
               rng: jax.Array, workdir: pathlib.Path, metadata: Mapping[str, Any],
               tokenizer: Any, image_config: ImageProcessorConfig,
               data_iterator: Any = None, guard: BadStepGuard | None = None) -> TrainResult:
    """The end of a run: the guard's last check, the final checkpoint, the summary, the merged
    policy (eval mode) and, with ``checkpoint.export_hf``, its transformers export (with
    ``tokenizer`` and ``image_config``). Closes the logger and checkpointer.

    A run that trained no step (resumed at its last step) keeps the ``summary.json`` of the run
    that trained, and returns it."""
    extra = {}
    if guard is not None:
        check_guard(config, guard, ckpt=ckpt, metric_log=metric_log)
        extra["skipped_steps"] = guard.skipped
    ckpt.save(end, params=trainable, opt_state=opt_state, rng=rng, data_iterator=data_iterator,
              metadata=metadata, force=True)
    ckpt.wait_until_finished()
    metric_log.flush()
    summary = {**metric_log.summary(), **extra}
    previous = workdir / SUMMARY_FILE
    if summary["steps"] == 0 and previous.is_file():
        summary = read_summary(previous)
        logger.info("%s: no step left to train; %s kept", config.name, previous)
    else:
        metric_log.write_summary(extra=extra)
        logger.info("%s\n%s", config.name, metric_log.format_summary())
    metric_log.close()
    ckpt.close()
    final = nnx.merge(split.graphdef, trainable, frozen)
    final.eval()
    if config.checkpoint.export_hf:
        exported = distributed.process_local(reference_lib.merged_copy(final))
        if distributed.is_primary():
            export_policy(exported, workdir / "hf", tokenizer=tokenizer,
                          image_config=image_config, template=config.data.template)
    return TrainResult(model=final, steps=end, summary=summary, workdir=workdir)


def _workdir(config: Any) -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(config.workdir or f"runs/{config.name}"))


def train(config: Any, *, model: Llava, tokenizer: Any, source: Any,
          image_config: ImageProcessorConfig, workdir: str | os.PathLike | None = None,
          data_iterator: Iterator | None = None, stop_at: int | None = None,
          evaluator: Any = None, focus_source: Any = None) -> TrainResult:
    """Runs ``config`` from ``model`` (see the module doc); the caller's ``model`` is untouched.

    Args:
      config: a validated training config (``configs/*.py``).
      model: the initial policy; also the reference (``copy``/``cache``: a frozen copy of it).
      tokenizer, source, image_config: the training split and how to encode it.
      focus_source: an SFT's two-image records, interleaved with ``source`` (``make_iterator``).
      workdir: overrides ``config.workdir``.
      data_iterator: a ready iterator to read instead of building one (tests).
      stop_at: leave after this step (checkpointed) as a pre-empted run would; a later call
        resumes from it. None runs to ``train.num_steps``.
      evaluator: real-data benchmarks (``training.benchmarks.Evaluator``) run on the policy when
        ``evaluator.due(step, end)``; their metrics are logged at that step.
    """
    config_checks.validate(config, device_count=jax.device_count())
    workdir = require_writable(workdir if workdir is not None else _workdir(config), "workdir")
    require_writable(workdir / "checkpoints", "the checkpoint directory")
    workdir.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_directory(workdir, "workdir")  # orbax writes one checkpoint from all
    method = config.method.to_dict()
    plan = plan_scoring(method)
    num_steps = int(config.train.num_steps)
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.mesh_rules)
    num_image_tokens = model.config.num_image_tokens
    eos_token_id = int(tokenizer.eos_token_id)
    pad_id = int(tokenizer.pad_token_id)

    def iterator(**overrides):
        return make_iterator(config, source, tokenizer=tokenizer, image_config=image_config,
                             num_image_tokens=num_image_tokens, plan=plan,
                             focus_source=focus_source, **overrides)

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
    opt_state = optimizer_lib.init_opt_state(tx, trainable, mesh)
    it = data_iterator if data_iterator is not None else iterator()
    replicated = NamedSharding(mesh, PartitionSpec())
    # one global key (orbax saves arrays that span the processes, not per-process copies)
    ckpt, trainable, opt_state, rng, start = open_and_resume(
        config, workdir, trainable, opt_state,
        distributed.put(jax.random.key(int(config.seed)), replicated), it)

    has_dropout = bool(config.model.lora.enabled and config.model.lora.dropout > 0)
    step_fn = None
    guard = BadStepGuard(int(config.train.max_bad_steps))
    metadata = {"config": config.to_dict(), "method": method}
    with open_metric_log(config, workdir, num_steps=num_steps, start=start) as metric_log:
        end = num_steps if stop_at is None else min(int(stop_at), num_steps)
        for step in range(start, end):
            host_batch = same_length_everywhere(next(it), pad_id)
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
            guard.record(step + 1, metrics)
            metrics = dict(metrics)
            metrics["optim/learning_rate"] = float(schedule(step))
            metric_log.log(step + 1, metrics, examples=int(np.sum(host_batch.example_mask)))
            if evaluator is not None and evaluator.due(step + 1, end):
                policy = nnx.merge(split.graphdef, trainable, frozen)  # evaluated in eval mode
                metric_log.log_evaluation(step + 1, evaluator(policy))
            saving = ckpt.should_save(step + 1)  # orbax's decision, taken once per step
            if saving or guard.due(step + 1):  # never save past max_bad_steps bad steps
                check_guard(config, guard, ckpt=ckpt, metric_log=metric_log)
            if saving:
                ckpt.save(step + 1, params=trainable, opt_state=opt_state, rng=rng,
                          data_iterator=it, metadata=metadata, force=True)
            else:
                ckpt.check_background_write()
        return finish_run(config, ckpt=ckpt, metric_log=metric_log, end=end, split=split,
                          trainable=trainable, opt_state=opt_state, frozen=frozen, rng=rng,
                          workdir=workdir, metadata=metadata, tokenizer=tokenizer,
                          image_config=image_config, data_iterator=it, guard=guard)
