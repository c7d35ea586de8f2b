"""``python -m mmpo_jax.evidence``: the evidence study (`mmpo_jax.evidence`), into ``docs/evidence/``.

    python -m mmpo_jax.evidence                       # every row, 3 seeds (the full study)
    python -m mmpo_jax.evidence --quick               # 1 seed, control / DPO / Cat-PO
    python -m mmpo_jax.evidence --methods dpo,catpo --seeds 0,1
    python -m mmpo_jax.evidence --world world=v2 --out docs/evidence_v2
    python -m mmpo_jax.evidence --set data.data_dir=/tmp/data --set eval.num_captions=100

Resumable: every training run and evaluation is cached under ``--cache`` by a hash of its full
config; run the same command again after an interruption and it continues where it stopped.
Progress is printed per run.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import shlex
import sys
from collections.abc import Sequence

from absl import logging as absl_logging

from mmpo_jax.config.loading import exit_on_config_error, world_options
from mmpo_jax.evidence import protocol as protocol_lib
from mmpo_jax.evidence.study import run_study


def _numbers(text: str, kind: type) -> tuple:
    return tuple(kind(x) for x in text.split(",") if x.strip())


def parse_protocol(argv: Sequence[str] | None = None) -> tuple[protocol_lib.Protocol, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all",
                        help="comma-separated row keys, or 'all' (base, control and DPO are always "
                             f"included); valid: {', '.join(protocol_lib.rows_lib.ROWS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--world", action="append", default=[], metavar="KEY=VALUE",
                        help="a shapes-world builder option, e.g. --world world=v2; repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. --set data.data_dir=/tmp/d")
    parser.add_argument("--learning-rates", default=None, help="the selection grid's learning rates")
    parser.add_argument("--betas", default=None, help="the selection grid's betas")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, the control / DPO / Cat-PO, two learning rates")
    parser.add_argument("--out", default="docs/evidence", help="where EVIDENCE.md, results.json "
                        "and the plots go")
    parser.add_argument("--cache", default="runs/evidence", help="the runs' cache (resumable)")
    parser.add_argument("--configs", default="configs", help="the config files' directory")
    args = parser.parse_args(argv)
    changes: dict[str, object] = {"world": world_options(args.world), "overrides": tuple(args.set),
                                  "configs": args.configs}
    if args.methods != "all" or not args.quick:
        changes["rows"] = protocol_lib.parse_rows(args.methods)
    if args.seeds:
        changes["seeds"] = _numbers(args.seeds, int)
    if args.learning_rates:
        changes["learning_rates"] = _numbers(args.learning_rates, float)
    if args.betas:
        changes["betas"] = _numbers(args.betas, float)
    build = protocol_lib.quick if args.quick else protocol_lib.Protocol
    try:
        return build(**changes), args
    except ValueError as error:  # an unknown row or world, an empty grid: one line, status 2
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> dict:
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("mmpo_jax").setLevel(logging.WARNING)
    with exit_on_config_error():
        protocol, args = parse_protocol(argv)
        command = "python -m mmpo_jax.evidence " + shlex.join(
            sys.argv[1:] if argv is None else list(argv))
        return run_study(protocol, pathlib.Path(args.out), pathlib.Path(args.cache),
                         command=command.strip(), log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
