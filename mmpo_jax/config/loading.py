"""How a training config is loaded: config files, ``--config.a.b=value`` overrides, CLI flags.

`load_config("configs/catpo.py:arg", ["method.beta=0.2"])` is ``--config=configs/catpo.py:arg
--config.method.beta=0.2`` of the train CLI (ml_collections' ``config_flags``, on a private flag
registry), with a clear error for an unknown key. Config files load their siblings (``base.py``)
with `config_module`, so they work from any working directory.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from mmpo_jax.config.schema import OPEN_MAPPINGS


def config_module(path: str | os.PathLike[str]) -> types.ModuleType:
    """Executes the config file at ``path`` as a fresh module (e.g. ``base.py`` beside a config).

    Config files are not a package on ``sys.path`` (``config_flags`` execs them by path), so
    ``configs/catpo.py`` loads ``base`` as
    ``config_module(pathlib.Path(__file__).with_name("base.py"))``.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist (cwd {os.getcwd()!r})")
    spec = importlib.util.spec_from_file_location(f"mmpo_configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The locked config of ``path`` (``file.py`` or ``file.py:arg``) with ``overrides`` applied.

    Args:
      path: a config file defining ``get_config(arg=None)``; ``:arg`` is passed to it.
      overrides: ``"a.b=value"`` strings, parsed by the type of the existing field as the CLI's
        ``--config.a.b=value`` is: bools (``true``/``false``), ints, floats, strings, tuples
        (``"(32, 64)"``), mappings (``"{'dpo': 1.0, 'nll': 0.1}"``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: an override without ``=``, an unknown key (naming the valid keys of its
        section), or a value its field's type cannot take.
    """
    file_path, *arg = path.split(":", 1)
    # What config_flags' file parser does, minus its wrapping of errors in a traceback string.
    config = config_module(file_path).get_config(*arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
    config.lock()
    for override in overrides:
        key, separator, _ = override.partition("=")
        if not separator:
            raise ValueError(f"override {override!r} is not of the form 'a.b=value'")
        _check_key(config, key)
    # Values are parsed by config_flags' own per-field parsers, as on the command line.
    argv = ["load_config", *(f"--config.{override}" for override in overrides)]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_dict("config", config, flag_values=flag_values,
                                             sys_argv=argv)
    try:
        flag_values(argv)
    except flags.Error as error:
        raise ValueError(f"{path}: {error}") from error
    return holder.value


def _check_key(config: ml_collections.ConfigDict, key: str) -> None:
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth]) or "the config"
        if not isinstance(node, ml_collections.ConfigDict):
            raise ValueError(f"unknown config key {key!r}: {parent} is a "
                             f"{type(node).__name__}, not a section")
        if part not in node:
            hint = (f"; a mapping field is replaced whole, e.g. {parent}=\"{{...}}\""
                    if parent in OPEN_MAPPINGS else "")
            raise ValueError(f"unknown config key {key!r}: {parent} has no field {part!r}; valid "
                             f"fields of {parent}: {sorted(node.keys())}{hint}")
        node = node[part]


def parse_config_flags(argv: Sequence[str]) -> list[str]:
    """``absl.app.run``'s ``flags_parser`` for CLIs with config flags: an unknown
    ``--config.a.b`` field (which ml_collections reports as an ``AttributeError`` from inside the
    parser) or a value of the wrong type exits with one line naming it, not a traceback."""
    import ast

    from absl import app

    try:
        return app.parse_flags_with_usage(list(argv))
    except (AttributeError, KeyError) as error:
        message = str(error.args[0]) if error.args else str(error)
        try:  # ml_collections nests the KeyError's repr in the AttributeError's
            message = str(ast.literal_eval(message))
        except (ValueError, SyntaxError):
            pass
        message = message.replace("\n", " ")
        raise SystemExit(f"FATAL Flags parsing error: unknown config field {message}") from None
