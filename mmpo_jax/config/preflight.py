"""What a run reads from disk, checked before any data is prepared or any model is loaded.

The LLaVA presets ship placeholders for the user's paths. `path_problems(config)` lists every one
left unfilled and every path that does not hold what the run will read, each naming the
``--config.*`` flag to set:

- ``--config.model.checkpoint`` (``model.init="checkpoint"``): a directory written by
  ``python -m mmpo_jax.convert import`` (``config.json`` and ``params/``);
- ``--config.data.tokenizer``: a saved tokenizer (``tokenizer_config.json``), needed unless the
  ``model.checkpoint`` folder holds one (``convert import`` saves it there) or the data ships one
  (the shapes world, pairs generated from it);
- the model's processor files (``config.model_files``) for a checkpoint trained on real data;
- ``--config.data.manual_dir``: the published files of a real dataset (``data.dataset``), needed
  until it is prepared under ``data.data_dir``; for ``p2dpo_pairs`` the folder its pairs are
  generated into;
- ``--config.pairs.source_manual_dir``: the same for P2-DPO's prompt source
  (``pairs.source_dataset``);
- ``--config.benchmarks.*``: every benchmark file and folder the run evaluates on.

`check(config, device_count=...)` raises one `checks.ConfigError` holding the config checks'
problems and these together, so a user fixes them all in one go; the train and generate_pairs
CLIs call it first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mmpo_jax.config import benchmarks, checks, model_files
from mmpo_jax.data.builders import BUILDERS
from mmpo_jax.data.sources import get_builder
from mmpo_jax.data.tokenizer import TOKENIZER_CONFIG
from mmpo_jax.engine import model_io

P2DPO_PAIRS = "p2dpo_pairs"


def check(config: Any, *, device_count: int | None, generating_pairs: bool = False,
          extra: Sequence[str] = ()) -> None:
    """Raises one `checks.ConfigError` listing `checks.problems`, `path_problems` and ``extra``.

    Args:
      config: the run's config.
      device_count: devices the mesh spans (None skips the mesh checks).
      generating_pairs: the config is read by ``generate_pairs`` (the prompt source and the model
        are read, the training dataset is not).
      extra: the caller's own problems (e.g. a CLI flag), listed with the rest.
    """
    found = checks.problems(config, device_count=device_count)
    if not checks.structure_problems(checks.plain(config)):
        found += path_problems(config, generating_pairs=generating_pairs)
    found += list(extra)
    if found:
        raise checks.ConfigError(checks.format_problems(config, found))


def path_problems(config: Any, *, generating_pairs: bool = False) -> list[str]:
    """Placeholders left unset and paths that do not hold what the run reads (module doc)."""
    tree = checks.plain(config)
    data, model = tree["data"], tree["model"]
    found = []
    checkpoint_problems = []
    if model["init"] == "checkpoint" and model["checkpoint"]:
        checkpoint_problems = _checkpoint_problems(model["checkpoint"])
        found += checkpoint_problems
    tokenizer_dataset = data["dataset"]
    if (data["dataset"] == P2DPO_PAIRS or generating_pairs) and "pairs" in tree:
        pairs = tree["pairs"]
        tokenizer_dataset = pairs["source_dataset"]
        found += _dataset_problems(pairs["source_dataset"], data["data_dir"],
                                   pairs["source_manual_dir"], pairs["source_builder"],
                                   flag="pairs.source_manual_dir",
                                   options_flag="pairs.source_builder")
    if generating_pairs:
        pass  # generate_pairs writes the training dataset's files; it reads none of them
    elif data["dataset"] == P2DPO_PAIRS:
        if not data["manual_dir"]:
            found.append("--config.data.manual_dir is not set: data.dataset='p2dpo_pairs' trains "
                         "on the pairs generated into that folder (configs/p2dpo.py uses "
                         "~/mmpo_data/generated/p2dpo_pairs)")
    else:
        found += _dataset_problems(data["dataset"], data["data_dir"], data["manual_dir"],
                                   data["builder"], flag="data.manual_dir",
                                   options_flag="data.builder")
    tokenizer_problems = _tokenizer_problems(tree, tokenizer_dataset)
    found += tokenizer_problems
    real_data = tokenizer_dataset in BUILDERS and not BUILDERS[tokenizer_dataset].SHIPS_TOKENIZER
    if (model["init"] == "checkpoint" and model["checkpoint"] and real_data
            and not checkpoint_problems + tokenizer_problems
            and model_files.processor_dir(tree) is None):
        found.append(model_files.processor_missing(tree))
    return found + benchmarks.path_problems(tree)


def _expand(path: str) -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(path))


def _checkpoint_problems(path: str) -> list[str]:
    directory = _expand(path)
    convert = f"`python -m mmpo_jax.convert import <llava-hf folder> {path}`"
    if not directory.is_dir():
        return [f"--config.model.checkpoint={path!r}: no such directory; write it with {convert}"]
    missing = [name for name in (model_io.CONFIG_FILE, model_io.PARAMS_DIR)
               if not (directory / name).exists()]
    if not missing:
        return []
    if any(directory.glob("*.safetensors")):
        return [f"--config.model.checkpoint={path!r} is a transformers checkpoint, not an orbax "
                f"model directory; convert it with `python -m mmpo_jax.convert import {path} "
                "<orbax folder>` and set --config.model.checkpoint=<orbax folder>"]
    return [f"--config.model.checkpoint={path!r} has no {' or '.join(missing)}; expected a "
            f"directory written by {convert}"]


def _tokenizer_problems(tree: Mapping[str, Any], dataset: str) -> list[str]:
    path = tree["data"]["tokenizer"]
    if path:
        directory = _expand(path)
        if (directory / TOKENIZER_CONFIG).is_file():
            return []
        what = f"no {TOKENIZER_CONFIG} there" if directory.is_dir() else "no such directory"
        return [f"--config.data.tokenizer={path!r}: {what}; expected a tokenizer saved with "
                "save_pretrained (a llava-hf checkpoint folder holds one)"]
    builder = BUILDERS.get(dataset)
    if builder is None or builder.SHIPS_TOKENIZER or model_files.tokenizer_dir(tree) is not None:
        return []
    return [f"--config.data.tokenizer is not set, {dataset} ships no tokenizer and "
            "--config.model.checkpoint holds none; set it to the model's tokenizer folder (e.g. "
            "the llava-hf checkpoint folder), or import the model with `python -m "
            "mmpo_jax.convert import`, which saves the tokenizer beside it"]


def _dataset_problems(name: str, data_dir: str, manual_dir: str, options: Mapping[str, Any], *,
                      flag: str, options_flag: str) -> list[str]:
    """Whether dataset ``name`` is prepared under ``data_dir`` or ``manual_dir`` (the value of
    ``--config.<flag>``) holds its published files."""
    if name not in BUILDERS or getattr(BUILDERS[name], "prepared_data_dir", None) is not None:
        return []  # unknown names are the config checks'; p2dpo_pairs is generated by the run
    try:
        with _quiet_tfds():
            builder = get_builder(name, data_dir=_expand(data_dir), **options)
            prepared = builder.is_prepared()
    except (TypeError, ValueError) as error:
        return [f"--config.{options_flag}: {error}"]
    manual = _expand(manual_dir) if manual_dir else None
    if prepared:
        prepared_from = (builder.info.metadata or {}).get("manual_dir")
        if manual is None or prepared_from in (None, os.path.abspath(manual)):
            return []
        return [f"--config.{flag}={manual_dir!r}: {name} under {builder.data_dir} was prepared "
                f"from {prepared_from!r}; unset --config.{flag} to train on that, or set another "
                "--config.data.data_dir to prepare these files"]
    if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        return []  # generated on first use (the shapes world)
    if manual is None:
        return [f"--config.{flag} is not set and {name} is not prepared under {builder.data_dir}; "
                f"set --config.{flag} to the folder holding its published files"]
    if not manual.is_dir():
        return [f"--config.{flag}={manual_dir!r}: no such directory ({name} is not prepared under "
                f"{builder.data_dir}, so it is prepared from that folder's published files)"]
    try:
        builder.source_files(os.fspath(manual.absolute()))
    except (FileNotFoundError, ValueError) as error:
        return [f"--config.{flag}={manual_dir!r}: {error}"]
    return []


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """TFDS warns (through absl) about every folder it finds unprepared: here that is the news."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)
