"""Phase planning, pure (no Ray, no files written): what each remaining phase of a run trains on.

The chain of a run's phases is known up front: a method's training rows depend only on its JSON driver state
(never on trained weights), and each phase starts from the folder the previous one will write.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from mcl.config import ExperimentConfig
from mcl.data import AnswerOrder, RowOrder, SampleRows, as_row_order, evaluation_order, group_by_length
from mcl.evaluation.policy import baseline_columns, evaluated_columns
from mcl.lengths import prompt_lengths, training_lengths
from mcl.methods_api import Phase, TrainingData, TrainingRequest
from mcl.run.prepare import PreparedRun
from mcl.run.rundir import RunDir, phase_folder_name, read_driver_state
from mcl.streams.store import ChainedSamples
from mcl.worker.job import TaskJob


@dataclass
class PlannedPhase:
    """One phase of a run's remaining plan: the job its workers run, their global training rows, and the name
    of the phase folder its state and result land in."""

    key: str  # "<task>:<phase>"
    folder: str
    job: TaskJob
    rows: Any  # a Sequence of row dicts (a RowOrder), the global order before sharding


def phase_config(cfg: ExperimentConfig, phase: Phase) -> ExperimentConfig:
    """The experiment config a phase trains with (its own epochs and learning rate, when it sets them). A
    phase with its own learning rate (MR-LoRA's router) trains every parameter at it: no projector lr."""
    changes: dict[str, Any] = {k: v for k, v in (("epochs", phase.epochs), ("lr", phase.lr)) if v is not None}
    if phase.lr is not None:
        changes["projector_lr"] = 0.0
    if not changes:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def phase_training_data(
    prep: PreparedRun, task_index: int, phase: Phase, driver_state: dict[str, Any] | None
) -> TrainingData:
    """The global order of training rows of one phase (every epoch, padded to whole global batches): what
    the workers of that phase train on, before sharding. Chosen by the method."""
    cfg = phase_config(prep.config, phase)
    request = TrainingRequest(
        phase,
        task_index,
        prep.stream.tasks,
        driver_state,
        epochs=cfg.train.epochs,
        global_batch=cfg.train.batch_size,
        seed=cfg.train.seed + task_index,
    )
    data = prep.method.training_data(request)
    if not data.rows or len(data.rows) % cfg.train.batch_size:
        raise RuntimeError(
            f"method {cfg.method.name!r} gave {len(data.rows)} training rows for phase {phase.name!r} of task "
            f"{task_index}; it must be a positive multiple of train.batch_size ({cfg.train.batch_size})"
        )
    if cfg.train.group_by_length:
        data = dataclasses.replace(
            data, rows=length_grouped_rows(prep, cfg, data.rows, f"{request.seed}-{phase.name}")
        )
    return data


def length_grouped_rows(prep: PreparedRun, cfg: ExperimentConfig, rows: Any, seed: str) -> RowOrder:
    """``rows`` regrouped by token length (``train.group_by_length``, see :func:`mcl.data.group_by_length`),
    the lengths measured with the run's model's processor."""
    order = as_row_order(rows)
    lengths = training_lengths(order, prep.model_path, cfg.model.trust_remote_code)
    return group_by_length(
        order,
        lengths,
        global_batch=cfg.train.batch_size,
        num_workers=cfg.scaling.num_workers,
        micro_batch=cfg.micro_batch,
        seed=seed,
    )


def task_training_rows(prep: PreparedRun, task_index: int) -> Any:
    """Training rows of the first phase of task ``task_index`` (at the start of the stream's state)."""
    return phase_training_data(prep, task_index, prep.method.phases(task_index)[0], None).rows


def phase_folder(prep: PreparedRun, task_index: int, phase: Phase) -> str:
    """The name of a phase's folder in the run folder."""
    return phase_folder_name(task_index, prep.stream.task_names[task_index], phase.name)


def phase_job(prep: PreparedRun, t: int, phase: Phase, previous: str | None) -> tuple[TaskJob, Any]:
    """The job and the global training rows of phase ``phase`` of task ``t``, starting from the state
    folder ``previous`` (None at the start of the stream): what a Ray Train job or a local run trains."""
    return _phase_job(prep, t, phase, previous, read_driver_state(previous))


def _phase_job(
    prep: PreparedRun, t: int, phase: Phase, previous: str | None, driver_state: dict[str, Any] | None
) -> tuple[TaskJob, Any]:
    cfg = phase_config(prep.config, phase)
    data = phase_training_data(prep, t, phase, driver_state)
    in_workers = cfg.eval.backend == "workers"  # else the driver's actor pool evaluates the published phase
    job = TaskJob(
        cfg.to_dict(),
        prep.model_path,
        t,
        prep.stream.task_names,
        previous,
        steps=len(data.rows) // cfg.train.batch_size,
        evaluate_before=(t == 0 and phase.evaluate and in_workers),
        phase=phase.name,
        evaluate=phase.evaluate and in_workers,
        optimize=phase.optimize,
        driver_state=data.driver_state if data.driver_state is not None else driver_state,
        eval_tasks=[prep.stream.task_names[i] for i in phase_eval_columns(prep, t)],
        probe_names=prep.probe_names,
    )
    return job, data.rows


def plan_phases(
    prep: PreparedRun, t: int, phase: Phase, previous: str | None, run_dir: RunDir
) -> list[PlannedPhase]:
    """Every phase from ``phase`` of task ``t`` to the end of the stream, starting from the state folder
    ``previous``; each next phase starts from the state folder of the one before in ``run_dir``."""
    driver_state = read_driver_state(previous)
    plan: list[PlannedPhase] = []
    for task in range(t, len(prep.stream.task_names)):
        phases = prep.method.phases(task)
        first = [p.name for p in phases].index(phase.name) if task == t else 0
        for ph in phases[first:]:
            job, rows = _phase_job(prep, task, ph, previous, driver_state)
            folder = phase_folder(prep, task, ph)
            plan.append(PlannedPhase(job.key, folder, job, rows))
            driver_state = job.driver_state
            previous = str(run_dir.phase(folder).state)
    return plan


def eval_rows(prep: PreparedRun) -> SampleRows:
    """Every task's test samples (the first ``eval.max_samples_per_task`` of each), as rows read lazily."""
    return _test_rows(prep, range(len(prep.stream.tasks)), probes=False)


def phase_eval_columns(prep: PreparedRun, task_index: int) -> list[int]:
    """The task columns the evaluating phase of task ``task_index`` evaluates (``eval.tasks``)."""
    return evaluated_columns(prep.config.eval.tasks, task_index, len(prep.stream.tasks))


def phase_eval_rows(prep: PreparedRun, task_index: int) -> SampleRows:
    """The rows the evaluating phase of task ``task_index`` evaluates: the test samples of the tasks
    ``eval.tasks`` names for that row (see :mod:`mcl.evaluation.policy`), then every probe's."""
    return _test_rows(prep, phase_eval_columns(prep, task_index), probes=True)


def baseline_eval_rows(prep: PreparedRun) -> SampleRows:
    """The rows the untrained model (the baseline row) is evaluated on: every task's test samples (FWT and
    the zero-shot row read them), then every probe's."""
    columns = baseline_columns(prep.config.eval.tasks, len(prep.stream.tasks))
    return _test_rows(prep, columns, probes=True)


def _test_rows(prep: PreparedRun, columns: Any, probes: bool) -> SampleRows:
    limit = prep.config.eval.max_samples_per_task
    tasks = [prep.stream.tasks[i] for i in columns]
    parts = [t.test[:limit] if limit else t.test for t in tasks]
    return SampleRows(ChainedSamples(parts + ([p.test for p in prep.probes] if probes else [])))


def answer_order(prep: PreparedRun, rows: Any) -> AnswerOrder:
    """Evaluation ``rows`` in the order to answer them, each with its position in ``rows`` (so predictions can
    be put back in that order, :func:`mcl.data.in_original_order`): grouped by answer type when the run stops
    generation per type (``eval.max_new_tokens_by_type`` / ``eval.stop_strings_by_type``), longest prompt first
    with ``eval.sort_by_length``, as they are otherwise. See :func:`mcl.data.evaluation_order`."""
    ev = prep.config.eval
    lengths = (
        prompt_lengths(rows, prep.model_path, prep.config.model.trust_remote_code)
        if ev.sort_by_length
        else None
    )
    per_type = bool(ev.max_new_tokens_by_type or ev.stop_strings_by_type)
    groups = [str(row["answer_type"]) for row in rows] if per_type else None
    order = evaluation_order(lengths, groups) if lengths is not None or groups else np.arange(len(rows))
    return AnswerOrder(rows, order)
