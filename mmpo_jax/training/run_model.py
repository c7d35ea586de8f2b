"""A training run's checkpoint as a model: restored with its tokenizer and preprocessing, exported.

``load_run_model(path)`` takes a run's workdir (``runs/<name>``), its ``checkpoints/`` folder or
one step's folder (``runs/<name>/checkpoints/<N>``) and rebuilds the policy of that checkpoint
(the newest one, or ``step``): the config saved in the checkpoint's metadata gives the initial
model (``training.experiment.initial_model``: the imported checkpoint, the cached SFT base, or
the seeded random init), the LoRA adapters and which parameters trained
(``engine.state.split_policy``); the checkpoint's parameters are restored over them (its
optimizer state is not read). The tokenizer and image preprocessing are the run's
(``training.experiment.load_data`` of its prompt source: `config.model_files`).

``export_run(path, output)`` writes that policy, LoRA merged, as a complete llava-hf directory
(``engine.checkpointing.export_policy``: weights, ``config.json``, tokenizer, processor, chat
template, generation config); ``python -m mmpo_jax.convert export runs/<name> <output>`` runs it.

[our choice] The model is rebuilt with float32 compute and without remat (``dtype``): an export
stores float32 weights, and evaluation and parity checks read it at full precision; parameters
keep the run's storage dtype.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

import ml_collections
from flax import nnx

from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.engine import distributed, sharding
from mmpo_jax.engine import reference as reference_lib
from mmpo_jax.engine import state as state_lib
from mmpo_jax.engine.checkpointing import Checkpointer, abstract_target, export_policy
from mmpo_jax.models.llava import Llava
from mmpo_jax.training import experiment

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


@dataclasses.dataclass
class RunModel:
    """A checkpoint's policy (LoRA adapters unmerged, eval mode) and what it was trained with."""

    model: Llava
    tokenizer: Any
    image_config: ImageProcessorConfig
    config: ml_collections.ConfigDict
    step: int


def checkpoint_location(path: str | os.PathLike[str], step: int | None = None
                        ) -> tuple[pathlib.Path, int | None]:
    """``(checkpoints folder, step)`` of a run's workdir, its ``checkpoints/`` or one step's
    folder (whose step wins over none, and must agree with ``step``).

    Raises:
      FileNotFoundError: ``path`` is none of these.
      ValueError: a step folder and another ``step``.
    """
    path = pathlib.Path(path).expanduser().absolute()
    if path.name.isdigit() and path.parent.name == CHECKPOINTS and path.is_dir():
        if step is not None and step != int(path.name):
            raise ValueError(f"{path} is the checkpoint of step {path.name}, not step {step}")
        return path.parent, int(path.name)
    if path.name == CHECKPOINTS and path.is_dir():
        return path, step
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS, step
    raise FileNotFoundError(f"{path} is not a training run: expected its workdir (holding "
                            f"{CHECKPOINTS}/), its {CHECKPOINTS}/ or {CHECKPOINTS}/<step>")


def is_run(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a training run or one of its checkpoints (`checkpoint_location`)."""
    try:
        checkpoint_location(path)
    except FileNotFoundError:
        return False
    return True


def load_run_model(path: str | os.PathLike[str], *, step: int | None = None,
                   dtype: str = "float32") -> RunModel:
    """The policy of a run's checkpoint (module doc).

    Args:
      path: the run's workdir, its ``checkpoints/`` or ``checkpoints/<step>``.
      step: which checkpoint; None: the one ``path`` names, else the newest that passes its
        checks.
      dtype: compute dtype of the rebuilt model (remat off).

    Raises:
      FileNotFoundError: no such run or no usable checkpoint.
      ValueError: a checkpoint saved without its config, or not matching it.
    """
    directory, step = checkpoint_location(path, step)
    with Checkpointer(directory, save_every=1) as ckpt:
        if step is None:
            step = ckpt.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {directory}")
        saved = ckpt.metadata(step).get("config")
        if not saved:
            raise ValueError(f"the checkpoint of step {step} in {directory} holds no config in "
                             "its metadata; it was not written by mmpo_jax's trainer")
        config = _runtime_config(saved, dtype)
        world = experiment.world_config(config)
        _, tokenizer, image_config = experiment.load_data(world)
        policy = state_lib.prepare_policy(experiment.initial_model(world, tokenizer),
                                          config.model, seed=int(config.seed))
        split = state_lib.split_policy(policy, config.model)
        # the trainer's layout: every parameter on the mesh by its logical axes
        mesh, rules = sharding.make_mesh(dict(config.mesh)), tuple(map(tuple, config.mesh_rules))
        frozen = distributed.put(split.frozen, sharding.state_shardings(split.frozen, mesh, rules))
        restored = ckpt.restore(step, abstract_params=abstract_target(
            split.trainable, sharding.state_shardings(split.trainable, mesh, rules)))
    model = nnx.merge(split.graphdef, restored.params, frozen)
    model.eval()
    logger.info("restored the policy of step %d from %s", step, directory)
    return RunModel(model, tokenizer, image_config, config, step)


def _runtime_config(saved: dict[str, Any], dtype: str) -> ml_collections.ConfigDict:
    """The run's config with ``dtype`` compute, no remat, and a mesh over every device (the
    restore's layout; the run's own mesh may have been another machine's)."""
    config = ml_collections.ConfigDict(saved)
    config.model.dtype = dtype
    config.model.remat = False
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return config


def export_run(path: str | os.PathLike[str], output: str | os.PathLike[str], *,
               step: int | None = None, max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
    """Writes the policy of a run's checkpoint, LoRA merged, as a llava-hf directory at
    ``output`` (module doc); returns ``output``. Several processes: each restores its shards,
    process 0 writes."""
    run = load_run_model(path, step=step)
    merged = distributed.process_local(reference_lib.merged_copy(run.model))
    if distributed.is_primary():
        export_policy(merged, output, tokenizer=run.tokenizer, image_config=run.image_config,
                      template=run.config.data.template, max_shard_bytes=max_shard_bytes)
    return pathlib.Path(output)
