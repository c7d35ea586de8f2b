"""Generate P2-DPO's training pairs: ``python -m mmpo_jax.generate_pairs --config=configs/p2dpo.py``.

Reads the training config (``--config``, any field overridable as ``--config.seed=1``) and its
generation settings, the ``pairs`` section (``--config.pairs.num_records=64``). The reference
model is the run's
initial policy (``training.experiment.initial_model``: for the embedded default the cached
shapes-world SFT base, trained first if absent) and the prompts come from
``pairs.source_dataset`` / ``pairs.source_split``. Pairs are written to ``--output_dir``
(default ``config.data.manual_dir``, the folder the ``p2dpo_pairs`` dataset of the training
config is prepared from); a rerun finishes an interrupted generation. Prints the summary: records
kept, drops per pair and reason, crop coverage of question prompts, throughput.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mmpo_jax.config import preflight
from mmpo_jax.config.loading import exit_on_config_error, parse_config_flags
from mmpo_jax.data.builders.p2dpo_pairs import read_manifest, summarize
from mmpo_jax.training.experiment import (check_image_size, generate_p2dpo_pairs, initial_model,
                                          load_data, prompt_source_config)

_CONFIG = config_flags.DEFINE_config_file("config", None, "the training config, configs/p2dpo.py",
                                          lock_config=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "", "generation folder (default: config.data.manual_dir)")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/p2dpo.py is required")
    output_dir = os.path.expanduser(_OUTPUT_DIR.value or config.data.manual_dir)
    with exit_on_config_error():  # every problem at once, before the model or data are loaded
        preflight.check(config, device_count=jax.device_count(), generating_pairs=True, extra=[
            *([] if "pairs" in config else
              ["the config has no pairs section (configs/p2dpo.py has one)"]),
            *([] if output_dir else
              ["no output folder: pass --output_dir or set --config.data.manual_dir"])])
        _generate(config, output_dir)


def _generate(config, output_dir: str) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("mmpo_jax").setLevel(logging.INFO)
    source_config = prompt_source_config(config)
    source, tokenizer, image_config = load_data(source_config)
    check_image_size(source_config, tokenizer, image_config)
    model = initial_model(source_config, tokenizer)
    previous = read_manifest(output_dir)
    done_before = summarize(previous).get("candidates", 0) if previous else 0
    started = time.perf_counter()
    manifest = generate_p2dpo_pairs(config, model, source, tokenizer, image_config, output_dir)
    elapsed = time.perf_counter() - started
    summary = summarize(manifest)
    summary["seconds"] = round(elapsed, 1)
    summary["records_per_second"] = round((summary.get("candidates", 0) - done_before) / elapsed, 2)
    summary["output_dir"] = output_dir
    print(json.dumps(summary, indent=1, sort_keys=True), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_config_flags)
