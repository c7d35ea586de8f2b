"""Checkpoints that cannot poison a run: checksums, damaged checkpoints set aside with a one-line
report and the previous one restored, no NaN state saved, write failures raised (not hung on)."""

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmpo_jax.engine import integrity, sharding
from mmpo_jax.engine.checkpoint_checks import CorruptCheckpoint
from mmpo_jax.engine.checkpointing import Checkpointer, CheckpointWriteError, NonFiniteState
from tests.engine import unwritable
from tests.engine.test_checkpointing import make_iterator  # noqa: F401  (a fixture)
from tests.engine.test_checkpointing import (TMP_SUFFIX, _abstract, _assert_trees_equal, _save,
                                             _trained)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_checksums_follow_the_bits_not_the_sharding():
    weights = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) / 7.0
    tree = {"w": weights, "b": jnp.ones(3, jnp.bfloat16), "n": jnp.arange(5, dtype=jnp.int32),
            "m": jnp.array([True, False])}
    one = integrity.fingerprints(tree)
    assert list(one) == ["b", "m", "n", "w"] and all(f.finite for f in one.values())
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    sharded = jax.device_put(weights, NamedSharding(mesh, P("fsdp", "tensor")))
    assert integrity.fingerprints({**tree, "w": sharded}) == one  # 8 shards, same sums

    def checksum(w):
        return integrity.fingerprints({"w": w})["w"].checksum

    one_ulp = weights.at[17, 3].set(jnp.nextafter(weights[17, 3], jnp.inf))
    swapped = weights.at[0, 0].set(weights[0, 1]).at[0, 1].set(weights[0, 0])
    assert len({checksum(weights), checksum(one_ulp), checksum(swapped)}) == 3
    poisoned = integrity.fingerprints({"w": weights.at[5, 5].set(jnp.nan)})["w"]
    assert not poisoned.finite


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bytes(step_dir):
    """1000 bytes of the params' largest data file inverted, its size unchanged. Usually the
    compressed chunk still decodes, to wrong numbers, and only the checksum can tell; the files'
    layout varies between runs, and when the range covers a zstd frame header zstd refuses the
    chunk itself (both are reports of the same damage)."""
    path = _largest_file(step_dir / "params")
    data = bytearray(path.read_bytes())
    data[100:1100] = bytes(b ^ 0xFF for b in data[100:1100])
    path.write_bytes(bytes(data))


def _swap_params(step_dir):
    """Step 2's saved params in place of step 4's: every file decodes, to another checkpoint's
    numbers, so only the checksum can tell."""
    shutil.rmtree(step_dir / "params")
    shutil.copytree(step_dir.parent / "2" / "params", step_dir / "params")


def _truncate(step_dir):
    path = _largest_file(step_dir / "params")
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _delete_metadata(step_dir):
    (step_dir / "params" / "_METADATA").unlink()


def _delete_params(step_dir):
    shutil.rmtree(step_dir / "params")


def _garbage_data_position(step_dir):
    (step_dir / "data" / "process_0-of-1.json").write_text("{not json")


@pytest.mark.parametrize("damage, reason, where", [
    (_flip_bytes, "checksum|unreadable",
     r"params/\S+: its contents do not match the checksum saved|params/: ValueError: \S+ Error reading"),
    (_swap_params, "checksum", r"params/\S+: its contents do not match the checksum saved"),
    (_truncate, "unreadable", r"params/: ValueError: \S+ Error reading"),
    (_delete_metadata, "missing", r"params/_METADATA: the file is missing"),
    (_delete_params, "missing", r"params/: the directory is missing"),
    (_garbage_data_position, "bad-json", r"data/process_0-of-1\.json: not valid JSON"),
], ids=["flipped_bytes", "swapped_params", "truncated_file", "deleted_metadata", "deleted_params",
        "garbage_data_position"])
def test_a_damaged_checkpoint_is_reported_set_aside_and_the_previous_one_restored(
        tmp_path, make_iterator, caplog, damage, reason, where):
    iterator = make_iterator()
    with Checkpointer(tmp_path, save_every=2) as checkpointer:
        next(iterator)
        _save(checkpointer, 2, seed=2, data_iterator=iterator)
        position = iterator.get_state()
        next(iterator)
        _save(checkpointer, 4, seed=4, data_iterator=iterator)
    damage(tmp_path / "4")

    resumed = make_iterator()
    with caplog.at_level(logging.WARNING, logger="mmpo_jax.engine.checkpointing"):
        with Checkpointer(tmp_path, save_every=2) as checkpointer:
            restored = checkpointer.restore(abstract_params=_abstract()[0],
                                            abstract_opt_state=_abstract()[1],
                                            data_iterator=resumed)
            assert checkpointer.all_steps() == [2]
            assert _save(checkpointer, 4, seed=40)  # the resumed run writes step 4 again
    assert restored.step == 2
    _assert_trees_equal(restored.params, _trained(seed=2, steps=1)[1])
    assert resumed.get_state() == position
    reports = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(reports) == 1 and "\n" not in reports[0], reports
    assert reports[0].startswith(f"checkpoint of step 4 in {tmp_path} is unusable: ")
    assert re.search(where, reports[0]), reports[0]
    set_aside = re.search(r"set aside as 4\.corrupt-(\S+), falling back", reports[0])
    assert set_aside and set_aside.group(1) in reason.split("|"), reports[0]
    reason = set_aside.group(1)
    assert (tmp_path / f"4.corrupt-{reason}").is_dir()  # kept for whoever investigates
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4", f"4.corrupt-{reason}"]


