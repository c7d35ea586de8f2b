"""Training-time metric logging: ``metrics.jsonl``, TensorBoard scalars, a tqdm bar, a run summary.

The trainer calls ``MetricLogger.log(step, metrics)`` once per optimizer step with the step's
metrics as ``objectives.metrics`` ``(sum, count)`` pairs of device arrays (plus plain scalars such
as the learning rate or the gradient norm, which count as means). Nothing is read from the device
between log points, so JAX's asynchronous dispatch keeps running ahead; every ``log_every`` steps
one ``jax.device_get`` fetches the whole window, which is reduced on the host (sums added, counts
added, one division) and written as:

- one JSON line ``{"step": s, "time": unix_seconds, "<metric>": mean, ...,
  "perf/steps_per_second": ..., "perf/examples_per_second": ...}`` appended to
  ``<workdir>/metrics.jsonl`` (a resumed run appends too; nothing is ever truncated, so after a
  resume from an older checkpoint a step may appear twice: the later line is the resumed run);
- TensorBoard scalars under ``<workdir>/tensorboard`` (``tensorboardX``);
- the postfix of a tqdm bar (loss, reward margin, accuracy; 4 significant digits).

The first window's throughput includes compiling the step; a window is timed from the previous log
point to the end of this one's ``device_get``, so it measures finished, not dispatched, steps.

``summary()`` / ``format_summary()`` / ``write_summary()`` describe the run at its end.

Non-finite values [our choice]: ``metrics.jsonl`` and ``summary.json`` are strict JSON. A NaN or
infinite value (a diverging run's loss, an infinite gradient norm) is written as the string
``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (the names Python's ``float()`` and JavaScript's
``Number()`` parse), never as the bare tokens ``json.dumps`` emits by default, which strict
parsers reject; strings rather than ``null`` so the sign of an infinity survives.
``read_metrics`` turns them back into floats. A summary's ``min`` / ``max`` are over the finite
values (NaN when there are none).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import tqdm

from mmpo_jax.engine.disk import write_atomic
from mmpo_jax.objectives.metrics import accumulate

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SUMMARY_FILE = "summary.json"
STEPS_PER_SECOND = "perf/steps_per_second"
EXAMPLES_PER_SECOND = "perf/examples_per_second"

PROGRESS_FIELDS = (
    ("loss", ("loss/total", "loss/nll")),
    ("margin", ("rewards/margins",)),
    ("acc", ("rewards/accuracy",)),
)
"""Bar postfix: a label, then the metrics it shows, first present wins (SFT: ``loss/nll``)."""


NON_FINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""How ``metrics.jsonl`` and ``summary.json`` write non-finite floats (module doc)."""


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts and lists too) replaced by its name."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a file, or the workdir that holds one), in file order;
    non-finite values come back as floats."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    with path.open() as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    return [{key: NON_FINITE_NAMES.get(value, value) if isinstance(value, str) else value
             for key, value in record.items()} for record in records]


def read_summary(path: str | Path) -> dict[str, Any]:
    """A ``summary.json`` (a file, or the workdir that holds one); non-finite values come back
    as floats."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE

    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: restore(item) for key, item in value.items()}
        if isinstance(value, list):
            return [restore(item) for item in value]
        return NON_FINITE_NAMES.get(value, value) if isinstance(value, str) else value

    return restore(json.loads(path.read_text()))


def _as_pair(name: str, value: Any) -> tuple[Any, Any]:
    """A metric as ``(sum, count)``: a pair stays one, a scalar is a mean of one observation."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(
                f"metric {name!r} is a sequence of {len(value)}; expected (sum, count) or a scalar"
            )
        return value[0], value[1]
    return value, 1.0


def _host_mean(name: str, total: float, count: float) -> float:
    """``objectives.metrics.finalize``'s rule (nothing counted -> 0) on host numbers."""
    if np.ndim(total) or np.ndim(count):
        raise ValueError(
            f"metric {name!r} has shape {np.shape(total)} / {np.shape(count)}; expected scalars"
        )
    return float(total) / max(float(count), 1.0)


