"""Training checkpoints with orbax: save every N steps, keep N, resume from the latest good one.

A checkpoint of step ``s`` is the directory ``<directory>/<s>/`` with one item per part:

- ``params``: the trainable (policy) model's ``nnx.State``; ``opt_state``: the optax state;
- ``rng``: the training PRNG key's raw data (``{"key_data": uint32[...]}``);
- ``data``: the grain iterator's position, one JSON file per process (grain's orbax handler), so
  every host of a pod resumes its own shard;
- ``metadata``: the caller's JSON (the config, ...); ``checkpoint_info``: what this module needs
  to rebuild the rest (the key's PRNG implementation, whether a data iterator was saved).

Atomicity is orbax's: every item is written under ``<s>.orbax-checkpoint-tmp/`` and the directory is
renamed to ``<s>/`` only once everything is on disk (``AtomicRenameTemporaryPath.finalize`` in
orbax-checkpoint 0.12.8; on GCS a ``commit_success.txt`` marker plays the rename's part). A process
killed mid-write leaves only a temporary directory, which step listing ignores, so ``latest_step``
and ``restore`` see the last complete checkpoint; the next ``Checkpointer`` on the directory deletes
such leftovers before its first save, so the resumed run can write that step again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mmpo_jax.models import convert

logger = logging.getLogger(__name__)

_INFO_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Restored:
    """What ``Checkpointer.restore`` returns.

    Attributes:
      params: the model state, laid out (shapes, dtypes, shardings) as the abstract target said.
      opt_state: the optimizer state, likewise.
      rng: the PRNG key as saved: a typed key (``jax.random.key``) or a raw ``uint32[2]`` key
        (``jax.random.PRNGKey``), replicated over all devices.
      step: the step the checkpoint was saved at.
      metadata: the JSON given to ``save`` (``{}`` if none).
    """

    params: nnx.State
    opt_state: Any
    rng: jax.Array
    step: int
    metadata: dict[str, Any]


def abstract_target(tree: Any, shardings: Any = None) -> Any:
    """The restore target for ``tree``: a ``jax.ShapeDtypeStruct`` per array leaf.

    Args:
      tree: arrays or abstract arrays (an ``nnx.State``, an optax state, the output of
        ``nnx.eval_shape``...).
      shardings: None to keep each leaf's own sharding (or none), or a tree of the same structure
        with a ``jax.sharding.Sharding`` per leaf (e.g. ``sharding.state_shardings``), which the
        restored arrays will have.
    """
    if shardings is None:
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None)), tree)
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype, sharding=sharding), tree, shardings)


def _split_key(rng: jax.Array) -> tuple[jax.Array, str | None]:
    """A PRNG key's ``uint32`` data and its implementation's name (None for a raw key)."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng), str(jax.random.key_impl(rng))
    if rng.dtype != np.uint32:
        raise TypeError(
            f"rng must be a typed PRNG key (jax.random.key) or a raw uint32 key "
            f"(jax.random.PRNGKey), got an array of dtype {rng.dtype} and shape {rng.shape}")
    return rng, None


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """``"a/b/0/value" -> shape`` for every array leaf; names, attributes and indices alike."""

    def name(key: Any) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(map(name, path)): tuple(leaf.shape) for path, leaf in leaves}


def _target_mismatches(stored: Any, target: Any, limit: int = 8) -> list[str]:
    """Missing, unexpected and differently shaped arrays of ``target`` against ``stored``."""
    saved, wanted = _shapes_by_path(stored), _shapes_by_path(target)
    problems = [f"{path} is not in the checkpoint" for path in sorted(wanted.keys() - saved)]
    problems += [f"{path} of the checkpoint is not in the target"
                 for path in sorted(saved.keys() - wanted)]
    problems += [f"{path} has shape {saved[path]} in the checkpoint, {wanted[path]} in the target"
                 for path in sorted(saved.keys() & wanted) if saved[path] != wanted[path]]
    return problems[:limit] + ([f"... {len(problems) - limit} more"] if len(problems) > limit
                               else [])


