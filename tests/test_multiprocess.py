"""Two CPU processes train exactly like one: jax.distributed on localhost, a kill, a resume.

The job (`tests/multiprocess_worker.py`): 2 processes x 4 fake CPU devices, Cat-PO on the tiny
model with one fsdp axis over all 8 devices, batch 8 (4 rows per process), a checkpoint every 2
of 4 steps. Both processes stall after step 2 (checkpointed); process 1 is killed; process 0 must
end, non-zero, within a bounded time. Two fresh processes resume from step 2 to 4, save the
policy collectively and load it back whole on each process. The final parameters must equal
(1e-5) those of one process with 8 devices reading the same global batches: the rows process 0
and process 1 read, concatenated in process order (`GlobalBatches`). A second job trains an SFT
whose two-image batches are interleaved with its one-image ones (`data.interleaving`), as the v2
SFT base does, and must end like one process too.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest

from mmpo_jax.config.checks import ConfigError, distributed_settings
from mmpo_jax.data.batch import pad_to_length
from mmpo_jax.engine import distributed, model_io
from mmpo_jax.engine.scoring import plan_scoring
from mmpo_jax.training.logging import read_metrics
from mmpo_jax.training.loop import make_iterator, train
from tests import multiprocess_worker as worker
from tests.engine import step_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 300  # seconds until both processes stall after step 2 (2 cores, under load)
DEATH_BOUND = 60  # seconds for the survivor to end after the kill (heartbeat timeout 5 s)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _launch(phase: str, workdir: pathlib.Path, port: int) -> list[subprocess.Popen]:
    flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
    env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return [subprocess.Popen(
        [sys.executable, "-m", "tests.multiprocess_worker", f"--process_id={index}",
         f"--port={port}", f"--workdir={workdir}", f"--phase={phase}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(2)]


def _wait_for(condition, timeout: float, what: str, processes) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        ended = [p for p in processes if p.poll() is not None]
        if ended or time.monotonic() > deadline:
            for p in processes:
                p.kill()
            logs = "\n".join(p.communicate()[0][-3000:] for p in processes)
            pytest.fail(f"{what}: {'a process ended' if ended else 'timed out'}\n{logs}")
        time.sleep(0.5)


class GlobalBatches(grain.DatasetIterator):
    """The global batches of a 2-process job on one process: each process's shard, padded to
    the longer one's length, rows concatenated in process order."""

    def __init__(self, shards, pad_id: int):
        super().__init__(shards)
        self._shards, self._pad_id = shards, pad_id

    def __next__(self):
        parts = [next(shard) for shard in self._shards]
        length = max(part.sequence_length for part in parts)
        parts = [pad_to_length(part, length, self._pad_id) for part in parts]
        return jax.tree.map(lambda *rows: np.concatenate(rows), *parts)

    def get_state(self):
        return {"shards": [shard.get_state() for shard in self._shards]}

    def set_state(self, state):
        for shard, part in zip(self._shards, state["shards"]):
            shard.set_state(part)


def _shards(config, source, **focus) -> list:
    """The iterators of the two processes of a job, read on this one."""
    return [make_iterator(config, source, tokenizer=fx.tokenizer(), image_config=fx.IMAGE_CONFIG,
                          num_image_tokens=16, plan=plan_scoring(config.method.to_dict()),
                          shard=(index, 2), **focus) for index in range(2)]


def _one_process_reference(workdir: pathlib.Path, config=None, **focus) -> dict[str, np.ndarray]:
    """The parameters one process reaches reading the two processes' global batches of
    ``config`` (the Cat-PO job's by default)."""
    config = config or worker.config()
    source = list(fx.records(16))
    shards = _shards(config, source, **focus)
    result = train(config, model=fx.base_model(), tokenizer=fx.tokenizer(), source=source,
                   image_config=fx.IMAGE_CONFIG, workdir=workdir,
                   data_iterator=GlobalBatches(shards, fx.tokenizer().pad_token_id))
    return worker.flat_params(result.model)


def _run_to_end(phase: str, workdir: pathlib.Path) -> None:
    """Both worker processes of ``phase``, run to their end; both must succeed."""
    processes = _launch(phase, workdir, _free_port())
    try:
        outputs = [process.communicate(timeout=STARTUP_TIMEOUT)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-3000:] for o in outputs)


