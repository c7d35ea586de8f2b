"""Command line: transformers LLaVA checkpoints <-> orbax checkpoints of our `Llava`.

    python -m mmpo_jax.convert import <hf_dir> <orbax_dir> [--dtype bfloat16] [--param-dtype float32]
    python -m mmpo_jax.convert export <orbax_dir> <hf_dir> [--max-shard-gb 5]

The orbax side is `engine.model_io`'s format (`config.json` + `params/`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from mmpo_jax.engine.model_io import load_model, save_model
from mmpo_jax.models.convert import load_hf_llava, save_hf_llava


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; `argv` defaults to `sys.argv[1:]`."""
    parser = argparse.ArgumentParser(prog="python -m mmpo_jax.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_orbax = commands.add_parser("import", help="transformers LLaVA directory -> orbax checkpoint")
    to_orbax.add_argument("hf_dir", type=pathlib.Path)
    to_orbax.add_argument("orbax_dir", type=pathlib.Path)
    to_orbax.add_argument("--dtype", default="float32", help="compute dtype stored in the config")
    to_orbax.add_argument("--param-dtype", default="float32", help="parameter storage dtype")
    to_hf = commands.add_parser("export", help="orbax checkpoint -> transformers LLaVA directory")
    to_hf.add_argument("orbax_dir", type=pathlib.Path)
    to_hf.add_argument("hf_dir", type=pathlib.Path)
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB")
    args = parser.parse_args(argv)
    if args.command == "import":
        model, config = load_hf_llava(args.hf_dir, dtype=args.dtype, param_dtype=args.param_dtype)
        save_model(model, args.orbax_dir)
    else:
        model, config = load_model(args.orbax_dir)
        save_hf_llava(model, config, args.hf_dir, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"{args.command}: wrote {args.orbax_dir if args.command == 'import' else args.hf_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
