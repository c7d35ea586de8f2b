"""Command line: transformers LLaVA checkpoints <-> orbax checkpoints of our `Llava`.

    python -m mmpo_jax.convert import <hf_dir> <orbax_dir> [--dtype bfloat16] [--param-dtype float32]
    python -m mmpo_jax.convert export <orbax_dir> <hf_dir> [--max-shard-gb 5]

An orbax directory holds `config.json` (our `LlavaConfig.to_dict()`) and `params/` (the parameter
state as a pure dict, written by orbax's `StandardCheckpointer`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from mmpo_jax.models.convert import load_hf_llava, save_hf_llava
from mmpo_jax.models.llava import Llava, LlavaConfig
from mmpo_jax.training.sharding import DEFAULT_RULES, state_shardings

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_checkpoint(model: Llava, config: LlavaConfig, directory: str | pathlib.Path) -> None:
    """Writes `config.json` and the orbax `params/` of `model` into `directory` (created)."""
    directory = pathlib.Path(directory).absolute()
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(f"{directory / PARAMS_DIR} already exists; choose an empty output directory")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    checkpointer.wait_until_finished()


def load_checkpoint(
    directory: str | pathlib.Path,
    *,
    runtime: Callable[[LlavaConfig], LlavaConfig] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
) -> tuple[Llava, LlavaConfig]:
    """Reads a directory written by `save_checkpoint` -> (Llava, LlavaConfig).

    Args:
      runtime: maps the stored config to the one to build (e.g. another compute or storage
        dtype, remat); it must keep every shape. Parameters are cast to its `param_dtype`.
      mesh, rules: restore every parameter straight into its shards on `mesh` (by its logical
        axis names and `rules`, as `training.sharding.state_shardings` places it), so that no
        device ever holds the whole model; None restores onto the default device.
    """
    directory = pathlib.Path(directory).absolute()
    for required in (CONFIG_FILE, PARAMS_DIR):
        if not (directory / required).exists():
            raise FileNotFoundError(f"{directory} has no {required}; expected a directory written by `import`")
    config = LlavaConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    if runtime is not None:
        config = runtime(config)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Llava(config, rngs=nnx.Rngs(0))), nnx.Param, ...)
    target = nnx.to_pure_dict(params)
    if mesh is not None:
        shardings = nnx.to_pure_dict(state_shardings(params, mesh, rules))
        target = jax.tree.map(lambda spec, where: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=where),
                              target, shardings)
    restored = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, target)
    restored = jax.tree.map(lambda value, spec: value if value.dtype == spec.dtype else value.astype(spec.dtype),
                            restored, target)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest), config


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
        save_checkpoint(model, config, args.orbax_dir)
    else:
        model, config = load_checkpoint(args.orbax_dir)
        save_hf_llava(model, config, args.hf_dir, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"{args.command}: wrote {args.orbax_dir if args.command == 'import' else args.hf_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
