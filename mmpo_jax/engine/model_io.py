"""A model on disk: our `Llava` as `config.json` + orbax `params/`, saved and restored sharded.

This is the format of `python -m mmpo_jax.convert import`, of the cached SFT base and of the
trainer's exports: `config.json` holds `LlavaConfig.to_dict()` and `params/` the parameter state as
a pure dict, written by orbax's `StandardCheckpointer`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from mmpo_jax.engine.sharding import DEFAULT_RULES, state_shardings
from mmpo_jax.models.llava import Llava, LlavaConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_model(model: Llava, directory: str | pathlib.Path) -> None:
    """Writes `config.json` (`model.config`) and the orbax `params/` of `model` into `directory`
    (created; its `params/` must not exist yet)."""
    config = model.config
    directory = pathlib.Path(directory).absolute()
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(f"{directory / PARAMS_DIR} already exists; choose an empty output directory")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    checkpointer.wait_until_finished()


def load_model(
    directory: str | pathlib.Path,
    *,
    runtime: Callable[[LlavaConfig], LlavaConfig] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
) -> tuple[Llava, LlavaConfig]:
    """Reads a directory written by `save_model` -> (Llava, LlavaConfig).

    Args:
      runtime: maps the stored config to the one to build (e.g. another compute or storage
        dtype, remat); it must keep every shape. Parameters are cast to its `param_dtype`.
      mesh, rules: restore every parameter straight into its shards on `mesh` (by its logical
        axis names and `rules`, as `engine.sharding.state_shardings` places it), so that no
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
