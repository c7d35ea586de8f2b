"""The training loop: resume equality, every method trains, and the main job end to end."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from mmpo_jax.training import config_checks
from mmpo_jax.training.config_loading import load_config
from mmpo_jax.training.experiment import run_experiment
from mmpo_jax.training.logging import read_metrics
from mmpo_jax.training.loop import train
from tests.training import step_fixtures as fx

SMALL = ("train.progress_bar=false", "train.log_every=1", "data.batch_size=8",
         "data.buckets=(64,96)", "checkpoint.async_save=false", "eval.enabled=false")


def _config(method_file: str, *overrides: str):
    config = load_config(f"configs/{method_file}", SMALL + overrides)
    config_checks.validate(config, device_count=jax.device_count())
    return config


def _params(model):
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _train(config, workdir, source=None, **kwargs):
    return train(config, model=fx.base_model(), tokenizer=fx.tokenizer(),
                 source=list(source or fx.records(16)), image_config=fx.IMAGE_CONFIG,
                 workdir=workdir, **kwargs)


def test_resumed_run_reaches_the_uninterrupted_parameters(tmp_path):
    config = _config("dpo.py", "train.num_steps=4", "checkpoint.save_every=2",
                     "optimizer.learning_rate=1e-3", "mesh.fsdp=2")
    whole = _train(config, tmp_path / "whole")
    first = _train(config, tmp_path / "resumed", stop_at=2)
    assert first.steps == 2
    resumed = _train(config, tmp_path / "resumed")
    fx.tree_allclose(_params(whole.model), _params(resumed.model), rtol=1e-6, atol=1e-7)
    logged = [r["step"] for r in read_metrics(tmp_path / "resumed")]
    assert logged == [1, 2, 3, 4]
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["steps"] == 4


def _p2dpo_records():
    # P2-DPO's pairs come from its generation pipeline; here each record carries given focus
    # images and a robustness pair, which is what the trainer reads.
    records = []
    for record in fx.records(16):
        records.append(dict(record, focus_aug_image=record["image"],
                            focus_deg_image=np.zeros_like(record["image"]),
                            robust_chosen=record["chosen"], robust_rejected=record["rejected"]))
    return records


@pytest.mark.slow
@pytest.mark.parametrize("method_file", ["sft.py", "dpo.py", "mdpo.py", "catpo.py", "tpo.py",
                                         "adapt.py", "p2dpo.py"])
def test_every_method_trains_without_nan_and_its_loss_goes_down(tmp_path, method_file):
    config = _config(method_file, "train.num_steps=12", "optimizer.learning_rate=2e-3",
                     "optimizer.warmup_ratio=0.0", "optimizer.schedule=constant")
    source = _p2dpo_records() if method_file == "p2dpo.py" else None
    _train(config, tmp_path, source=source)
    losses = [r["loss/total"] for r in read_metrics(tmp_path)]
    assert len(losses) == 12 and np.all(np.isfinite(losses)), losses
    # Two passes over 16 records: the second pass's loss is below the first's.
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses


@pytest.mark.slow
def test_main_job_prints_the_before_after_table(tmp_path, capsys):
    world = "data.builder={'sft_size': 64, 'preference_size': 32, 'test_caption_size': 8, " \
            "'test_pope_images': 2}"
    config = load_config("configs/catpo.py", (
        world, f"data.data_dir={tmp_path / 'data'}", f"workdir={tmp_path / 'run'}",
        "train.progress_bar=false", "train.num_steps=3", "data.batch_size=8",
        "sft_base.num_steps=4", "sft_base.batch_size=8", "eval.num_samples=1",
        "eval.max_new_tokens=8", "checkpoint.async_save=false"))
    config_checks.validate(config, device_count=jax.device_count())
    rows = run_experiment(config)
    assert list(rows) == ["base (SFT)", "catpo", "control (SFT on chosen)"]
    for metrics in rows.values():
        assert {"chair_i", "sampled/chair_i", "pope_f1", "continuation_prob"} <= set(metrics)
    out = capsys.readouterr().out
    assert "CHAIR_i sampled" in out and "control (SFT on chosen)" in out
    assert (tmp_path / "run" / "results.json").exists()
    # The SFT base is cached: a second run reuses it instead of training again.
    cached = list((tmp_path / "data" / "sft_base").iterdir())
    assert len(cached) == 1 and (cached[0] / "done").exists()
