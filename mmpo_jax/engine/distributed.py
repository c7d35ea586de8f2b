"""Several JAX processes in one job: start-up, who writes, barriers and agreement, a clean end.

A TPU pod slice or a GPU cluster runs one process per host (a CPU run may start several on one
machine); together they are one SPMD program over the global device mesh. ``initialize`` starts
``jax.distributed`` from the config's ``distributed`` section (`Settings`) before anything touches
a device:

- ``coordinator`` / ``num_processes`` / ``process_id`` given: exactly those (any left unset is
  filled by JAX's own detection, e.g. the coordinator from ``JAX_COORDINATOR_ADDRESS``);
- none given, ``mode="auto"``: ``jax.distributed.initialize()`` when JAX detects a cluster (a Cloud
  TPU VM, SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``; `detected_cluster`), else one process;
- ``mode="off"``: one process, whatever the environment says.

Then every process reads its own shard of the data and all of them save and restore the sharded
arrays (orbax); files that are one per job (metrics, tables, caches' markers) are written by
``is_primary()`` (process 0) alone. ``primary_first`` lets process 0 build something (a dataset)
while the others wait at a barrier; ``broadcast`` / ``all_gather`` agree on small JSON values
through the coordination service (no device work, so they never wait behind queued steps);
``check_shared_directory`` refuses a checkpoint directory the processes do not share; ``put``
places arrays every process holds whole onto shardings that span the processes, and
``process_local`` copies such arrays whole onto each process (evaluation, exports).

CPU processes (tests, a laptop) talk through gloo, JAX's default
``jax_cpu_collectives_implementation``; gloo gives the processes 30 s (fixed) to meet at the first
collective over a set of devices, so they must not drift further apart than that before it.

A process that dies ends the job: JAX's coordination service notices its missing heartbeats
within ``heartbeat_timeout`` seconds and terminates every other process with "Terminating process
because the JAX distributed service detected fatal errors ... another task died" (a dead process 0,
which hosts the service, is noticed at once). ``exit_together`` wraps a CLI's ``main`` so that a
Python error ends its process at once instead of waiting ``shutdown_timeout`` for the others at
JAX's exit barrier, which they never reach while they wait for it in a collective.

[our choice] The barriers use the coordination service (``wait_at_barrier``, with a timeout), not
a device collective (``multihost_utils.sync_global_devices``): a wait of an hour while process 0
builds a dataset needs a timeout of its own, and no device program is compiled for it.
[our choice] "auto" relies on JAX's own cluster detection (``jax._src.clusters``, the code
``jax.distributed.initialize()`` runs), so a laptop or a single CPU job never opens a port.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import pathlib
import sys
import traceback
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MODES = ("auto", "off")
_KEY_PREFIX = "mmpo_jax"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``distributed`` config section (``config.checks.distributed_settings`` reads it).

    Attributes:
      mode: "auto" (start ``jax.distributed`` when the fields below or a detected cluster say
        there are several processes) or "off" (always one process).
      coordinator: ``host:port`` of process 0's coordination service; "" -> detected.
      num_processes: processes in the job; 0 -> detected.
      process_id: this process's index in ``[0, num_processes)``; -1 -> detected.
      initialization_timeout: seconds a process waits for all the others to connect.
      heartbeat_timeout: seconds without a heartbeat after which a process counts as dead and
        every other process is terminated.
      shutdown_timeout: seconds a finishing process waits for the others at JAX's exit barrier.
      barrier_timeout: seconds a process waits at one of this package's barriers (e.g. while
        process 0 builds the shapes world or generates P2-DPO pairs).
    """

    mode: str = "auto"
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    initialization_timeout: int = 300
    heartbeat_timeout: int = 100
    shutdown_timeout: int = 300
    barrier_timeout: int = 7200

    @property
    def explicit(self) -> bool:
        """Whether any of coordinator / num_processes / process_id is given."""
        return bool(self.coordinator) or self.num_processes > 0 or self.process_id >= 0

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when nothing)."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"distributed.mode={self.mode!r} is not one of {MODES}")
        if self.mode == "off" and self.explicit:
            problems.append("distributed.mode='off' with distributed.coordinator / num_processes "
                            "/ process_id set; use mode='auto' to start several processes")
        if self.coordinator and not _is_host_port(self.coordinator):
            problems.append(f"distributed.coordinator={self.coordinator!r}: expected host:port, "
                            "e.g. 10.0.0.2:8476 or localhost:8476")
        if self.num_processes < 0:
            problems.append(f"distributed.num_processes={self.num_processes} must be >= 1 "
                            "(0: detected)")
        if self.process_id < -1 or (self.num_processes and self.process_id >= self.num_processes):
            problems.append(f"distributed.process_id={self.process_id} must lie in "
                            f"[0, num_processes={self.num_processes}) (-1: detected)")
        for name in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout",
                     "barrier_timeout"):
            if getattr(self, name) < 1:
                problems.append(f"distributed.{name}={getattr(self, name)} must be >= 1 second")
        return problems


