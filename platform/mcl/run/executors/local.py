"""Each phase in this process, when the driver asks for it: one worker, plain PyTorch or DeepSpeed, no Ray."""

from __future__ import annotations

from collections.abc import Callable

from mcl.errors import ConfigError
from mcl.methods_api import Phase
from mcl.run.plan import answer_order, baseline_eval_rows, phase_eval_rows, phase_folder, phase_job
from mcl.run.prepare import PreparedRun
from mcl.run.rundir import PhaseDir, RunDir
from mcl.worker.local import run_task_locally


class LocalExecutor:
    """Trains each phase in this process with :func:`mcl.worker.local.run_task_locally` (one worker)."""

    def __init__(self, prep: PreparedRun, run_dir: RunDir, log: Callable[[str], None] = print) -> None:
        if prep.config.eval.backend != "workers":
            raise ConfigError(
                f"eval.backend: the local executor (one process, no Ray) evaluates in its worker only; "
                f"use eval.backend=workers or run through Ray, got {prep.config.eval.backend!r}"
            )
        self.prep, self.run_dir, self.log = prep, run_dir, log

    def run_phase(self, task_index: int, phase: Phase, previous: str | None) -> PhaseDir:
        job, rows = phase_job(self.prep, task_index, phase, previous)
        folder = self.run_dir.phase(phase_folder(self.prep, task_index, phase))
        run_task_locally(
            job,
            rows,
            answer_order(self.prep, phase_eval_rows(self.prep, task_index)) if phase.evaluate else [],
            folder.path,
            log=self.log,
            baseline_rows=answer_order(self.prep, baseline_eval_rows(self.prep))
            if job.evaluate_before
            else None,
        )
        return folder

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass
