"""Train a method from a config file: ``python -m mmpo_jax.train --config=configs/catpo.py``.

With no other flag this is the main job on the embedded default: it prepares the shapes world,
trains (once, cached) the tiny SFT base, trains the method, trains the chosen-only SFT control,
and prints the before/after table of CHAIR and POPE (``training.experiment``). Any config field
can be overridden: ``--config.method.beta=0.2 --config.train.num_steps=50 --config.mesh.fsdp=2``.
A config file that cannot be loaded, unknown fields, impossible meshes, unset placeholders and
paths that hold nothing usable (``config.preflight``) are reported together before any data is
prepared or any model loaded; data the method needs but the dataset lacks, and an image size the
model does not take, before anything compiles. Such problems print as one list, without a
traceback, and exit with status 2. P2-DPO's pair generation reads the config's ``pairs`` section
(``--config.pairs.noise_step=300``; pairs made with other settings need their own
``--config.data.manual_dir``).
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mmpo_jax.config import preflight
from mmpo_jax.config.loading import exit_on_config_error, parse_config_flags
from mmpo_jax.training.experiment import run_experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/<method>.py file",
                                          lock_config=True)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<method>.py is required")
    with exit_on_config_error():
        preflight.check(config, device_count=jax.device_count())
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save INFO lines
        logging.getLogger("mmpo_jax").setLevel(logging.INFO)
        run_experiment(config)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_config_flags)