def _is_host_port(address: str) -> bool:
    host, separator, port = address.rpartition(":")
    return bool(separator and host and port.isdigit() and 0 < int(port) < 65536)


def detected_cluster() -> str | None:
    """The cluster environment ``jax.distributed.initialize()`` would start from, or None.

    ``JAX_COORDINATOR_ADDRESS``, or the name of JAX's detector that recognises this environment
    (Cloud TPU VM, SLURM step, Open MPI, Kubernetes with the ``kubernetes`` package).
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    try:
        from jax._src import clusters  # JAX's detectors; private, the lock pins the version
    except ImportError:  # pragma: no cover - a JAX without them: explicit settings only
        return None
    for environment in clusters.ClusterEnv._cluster_types:  # noqa: SLF001
        if not environment.opt_in_only_method and environment.is_env_present():
            return environment.__name__
    return None


_settings = Settings()


def initialize(settings: Settings) -> bool:
    """Start ``jax.distributed`` as ``settings`` say (module doc); call before any device use.

    Returns:
      Whether this process is part of a multi-process job (``jax.distributed`` is running).

    Raises:
      ValueError: bad settings.
      RuntimeError: JAX's devices were touched before (``jax.distributed`` must come first).
    """
    global _settings
    problems = settings.problems()
    if problems:
        raise ValueError("distributed: " + "; ".join(problems))
    _settings = settings
    if jax.distributed.is_initialized():
        return True
    if settings.mode == "off":
        return False
    cluster = None if settings.explicit else detected_cluster()
    if not settings.explicit and cluster is None:
        return False
    described = (f"coordinator={settings.coordinator or '(detected)'}, "
                 f"num_processes={settings.num_processes or '(detected)'}, "
                 f"process_id={settings.process_id if settings.process_id >= 0 else '(detected)'}"
                 if settings.explicit else f"detected {cluster}")
    logger.info("jax.distributed: %s; waiting up to %d s for every process to connect", described,
                settings.initialization_timeout)
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator or None,
            num_processes=settings.num_processes or None,
            process_id=settings.process_id if settings.process_id >= 0 else None,
            initialization_timeout=settings.initialization_timeout,
            heartbeat_timeout_seconds=settings.heartbeat_timeout,
            shutdown_timeout_seconds=settings.shutdown_timeout)
    except RuntimeError as error:
        if "must be called before" in str(error):
            raise RuntimeError("jax.distributed must start before anything touches a device: "
                               "call engine.distributed.initialize first") from error
        raise
    except (ValueError, TypeError) as error:
        raise ValueError(f"jax.distributed could not start ({described}): {error}; set "
                         "distributed.coordinator=host:port, distributed.num_processes and "
                         "distributed.process_id") from error
    logger.info("jax.distributed: process %d of %d, %d of %d devices local", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Whether this process writes the job's single files (metrics, tables, markers)."""
    return jax.process_index() == 0


def _client() -> Any:
    client = jax._src.distributed.global_state.client  # noqa: SLF001 - as orbax does
    if client is None:
        raise RuntimeError(f"{jax.process_count()} processes but no jax.distributed client; "
                           "start it with engine.distributed.initialize")
    return client


_calls = itertools.count()


def _unique(name: str) -> str:
    """A key for the next collective call named ``name``: every process calls these in the same
    order, so the counter agrees across processes."""
    return f"{_KEY_PREFIX}/{name}/{next(_calls)}"


def barrier(name: str, timeout: int | None = None) -> None:
    """Wait until every process reaches this barrier (no-op in a one-process job).

    Args:
      name: what is waited for, named in the timeout error.
      timeout: seconds; None -> ``distributed.barrier_timeout``.

    Raises:
      TimeoutError: not every process arrived in time.
    """
    if jax.process_count() == 1:
        return
    timeout = _settings.barrier_timeout if timeout is None else timeout
    try:
        _client().wait_at_barrier(_unique(f"barrier/{name}"), timeout * 1000)
    except Exception as error:  # JAX raises its runtime error type, named differently per version
        raise TimeoutError(
            f"process {jax.process_index()} of {jax.process_count()} waited at barrier {name!r} "
            f"for {timeout} s (distributed.barrier_timeout) without every process arriving: "
            f"{str(error).splitlines()[0]}") from error


def primary_first(name: str, build: Callable[[], T]) -> T:
    """``build()`` on process 0 first, then, after a barrier, on the others.

    For work whose result lands on disk (a dataset): the others then find it done on a shared
    filesystem, or do it on their own disk when the filesystem is not shared, never concurrently
    with process 0 in the same directory.
    """
    if jax.process_count() == 1:
        return build()
    if is_primary():
        result = build()
        barrier(name)
        return result
    barrier(name)
    return build()