def _as_json(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """``metadata`` as a plain JSON dict, or a TypeError naming what cannot be written."""
    if metadata is None:
        return {}
    try:
        return json.loads(json.dumps(dict(metadata)))
    except TypeError as error:
        raise TypeError(
            f"checkpoint metadata must be JSON-serialisable (convert configs with "
            f"config.to_dict() or to_json()): {error}") from error


class Checkpointer:
    """A training run's checkpoints in one directory (a thin layer over ``ocp.CheckpointManager``).

    ``save`` writes on multiples of ``save_every`` (and on a preemption signal orbax receives), or
    whenever ``force=True`` (the end of a run); only the newest ``keep`` checkpoints survive.
    ``restore()`` with no step resumes from the latest complete checkpoint.

    Use as a context manager, or call ``close()``: with ``async_save=True`` a save returns once the
    arrays are copied off the devices and the write finishes in a background thread.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int | None = None,
                 async_save: bool = False):
        """Open (or create) ``directory``; leftovers of interrupted writes are deleted in the
        background before the first save.

        Args:
          directory: the run's checkpoint directory (created if absent).
          save_every: save at steps that are multiples of this (>= 1).
          keep: how many of the newest checkpoints to keep (>= 1), None to keep all.
          async_save: write in a background thread (``save`` blocks only for the device copy).
        """
        if save_every < 1:
            raise ValueError(f"save_every must be an integer >= 1, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None (keep every checkpoint), got {keep}")
        self.save_every = save_every
        self.keep = keep
        policies = ocp.checkpoint_managers
        # Without orbax's default InitialSavePolicy, which would also save the first step seen.
        decision = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every),
                                           policies.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_decision_policy=decision, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save, create=True)
        handlers = dict(params=ocp.StandardCheckpointHandler(),
                        opt_state=ocp.StandardCheckpointHandler(),
                        rng=ocp.StandardCheckpointHandler(),
                        data=grain.checkpoint.CheckpointHandler(),
                        metadata=ocp.JsonCheckpointHandler(),
                        checkpoint_info=ocp.JsonCheckpointHandler())
        self._manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                                              item_handlers=handlers, options=options)

    @property
    def directory(self) -> pathlib.Path:
        """The run's checkpoint directory (absolute)."""
        return pathlib.Path(self._manager.directory)

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (unfinished writes are not listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, None when there is none."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether ``save(step)`` without ``force`` would write."""
        return step not in self.all_steps() and self._manager.should_save(step)

    def save(self, step: int, *, params: nnx.State, opt_state: Any, rng: jax.Array,
             data_iterator: grain.DatasetIterator | None = None,
             metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Save the training state at ``step`` if it is due (or ``force``).

        Args:
          step: the number of optimizer steps taken.
          params: the trainable model's state (``nnx.state(model)`` or a filtered part of it).
          opt_state: the optax state (any pytree of arrays).
          rng: the training PRNG key, typed or raw ``uint32``.
          data_iterator: the grain iterator feeding the run (its position is saved per process),
            or None.
          metadata: JSON-able facts of the run (its config, ...), returned by ``restore``.
          force: save even when ``step`` is not a multiple of ``save_every``.

        Returns:
          Whether a checkpoint was written (False when not due, or when ``step`` is already saved,
          e.g. a forced final save at a step the interval already covered).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step in self.all_steps():
            logger.info("checkpoint of step %d already exists in %s; not saving again", step,
                        self.directory)
            return False
        if not force and not self._manager.should_save(step):
            return False
        key_data, rng_impl = _split_key(rng)
        info = {"version": _INFO_VERSION, "rng_impl": rng_impl, "rng_shape": list(key_data.shape),
                "has_data_iterator": data_iterator is not None}
        items = dict(params=ocp.args.StandardSave(params),
                     opt_state=ocp.args.StandardSave(opt_state),
                     rng=ocp.args.StandardSave({"key_data": key_data}),
                     metadata=ocp.args.JsonSave(_as_json(metadata)),
                     checkpoint_info=ocp.args.JsonSave(info))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int | None = None, *, abstract_params: nnx.State,
                abstract_opt_state: Any, data_iterator: grain.DatasetIterator | None = None
                ) -> Restored:
        """Restore a checkpoint onto the given abstract structures.

        Args:
          step: which checkpoint; None for the latest complete one (resume).
          abstract_params: the target of ``params`` (``abstract_target(...)`` of the model's state,
            with the shardings the restored arrays should have).
          abstract_opt_state: the target of ``opt_state``, likewise.
          data_iterator: a freshly built iterator of the same pipeline; its position is set to the
            saved one. None leaves the data position alone (evaluation from a checkpoint).

        Raises:
          FileNotFoundError: no complete checkpoint in the directory (with ``step=None``).
          ValueError: ``step`` is not among the saved steps, a data iterator is given for a
            checkpoint saved without one, or the checkpoint's format version is not this module's.
        """
        step = self._resolve_step(step)
        info = self._read_json(step, "checkpoint_info")
        if info.get("version") != _INFO_VERSION:
            raise ValueError(f"checkpoint of step {step} in {self.directory} has format version "
                             f"{info.get('version')}; this code reads version {_INFO_VERSION}")
        if data_iterator is not None and not info["has_data_iterator"]:
            raise ValueError(f"checkpoint of step {step} in {self.directory} was saved without a "
                             f"data iterator; pass data_iterator=None to restore it")
        replicated = jax.sharding.NamedSharding(
            jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",)),
            jax.sharding.PartitionSpec())
        stored = self._manager.item_metadata(step)
        for item, target in (("params", abstract_params), ("opt_state", abstract_opt_state)):
            problems = _target_mismatches(stored[item].tree, target)
            if problems:
                raise ValueError(
                    f"the abstract {item} does not match the {item} saved at step {step} in "
                    f"{self.directory} (was the model or optimizer configured differently?): "
                    + "; ".join(problems))
        items = dict(params=ocp.args.StandardRestore(abstract_params),
                     opt_state=ocp.args.StandardRestore(abstract_opt_state),
                     rng=ocp.args.StandardRestore({"key_data": jax.ShapeDtypeStruct(
                         tuple(info["rng_shape"]), np.uint32, sharding=replicated)}),
                     metadata=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        key_data = restored["rng"]["key_data"]
        rng = (key_data if info["rng_impl"] is None
               else jax.random.wrap_key_data(key_data, impl=info["rng_impl"]))
        return Restored(params=restored["params"], opt_state=restored["opt_state"], rng=rng,
                        step=step, metadata=restored["metadata"])

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON saved with a checkpoint (None: the latest), without reading any array.

        A resumed run can compare it with its own config before building the model.
        """
        return self._read_json(self._resolve_step(step), "metadata")

    def _resolve_step(self, step: int | None) -> int:
        """``step``, or the latest complete step when None, after pending saves are committed."""
        self.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise ValueError(f"no checkpoint of step {step} in {self.directory}; saved steps: "
                             f"{steps}")
        return step

    def _read_json(self, step: int, item: str) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.JsonRestore()}))[item]

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def export_policy(model: nnx.Module, config: Any, path: str | os.PathLike) -> pathlib.Path:
    """Write the trained policy in the transformers ``LlavaForConditionalGeneration`` layout.

    Delegates to ``mmpo_jax.models.convert.save_hf_llava``, writing into a sibling temporary
    directory renamed to ``path`` when complete, so an interrupted export never looks finished.

    Args:
      model: the ``Llava`` policy (merged weights if it was trained with LoRA).
      config: its ``LlavaConfig``.
      path: the export directory; must not exist yet.

    Returns:
      ``path``, holding ``config.json`` and float32 safetensors.
    """
    path = pathlib.Path(path)
    if path.exists():
        raise FileExistsError(f"export directory {path} already exists; choose a new path")
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a previous export that was interrupted
    convert.save_hf_llava(model, config, partial)
    partial.rename(path)
    return path
