"""What `python -m mmpo_jax.train` / `generate_pairs` print for bad input: one line (or one list)
on stderr, no traceback, exit status 2, before any data is prepared or any model loaded."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, cwd: pathlib.Path = REPO, home: pathlib.Path | None = None
         ) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", f"mmpo_jax.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["train", "generate_pairs"])
def test_a_missing_config_file_is_one_line_naming_the_closest(module):
    result = _run(module, "--config=configs/dppo.py", "--config.seed=1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"FATAL Flags parsing error: flag --config=configs/dppo.py: no such config file (cwd "
        f"{REPO}); did you mean configs/dpo.py?"]


def test_an_unloadable_config_file_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("def get_config(arg=None):\n    return 1 / 0\n")
    result = _run("train", "--config=broken.py", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "FATAL Flags parsing error: flag --config=broken.py: get_config() raised "
        "ZeroDivisionError: division by zero (broken.py:2)"]


def test_config_problems_and_placeholders_print_as_one_list(tmp_path):
    """The GPU preset as shipped, with one mistake more: every problem at once, nothing loaded."""
    result = _run("train", f"--config={REPO / 'configs/llava_1_5_7b_gpu.py'}:catpo",
                  f"--config.data.data_dir={tmp_path / 'data'}", "--config.mesh.data=3",
                  cwd=tmp_path, home=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "config 'llava_1_5_7b_catpo' is invalid:" and len(lines) == 5, lines
    assert lines[1] == ("  - mesh {'data': 3, 'fsdp': -1, 'tensor': 1}: 8 devices are not divisible by "
                        "the fixed axes' product 3")
    assert [line.split(" ")[3].split("=")[0] for line in lines[2:]] == [
        "--config.model.checkpoint", "--config.data.manual_dir", "--config.data.tokenizer"]
    assert not (tmp_path / "data").exists()  # nothing prepared
