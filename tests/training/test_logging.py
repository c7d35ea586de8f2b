"""MetricLogger: window means of (sum, count) pairs, jsonl, TensorBoard, bar, resume, summary."""

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.objectives.metrics import accumulate, finalize, mean_metric
from mmpo_jax.training.logging import (
    EXAMPLES_PER_SECOND,
    STEPS_PER_SECOND,
    MetricLogger,
    read_metrics,
    read_summary,
)


def step_metrics(step: int) -> dict:
    """What a DPO step hands the logger: device (sum, count) pairs plus plain scalars."""
    losses = jnp.asarray([0.7, 0.6, 0.9, 0.2]) / step
    margins = jnp.asarray([0.1, -0.3, 0.5, 0.2]) * step
    # Later steps count fewer examples: a mean of step means would differ from the pooled mean.
    mask = jnp.arange(4) < 5 - step
    return {
        "loss/total": mean_metric(losses, mask),
        "rewards/margins": mean_metric(margins, mask),
        "rewards/accuracy": mean_metric(margins > 0, mask),
        "learning_rate": 1e-3 * step,
        "grad_norm": jnp.asarray(2.0 * step),
    }


def read_tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every event file below ``directory`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4  # length, its crc, payload, its crc
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_window_mean_is_the_pooled_sum_over_count(tmp_path):
    with MetricLogger(tmp_path, total_steps=4, log_every=3, progress_bar=False) as logger:
        for step in (1, 2, 3, 4):
            logger.log(step, step_metrics(step), examples=4)
    records = read_metrics(tmp_path)
    assert [record["step"] for record in records] == [3, 4]

    window = [step_metrics(step) for step in (1, 2, 3)]
    pairs = [{k: v for k, v in m.items() if isinstance(v, tuple)} for m in window]
    pooled = finalize(accumulate(accumulate(pairs[0], pairs[1]), pairs[2]))
    for name, mean in pooled.items():
        np.testing.assert_allclose(records[0][name], float(mean), rtol=1e-6)
    # Not the mean of the per-step means (the counts are 4, 3, 2).
    step_means = [float(finalize(p)["loss/total"]) for p in pairs]
    assert abs(records[0]["loss/total"] - np.mean(step_means)) > 1e-3
    # Plain scalars are means of one observation each.
    np.testing.assert_allclose(records[0]["learning_rate"], 2e-3, rtol=1e-6)
    np.testing.assert_allclose(records[0]["grad_norm"], 4.0, rtol=1e-6)
    # The partial last window (step 4 alone) is written by close().
    last = finalize({k: v for k, v in step_metrics(4).items() if isinstance(v, tuple)})
    np.testing.assert_allclose(records[1]["loss/total"], float(last["loss/total"]), rtol=1e-6)


def test_nothing_counted_is_zero_not_nan(tmp_path):
    with MetricLogger(tmp_path, total_steps=2, log_every=2, progress_bar=False) as logger:
        for step in (1, 2):
            logger.log(step, {"loss/anchor": (jnp.zeros(()), jnp.zeros(()))})
    assert read_metrics(tmp_path)[0]["loss/anchor"] == 0.0


def test_jsonl_records_and_throughput(tmp_path):
    with MetricLogger(tmp_path, total_steps=6, log_every=2, progress_bar=False) as logger:
        for step in range(1, 7):
            logger.log(step, {"loss/total": (jnp.asarray(2.0 * step), 2.0)}, examples=8)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert [r["loss/total"] for r in records] == [1.5, 3.5, 5.5]
    for record in records:
        assert set(record) == {"step", "time", "loss/total", STEPS_PER_SECOND, EXAMPLES_PER_SECOND}
        assert record[STEPS_PER_SECOND] > 0
        # 8 examples per step.
        np.testing.assert_allclose(record[EXAMPLES_PER_SECOND], 8 * record[STEPS_PER_SECOND])
        assert abs(record["time"] - records[0]["time"]) < 60


def test_without_examples_no_examples_rate(tmp_path):
    with MetricLogger(tmp_path, total_steps=1, log_every=1, progress_bar=False) as logger:
        logger.log(1, {"loss/nll": 1.0})
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert STEPS_PER_SECOND in record and EXAMPLES_PER_SECOND not in record


def test_one_device_get_per_log_point(tmp_path, monkeypatch):
    calls = []
    real_device_get = jax.device_get

    def counting_device_get(tree):
        calls.append(tree)
        return real_device_get(tree)

    monkeypatch.setattr(jax, "device_get", counting_device_get)
    with MetricLogger(tmp_path, total_steps=8, log_every=4, progress_bar=False) as logger:
        for step in range(1, 4):
            logger.log(step, step_metrics(step))
        assert calls == []  # nothing fetched between log points
        logger.log(4, step_metrics(4))
        assert len(calls) == 1 and len(calls[0]) == 4  # the whole window in one call
        # Still device arrays until then.
        assert isinstance(calls[0][0]["loss/total"][0], jax.Array)
        for step in range(5, 9):
            logger.log(step, step_metrics(step))
    assert len(calls) == 2


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    with MetricLogger(tmp_path, total_steps=4, log_every=2, progress_bar=False) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss/total": float(step), "rewards/accuracy": (step, 2.0)})
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss/total"] == [(2, 1.5), (4, 3.5)]
    assert scalars["rewards/accuracy"] == [(2, 0.75), (4, 1.75)]
    assert [step for step, _ in scalars[STEPS_PER_SECOND]] == [2, 4]


def test_tensorboard_off_writes_no_event_files(tmp_path):
    with MetricLogger(
        tmp_path, total_steps=1, log_every=1, progress_bar=False, tensorboard=False
    ) as logger:
        logger.log(1, {"loss/total": 1.0})
    assert not (tmp_path / "tensorboard").exists()
    assert len(read_metrics(tmp_path)) == 1


def test_resumed_run_appends(tmp_path):
    with MetricLogger(tmp_path, total_steps=6, log_every=2, progress_bar=False) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss/total": float(step)})
    with MetricLogger(
        tmp_path, total_steps=6, initial_step=4, log_every=2, progress_bar=False
    ) as logger:
        for step in (5, 6):
            logger.log(step, {"loss/total": float(step)})
        summary = logger.summary()
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss/total"]) for r in records] == [(2, 1.5), (4, 3.5), (6, 5.5)]
    assert (summary["first_step"], summary["last_step"], summary["steps"]) == (4, 6, 2)
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss/total"] == [(2, 1.5), (4, 3.5), (6, 5.5)]


def test_summary_content(tmp_path):
    losses = [0.9, 0.5, 0.7, 0.4]
    with MetricLogger(
        tmp_path, total_steps=4, log_every=1, progress_bar=False, run_name="dpo"
    ) as logger:
        for step, loss in enumerate(losses, start=1):
            logger.log(step, {"loss/total": loss, "rewards/accuracy": (step, 4.0)}, examples=16)
        summary = logger.summary()
        path = logger.write_summary()
        text = logger.format_summary()
    assert path == tmp_path / "summary.json"
    assert json.loads(path.read_text())["metrics"] == summary["metrics"]
    assert summary["run_name"] == "dpo"
    assert (summary["first_step"], summary["last_step"], summary["steps"]) == (0, 4, 4)
    assert summary["examples"] == 64
    assert summary["wall_time_seconds"] > 0
    np.testing.assert_allclose(summary["examples_per_second"], 16 * summary["steps_per_second"])
    assert summary["metrics"]["loss/total"] == {"first": 0.9, "last": 0.4, "min": 0.4, "max": 0.9}
    assert summary["metrics"]["rewards/accuracy"] == {"first": 0.25, "last": 1.0}
    assert text.splitlines()[0].startswith("run dpo: steps 0 -> 4 (4 run) in ")
    assert re.search(r"\n  loss/total +first 0.9  last 0.4  min 0.4  max 0.9\n", text)
    assert re.search(r"\n  rewards/accuracy +first 0.25  last 1(\n|$)", text)
    assert re.search(r"\n  perf/steps_per_second +first ", text)


def _strict_json(text: str):
    """``json.loads`` that refuses the bare NaN / Infinity tokens strict parsers reject."""
    def refuse(token):
        raise ValueError(f"bare {token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_keep_both_files_valid_json(tmp_path):
    values = [(0.5, 1.0), (float("nan"), float("inf")), (0.25, -float("inf"))]
    with MetricLogger(tmp_path, total_steps=3, log_every=1, progress_bar=False) as logger:
        for step, (loss, grad_norm) in enumerate(values, start=1):
            logger.log(step, {"loss/total": loss, "optim/grad_norm": jnp.float32(grad_norm)})
        logger.write_summary(extra={"skipped_steps": 1})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    written = [_strict_json(line) for line in lines]
    assert [(r["loss/total"], r["optim/grad_norm"]) for r in written] == [
        (0.5, 1.0), ("NaN", "Infinity"), (0.25, "-Infinity")]
    read = read_metrics(tmp_path)
    assert np.isnan(read[1]["loss/total"]) and read[1]["optim/grad_norm"] == float("inf")
    assert read[2]["optim/grad_norm"] == -float("inf")
    summary = _strict_json((tmp_path / "summary.json").read_text())
    # min / max over the finite losses; first / last as logged
    assert summary["metrics"]["loss/total"] == {"first": 0.5, "last": 0.25, "min": 0.25,
                                                "max": 0.5}
    assert summary["metrics"]["optim/grad_norm"] == {"first": 1.0, "last": "-Infinity"}
    assert summary["skipped_steps"] == 1
    read_back = read_summary(tmp_path)
    assert read_back["metrics"]["optim/grad_norm"] == {"first": 1.0, "last": -float("inf")}


def test_evaluations_are_their_own_records_and_join_the_summary(tmp_path):
    """Benchmarks evaluated in training: a record at their step after the pending window, counted
    as no training step."""
    with MetricLogger(tmp_path, total_steps=4, log_every=2, progress_bar=False) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss/total": 0.5 / step}, examples=4)
            if step in (1, 3):
                logger.log_evaluation(step, {"benchmarks/pope_f1": 0.25 * step})
        summary = logger.summary()
    records = read_metrics(tmp_path)
    assert [(r["step"], "loss/total" in r, "benchmarks/pope_f1" in r) for r in records] == [
        (1, True, False), (1, False, True), (2, True, False), (3, True, False), (3, False, True)]
    assert summary["steps"] == 3 and summary["examples"] == 12
    assert summary["metrics"]["benchmarks/pope_f1"] == {"first": 0.25, "last": 0.75}


def test_progress_bar_shows_loss_margin_accuracy(tmp_path, capsys):
    metrics = {"loss/total": 0.693147, "rewards/margins": 0.0123456, "rewards/accuracy": 0.5}
    with MetricLogger(
        tmp_path, total_steps=10, initial_step=2, log_every=1, run_name="catpo"
    ) as logger:
        logger.log(3, metrics)
    err = capsys.readouterr().err
    assert "catpo" in err and "3/10" in err
    assert "loss=0.6931" in err and "margin=0.01235" in err and "acc=0.5" in err


def test_progress_bar_shows_nll_for_sft(tmp_path, capsys):
    with MetricLogger(tmp_path, total_steps=1, log_every=1, tensorboard=False) as logger:
        logger.log(1, {"loss/nll": 2.345678})
    assert "loss=2.346" in capsys.readouterr().err


def test_progress_bar_disabled_prints_nothing(tmp_path, capfd):
    with MetricLogger(tmp_path, total_steps=4, log_every=2, progress_bar=False) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss/total": 1.0})
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_changing_metric_names_inside_a_window_is_an_error(tmp_path):
    with MetricLogger(tmp_path, total_steps=4, log_every=4, progress_bar=False) as logger:
        logger.log(1, {"loss/total": 1.0})
        with pytest.raises(ValueError, match=r"step 2 logs metrics \['loss/nll'\]"):
            logger.log(2, {"loss/nll": 1.0})


def test_bad_metric_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"'loss/total' is a sequence of 3"):
        with MetricLogger(tmp_path, total_steps=4, log_every=1, progress_bar=False) as logger:
            logger.log(1, {"loss/total": (1.0, 2.0, 3.0)})
    with MetricLogger(tmp_path, total_steps=4, log_every=1, progress_bar=False) as logger:
        with pytest.raises(ValueError, match=r"'loss/total' has shape \(2,\)"):
            logger.log(1, {"loss/total": jnp.ones(2)})
        logger.log(2, {"loss/total": 2.0})  # the bad window is dropped; logging goes on
    assert [r["step"] for r in read_metrics(tmp_path)] == [2]
    with pytest.raises(ValueError, match="log_every=0 must be >= 1"):
        MetricLogger(tmp_path, total_steps=4, log_every=0)


def test_logging_never_imports_torch(tmp_path):
    """tensorboardX would import torch where installed; the package must not."""
    code = (
        "import sys\n"
        "from mmpo_jax.training.logging import MetricLogger\n"
        f"with MetricLogger({str(tmp_path)!r}, total_steps=1, progress_bar=False) as logger:\n"
        "    logger.log(1, {'loss/total': 1.0})\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import torch\n"  # and the block is lifted afterwards: torch still imports for others
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