def broadcast(name: str, value: Any = None) -> Any:
    """Process 0's ``value`` (JSON-able) on every process; the others' ``value`` is ignored."""
    if jax.process_count() == 1:
        return value
    key = _unique(f"broadcast/{name}")
    client = _client()
    if is_primary():
        client.key_value_set(key, json.dumps(value))
        return value
    return json.loads(client.blocking_key_value_get(key, _settings.barrier_timeout * 1000))


_gathered: list[str] = []


def all_gather(name: str, value: Any) -> list[Any]:
    """Every process's ``value`` (JSON-able), in process order (``[value]`` for one process).

    Host-side (the coordination service's key-value store), so it never waits for the devices to
    finish queued work; cheap enough to run every step.
    """
    if jax.process_count() == 1:
        return [value]
    key = _unique(f"gather/{name}")
    client = _client()
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    timeout_ms = _settings.barrier_timeout * 1000
    values = [value if index == jax.process_index() else
              json.loads(client.blocking_key_value_get(f"{key}/{index}", timeout_ms))
              for index in range(jax.process_count())]
    # Every process has read the previous call's keys once it has written this one's (it reads
    # in order), so this process's previous key can go.
    if _gathered:
        client.key_value_delete(_gathered.pop())
    _gathered.append(f"{key}/{jax.process_index()}")
    return values


def check_shared_directory(directory: str | os.PathLike[str], what: str) -> None:
    """Raise on every process unless all of them see ``directory`` as one directory.

    Orbax writes a checkpoint from every process into one directory and reads it back from
    every process; hosts with separate disks would each hold part of it.

    Raises:
      ValueError: some process does not see a file process 0 wrote into ``directory``.
    """
    if jax.process_count() == 1:
        return
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f".shared-check-{broadcast(f'shared/{what}', uuid.uuid4().hex)}"
    if is_primary():
        marker.write_text("")
    barrier(f"shared/{what}/written")
    seen = all_gather(f"shared/{what}", marker.exists())
    if is_primary():
        marker.unlink()
    blind = [index for index, ok in enumerate(seen) if not ok]
    if blind:
        raise ValueError(
            f"{what} {directory} is not shared by all {jax.process_count()} processes: process(es) "
            f"{blind} do not see a file process 0 wrote there; put it on a filesystem every host "
            "mounts (NFS, a gcsfuse bucket)")


def put(tree: T, shardings: Any) -> T:
    """``jax.device_put(tree, shardings)`` that also takes, in a multi-process job, arrays each
    process holds whole (a process-local model, NumPy, a PRNG key) onto shardings that span the
    processes: every process must hold the same values; each keeps its own shards of them."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put_leaf(leaf: Any, where: Any) -> Any:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put_leaf(jax.random.key_data(leaf), where),
                                            impl=jax.random.key_impl(leaf))
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.device_put(leaf, where)  # already global: a reshard
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

    return jax.tree.map(put_leaf, tree, shardings)


def _replicated(array: jax.Array) -> NamedSharding:
    sharding = array.sharding
    mesh = (sharding.mesh if isinstance(sharding, NamedSharding)
            else Mesh(np.asarray(sorted(sharding.device_set, key=lambda d: d.id)), ("devices",)))
    return NamedSharding(mesh, PartitionSpec())


def process_local(tree: T) -> T:
    """``tree`` with every array that spans other processes' devices copied whole onto this
    process's first device (collective: every process must call it); other leaves unchanged.

    For host-side work on a trained model in a multi-process job: evaluation, exports.
    """
    if jax.process_count() == 1:
        return tree

    def local(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return leaf
        whole = jax.device_put(leaf, _replicated(leaf))
        return jax.device_put(whole.addressable_data(0), jax.local_devices()[0])

    return jax.tree.map(local, tree)


def exit_together(main: Callable[..., T]) -> Callable[..., T]:
    """A CLI ``main`` that, in a multi-process job, ends its process at once on an error.

    Without it a failing process would wait ``shutdown_timeout`` at JAX's exit barrier while the
    others wait for it in a collective, and all would end with a message about the barrier. With
    it the error is printed (with the process index), the process exits with status 1 (or the
    ``SystemExit`` code), and the others are terminated within ``heartbeat_timeout``.
    """

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return main(*args, **kwargs)
        except BaseException as error:
            if (not jax.distributed.is_initialized() or jax.process_count() == 1
                    or (isinstance(error, SystemExit) and not error.code)):
                raise
            code = error.code if isinstance(error, SystemExit) else 1
            code = code if isinstance(code, int) else 1
            if not isinstance(error, SystemExit):
                traceback.print_exc()
            print(f"process {jax.process_index()} of {jax.process_count()} failed "
                  f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                  f"ending it so the others stop within distributed.heartbeat_timeout="
                  f"{_settings.heartbeat_timeout} s", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(code)

    return run
