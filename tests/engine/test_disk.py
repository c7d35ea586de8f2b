import pathlib

import pytest

from mmpo_jax.engine import disk


def test_the_probe_leaves_no_trace_of_the_directories_it_created(tmp_path):
    target = tmp_path / "a" / "run"
    assert disk.require_writable(target, "workdir") == target
    assert not (tmp_path / "a").exists()


def test_a_new_directory_removed_by_another_process_probe_is_made_and_probed_again(tmp_path, monkeypatch):
    """Every process of a multi-host run probes the shared workdir; one that created it removes it
    after its own probe, possibly between another process's mkdir and probe (seen in a two-process
    run: 'workdir ... is not writable (No such file or directory)')."""
    target = tmp_path / "run"
    make = pathlib.Path.mkdir
    removals = []

    def other_process_cleans_up_first(self, *args, **kwargs):
        if self.name.startswith(".write-probe") and len(removals) < 3:
            removals.append(self.parent)
            self.parent.rmdir()  # the other process's finally, just before our probe
        return make(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", other_process_cleans_up_first)
    assert disk.require_writable(target, "workdir") == target
    assert removals == [target] * 3 and not target.exists()


def test_a_directory_that_keeps_vanishing_is_reported(tmp_path, monkeypatch):
    make = pathlib.Path.mkdir

    def always_removed(self, *args, **kwargs):
        if self.name.startswith(".write-probe"):
            self.parent.rmdir()
        return make(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", always_removed)
    with pytest.raises(disk.UnwritableDirectory, match=r"^workdir .*run is not writable \(No such file"):
        disk.require_writable(tmp_path / "run", "workdir")
