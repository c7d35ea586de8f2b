"""Files a run writes: a writability probe before any work, and all-or-nothing small files.

``require_writable(directory, role)`` creates and removes a probe directory in ``directory`` (and
the directory itself when absent), in the calling thread. A run calls it for its workdir, data
directory and checkpoint directory before loading data or models, and the checkpointer before
every save, so a directory it cannot write is one clear ``UnwritableDirectory`` error at once
instead of a failure deep inside a data builder or orbax's background threads. [our choice] The probe creates a
directory rather than testing ``os.access``: permission bits do not bind root, and read-only
mounts, immutable directories and full disks refuse a real ``mkdir`` whoever asks; a directory,
not a file, because that is what orbax's first write is.

``write_atomic(path, text)`` writes a sibling temporary file, flushes it to disk and renames it
over ``path``: a reader (or a run killed mid-write) sees the old contents or the new, never half.
"""

from __future__ import annotations

import os
import pathlib
import uuid


PROBE_ATTEMPTS = 16
"""Probes of a directory that other processes' probes keep removing (each removes only what it
created, once), before it is reported unwritable."""


class UnwritableDirectory(OSError):
    """A directory a run must write to refuses writes; the message names it and its role."""


def require_writable(directory: str | os.PathLike[str], role: str) -> pathlib.Path:
    """``directory`` after proving that it can be created (if absent) and written in.

    The probe leaves no trace: the directories it creates, ``directory`` and any missing parents,
    are removed again (the run creates them when it writes there).

    Args:
      directory: the directory the run will write under.
      role: what it is, as the user sets it (``"workdir"``, ``"data.data_dir"``...): the error
        message names it.

    Raises:
      UnwritableDirectory: ``directory`` cannot be created, or nothing can be created in it.
    """
    path = pathlib.Path(directory).expanduser()
    missing = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for attempt in range(PROBE_ATTEMPTS):
            path.mkdir(parents=True, exist_ok=True)
            try:
                probe.mkdir()
                break
            except FileNotFoundError:
                # Another process probing the same new directory (every host of a run probes
                # its workdir) removed it between our mkdir and our probe: make it again.
                if attempt == PROBE_ATTEMPTS - 1:
                    raise
        probe.rmdir()
    except OSError as error:
        raise UnwritableDirectory(
            f"{role} {path} is not writable ({error.strerror or error}); fix its permissions, "
            f"free space or mount, or point {role} elsewhere") from error
    finally:
        for created in missing:
            try:
                created.rmdir()
            except OSError:  # not created by us after all, or no longer empty
                break
    return path


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path``'s contents with ``text`` (UTF-8) in one step (see the module doc)."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
