"""Shared fixtures: a private model cache, the tiny LLaVA and the generated stream, each built once per session.

``MCL_CACHE_DIR`` points at a session temp dir for every test (autouse), so nothing is written to the user's
``~/.cache/mcl`` and ``resolve_model_path("tiny-llava")`` without ``cache_dir`` (as ``prepare_run`` calls it)
finds the same tiny model that :func:`tiny_model_path` built.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ray Train's controller polls its worker group every 2 s by default, so a small Train job waits up to 2 s to
# start and again to finish (about 3 s of idle wall time per Train job on the CI machine, measured 2026-12-06:
# the contract config's run took 42.4 s, 39.4-39.8 s at 0.1-0.25 s). The suite starts some 50 Train jobs;
# Ray Train hands the variable on to its controller. Tests and the subprocesses they start inherit it.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


@pytest.fixture(scope="session", autouse=True)
def interpreter_ninja_first() -> Iterator[None]:
    """The test process finds this interpreter's ninja first, as Ray's workers do (``.venv/bin/python -m pytest``
    without an activated environment found the system's ninja, whose build log the pip ninja of the workers
    does not read: DeepSpeed's CPU ops were rebuilt, 20-60 s, whenever in-process and Ray tests took turns).
    The engine does the same before it builds an op (``mcl.worker.engine.use_interpreter_ninja``); this also
    covers the tests that build DeepSpeed engines themselves."""
    from mcl.worker.engine import use_interpreter_ninja

    saved = os.environ.get("PATH")
    use_interpreter_ninja()
    yield
    if saved is not None:
        os.environ["PATH"] = saved


@pytest.fixture(scope="session", autouse=True)
def quick_train_polling() -> Iterator[None]:
    patch = pytest.MonkeyPatch()
    for name, value in TRAIN_POLL_ENV.items():
        patch.setenv(name, value)
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def mcl_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session-wide ``MCL_CACHE_DIR`` (built-in models go to ``<it>/models``)."""
    root = tmp_path_factory.mktemp("mcl_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("MCL_CACHE_DIR", str(root))
    yield root
    patch.undo()


@pytest.fixture(scope="session")
def tiny_model_path(mcl_cache_dir: Path) -> str:
    """Folder of the tiny random-weight LLaVA checkpoint, built once into a temp dir (the session's
    ``$MCL_CACHE_DIR/models``, so ``resolve_model_path("tiny-llava")`` reuses it)."""
    from mcl.models import resolve_model_path

    return resolve_model_path("tiny-llava", cache_dir=mcl_cache_dir / "models")


@pytest.fixture(scope="session")
def generated_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the generated stream with default options (``build_stream("generated", root, {})``), built
    once. Treat it as read-only: copy it (``shutil.copytree``) before corrupting anything."""
    from mcl.streams import build_stream

    root = tmp_path_factory.mktemp("data") / "generated"
    build_stream("generated", root, {})
    return root


@pytest.fixture
def failing_executor():
    """``make(fail)``: an executor factory for ``run_experiment(..., executor=...)`` whose training job fails
    as ``fail(run folder path)`` does, at the first phase (the driver's side of a failed Train job)."""

    def make(fail):
        class FailingExecutor:
            def __init__(self, _prep, run_dir):
                self.run_dir = run_dir

            def run_phase(self, *_args):
                fail(self.run_dir.path)
                raise AssertionError("fail() must raise")

            def close(self):
                pass

            def abort(self):
                pass

        return FailingExecutor

    return make
