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

Integrity. ``checkpoint_info`` also holds an ``engine.integrity`` checksum of every saved array
(params, optimizer state, PRNG key), committed with them. ``restore()`` checks a checkpoint's
files, reads it, and compares the checksums and finiteness of what it read
(``engine.checkpoint_checks``); a checkpoint failing any check is reported in one warning line
naming its step and the file, renamed ``<step>.corrupt-<reason>`` and skipped, and the next-older
one is tried, down to none (the run then starts from step 0). A save refuses a state holding NaN or
inf (``NonFiniteState``), so no such checkpoint is ever written.

Write errors. Before each save the checkpoint directory is probed in the calling thread
(``engine.disk.require_writable``): an unwritable or full directory is a ``CheckpointWriteError``
there and then. An asynchronous write that fails later is noticed at the next ``save`` call
(every step of a run) once orbax reports the write done, and raised there as a
``CheckpointWriteError`` naming the step. [why] orbax-checkpoint 0.12.8 creates the step directory
of an asynchronous save in a background thread; when that ``mkdir`` fails, the commit threads of
the other items wait ``multihost.coordination_timeout()`` (300 s) per signal for it, and as
non-daemon threads they keep the interpreter from exiting: the probe avoids that case, and
``_release_orbax_waiters`` wakes them when it happens anyway.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import threading
from typing import Any, Callable, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from mmpo_jax.engine import checkpoint_checks as checks
from mmpo_jax.engine import hf_export
from mmpo_jax.engine import integrity
from mmpo_jax.engine.checkpoint_checks import CorruptCheckpoint
from mmpo_jax.engine.disk import UnwritableDirectory, require_writable

logger = logging.getLogger(__name__)

