"""How a training config is loaded: config files, ``--config.a.b=value`` overrides, CLI flags.

`load_config("configs/catpo.py:arg", ["method.beta=0.2"])` is ``--config=configs/catpo.py:arg
--config.method.beta=0.2`` of the train CLI (ml_collections' ``config_flags``, on a private flag
registry), with a clear error for an unknown key. Config files load their siblings (``base.py``)
with `config_module`, so they work from any working directory.

A config file that cannot be loaded (missing, a near-miss name, a syntax error, a ``get_config``
that raises or returns no ConfigDict) is one line naming the file and the problem
(`load_config_file`, a `ConfigError`); the CLIs' flag parser (`parse_config_flags`) checks every
``--config`` file so before absl parses it, and `exit_on_config_error` turns any `ConfigError`
(these, and `config.checks` problems) into its message on stderr and exit status 2, without a
traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import pathlib
import sys
import traceback
import types
from collections.abc import Iterator, Sequence
from typing import NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags

from mmpo_jax.config.checks import ConfigError
from mmpo_jax.config.schema import OPEN_MAPPINGS

USAGE_ERROR_STATUS = 2
_CONFIG_FILE_PARSER = config_flags.config_flags.ConfigFileFlagParser  # DEFINE_config_file's


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


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file ``path`` (``file.py`` or ``file.py:arg``), unlocked.

    Raises:
      ConfigError: one line naming ``path`` and the problem: no such file (with the closest
        existing config beside it, else the configs there), a directory, an error while executing
        the file or its ``get_config`` (type, message and the config file's line), or a result
        that is not a ConfigDict.
    """
    file_path, *arg = path.split(":", 1)
    target = pathlib.Path(file_path)
    if target.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not target.is_file():
        raise ConfigError(f"{path}: no such config file (cwd {os.getcwd()}){_nearest(target)}")
    call = f"get_config({arg[0]!r})" if arg else "get_config()"
    try:
        module = config_module(target)
    except Exception as error:  # noqa: BLE001 - any failure of the user's file is reported
        raise ConfigError(f"{path}: cannot be executed: {_describe(error, target)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{path}: defines no get_config() function")
    try:
        config = module.get_config(*arg)
    except Exception as error:  # noqa: BLE001
        raise ConfigError(f"{path}: {call} raised {_describe(error, target)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: {call} returned {type(config).__name__}, not a ConfigDict")
    return config


def _nearest(target: pathlib.Path) -> str:
    """"; did you mean <closest config>?" or the configs in the folder, for a missing file."""
    folder = target.parent
    if not folder.is_dir():
        return f"; no folder {str(folder)!r}"
    stems = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    close = difflib.get_close_matches(target.stem, stems, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {folder / (close[0] + '.py')}?"
    return f"; the configs in {folder}: {', '.join(stems)}" if stems else ""


def _describe(error: BaseException, target: pathlib.Path) -> str:
    """``Type: message`` on one line, with the config folder's file and line it came from."""
    if isinstance(error, SyntaxError):
        where = f" ({_shown(error.filename)}:{error.lineno})" if error.filename else ""
        return f"SyntaxError: {error.msg}{where}"
    folder = target.resolve().parent
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if pathlib.Path(frame.filename).resolve().parent == folder]
    where = f" ({_shown(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}{where}" if message else type(error).__name__ + where


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The locked config of ``path`` (``file.py`` or ``file.py:arg``) with ``overrides`` applied.

    Args:
      path: a config file defining ``get_config(arg=None)``; ``:arg`` is passed to it.
      overrides: ``"a.b=value"`` strings, parsed by the type of the existing field as the CLI's
        ``--config.a.b=value`` is: bools (``true``/``false``), ints, floats, strings, tuples
        (``"(32, 64)"``), mappings (``"{'dpo': 1.0, 'nll': 0.1}"``).

    Raises:
      ConfigError: the file cannot be loaded (`load_config_file`).
      ValueError: an override without ``=``, an unknown key (naming the valid keys of its
        section), or a value its field's type cannot take.
    """
    # What config_flags' file parser does, minus its wrapping of errors in a traceback string.
    config = load_config_file(path)
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


def world_options(pairs: Sequence[str]) -> dict[str, object]:
    """``--world`` flags of the CLIs: ``["p=0.5", "seed=3"]`` -> ``{"p": 0.5, "seed": 3}``
    (shapes-world builder options; values read as JSON, else kept as text)."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise SystemExit(f"--world {pair!r} is not KEY=VALUE (e.g. --world p=0.5)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


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
    """``absl.app.run``'s ``flags_parser`` for CLIs with config flags: a config file that cannot
    be loaded (`load_config_file`, checked before absl parses it: ml_collections would defer a
    missing file to a later traceback and wrap other errors in one), an unknown ``--config.a.b``
    field (which ml_collections reports as an ``AttributeError`` from inside the parser) or a
    value of the wrong type exits with one line naming it and status 2, not a traceback. [our
    choice] a good config file thus runs twice (here and in absl's parser): config files are
    pure functions of their argument, and the alternative is ml_collections' private parser."""
    import ast

    from absl import app

    for name, path in config_file_arguments(argv, flags.FLAGS):
        try:
            load_config_file(path)
        except ConfigError as error:
            _exit_with(f"FATAL Flags parsing error: flag --{name}={error}")
    try:
        return app.parse_flags_with_usage(list(argv))
    except (AttributeError, KeyError) as error:
        message = str(error.args[0]) if error.args else str(error)
        try:  # ml_collections nests the KeyError's repr in the AttributeError's
            message = str(ast.literal_eval(message))
        except (ValueError, SyntaxError):
            pass
        message = message.replace("\n", " ")
        _exit_with(f"FATAL Flags parsing error: unknown config field {message}")


def config_file_arguments(argv: Sequence[str], flag_values: flags.FlagValues
                          ) -> list[tuple[str, str]]:
    """``(flag name, value)`` of every config-file flag (``DEFINE_config_file``) on the command
    line ``argv`` (``--name=value``, ``-name=value`` or ``--name value``; none after ``--``)."""
    names = {name for name in flag_values
             if isinstance(flag_values[name].parser, _CONFIG_FILE_PARSER)}
    found, args = [], list(argv[1:])
    for index, arg in enumerate(args):
        if arg == "--":
            break
        name, separator, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or name not in names:
            continue
        if separator:
            found.append((name, value))
        elif index + 1 < len(args):
            found.append((name, args[index + 1]))
    return found


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """For a CLI's ``main``: a `ConfigError` raised inside (config file, config checks, paths)
    prints its message to stderr and exits with status 2, without a traceback."""
    try:
        yield
    except ConfigError as error:
        _exit_with(str(error))


def _exit_with(message: str) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(USAGE_ERROR_STATUS)
