"""Config sweeps: one trained row per override combination, with the base and control rows.

A sweep is a list of override tuples (``("optimizer.learning_rate=5e-5", "method.beta=0.5")``),
from a grid given on the command line (``key=v1|v2`` per key, the cartesian product) or from the
config file's ``get_sweep()`` (a list of ``{key: value}`` dicts). Every variant starts from the
same initial model (the cached SFT base) and is evaluated like the main job.
"""

from __future__ import annotations

import itertools
import pathlib
import re
from typing import Any, Mapping, Sequence

from mmpo_jax.config.loading import config_module, load_config
from mmpo_jax.training.experiment import _expand, run_variants


def grid_overrides(grid: Sequence[str]) -> list[tuple[str, ...]]:
    """``["a=1|2", "b=x|y"]`` -> the 4 combinations ``("a=1", "b=x"), ...`` (in order)."""
    axes = []
    for entry in grid:
        key, separator, values = entry.partition("=")
        if not separator or not values:
            raise ValueError(f"sweep axis {entry!r} is not of the form 'key=v1|v2|...'")
        axes.append([f"{key}={value}" for value in values.split("|")])
    return [tuple(combo) for combo in itertools.product(*axes)]


def file_overrides(path: str) -> list[tuple[str, ...]]:
    """The config file's ``get_sweep()`` as override tuples (empty when it has none)."""
    module = config_module(path.split(":", 1)[0])
    sweep: Sequence[Mapping[str, Any]] = getattr(module, "get_sweep", lambda: [])()
    return [tuple(f"{key}={value}" for key, value in variant.items()) for variant in sweep]


def _folder(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)[:120] or "default"


def run_sweep(path: str, sweep: Sequence[tuple[str, ...]], *,
              common: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Trains and evaluates every variant of ``path`` (see the module doc).

    Args:
      path: a config file (``configs/catpo.py``).
      sweep: override tuples, one per variant; an empty tuple is the config as it is.
      common: overrides applied to every variant (and to the shared base/control settings).
    """
    if not sweep:
        raise ValueError(f"the sweep of {path} is empty: pass key=v1|v2 axes or define get_sweep()")
    config = load_config(path, tuple(common))
    root = _expand(config.workdir or f"runs/{config.name}") / "sweep"
    variants = {}
    for overrides in sweep:
        name = " ".join(overrides) or "default"
        variant = load_config(path, tuple(common) + tuple(overrides))
        variants[name] = (variant, pathlib.Path(root, _folder(name)))
    return run_variants(config, variants, workdir=root)