def test_without_a_usable_checkpoint_restore_says_so_and_leaves_the_data_where_it_was(
        tmp_path, make_iterator):
    with Checkpointer(tmp_path, save_every=2) as checkpointer:
        _save(checkpointer, 2, data_iterator=make_iterator())
    _truncate(tmp_path / "2")
    iterator = make_iterator()
    next(iterator)
    position = iterator.get_state()
    with Checkpointer(tmp_path, save_every=2) as checkpointer:
        with pytest.raises(CorruptCheckpoint, match=r"step 2 .* unusable: params/: "):
            checkpointer.restore(2, abstract_params=_abstract()[0],
                                 abstract_opt_state=_abstract()[1])
        assert checkpointer.all_steps() == [2]  # a step asked for by name is not moved
        with pytest.raises(FileNotFoundError,
                           match=r"no complete checkpoint .* \(set aside: 2\.corrupt-unreadable\)"):
            checkpointer.restore(abstract_params=_abstract()[0],
                                 abstract_opt_state=_abstract()[1], data_iterator=iterator)
        assert checkpointer.latest_step() is None
    assert iterator.get_state() == position


def test_a_state_holding_nan_is_never_saved(tmp_path):
    _, params, opt_state = _trained(seed=0, steps=1)
    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), params)
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        with pytest.raises(NonFiniteState, match=r"refusing to save the checkpoint of step 1: "
                                                 r"params/\S+ holds NaN or inf values "
                                                 r"\(4 arrays do\); the newest checkpoint .* none"):
            checkpointer.save(1, params=poisoned, opt_state=opt_state, rng=jax.random.key(0))
        assert checkpointer.all_steps() == []
    assert not [p for p in tmp_path.iterdir() if p.name[0].isdigit()]


def _failing_writes(directory: str) -> None:
    """Child process of the next test: an asynchronous run whose writes start failing."""
    directory = pathlib.Path(directory)
    _, params, opt_state = _trained(seed=0, steps=1)
    state = dict(params=params, opt_state=opt_state, rng=jax.random.key(0))
    report = {}
    checkpointer = Checkpointer(directory, save_every=1, async_save=True)
    checkpointer.save(1, **state)
    checkpointer.wait_until_finished()
    with unwritable.unwritable(directory):  # the disk stops taking writes
        start = time.monotonic()
        try:
            checkpointer.save(2, **state)
        except CheckpointWriteError as error:
            report["unwritable"] = [str(error), time.monotonic() - start]
    # orbax's background thread cannot create step 3's directory (its leftover cannot be removed)
    blocker = directory / f"3{TMP_SUFFIX}"
    (blocker / "x").mkdir(parents=True)
    with unwritable.unwritable(blocker):
        start = time.monotonic()
        checkpointer.save(3, **state)  # returns: the write fails in the background
        try:
            checkpointer.save(4, **state)
        except CheckpointWriteError as error:
            report["background"] = [str(error), time.monotonic() - start]
    report["steps"] = checkpointer.all_steps()
    report["done_at"] = time.time()
    print(json.dumps(report), flush=True)


def test_checkpoint_write_errors_surface_at_once_and_the_process_exits(tmp_path):
    probe = tmp_path / "probe"
    with unwritable.unwritable(probe):  # skips where directories cannot be made unwritable
        pass
    directory = tmp_path / "checkpoints"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    code = ("from tests.engine.test_checkpoint_checks import _failing_writes; "
            f"_failing_writes({str(directory)!r})")
    try:
        child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=240,
                               capture_output=True, text=True)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the process hung after a failed checkpoint write:\n{error.stderr}")
    finally:
        for path in (directory, directory / f"3{TMP_SUFFIX}"):
            unwritable.unlock(path)
    exited_at = time.time()
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    message, seconds = report["unwritable"]
    assert message.startswith(f"checkpoint of step 2 not written: the checkpoint directory "
                              f"{directory} is not writable (")
    assert seconds < 10
    message, seconds = report["background"]
    assert message.startswith(f"writing the checkpoint of step 3 to {directory} failed: ")
    assert "\n" not in message and seconds < 30
    assert report["steps"] == [1]
    # orbax's commit threads would wait 300 s for a signal that never comes; they were released
    assert exited_at - report["done_at"] < 60
