"""What makes a checkpoint unusable, how it is reported, and where a bad one is set aside.

``Checkpointer.restore`` (``engine.checkpointing``) runs these checks on a step directory:

1. its files (``check_files`` of ``item_files``): every item directory and the files orbax-checkpoint 0.12.8 and
   grain read first (an array item's ``_METADATA``, a JSON item's ``metadata``, the data
   iterator's ``process_<i>-of-<n>.json``) exist, and the JSON ones parse;
2. reading the arrays: an error orbax or TensorStore raises (a truncated or deleted chunk, a
   missing OCDBT manifest) is ``describe``-d in one line, its innermost cause first, without
   TensorStore's multi-line spec dump;
3. the content (``compare``): the ``engine.integrity`` checksums of what was restored against
   those saved with it, and every array finite.

A failure is a ``CorruptCheckpoint`` naming the step, the file (or array) and what is wrong, and
``set_aside`` renames the step directory ``<step>.corrupt-<reason>`` (never deletes it: the bytes
may matter to whoever investigates). The new name has no digits-only part after an underscore,
so orbax's step listing ignores it and the next-older checkpoint becomes the latest.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from mmpo_jax.engine.integrity import Fingerprint, leaf_name

logger = logging.getLogger(__name__)

ARRAY_ITEMS = ("params", "opt_state", "rng")
JSON_ITEMS = ("checkpoint_info", "metadata")
DATA_ITEM = "data"
ARRAY_METADATA = "_METADATA"  # orbax's tree metadata of an array item (StandardCheckpointHandler)
JSON_FILE = "metadata"  # the file of a JsonCheckpointHandler item
CORRUPT_MARK = ".corrupt-"

_NOISE = (re.compile(r"\s*\[tensorstore_spec=.*$", re.S),
          re.compile(r"\s*See full TensorStore details.*$", re.S))
_MAX_DETAIL = 300


class CorruptCheckpoint(ValueError):
    """A checkpoint that fails a check (see the module doc).

    Attributes:
      step: the checkpoint's step.
      where: the failing file or array, relative to the step directory
        (``params/_METADATA``, ``params/up/kernel/value``, ``data/process_0-of-1.json``).
      reason: a short slug for the set-aside name (``missing``, ``bad-json``, ``unreadable``,
        ``checksum``, ``non-finite``).
    """

    def __init__(self, step: int, directory: pathlib.Path, where: str, reason: str, detail: str):
        self.step, self.where, self.reason = step, where, reason
        super().__init__(f"checkpoint of step {step} in {directory} is unusable: {where}: "
                         f"{detail}")


def data_file(process_index: int, process_count: int) -> str:
    """grain's file of one process's iterator position, relative to the step directory."""
    return f"{DATA_ITEM}/process_{process_index}-of-{process_count}.json"


INFO_FILE = f"checkpoint_info/{JSON_FILE}"


def item_files(data_files: Iterable[str] = ()) -> list[str]:
    """The files a restore reads first, relative to the step directory: each array item's tree
    metadata, each JSON item's file, and ``data_files`` (``data_file(...)``, when the data
    iterator is restored)."""
    return [*(f"{item}/{ARRAY_METADATA}" for item in ARRAY_ITEMS),
            *(f"{item}/{JSON_FILE}" for item in JSON_ITEMS), *data_files]


def check_files(step: int, directory: pathlib.Path, files: Iterable[str]) -> None:
    """Raises ``CorruptCheckpoint`` for the first of ``files`` (relative to the step directory
    ``<directory>/<step>``, ``item_files``) that is missing or is not valid JSON."""
    step_dir = directory / str(step)
    for relative in files:
        path = step_dir / relative
        if not path.parent.is_dir():
            raise CorruptCheckpoint(step, directory, f"{path.parent.name}/", "missing",
                                    "the directory is missing")
        if not path.is_file():
            raise CorruptCheckpoint(step, directory, relative, "missing", "the file is missing")
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CorruptCheckpoint(step, directory, relative, "bad-json",
                                    f"not valid JSON ({error})") from None


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """``"a/b/0/value" -> shape`` for every array leaf; names, attributes and indices alike."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {leaf_name(path): tuple(leaf.shape) for path, leaf in leaves}


def target_mismatches(stored: Any, target: Any, limit: int = 8) -> list[str]:
    """Missing, unexpected and differently shaped arrays of a restore ``target`` against the
    ``stored`` tree (orbax's metadata): the run's model or optimizer differ from the saved ones,
    which is the caller's mistake, not damage to the checkpoint."""
    saved, wanted = _shapes_by_path(stored), _shapes_by_path(target)
    problems = [f"{path} is not in the checkpoint" for path in sorted(wanted.keys() - saved)]
    problems += [f"{path} of the checkpoint is not in the target"
                 for path in sorted(saved.keys() - wanted)]
    problems += [f"{path} has shape {saved[path]} in the checkpoint, {wanted[path]} in the target"
                 for path in sorted(saved.keys() & wanted) if saved[path] != wanted[path]]
    return problems[:limit] + ([f"... {len(problems) - limit} more"] if len(problems) > limit
                               else [])


def describe(error: BaseException) -> str:
    """One line for an error raised while reading: its innermost cause, without spec dumps."""
    causes = [error]
    while causes[-1].__cause__ is not None or causes[-1].__context__ is not None:
        causes.append(causes[-1].__cause__ or causes[-1].__context__)
    for cause in reversed(causes):
        text = str(cause)
        for noise in _NOISE:
            text = noise.sub("", text)
        text = " ".join(text.split())
        if text:
            text = text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."
            return f"{type(cause).__name__}: {text}"
    return type(error).__name__


def compare(step: int, directory: pathlib.Path, item: str, restored: Mapping[str, Fingerprint],
            saved: Mapping[str, str] | None) -> None:
    """Raises ``CorruptCheckpoint`` when an array of ``item`` is non-finite or its checksum is
    not the saved one (``saved`` None: a checkpoint written before checksums, finiteness only)."""
    for name, fingerprint in restored.items():
        if saved is not None and saved.get(name) != fingerprint.checksum:
            raise CorruptCheckpoint(
                step, directory, f"{item}/{name}", "checksum",
                f"its contents do not match the checksum saved with them (saved "
                f"{saved.get(name)}, read {fingerprint.checksum}): the file changed on disk")
        if not fingerprint.finite:
            raise CorruptCheckpoint(step, directory, f"{item}/{name}", "non-finite",
                                    "it holds NaN or inf values")


def set_aside(directory: pathlib.Path, failure: CorruptCheckpoint) -> pathlib.Path:
    """Renames ``<directory>/<step>`` to ``<step>.corrupt-<reason>`` (``-2``, ``-3``... when
    taken) and returns the new path."""
    source = directory / str(failure.step)
    target = directory / f"{failure.step}{CORRUPT_MARK}{failure.reason}"
    copy = 2
    while target.exists():
        target = directory / f"{failure.step}{CORRUPT_MARK}{failure.reason}-{copy}"
        copy += 1
    source.rename(target)
    return target
