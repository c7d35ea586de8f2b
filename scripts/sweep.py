"""Sweep a config: ``python scripts/sweep.py configs/catpo.py optimizer.learning_rate='1e-5|5e-5'``.

Every ``key=v1|v2`` argument is a sweep axis (the cartesian product runs); ``--set key=value``
applies to every variant; without axes the config file's ``get_sweep()`` is used. Prints the
table of base, control and one row per variant (``mmpo_jax.training.sweep``).
"""

from __future__ import annotations

import argparse
import logging

from absl import logging as absl_logging

from mmpo_jax.config.loading import exit_on_config_error
from mmpo_jax.engine import distributed
from mmpo_jax.training.sweep import file_overrides, grid_overrides, run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a configs/<method>.py file")
    parser.add_argument("axes", nargs="*", help="key=v1|v2|... sweep axes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every variant; repeatable")
    args = parser.parse_args()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("mmpo_jax").setLevel(logging.INFO)
    with exit_on_config_error():  # a bad config or override: its problems in a list, status 2
        sweep = grid_overrides(args.axes) if args.axes else file_overrides(args.config)
        run_sweep(args.config, sweep, common=args.set)


if __name__ == "__main__":
    distributed.exit_together(main)()