_INFO_VERSION = 2
"""2: ``checkpoint_info`` holds the arrays' checksums. Version 1 (no checksums) is still read."""
_READABLE_VERSIONS = (1, 2)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (in ``save`` or in orbax's background write)."""


class NonFiniteState(ValueError):
    """``save`` was given a state holding NaN or inf; nothing was written."""


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


def _release_orbax_waiters() -> None:
    """Wake the commit threads of a failed asynchronous save, so the process can exit.

    [why] They wait for the signal of a step directory that was never created (module doc). Each
    is cancelled (once woken it returns without writing) and its signals are set. This reads
    orbax-checkpoint 0.12.8's private ``_SignalingThread`` fields; with another orbax it does
    nothing.
    """
    try:
        from orbax.checkpoint._src.futures import future as orbax_future

        waiting = [thread for thread in threading.enumerate()
                   if isinstance(thread, orbax_future._SignalingThread) and thread.is_alive()]
        for thread in waiting:
            thread.cancel()
            orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
    except (ImportError, AttributeError) as error:  # another orbax: nothing to release
        logger.debug("cannot release orbax's commit threads: %s", error)


class Checkpointer:
    """A training run's checkpoints in one directory (a thin layer over ``ocp.CheckpointManager``).

    ``save`` writes on multiples of ``save_every`` (and on a preemption signal orbax receives), or
    whenever ``force=True`` (the end of a run); only the newest ``keep`` checkpoints survive.
    ``restore()`` with no step resumes from the latest checkpoint that passes every check (module
    doc), setting aside the newer ones that fail.

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
        self._async = async_save
        self._in_flight: int | None = None  # the step of an asynchronous save not yet confirmed
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
        """The newest complete checkpoint's step, None when there is none (not yet checked:
        ``restore`` may still find it unusable)."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether ``save(step)`` without ``force`` would write."""
        return step not in self.all_steps() and self._manager.should_save(step)

    def save(self, step: int, *, params: nnx.State, opt_state: Any, rng: jax.Array,
             data_iterator: grain.DatasetIterator | None = None,
             metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Save the training state at ``step`` if it is due (or ``force``); first raise the
        failure of a finished asynchronous save, if any (``check_background_write``).

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

        Raises:
          CheckpointWriteError: the directory is not writable, or this or an earlier
            (asynchronous) write failed.
          NonFiniteState: ``params``, ``opt_state`` hold NaN or inf; nothing is written.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.check_background_write()
        if step in self.all_steps():
            logger.info("checkpoint of step %d already exists in %s; not saving again", step,
                        self.directory)
            return False
        if not force and not self._manager.should_save(step):
            return False
        key_data, rng_impl = _split_key(rng)
        arrays = dict(params=params, opt_state=opt_state, rng={"key_data": key_data})
        info = {"version": _INFO_VERSION, "rng_impl": rng_impl, "rng_shape": list(key_data.shape),
                "has_data_iterator": data_iterator is not None,
                "checksums": {item: self._checksums(step, item, tree)
                              for item, tree in arrays.items()}}
        items = {item: ocp.args.StandardSave(tree) for item, tree in arrays.items()}
        items.update(metadata=ocp.args.JsonSave(_as_json(metadata)),
                     checkpoint_info=ocp.args.JsonSave(info))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            require_writable(self.directory, "the checkpoint directory")
        except UnwritableDirectory as error:
            raise CheckpointWriteError(f"checkpoint of step {step} not written: {error}") from None
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:  # orbax's or the filesystem's, of this save or the one before
            failed = self._in_flight if self._in_flight not in (None, *self.all_steps()) else step
            self._in_flight = None
            raise CheckpointWriteError(self._write_failure(failed, error)) from error
        if saved and self._async:
            self._in_flight = step
        return saved

    def _checksums(self, step: int, item: str, tree: Any) -> dict[str, str]:
        """``{array path: checksum}`` of ``tree``; NonFiniteState if an array is not finite."""
        fingerprints = integrity.fingerprints(tree)
        bad = [name for name, fingerprint in fingerprints.items() if not fingerprint.finite]
        if bad:
            raise NonFiniteState(
                f"refusing to save the checkpoint of step {step}: {item}/{bad[0]} holds NaN or "
                f"inf values ({len(bad)} arrays do); the newest checkpoint in {self.directory} "
                f"is {'none' if self.latest_step() is None else f'step {self.latest_step()}'}")
        return {name: fingerprint.checksum for name, fingerprint in fingerprints.items()}

    def _write_failure(self, step: int, error: BaseException) -> str:
        """The one-line message of a failed write; wakes orbax's threads that would wait for it."""
        _release_orbax_waiters()
        return (f"writing the checkpoint of step {step} to {self.directory} failed: "
                f"{checks.describe(error)}")

    def check_background_write(self) -> None:
        """Raise ``CheckpointWriteError`` if the last asynchronous save finished and failed;
        return at once while it is still being written (or when there is none)."""
        if self._in_flight is not None and not self._manager.is_saving_in_progress():
            self.wait_until_finished()

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save has been committed.

        Raises:
          CheckpointWriteError: it failed, or orbax finished without committing it (orbax logs
            some background failures instead of raising them).
        """
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise CheckpointWriteError(self._write_failure(step, error)) from error
        if step is not None and not (self.directory / str(step)).is_dir():
            self._manager.reload()
            _release_orbax_waiters()
            raise CheckpointWriteError(
                f"the checkpoint of step {step} was not committed to {self.directory}: orbax's "
                f"background write failed (its log above says why)")

    def restore(self, step: int | None = None, *, abstract_params: nnx.State,
                abstract_opt_state: Any = None, data_iterator: grain.DatasetIterator | None = None
                ) -> Restored:
        """Restore a checkpoint onto the given abstract structures, after checking it.

        Args:
          step: which checkpoint; None for the newest one that passes every check (resume): each
            newer one that fails is reported (one warning line) and set aside.
          abstract_params: the target of ``params`` (``abstract_target(...)`` of the model's state,
            with the shardings the restored arrays should have).
          abstract_opt_state: the target of ``opt_state``, likewise; None reads the parameters
            only (an export or evaluation of the checkpoint; ``Restored.opt_state`` is None).
          data_iterator: a freshly built iterator of the same pipeline; its position is set to the
            saved one. None leaves the data position alone (evaluation from a checkpoint).

        Raises:
          FileNotFoundError: no usable checkpoint in the directory (with ``step=None``); the
            data iterator is left where it was.
          CorruptCheckpoint: the requested ``step`` fails a check (it is not set aside).
          ValueError: ``step`` is not among the saved steps, a data iterator is given for a
            checkpoint saved without one, the targets do not match the saved arrays (another
            model or optimizer), or the checkpoint's format version is unknown.
        """
        self.wait_until_finished()
        if step is not None:
            return self._restore_checked(self._resolve_step(step), abstract_params,
                                         abstract_opt_state, data_iterator)
        position = data_iterator.get_state() if data_iterator is not None else None
        set_aside = []
        for candidate in reversed(self.all_steps()):
            try:
                return self._restore_checked(candidate, abstract_params, abstract_opt_state,
                                             data_iterator)
            except CorruptCheckpoint as failure:
                moved = self._set_aside(failure)
                set_aside.append(moved)
                logger.warning("%s; set aside as %s, falling back to the previous checkpoint",
                               failure, moved)
        if data_iterator is not None:
            data_iterator.set_state(position)
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}" + (
            f" that passes its checks (set aside: {', '.join(set_aside)})" if set_aside else ""))

    def _set_aside(self, failure: CorruptCheckpoint) -> str:
        """Rename the failed step directory (process 0, which every process waits for); its new
        name."""
        moved = "(renamed by process 0)"
        if jax.process_index() == 0:
            moved = checks.set_aside(self.directory, failure).name
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {failure.step}")
        self._manager.reload()
        return moved

    def _restore_checked(self, step: int, abstract_params: Any, abstract_opt_state: Any,
                         data_iterator: Any) -> Restored:
        """``restore`` of one step: files, then format and targets, then arrays and checksums."""
        checks.check_files(step, self.directory, [checks.INFO_FILE])
        info = self._read(step, "checkpoint_info", ocp.args.JsonRestore())
        version = info.get("version")
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"checkpoint of step {step} in {self.directory} has format version "
                             f"{version}; this code reads versions {_READABLE_VERSIONS}")
        if data_iterator is not None and not info["has_data_iterator"]:
            raise ValueError(f"checkpoint of step {step} in {self.directory} was saved without a "
                             f"data iterator; pass data_iterator=None to restore it")
        data_files = ([checks.data_file(jax.process_index(), jax.process_count())]
                      if data_iterator is not None else [])
        checks.check_files(step, self.directory, checks.item_files(data_files))
        checksums = info.get("checksums") if version >= 2 else {}
        if not isinstance(checksums, dict):
            raise CorruptCheckpoint(step, self.directory, f"checkpoint_info/{checks.JSON_FILE}",
                                    "bad-json", "it holds no checksums")
        stored = self._read_metadata(step)
        wanted = {"params": abstract_params, "opt_state": abstract_opt_state}
        wanted = {item: target for item, target in wanted.items() if target is not None}
        for item, target in wanted.items():
            problems = checks.target_mismatches(stored[item].tree, target)
            if problems:
                raise ValueError(
                    f"the abstract {item} does not match the {item} saved at step {step} in "
                    f"{self.directory} (was the model or optimizer configured differently?): "
                    + "; ".join(problems))
        replicated = jax.sharding.NamedSharding(
            jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",)),
            jax.sharding.PartitionSpec())
        targets = dict(**wanted, rng={"key_data": jax.ShapeDtypeStruct(
            tuple(info["rng_shape"]), np.uint32, sharding=replicated)})
        restored = {}
        for item, target in targets.items():
            restored[item] = self._read(step, item, ocp.args.StandardRestore(target))
            checks.compare(step, self.directory, item, integrity.fingerprints(restored[item]),
                           checksums.get(item) if version >= 2 else None)
        metadata = self._read(step, "metadata", ocp.args.JsonRestore())
        if data_iterator is not None:
            self._read(step, checks.DATA_ITEM, grain.checkpoint.CheckpointRestore(data_iterator),
                       where=data_files[0])
        key_data = restored["rng"]["key_data"]
        rng = (key_data if info["rng_impl"] is None
               else jax.random.wrap_key_data(key_data, impl=info["rng_impl"]))
        return Restored(params=restored["params"], opt_state=restored.get("opt_state"), rng=rng,
                        step=step, metadata=metadata)

    def _read(self, step: int, item: str, args: Any, *, where: str | None = None) -> Any:
        """One item of a checkpoint; an error reading it is a ``CorruptCheckpoint``."""
        return self._reading(step, where or f"{item}/", lambda: self._manager.restore(
            step, args=ocp.args.Composite(**{item: args}))[item])

    def _read_metadata(self, step: int) -> Any:
        """orbax's description of the saved arrays (their tree, shapes and dtypes)."""
        stored = self._reading(step, "the arrays' metadata",
                               lambda: self._manager.item_metadata(step))
        for item in ("params", "opt_state"):
            if stored.get(item) is None:
                raise CorruptCheckpoint(step, self.directory, f"{item}/{checks.ARRAY_METADATA}",
                                        "bad-metadata", "orbax cannot read the arrays' metadata")
        return stored

    def _reading(self, step: int, where: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except (CorruptCheckpoint, MemoryError, jax.errors.JaxRuntimeError):
            raise  # ours, or the devices' (out of memory...): not the checkpoint's fault
        except Exception as error:
            raise CorruptCheckpoint(step, self.directory, where, "unreadable",
                                    checks.describe(error)) from error

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON saved with a checkpoint (None: the latest), without reading any array.

        A resumed run can compare it with its own config before building the model.
        """
        return self._read(self._resolve_step(step), "metadata", ocp.args.JsonRestore())

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

    def close(self) -> None:
        """Finish pending saves and release orbax's threads (CheckpointWriteError if the last
        asynchronous save failed)."""
        try:
            self.wait_until_finished()
        except CheckpointWriteError:
            try:
                self._manager.close()
            except Exception:  # orbax raises the same failure again
                logger.debug("closing orbax's manager after a failed write", exc_info=True)
            raise
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error is on its way out: do not mask it with a second one
            self.close()
        except Exception as error:
            logger.warning("while closing the checkpointer after an error: %s", error)

def export_policy(model: nnx.Module, path: str | os.PathLike, *, tokenizer: Any,
                  image_config: Any, template: str, max_shard_bytes: int = 5 * 2**30
                  ) -> pathlib.Path:
    """Write the trained policy as a complete llava-hf directory (``engine.hf_export``: weights,
    ``config.json``, tokenizer, processor, chat template, generation config).

    Written into a sibling temporary directory renamed to ``path`` when complete, so an
    interrupted export never looks finished.

    Args:
      model: the ``Llava`` policy (merged weights if it was trained with LoRA).
      path: the export directory; must not exist yet.
      tokenizer, image_config, template: what the policy was trained with.
      max_shard_bytes: largest safetensors file.

    Returns:
      ``path``.
    """
    path = pathlib.Path(path)
    if path.exists():
        raise FileExistsError(f"export directory {path} already exists; choose a new path")
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a previous export that was interrupted
    hf_export.export_pretrained(model, partial, tokenizer=tokenizer, image_config=image_config,
                                template=template, max_shard_bytes=max_shard_bytes)
    partial.rename(path)
    return path
