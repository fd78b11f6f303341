"""Repository layout invariants that are easy to break and expensive to debug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mcl.config import load_config

REPO = Path(__file__).resolve().parents[1]
JOB_YAMLS = sorted(p for pattern in ("*.yaml", "*.yml") for p in (REPO / "jobs").rglob(pattern))
# Sweep YAMLs (``sweep*.yaml``) are sweeps over experiment configs, not experiment configs themselves.
SWEEP_YAMLS = [p for p in JOB_YAMLS if p.name.startswith("sweep")]
EXPERIMENT_YAMLS = [p for p in JOB_YAMLS if p not in SWEEP_YAMLS]


def test_platform_is_not_a_package() -> None:
    assert not (REPO / "platform" / "__init__.py").exists(), (
        "platform/__init__.py must not exist: platform/ is a source root, not a package. With that file, "
        "`import platform` from the repo root (Ray's working_dir, `python jobs/...`) imports this folder "
        "instead of Python's stdlib `platform` module, which shadows it and kills every Ray worker on start."
    )


def test_stdlib_platform_importable_from_repo_root() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import platform; "
        "print(platform.system()); print(platform.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    system, module_file = done.stdout.split("\n")[:2]
    assert system, "platform.system() returned nothing"
    assert not Path(module_file).resolve().is_relative_to(REPO), (
        f"`import platform` resolved to {module_file} inside the repo instead of the stdlib module"
    )


def test_jobs_have_yaml_configs() -> None:
    assert JOB_YAMLS, "expected at least jobs/configs/default.yaml"


@pytest.mark.parametrize("path", EXPERIMENT_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_job_yaml_loads(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize("path", SWEEP_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_sweep_yaml_loads(path: Path) -> None:
    from mcl.sweep import expand_trials, load_sweep_config

    assert expand_trials(load_sweep_config(path))
