"""Stopping a diverged run: ``train.max_bad_steps`` consecutive steps with a NaN/inf loss or
gradient norm.

The jitted step already skips such a step's update and flags it in its metrics
(``engine.step.guarded_update``). ``BadStepGuard`` keeps those flags as device scalars and reads
them only at check points: every ``max_bad_steps`` steps, before a checkpoint is
written and at the end of the run, so the host never waits on the device in between. A run whose
flags show ``max_bad_steps`` bad steps in a row (counted across check points) is stopped within
``max_bad_steps - 1`` more steps by ``TrainingDiverged``, whose one-line message names the step
where the streak reached the limit, the value that was not finite and the last good checkpoint.
A skipped step leaves the state as it was, so every checkpoint written before the stop is finite.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mmpo_jax.engine.step import NONFINITE_GRAD_NORM, NONFINITE_LOSS, SKIPPED


class TrainingDiverged(RuntimeError):
    """A run stopped by its NaN/inf guard; the message is one line."""


def _to_host(value: Any) -> float:
    """A replicated device scalar's value, also when other processes own some of its devices."""
    if not getattr(value, "is_fully_addressable", True):
        value = value.addressable_data(0)
    return float(np.asarray(value))


class BadStepGuard:
    """Counts the steps whose update was skipped; see the module doc.

    Args:
      max_bad_steps: the consecutive skipped steps that stop the run (>= 1).
    """

    def __init__(self, max_bad_steps: int):
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.skipped = 0  # skipped steps among those checked
        self._streak = 0  # consecutive skipped steps up to the last checked step
        self._pending: list[tuple[int, Any, Any]] = []
        self._tripped: tuple[int, str] | None = None

    def record(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Keep step ``step``'s flags (``engine.step.guarded_update``'s metrics), unread."""
        self._pending.append((step, metrics[NONFINITE_LOSS][0], metrics[NONFINITE_GRAD_NORM][0]))

    def due(self, step: int) -> bool:
        """Whether step ``step`` is a regular check point."""
        return step % self.max_bad_steps == 0

    def check(self) -> tuple[int, str] | None:
        """Read the recorded flags; ``(step, metric)`` where the streak first reached
        ``max_bad_steps`` (the metric that was not finite there), or None."""
        pending, self._pending = self._pending, []
        for step, loss_flag, norm_flag in pending:
            bad_loss, bad_norm = _to_host(loss_flag) > 0, _to_host(norm_flag) > 0
            if not (bad_loss or bad_norm):
                self._streak = 0
                continue
            self.skipped += 1
            self._streak += 1
            if self._streak >= self.max_bad_steps and self._tripped is None:
                self._tripped = (step, "the loss" if bad_loss else "the gradient norm")
        return self._tripped

    def error(self, run_name: str, last_checkpoint: int | None, directory: Any
              ) -> TrainingDiverged:
        """The one-line error of a tripped guard (``check()`` returned a step)."""
        step, metric = self._tripped
        saved = ("none was saved" if last_checkpoint is None
                 else f"step {last_checkpoint} in {directory}")
        return TrainingDiverged(
            f"{run_name}: stopped at step {step}: {metric} was NaN or inf at "
            f"{self.max_bad_steps} consecutive steps (train.max_bad_steps={self.max_bad_steps}; "
            f"their updates were skipped, {SKIPPED} in metrics.jsonl); the last good checkpoint: "
            f"{saved}; lower optimizer.learning_rate (or the method's scale, e.g. method.beta) "
            f"and resume")
