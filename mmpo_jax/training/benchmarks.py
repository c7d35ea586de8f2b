"""Real-data benchmarks during and after training: the config's ``benchmarks`` section.

The section (`config.benchmarks`) holds `evaluation.suite.EvaluationSpec`'s fields (COCO
``instances_*.json`` for CHAIR on a caption set or a held-out split of the preference data, POPE question files, AMBER's
data folder; an unset path is "", an unset count 0) and ``every``. With any benchmark set:

- the main job evaluates the initial model and every trained one (rows of ``results.json`` /
  ``results.txt``, beside the shapes-world rows when those run);
- the loop evaluates the policy at the end of training and, with ``every=N``, every N steps;
  the metrics go to ``metrics.jsonl`` / TensorBoard as ``benchmarks/<name>`` records at their
  step, and into ``summary.json`` (first and last of each).

Decoding is greedy; the files are read once per run (`suite.load_benchmarks`) and images on use.
The model, tokenizer and preprocessing are the run's own (`config.model_files`), so the numbers
are those ``python -m mmpo_jax.evaluate`` gives for the exported policy. A held-out split
without ``heldout_data_dir`` is read from ``data.data_dir``.
"""

from __future__ import annotations

from typing import Any

from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.engine import distributed
from mmpo_jax.config import benchmarks as section
from mmpo_jax.evaluation import suite
from mmpo_jax.models.llava import Llava

PREFIX = section.PREFIX


class Evaluator:
    """The run's benchmarks, read once;
    ``evaluator(model)`` -> ``{"benchmarks/<metric>": value}``."""

    def __init__(self, spec: suite.EvaluationSpec, *, tokenizer: Any,
                 image_config: ImageProcessorConfig, every: int = 0):
        self.spec, self.tokenizer, self.image_config = spec, tokenizer, image_config
        self.every = every
        self.benchmarks = suite.load_benchmarks(spec)

    def __call__(self, model: Llava) -> dict[str, float]:
        """Metrics of ``model`` (any mode; evaluated in eval mode on a whole copy per process)."""
        model.eval()
        metrics = suite.evaluate(distributed.process_local(model), self.tokenizer,
                                 self.image_config, self.spec, self.benchmarks)
        return {f"{PREFIX}{name}": value for name, value in metrics.items()}

    def due(self, step: int, end: int) -> bool:
        """Whether the loop evaluates after ``step`` (every ``every`` steps, and at ``end``)."""
        return step == end or bool(self.every and step % self.every == 0)


def evaluator(config: Any, *, tokenizer: Any, image_config: ImageProcessorConfig
              ) -> Evaluator | None:
    """The `Evaluator` of ``config``'s ``benchmarks`` section, None when it names no benchmark."""
    fields = section.spec_fields(config)
    if fields is None:
        return None
    return Evaluator(suite.EvaluationSpec(**fields), tokenizer=tokenizer, image_config=image_config,
                     every=section.every(config))
