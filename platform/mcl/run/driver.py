"""The driver: one continual-learning run, a method trained through a stream, task after task.

:func:`run_experiment` prepares the run (:mod:`mcl.run.prepare`), opens its folder (:mod:`mcl.run.rundir`)
and MLflow run (:mod:`mcl.run.record`), and walks the stream with :class:`StreamLoop`: every phase of every
task is trained by an executor (by default one Ray Train job for the whole run, :mod:`mcl.run.executors`),
each phase's result goes into the accuracy table (:mod:`mcl.run.table`) and MLflow as soon as it is
published. :func:`run_stream_locally` walks the same loop in this process, without Ray or MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mcl.config import ExperimentConfig
from mcl.methods_api import Phase
from mcl.run.executors import Executor, ExecutorFactory
from mcl.run.executors.local import LocalExecutor
from mcl.run.executors.ray_train import RayTrainExecutor
from mcl.run.memory_plan import plan_prepared
from mcl.run.plan import phase_folder
from mcl.run.prepare import PreparedRun, open_run_dir, prepare_run, run_name
from mcl.run.provenance import executor_tag
from mcl.run.record import RunRecorder
from mcl.run.rundir import PhaseDir, Progress, RunDir
from mcl.run.table import AccuracyTable
from mcl.worker.job import TaskResult

OnTask = Callable[[int, list[str], list[list[float | None]]], None]


@dataclass
class RunSummary:
    """What a finished run produced."""

    run_id: str
    tracking_uri: str
    task_names: list[str]
    matrix: list[list[float | None]]  # None: not evaluated (eval.tasks)
    baseline: list[float | None] | None
    metrics: dict[str, float]
    output_dir: str
    task_results: list[TaskResult] = field(default_factory=list)
    state_dirs: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    experiment_id: str = ""


@dataclass
class LocalStreamResult:
    """What :func:`run_stream_locally` produced: per task, the evaluating phase's result and the final
    state folder; per phase, its folder (``"<task>:<phase>"``)."""

    results: list[TaskResult]
    state_dirs: list[Path]
    phase_dirs: dict[str, Path]
    matrix: list[list[float | None]]
    baseline: list[float | None] | None = None
    probes: dict[str, list[float]] = field(default_factory=dict)  # per probe: accuracy after every task
    baseline_probes: dict[str, float] | None = None


class StreamLoop:
    """Tasks in order; each task's phases trained by ``executor`` (or reused from ``progress``), its evaluating
    phase's result added to the table, and everything recorded when there is a ``recorder``."""

    def __init__(
        self,
        prep: PreparedRun,
        executor: Executor,
        run_dir: RunDir,
        progress: Progress | None = None,
        recorder: RunRecorder | None = None,
        log: Callable[[str], None] = print,
        previous: str | None = None,
    ) -> None:
        self.prep, self.executor, self.run_dir = prep, executor, run_dir
        self.recorder, self.log = recorder, log
        self.persist = progress is not None  # written to the run folder after every phase
        self.progress = progress if progress is not None else Progress()
        self.names = prep.stream.task_names
        self.table = AccuracyTable(self.names)
        self.results: list[TaskResult] = []
        self.state_dirs: list[str] = []
        self.phase_dirs: dict[str, Path] = {}
        self.previous = previous  # the state folder the next phase starts from

    def run(self, tasks: range, on_task: OnTask | None = None) -> None:
        for t in tasks:
            if t in self.progress.tasks_done:  # finished by an earlier attempt: its results are in MLflow
                self._read_finished_task(t)
            else:
                self._train_task(t)
            if on_task is not None:
                on_task(t, self.names, self.table.matrix)

    def _phases(self, t: int) -> list[Phase]:
        phases = self.prep.method.phases(t)
        if sum(p.evaluate for p in phases) != 1:
            raise RuntimeError(
                f"method {self.prep.config.method.name!r}: exactly one phase of task {t} must evaluate"
            )
        return phases

    def _read_finished_task(self, t: int) -> None:
        for phase in self._phases(t):
            folder = PhaseDir(self.progress.phases[f"{t}:{phase.name}"])
            result = TaskResult.load(folder.path)
            if self.recorder is not None:
                self.recorder.count_steps(result, phase)
            if phase.evaluate:
                self.results.append(result)
                self.table.add(result)
            self._moved_to(t, phase.name, folder)
        self.state_dirs.append(str(self.previous))

    def _train_task(self, t: int) -> None:
        phases, name = self._phases(t), self.names[t]
        self.log(f"=== task {t + 1}/{len(self.names)}: {name} ({self.prep.config.method.name}) ===")
        task_run = self._start_task_run(t, phases)
        t_task = time.perf_counter()
        evaluated: TaskResult | None = None
        memory: dict[str, float] = {}
        for phase in phases:
            folder = self._phase(t, phase)
            result = TaskResult.load(folder.path)
            if self.recorder is not None:
                self.recorder.log_phase(task_run, result, phase)
            evaluated = result if phase.evaluate else evaluated
            memory = result.memory
            self._moved_to(t, phase.name, folder)
        assert evaluated is not None
        self.results.append(evaluated)
        row = self.table.add(evaluated)
        wall = time.perf_counter() - t_task
        if self.recorder is not None:
            self.recorder.finish_task(task_run, evaluated, wall, memory, Path(str(self.previous)))
        self.state_dirs.append(str(self.previous))
        self.progress.tasks_done.append(t)
        self._save_progress()
        accuracies = ", ".join(f"{n} {a:.1f}" for n, a in zip(self.names, row, strict=True) if a is not None)
        self.log(f"task {name} done in {wall:.1f}s: {accuracies}")

    def _start_task_run(self, t: int, phases: list[Phase]) -> str:
        if self.recorder is None:
            return ""
        task_run = self.recorder.start_task(t, self.progress.task_runs.get(str(t)))
        self.progress.task_runs[str(t)] = task_run
        self._save_progress()
        self.recorder.log_task_params(task_run, t, phases)
        return task_run

    def _phase(self, t: int, phase: Phase) -> PhaseDir:
        key = f"{t}:{phase.name}"
        if key in self.progress.phases:
            self.log(f"{phase_folder(self.prep, t, phase)}: reusing the checkpoint of an earlier attempt")
            return PhaseDir(self.progress.phases[key])
        folder = self.executor.run_phase(t, phase, self.previous)
        self.progress.phases[key] = str(folder.path)
        self._save_progress()
        return folder

    def _moved_to(self, t: int, phase: str, folder: PhaseDir) -> None:
        self.phase_dirs[f"{t}:{phase}"] = folder.path
        self.previous = str(folder.state)

    def _save_progress(self) -> None:
        if self.persist:
            self.run_dir.write_progress(self.progress)


