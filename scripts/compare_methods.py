"""Several methods (or settings) from one cached SFT base, in one before/after table.

    python scripts/compare_methods.py \\
        --variant "dpo=configs/dpo.py" \\
        --variant "dpo lr5e-5=configs/dpo.py optimizer.learning_rate=5e-5" \\
        --variant "catpo=configs/catpo.py" [--set train.num_steps=200]

Each ``--variant "NAME=FILE [key=value ...]"`` trains one row; ``--set`` overrides apply to all
(P2-DPO's generation settings too: ``--set pairs.noise_step=300``).
The base, evaluation and control settings (and P2-DPO's pair generation) come from the first
variant's file. Rows: the base,
one per variant, and the chosen-only SFT control (``mmpo_jax.training.experiment.run_variants``).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import shlex

from absl import logging as absl_logging

from mmpo_jax.config.loading import load_config
from mmpo_jax.training.experiment import _expand, run_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True,
                        help='"NAME=FILE [key=value ...]"; repeatable')
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", default="runs/compare")
    args = parser.parse_args()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("mmpo_jax").setLevel(logging.INFO)
    root = _expand(args.workdir)
    variants = {}
    for index, spec in enumerate(args.variant):
        name, separator, rest = spec.partition("=")
        words = shlex.split(rest)
        if not separator or not words:
            parser.error(f"--variant {spec!r} is not 'NAME=FILE [key=value ...]'")
        overrides = (*args.set, f"workdir={root}", *words[1:])
        variants[name] = (load_config(words[0], overrides), pathlib.Path(root, f"{index:02d}"))
    run_variants(next(iter(variants.values()))[0], variants, workdir=root)


if __name__ == "__main__":
    main()
