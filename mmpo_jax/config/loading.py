"""What a training config is, and how one is loaded: the schema, config files, overrides.

`SCHEMA` states every section and field the trainer reads, with its default (hence its type):
`configs/base.py` builds its sections from it, `config_checks.validate` checks configs against it.
A `Required` entry has no default; an empty dict is a free-form mapping (builder options). The
method block is open-ended: `METHOD_CORE` (``name``, ``beta``, ``terms``, ``token_weights``) plus
the options of `TERM_OPTIONS` / `WEIGHTING_OPTIONS` that its terms read (`method_defaults`). Two
optional sections: ``reference_settings`` (free-form: a paper's hyper-parameters, documentation)
and ``rollout`` (on-policy sampling, read by the FiSAO loop).

`load_config("configs/catpo.py:arg", ["method.beta=0.2"])` is ``--config=configs/catpo.py:arg
--config.method.beta=0.2`` of the train CLI (ml_collections' ``config_flags``, on a private flag
registry), with a clear error for an unknown key. Config files load their siblings (``base.py``)
with `config_module`, so they work from any working directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import types
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from mmpo_jax.models.lora import LLAMA_LINEAR_NAMES
from mmpo_jax.objectives import registry
from mmpo_jax.engine.sharding import DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class Required:
    """A schema field without a default: every config must set it (to a ``type``)."""

    type: type


SCHEMA: dict[str, Any] = {
    "seed": 0,
    "workdir": "",  # "" -> runs/<name>
    "name": Required(str),
    "model": {
        "preset": "tiny", "init": "sft_base", "checkpoint": "", "dtype": "float32",
        "param_dtype": "float32", "remat": False, "freeze_vision": True, "train_projector": True,
        "lora": {"enabled": False, "rank": 64, "alpha": 128.0, "dropout": 0.05,
                 "targets": LLAMA_LINEAR_NAMES},
    },
    "data": {
        "dataset": "shapes_world", "split": "preference", "data_dir": "~/mmpo_data",
        "manual_dir": "", "builder": {}, "tokenizer": "", "template": "llava_1_5",
        "batch_size": 32, "buckets": (64, 96), "max_length": 0, "num_epochs": 0, "shuffle": True,
    },
    "optimizer": {
        "learning_rate": Required(float), "schedule": "cosine", "warmup_ratio": 0.1,
        "end_learning_rate_ratio": 0.0, "weight_decay": 0.05, "b1": 0.9, "b2": 0.999,
        "eps": 1e-8, "grad_clip": 1.0, "grad_accum_steps": 1,
    },
    "train": {"num_steps": Required(int), "log_every": 10, "progress_bar": True},
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "mesh_rules": DEFAULT_RULES,
    "reference": {"mode": "copy", "cache_dir": ""},
    "checkpoint": {"save_every": 100, "keep": 2, "async_save": True, "resume": True,
                   "export_hf": False},
    "eval": {
        "enabled": True, "caption_split": "test_caption", "pope_split": "test_pope",
        "num_captions": 0, "num_samples": 3, "temperature": 1.0, "max_new_tokens": 24,
        "batch_size": 64, "control": True,
        "control_learning_rate": 5e-5,  # the control run's (configs/sft.py's) learning rate
    },
    "sft_base": {"split": "sft", "num_steps": 1300, "batch_size": 32, "learning_rate": 1e-3,
                 "cache_dir": ""},
}
"""Section -> field -> default (the method block is `method_defaults`')."""

OPTIONAL_SECTIONS: dict[str, Any] = {
    "reference_settings": {},
    "rollout": {"num_samples": 4, "temperature": 1.0, "max_new_tokens": 24, "ppo_epochs": 2,
                "reward_granularity": "token", "vocabulary": "shapes_world"},
}

METHOD_OPTION_DEFAULTS: dict[str, Any] = {
    **registry.OPTION_DEFAULTS,
    # Cat-PO token weights (rewards.catpo.token_weights; top_k_percent 0 = off)
    "alpha": 0.5, "lambda_ref": 0.5, "normalize": "minmax", "top_k_percent": 0.0,
    "layer_band": (0.6, 0.7),
    # ADAPT VAG-DPO's visual anchor: K steps, refined-mask quantile (0 = METHODS.md's chain)
    "anchor_steps": 5, "mask_threshold_percentile": 0.4,
}
_PREFERENCE = ("beta", "label_smoothing", "loss_type", "reduction")
TERM_OPTIONS: dict[str, tuple[str, ...]] = {
    "dpo": _PREFERENCE,
    "copo": ("beta", "reduction"),
    "anchor": ("beta", "reduction", "anchor_delta"),
    "token_kl": (),
    "nll": ("nll_reduction",),
    "adapt_vag": _PREFERENCE + ("anchor_steps", "mask_threshold_percentile"),
    "p2dpo": _PREFERENCE + ("lambda_calib", "calib_ref_response", "w_base", "ddw", "branches"),
    "fisao_ppo": ("beta_kl", "gamma", "clip_eps", "num_position_bins"),
}
"""Registry term -> the method options it reads."""
WEIGHTING_OPTIONS = {"catpo": ("alpha", "lambda_ref", "normalize", "top_k_percent", "layer_band"),
                     "tpo": (), "none": ()}
METHOD_CORE = {"name": Required(str), "beta": 0.1, "terms": {}, "token_weights": "none"}
OPEN_MAPPINGS = ("data.builder", "method.terms", "reference_settings")


def method_defaults(name: str, *, terms: Mapping[str, float] | None = None,
                    token_weights: str | None = None, **options: Any) -> dict[str, Any]:
    """The method block of ``name``: its terms, weighting and the options they read.

    Args:
      name: a `registry.METHODS` key.
      terms: ``{term: weight}``; None -> the method's default terms.
      token_weights: "catpo" | "tpo" | "none"; None -> the method's default.
      **options: values for `METHOD_OPTION_DEFAULTS` keys (others than the terms read are added).

    Raises:
      ValueError: unknown method, term, weighting or option.
    """
    default = registry.METHODS.get(name)
    if default is None:
        raise ValueError(f"method name={name!r} is not one of {sorted(registry.METHODS)}")
    terms = {term: float(weight) for term, weight in (terms or default["terms"]).items()}
    weighting = default["token_weights"] if token_weights is None else token_weights
    weighting = "none" if weighting is None else weighting
    registry.active_terms({"name": name, "terms": terms, "token_weights": weighting})
    unknown = sorted(set(options) - set(METHOD_OPTION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown method options {unknown}; "
                         f"valid: {sorted(METHOD_OPTION_DEFAULTS)}")
    read = {"beta", *options, *WEIGHTING_OPTIONS[weighting]}
    read.update(option for term in terms for option in TERM_OPTIONS[term])
    block = {"name": name, "beta": METHOD_OPTION_DEFAULTS["beta"], "terms": terms,
             "token_weights": weighting}
    block.update((key, value) for key, value in METHOD_OPTION_DEFAULTS.items() if key in read)
    block.update(options)
    return block


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


def flag_file_config(flag: str, arg: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the file the config-file flag ``flag`` was given, e.g. P2-DPO's
    generation settings (``"pairs"``) of ``--config=configs/p2dpo.py``."""
    return load_config(f"{config_flags.get_config_filename(flags.FLAGS[flag])}:{arg}")


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
