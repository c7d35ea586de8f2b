"""A run meeting faults: divergence (NaN/inf), directories it cannot write, a killed cache write."""

from __future__ import annotations

import logging
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mmpo_jax.config.loading import load_config
from mmpo_jax.engine.disk import UnwritableDirectory
from mmpo_jax.training.divergence import TrainingDiverged
from mmpo_jax.training.experiment import initial_model, load_data, run_experiment
from tests.engine import step_fixtures as fx
from tests.engine.unwritable import unwritable
from tests.training.test_logging import _strict_json
from tests.training.test_loop import _config, _train


@pytest.mark.slow
def test_a_diverging_run_stops_without_saving_a_non_finite_checkpoint(tmp_path):
    # learning_rate=1e10: step 1 is finite and throws the weights far; from step 2 the loss is NaN
    config = _config("dpo.py", "optimizer.learning_rate=1e10", "optimizer.warmup_ratio=0.0",
                     "train.num_steps=12", "checkpoint.save_every=1", "train.max_bad_steps=2")
    with pytest.raises(TrainingDiverged) as stopped:
        _train(config, tmp_path)
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith("dpo: stopped at step 3: the loss was NaN or inf at 2 consecutive "
                              "steps (train.max_bad_steps=2;")
    assert f"the last good checkpoint: step 2 in {tmp_path / 'checkpoints'}" in message

    records = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # bounded: nothing ran past the limit
    assert [r["optim/skipped"] for r in records] == [0.0, 1.0, 1.0]
    assert [r["loss/total"] for r in records][1:] == ["NaN", "NaN"]
    summary = _strict_json((tmp_path / "summary.json").read_text())
    assert summary["stopped"] == message and summary["skipped_steps"] == 2

    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["1", "2"]
    for step in steps:  # read back by orbax alone, without this package's checks
        for item in ("params", "opt_state"):
            arrays = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / step / item)
            assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(arrays))


def test_an_unwritable_checkpoint_directory_stops_the_run_before_it_builds_anything(tmp_path):
    config = _config("dpo.py", "train.num_steps=2", "checkpoint.async_save=true",
                     "optimizer.learning_rate=1e-3")
    fx.base_model(), fx.tokenizer(), fx.records(16)  # built (and cached) before the clock starts
    with unwritable(tmp_path / "checkpoints"):
        start = time.monotonic()
        with pytest.raises(UnwritableDirectory, match=(
                f"^the checkpoint directory {tmp_path / 'checkpoints'} is not writable \\(")):
            _train(config, tmp_path)
        assert time.monotonic() - start < 30
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unwritable_data_dir_is_reported_before_any_data_is_loaded(tmp_path):
    config = load_config("configs/catpo.py", (f"data.data_dir={tmp_path / 'data'}",
                                              f"workdir={tmp_path / 'run'}",
                                              "train.num_steps=1"))
    with unwritable(tmp_path / "data"):
        with pytest.raises(UnwritableDirectory, match=f"^data.data_dir {tmp_path / 'data'} is "
                                                      f"not writable"):
            run_experiment(config)
    assert list((tmp_path / "data").iterdir()) == []


def _params(model):
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.slow
def test_a_killed_sft_base_cache_write_is_rebuilt_by_the_next_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmpo_jax.training.experiment")
    world = ("data.builder={'sft_size': 16, 'preference_size': 8, 'test_caption_size': 2, "
             "'test_pope_images': 1}")
    config = load_config("configs/dpo.py", (
        world, f"data.data_dir={tmp_path / 'data'}", "train.progress_bar=false",
        "train.num_steps=1", "sft_base.num_steps=2", "sft_base.batch_size=8",
        "checkpoint.async_save=false"))
    _, tokenizer, _ = load_data(config)
    built = _params(initial_model(config, tokenizer))
    [entry] = (tmp_path / "data" / "sft_base").iterdir()
    model_dir = entry / "model"

    # A run killed while writing the model: it was still under its temporary name, half written.
    partial = entry / "model.partial"
    model_dir.rename(partial)
    shutil.rmtree(partial / "params")
    rebuilt = _params(initial_model(config, tokenizer))
    assert sorted(p.name for p in entry.iterdir()) == ["model", "run"]
    jax.tree.map(np.testing.assert_array_equal, rebuilt, built)

    # What a kill left with earlier versions (a model/ without params/; every later run then
    # failed with FileExistsError): rebuilt too, with a warning.
    shutil.rmtree(model_dir / "params")
    rebuilt = _params(initial_model(config, tokenizer))
    assert "is incomplete (an interrupted write); rebuilding it" in caplog.text
    jax.tree.map(np.testing.assert_array_equal, rebuilt, built)
    caplog.clear()
    initial_model(config, tokenizer)
    assert "SFT base: using the cached model" in caplog.text