def _import_summary_writer() -> type:
    """``tensorboardX.SummaryWriter``, imported without letting it import torch.

    tensorboardX's writer tries ``import torch`` at import time only to recognise torch tensors,
    which this package never hands it; where torch happens to be installed that would pull it (~2 s,
    GBs) into a JAX process. A ``None`` entry in ``sys.modules`` makes that import fail cleanly.
    """
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricLogger:
    """Accumulates per-step metrics and writes window means every ``log_every`` steps.

    Use as a context manager (or call ``close()``) so the last partial window is written.

    Args:
      workdir: the run directory; created if missing.
      total_steps: optimizer steps of the whole run (the bar's total).
      initial_step: the step a resumed run starts from (0 for a fresh run).
      log_every: a record is written after every step ``s`` with ``s % log_every == 0``.
      progress_bar: show a tqdm bar on stderr.
      tensorboard: also write TensorBoard scalars.
      run_name: shown on the bar and in the summary.
      write_files: write ``metrics.jsonl``, TensorBoard and ``summary.json``; False on every
        process of a multi-process job but process 0 (it still keeps the records and summary).
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        total_steps: int,
        initial_step: int = 0,
        log_every: int = 10,
        progress_bar: bool = True,
        tensorboard: bool = True,
        run_name: str = "",
        write_files: bool = True,
    ):
        if log_every < 1:
            raise ValueError(f"log_every={log_every} must be >= 1")
        if not 0 <= initial_step <= total_steps:
            raise ValueError(
                f"initial_step={initial_step} must lie in [0, total_steps={total_steps}]"
            )
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.initial_step = initial_step
        self.log_every = log_every
        self.run_name = run_name
        self.write_files = write_files
        self._metrics_file = (self.workdir / METRICS_FILE).open("a") if write_files else None
        self._writer = None
        if tensorboard and write_files:
            # tensorboardX names event files by the second and the host, and truncates a file of
            # that name: a run resumed within the same second would wipe the previous file.
            self._writer = _import_summary_writer()(
                str(self.workdir / TENSORBOARD_DIR),
                filename_suffix=f".from_step_{initial_step}.{os.getpid()}",
            )
        self._bar = None
        if progress_bar:
            self._bar = tqdm.tqdm(
                total=total_steps, initial=initial_step, desc=run_name or None, dynamic_ncols=True
            )
        # The window since the last log point: step metrics still as device arrays.
        self._pending: list[Mapping[str, Any]] = []
        self._pending_examples = 0
        self._last_step = initial_step
        # Run totals, for throughput and the summary.
        self._start = time.perf_counter()
        self._window_start = self._start
        self._steps_run = 0
        self._examples_run = 0
        self._records: list[dict[str, Any]] = []
        self._closed = False

    # ------------------------------------------------------------------ per step

    def log(self, step: int, metrics: Mapping[str, Any], *, examples: int = 0) -> None:
        """Record optimizer step ``step``; write a record when ``step % log_every == 0``.

        Args:
          step: the optimizer step just taken (1 for the first update of a fresh run).
          metrics: name -> ``(sum, count)`` pair or scalar (a mean), device arrays or numbers;
            every step of a window must have the same names.
          examples: training examples (preference pairs) consumed by this step.
        """
        if self._closed:
            raise RuntimeError("MetricLogger.log after close()")
        if self._pending and set(metrics) != set(self._pending[0]):
            raise ValueError(
                f"step {step} logs metrics {sorted(metrics)}, but this window started with "
                f"{sorted(self._pending[0])}; every step of a window must log the same names"
            )
        self._pending.append(dict(metrics))
        self._pending_examples += examples
        self._steps_run += 1
        self._examples_run += examples
        if self._bar is not None:
            self._bar.update(step - self._last_step)
        self._last_step = step
        if step % self.log_every == 0:
            self.flush()

    def flush(self) -> None:
        """Write the pending window (if any) as one record at the last logged step."""
        if not self._pending:
            return
        # The window is taken before anything can fail, so close() after an error does not retry it.
        pending, examples = self._pending, self._pending_examples
        self._pending, self._pending_examples = [], 0
        window = jax.device_get(pending)  # the only device -> host transfer
        now = time.perf_counter()
        totals = {name: _as_pair(name, value) for name, value in window[0].items()}
        for step_metrics in window[1:]:
            pairs = {name: _as_pair(name, value) for name, value in step_metrics.items()}
            totals = accumulate(totals, pairs)
        record: dict[str, Any] = {"step": self._last_step, "time": time.time()}
        record.update({name: _host_mean(name, *pair) for name, pair in totals.items()})
        elapsed = max(now - self._window_start, 1e-9)
        record[STEPS_PER_SECOND] = len(window) / elapsed
        if examples:
            record[EXAMPLES_PER_SECOND] = examples / elapsed
        self._window_start = now
        self._write(record)

    def log_evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Write an evaluation's ``metrics`` (host floats) as their own record at ``step``, after
        the pending window; they join the summary's metrics and count no training step."""
        if self._closed:
            raise RuntimeError("MetricLogger.log_evaluation after close()")
        self.flush()
        self._write({"step": step, "time": time.time(),
                     **{name: float(value) for name, value in metrics.items()}})

    def _write(self, record: dict[str, Any]) -> None:
        self._records.append(record)
        if self._metrics_file is not None:
            self._metrics_file.write(_dumps(record) + "\n")
            self._metrics_file.flush()
        step = record["step"]
        if self._writer is not None:
            for name, value in record.items():
                if name not in ("step", "time"):
                    self._writer.add_scalar(name, value, step, walltime=record["time"])
            self._writer.flush()
        if self._bar is not None:
            postfix = {}
            for label, names in PROGRESS_FIELDS:
                shown = next((name for name in names if name in record), None)
                if shown is not None:
                    postfix[label] = f"{record[shown]:.4g}"
            self._bar.set_postfix(postfix, refresh=True)

    # ------------------------------------------------------------------ end of run

    def summary(self) -> dict[str, Any]:
        """The run so far: steps, wall time, mean throughput, first/last of each metric.

        Returns:
          ``{"run_name", "first_step", "last_step", "steps", "wall_time_seconds", "examples",
          "steps_per_second", "examples_per_second", "metrics": {name: {"first", "last"}}}``;
          ``loss/*`` metrics also carry ``"min"`` and ``"max"`` over the logged records. The
          throughput is over the whole wall time (to ``close()``), compilation included.
        """
        wall_time = (self._end if self._closed else time.perf_counter()) - self._start
        metrics: dict[str, dict[str, float]] = {}
        for record in self._records:
            for name, value in record.items():
                if name in ("step", "time"):
                    continue
                entry = metrics.setdefault(name, {"first": value})
                entry["last"] = value
                if name.startswith("loss/"):  # fmin/fmax skip NaN: non-finite values count out
                    finite = value if math.isfinite(value) else math.nan
                    entry["min"] = float(np.fmin(entry.get("min", math.nan), finite))
                    entry["max"] = float(np.fmax(entry.get("max", math.nan), finite))
        return {
            "run_name": self.run_name,
            "first_step": self.initial_step,
            "last_step": self._last_step,
            "steps": self._steps_run,
            "wall_time_seconds": wall_time,
            "examples": self._examples_run,
            "steps_per_second": self._steps_run / max(wall_time, 1e-9),
            "examples_per_second": self._examples_run / max(wall_time, 1e-9),
            "metrics": metrics,
        }

    def format_summary(self) -> str:
        """``summary()`` as a few human-readable lines (4 significant digits)."""
        summary = self.summary()
        lines = [
            f"run {summary['run_name'] or self.workdir.name}: steps {summary['first_step']} -> "
            f"{summary['last_step']} ({summary['steps']} run) in "
            f"{summary['wall_time_seconds']:.1f} s, {summary['steps_per_second']:.4g} steps/s, "
            f"{summary['examples_per_second']:.4g} examples/s"
        ]
        width = max((len(name) for name in summary["metrics"]), default=0)
        for name, entry in sorted(summary["metrics"].items()):
            line = f"  {name:<{width}}  first {entry['first']:.4g}  last {entry['last']:.4g}"
            if "min" in entry:
                line += f"  min {entry['min']:.4g}  max {entry['max']:.4g}"
            lines.append(line)
        return "\n".join(lines)

    def write_summary(self, path: str | Path | None = None, *,
                      extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``summary()`` (with ``extra``'s fields added, e.g. why the run stopped) as JSON
        to ``path`` (default ``<workdir>/summary.json``), replacing it in one step; only with
        ``write_files``."""
        path = Path(path) if path is not None else self.workdir / SUMMARY_FILE
        if self.write_files:
            write_atomic(path, _dumps({**self.summary(), **(extra or {})}, indent=2) + "\n")
        return path

    def close(self) -> None:
        """Flush the pending window, then close the bar, the TensorBoard writer and the file."""
        if self._closed:
            return
        self.flush()
        self._closed, self._end = True, time.perf_counter()
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._metrics_file is not None:
            self._metrics_file.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