def _the_processes_copy(workdir: pathlib.Path, stem: str) -> dict[str, np.ndarray]:
    """The parameters both processes wrote (``<stem>.<process>.npz``): each loaded the whole
    model, the same one."""
    copies = [dict(np.load(workdir / f"{stem}.{i}.npz")) for i in range(2)]
    assert copies[0].keys() == copies[1].keys()
    for name in copies[0]:
        np.testing.assert_array_equal(copies[0][name], copies[1][name], err_msg=name)
    return copies[0]


def _assert_trained_like(params: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    """``params`` equal (1e-5) the one-process ``reference``, which moved from the base."""
    before = worker.flat_params(fx.base_model())
    assert any(not np.allclose(before[name], reference[name]) for name in reference)  # it trained
    for name, value in reference.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_two_processes_killed_and_resumed_end_like_one_process(tmp_path):
    assert jax.device_count() == 8  # tests/conftest.py: the one-process reference's devices
    model_io.save_model(fx.base_model(), tmp_path / "base")
    first = _launch("first", tmp_path, _free_port())
    try:
        stalled = lambda: all((tmp_path / f"blocked.{i}").exists() for i in range(2)) and (
            tmp_path / "run" / "checkpoints" / str(worker.BLOCK_AFTER)).is_dir()
        _wait_for(stalled, STARTUP_TIMEOUT, "both processes stalling after step 2", first)
        killed_at = time.monotonic()
        first[1].send_signal(signal.SIGKILL)
        output, _ = first[0].communicate(timeout=DEATH_BOUND)
        survivor_seconds = time.monotonic() - killed_at
    finally:
        for process in first:
            process.kill()
    assert first[0].returncode != 0, output[-3000:]
    assert "another task died" in output or "stopped sending heartbeats" in output, output[-3000:]
    print(f"process 0 ended {survivor_seconds:.1f} s after process 1 was killed "
          f"(heartbeat timeout {worker.HEARTBEAT_TIMEOUT} s)")

    _run_to_end("resume", tmp_path)

    # Process 0 alone wrote the metric log: each step once, the killed run's then the resumed.
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    _assert_trained_like(_the_processes_copy(tmp_path, "final_params"),
                         _one_process_reference(tmp_path / "one_process"))


@pytest.mark.slow
def test_two_processes_train_an_interleaved_sft_like_one_process(tmp_path):
    model_io.save_model(fx.base_model(), tmp_path / "base")
    _run_to_end("sft_focus", tmp_path)
    config, focus = worker.sft_config(), dict(focus_source=worker.focus_records())
    steps = [batch.pixel_values.ndim for batch, _ in
             zip(_shards(config, list(fx.records(16)), **focus)[0], range(worker.NUM_STEPS))]
    assert 5 in steps and 4 in steps  # the job read both kinds of batch
    _assert_trained_like(_the_processes_copy(tmp_path, "sft_params"),
                         _one_process_reference(tmp_path / "one_process", config, **focus))


def test_one_process_helpers_are_no_ops_and_settings_are_checked():
    assert distributed.initialize(distributed.Settings(mode="off")) is False
    assert distributed.broadcast("x", 3) == 3 and distributed.all_gather("x", 3) == [3]
    assert distributed.primary_first("x", lambda: 5) == 5
    distributed.barrier("x")
    tree = {"a": jax.numpy.ones(2)}
    assert distributed.process_local(tree) is tree
    problems = distributed.Settings(coordinator="localhost", num_processes=2, process_id=2,
                                    heartbeat_timeout=0).problems()
    assert [p.split("=")[0] for p in problems] == [
        "distributed.coordinator", "distributed.process_id", "distributed.heartbeat_timeout"]
    assert distributed.Settings(mode="off", process_id=0).problems()  # off with explicit fields
    config = worker.config("distributed.mode=on", "distributed.initialization_timeout=0")
    with pytest.raises(ConfigError, match=r"(?s)distributed.mode='on'.*initialization_timeout=0"):
        distributed_settings(config)


def test_auto_mode_starts_nothing_without_a_cluster(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri",
                 "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detected_cluster() is None
    assert distributed.initialize(distributed.Settings()) is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    assert distributed.detected_cluster() == "JAX_COORDINATOR_ADDRESS"
    for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID"):
        monkeypatch.setenv(name, "1")
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    assert distributed.detected_cluster() == "SlurmCluster"
