"""Making a directory refuse writes for a test, for root too.

Permission bits do not bind root, so as root a directory is made immutable (``chattr +i``: no
entry can be created, removed or renamed in it); otherwise its write permission is removed. A
test calls ``unwritable(path)`` as a context manager, which restores the directory on exit so that
pytest can delete it, and skips the test where neither works (``chattr`` absent or refused).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import stat
import subprocess

import pytest


def _set(path: pathlib.Path, locked: bool) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if locked else "-i", str(path)], check=True,
                       capture_output=True)
    else:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) if locked
                   else mode | stat.S_IWUSR)


def lock(path: pathlib.Path) -> None:
    """Make ``path`` (a directory) refuse writes; ``pytest.skip`` where that is impossible."""
    if os.geteuid() == 0 and shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a directory unwritable")
    try:
        _set(path, True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot make {path} unwritable here: {error}")
    probe = path / ".probe"
    try:
        probe.mkdir()
    except OSError:
        return
    probe.rmdir()
    _set(path, False)
    pytest.skip(f"{path} stays writable after locking it (filesystem without chattr support?)")


def unlock(path: pathlib.Path) -> None:
    """Undo ``lock`` (harmless on a directory that is not locked)."""
    if path.exists():
        _set(path, False)


@contextlib.contextmanager
def unwritable(path: pathlib.Path):
    """``path`` (created if absent) refuses writes inside the ``with`` block."""
    path.mkdir(parents=True, exist_ok=True)
    lock(path)
    try:
        yield path
    finally:
        unlock(path)
