"""The ``benchmarks`` section of a config as an `evaluation.suite.EvaluationSpec`, and its checks.

The section (`config.schema.BENCHMARKS`) holds the spec's fields, an unset path as "" and an unset
count as 0, plus ``every`` (evaluate every N steps; 0: at the end only). `training.benchmarks`
runs it. `problems` is part of the config checks; `path_problems` of the preflight (every file
and folder named must exist), each naming its ``--config.benchmarks.*`` flag.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from mmpo_jax.evaluation import suite

PREFIX = "benchmarks/"
SECTION = "benchmarks"
NOT_SPEC_FIELDS = ("every",)
# path field -> "file" | "dir" (amber_queries are relative to amber_dir)
PATHS = {"coco_instances": "file", "coco_captions": "file", "coco_images": "dir",
         "heldout_manual_dir": "dir", "pope_questions": "file", "pope_images": "dir",
         "amber_dir": "dir", "amber_queries": "file", "amber_images": "dir"}


def spec_fields(config: Any) -> dict[str, Any] | None:
    """The section as `EvaluationSpec` keyword arguments ("" / 0 -> None), or None when the config
    has no section or it names no benchmark."""
    tree = _plain(config)
    if SECTION not in tree:
        return None
    section = tree[SECTION]
    fields = {name: (None if value in ("", 0) and name in _OPTIONAL else value)
              for name, value in section.items() if name not in NOT_SPEC_FIELDS}
    fields["pope_questions"] = tuple(fields.get("pope_questions") or ())
    fields["amber_queries"] = tuple(fields.get("amber_queries") or ())
    if not (fields.get("coco_images") or fields.get("heldout_dataset") or fields["pope_questions"]
            or fields.get("amber_dir")):
        return None
    if fields.get("heldout_dataset") and not fields.get("heldout_data_dir"):
        fields["heldout_data_dir"] = os.path.expanduser(tree["data"]["data_dir"])
    return fields


_OPTIONAL = tuple(field.name for field in dataclasses.fields(suite.EvaluationSpec)
                  if field.default is None)


def path_problems(config: Any) -> list[str]:
    """Every benchmark path of the section that names nothing (a file or folder, as needed)."""
    fields = spec_fields(config)
    if fields is None:
        return []
    found = []
    for name, kind in PATHS.items():
        values = fields.get(name) or ()
        for value in (values if isinstance(values, tuple) else (values,)):
            path = os.path.expanduser(value)
            if name == "amber_queries":
                if not fields.get("amber_dir"):
                    continue
                path = os.path.join(os.path.expanduser(fields["amber_dir"]), path)
            if not (os.path.isdir(path) if kind == "dir" else os.path.isfile(path)):
                noun = "folder" if kind == "dir" else "file"
                found.append(f"--config.{SECTION}.{name}={value!r}: no such {noun}")
    return found


def problems(config: Any) -> list[str]:
    """Why the ``benchmarks`` section cannot make an `EvaluationSpec` (flags named as
    ``benchmarks.<field>``); empty when it can or names no benchmark."""
    fields = spec_fields(config)
    if fields is None:
        return []
    try:
        suite.EvaluationSpec(**fields)
    except ValueError as error:
        return [str(error).replace("evaluation spec: ", f"{SECTION}: ")]
    every = _plain(config)[SECTION]["every"]
    return [f"{SECTION}.every={every} must be >= 0"] if every < 0 else []


def every(config: Any) -> int:
    """The section's ``every`` (0 without the section)."""
    return int(_plain(config).get(SECTION, {}).get("every", 0))


def _plain(config: Any) -> Any:
    return config.to_dict() if hasattr(config, "to_dict") else config


