"""DeepSpeed's JIT-built CPU ops are built once for the driver, the in-process engine and the Ray workers: every
process puts the interpreter's ninja first on PATH, as Ray does for its workers (two ninja releases keep
incompatible build logs and rebuilt each other's builds)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mcl.worker.engine import use_interpreter_ninja


def test_the_interpreters_ninja_goes_first_on_path_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "venv" / "bin"
    folder.mkdir(parents=True)
    (folder / "ninja").write_text("")
    monkeypatch.setattr(sys, "executable", str(folder / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", str(folder), "/bin"]))
    use_interpreter_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [str(folder), "/usr/bin", "/bin"]
    use_interpreter_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [str(folder), "/usr/bin", "/bin"]


def test_an_interpreter_without_ninja_leaves_path_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_interpreter_ninja()
    assert os.environ["PATH"] == "/usr/bin:/bin"