def run_experiment(
    cfg: ExperimentConfig,
    log: Callable[[str], None] = print,
    prepared: PreparedRun | None = None,
    resume: bool = False,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_task: OnTask | None = None,
    executor: ExecutorFactory = RayTrainExecutor,
) -> RunSummary:
    """Train ``cfg.method`` through ``cfg.stream`` and return the accuracy matrix and CL metrics.

    With ``resume``, a run folder left by an earlier attempt with the same ``tracking.run_name`` and
    config is continued: finished phases are not trained again (their folders are reused), the run
    continues in its original MLflow run, and a task run left by the interrupted attempt is replaced. A
    finished run is returned as it is. Without ``resume``, an existing run folder is an error.

    ``parent_run_id`` nests the run's MLflow run under another (a sweep's); ``tags`` are added to the run.
    ``on_task(t, task_names, matrix)`` is called after every task (also those an earlier attempt finished),
    with the accuracy matrix so far; a sweep reports progress through it. If the run is stopped (``on_task``
    raises :class:`mcl.errors.RunStopped`, or anything in the run exits cleanly: ``SystemExit`` with code 0),
    its open MLflow runs are closed KILLED; any other exception closes them FAILED. Either way the exception
    is re-raised. ``executor`` builds what trains the phases (default: one Ray Train job for the run).
    """
    t_start = time.perf_counter()
    prep = prepared or prepare_run(cfg, log)
    plan = plan_prepared(prep, log)
    name = run_name(cfg)
    run_dir, existing = open_run_dir(prep, name, resume)
    progress = run_dir.read_progress()
    recorder = RunRecorder(prep, {**(tags or {}), **executor_tag(executor)}, log)
    progress.run_id = recorder.open(progress, name, parent_run_id)
    run_dir.write_progress(progress)
    loop: StreamLoop | None = None
    try:
        loop = StreamLoop(prep, executor(prep, run_dir), run_dir, progress, recorder, log)
        if not existing:
            recorder.log_setup(run_dir, plan)
        loop.run(range(len(loop.names)), on_task)
        loop.executor.close()
        recorder.finish(loop.table, run_dir, loop.previous, t_start)
    except BaseException as exc:
        if loop is not None:
            loop.executor.abort()
        recorder.close_interrupted(exc)
        raise
    table = loop.table
    return RunSummary(
        run_id=recorder.run_id,
        tracking_uri=recorder.uri,
        task_names=loop.names,
        matrix=table.matrix,
        baseline=table.baseline,
        metrics=table.metrics(),
        output_dir=str(run_dir.path),
        task_results=loop.results,
        state_dirs=loop.state_dirs,
        wall_s=time.perf_counter() - t_start,
        experiment_id=recorder.tracker.experiment_id,
    )


def run_stream_locally(
    prep: PreparedRun,
    out_dir: str | Path,
    tasks: int | None = None,
    log: Callable[[str], None] = print,
    start_state: str | Path | None = None,
    start_task: int = 0,
) -> LocalStreamResult:
    """Train the first ``tasks`` tasks in this process, without Ray or MLflow (one worker).

    The same driver loop, driver-side hooks (phases, training data, driver state) and per-phase recipe as
    :func:`run_experiment` run here, each phase by :class:`~mcl.run.executors.local.LocalExecutor`. Meant
    for mechanism tests and debugging a method; ``start_state``/``start_task`` continue from a saved state.
    """
    run_dir = RunDir(out_dir)
    previous = str(start_state) if start_state else None
    loop = StreamLoop(prep, LocalExecutor(prep, run_dir, log), run_dir, log=log, previous=previous)
    loop.run(range(start_task, tasks if tasks is not None else len(loop.names)))
    table = loop.table
    return LocalStreamResult(
        loop.results,
        [Path(s) for s in loop.state_dirs],
        loop.phase_dirs,
        table.matrix,
        table.baseline,
        table.probes,
        table.baseline_probes,
    )
