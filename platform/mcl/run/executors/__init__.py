"""Executors train a run's phases; the driver loop (:mod:`mcl.run.driver`) is the same for all of them.

- :class:`~mcl.run.executors.ray_train.RayTrainExecutor`: every remaining phase in one Ray Train worker
  group, on a background thread, fed by Ray Data (what :func:`mcl.run.run_experiment` uses by default);
- :class:`~mcl.run.executors.local.LocalExecutor`: each phase in this process, one worker, no Ray (tests,
  debugging, :func:`mcl.run.run_stream_locally`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mcl.methods_api import Phase
    from mcl.run.prepare import PreparedRun
    from mcl.run.rundir import PhaseDir, RunDir


class Executor(Protocol):
    """Trains phases into a run folder, in the order the driver asks for them."""

    def run_phase(self, task_index: int, phase: Phase, previous: str | None) -> PhaseDir:
        """The published folder of ``phase`` of task ``task_index``, trained from the state folder
        ``previous`` (None at the start of the stream). Blocks until it exists."""
        ...

    def close(self) -> None:
        """Wait for the executor's work to end; raise its error, if any."""
        ...

    def abort(self) -> None:
        """Stop training after the phase in progress (the driver failed or was stopped)."""
        ...


class ExecutorFactory(Protocol):
    def __call__(self, prep: PreparedRun, run_dir: RunDir) -> Executor: ...
