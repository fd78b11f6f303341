"""Builds a small but real MLflow store in the layout a sweep writes (see jobs/sweep.py), for analysis tests.

Runs are written through :class:`mcl.tracking.Tracker`, as the sweep does: a sweep run (``mcl.kind=sweep``),
trial runs as its children (``mcl.kind=stream_run``) with the final CL metrics, ``acc_<task>`` at step ``t``
and an ``accuracy_matrix.json`` artifact, and task runs as children of the trials.

Not a test module (no ``test_`` prefix); load it by path from other test folders:
``importlib.util.spec_from_file_location("sweep_store", <this file>)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mcl.evaluation.metrics import accuracy_matrix_json, cl_metrics
from mcl.tracking import Tracker

TASKS = ["count", "color", "shape"]
STREAM = "generated"

# (method, seed) -> accuracy matrix (rows: after training task t; columns: tasks), hand-picked so the
# tests can check means and stds by hand. Not symmetric, so a transposed matrix shows.
MATRICES: dict[tuple[str, int], list[list[float]]] = {
    ("sequential_lora", 0): [[80.0, 10.0, 20.0], [30.0, 90.0, 10.0], [20.0, 40.0, 90.0]],
    ("sequential_lora", 1): [[70.0, 20.0, 10.0], [40.0, 80.0, 20.0], [40.0, 50.0, 90.0]],
    ("replay", 0): [[80.0, 10.0, 10.0], [70.0, 85.0, 20.0], [60.0, 80.0, 85.0]],
    ("replay", 1): [[90.0, 20.0, 30.0], [80.0, 75.0, 10.0], [70.0, 70.0, 95.0]],
}
BASELINE = [5.0, 10.0, 15.0]
# A general-capability probe (stream.probes) of every finished trial: untrained 50, after every task.
PROBE = {"vqa": {"baseline": 50.0, "after_task": [45.0, 40.0, 25.0], "retention": 0.5}}
# A second task order for the order-sensitivity tests, and sequential_lora's matrices trained in it (columns in
# this order, as a run writes them: each run's matrix is in its own task order).
ORDER_1 = ["shape", "count", "color"]
ORDER_1_MATRICES: dict[int, list[list[float]]] = {
    0: [[90.0, 10.0, 20.0], [20.0, 80.0, 10.0], [10.0, 30.0, 70.0]],
    1: [[80.0, 20.0, 10.0], [40.0, 90.0, 20.0], [30.0, 20.0, 90.0]],
}


@dataclass
class TrialSpec:
    """One trial to write: its method, seed, matrix, and whether it finished (an unfinished one has no
    final metrics and no ``accuracy_matrix.json``)."""

    method: str
    seed: int
    matrix: list[list[float]]
    stream: str = STREAM
    finished: bool = True
    artifact: bool = True  # False: finished but without accuracy_matrix.json (a broken trial)
    suffix: str = ""  # searched hyper-parameters in the trial key, e.g. "-lr0.003"
    label: str = ""  # the ``mcl.label`` tag (method and searched values), when set
    order: int | None = None  # the ``mcl.order`` tag (a sweep of several task orders); None: no tag
    tasks: list[str] | None = None  # the trial's task order (None: the sweep's tasks)

    @property
    def key(self) -> str:
        order = f"-o{self.order}" if self.order is not None else ""
        return f"{self.method}-{self.stream}{order}-s{self.seed}{self.suffix}"


def default_trials(methods: tuple[str, ...] = ("sequential_lora", "replay")) -> list[TrialSpec]:
    """The 2 methods x 2 seeds of :data:`MATRICES`."""
    return [TrialSpec(m, s, MATRICES[(m, s)]) for m in methods for s in (0, 1)]


def order_trials() -> list[TrialSpec]:
    """sequential_lora in 2 task orders x 2 seeds: order 0 is :data:`TASKS` (the matrices of
    :data:`MATRICES`), order 1 is :data:`ORDER_1`."""
    first = [TrialSpec("sequential_lora", s, MATRICES[("sequential_lora", s)], order=0) for s in (0, 1)]
    second = [TrialSpec("sequential_lora", s, ORDER_1_MATRICES[s], order=1, tasks=ORDER_1) for s in (0, 1)]
    return first + second


def _log_trial(tracker: Tracker, sweep_name: str, sweep_run: str, spec: TrialSpec, tasks: list[str]) -> str:
    tasks = spec.tasks or tasks
    tags = {
        "mcl.kind": "stream_run",
        "mcl.sweep": sweep_name,
        "mcl.trial": spec.key,
        "mcl.method": spec.method,
        "mcl.stream": spec.stream,
        "mcl.seed": str(spec.seed),
    }
    if spec.label:
        tags["mcl.label"] = spec.label
    if spec.order is not None:
        tags["mcl.order"] = str(spec.order)
        tags["mcl.task_order"] = ",".join(tasks)
    run = tracker.start_run(spec.key, parent_run_id=sweep_run, tags=tags)
    tracker.log_params(
        run,
        {"method.name": spec.method, "stream.name": spec.stream, "train.seed": spec.seed, "train.lr": 1e-3},
    )
    tracker.log_metric_series(run, "train_loss", [(s, 2.0 / (s + 1)) for s in range(6)])
    done = len(spec.matrix) if spec.finished else 1
    for t in range(done):
        tracker.log_metrics(run, {f"acc_{n}": spec.matrix[t][i] for i, n in enumerate(tasks)}, step=t)
        task_run = tracker.start_run(
            f"{t:02d}-{tasks[t]}", parent_run_id=run, tags={**tags, "mcl.kind": "task", "mcl.task": tasks[t]}
        )
        tracker.end_run(task_run)
    if not spec.finished:
        return run  # left RUNNING, like a trial still training (or one whose process died)
    metrics = cl_metrics(spec.matrix, BASELINE)
    tracker.log_metrics(run, {**metrics, "wall_time_s": 12.0, "cpu_hours": 0.01, "gpu_hours": 0.0})
    data = {
        **accuracy_matrix_json(tasks, spec.matrix),
        "baseline": BASELINE,
        "metrics": metrics,
        "probes": PROBE,
    }
    if spec.artifact:
        tracker.log_dict(run, data, "accuracy_matrix.json")
    tracker.end_run(run)
    return run


def build_sweep(
    tracking_uri: str,
    name: str,
    trials: list[TrialSpec],
    experiment: str = "mcl-sweeps",
    tasks: list[str] | None = None,
) -> str:
    """Write one sweep run with ``trials`` as its child runs into ``tracking_uri``; return its run id."""
    tasks = tasks or TASKS
    tracker = Tracker(tracking_uri, experiment)
    sweep_run = tracker.start_run(name, tags={"mcl.kind": "sweep", "mcl.sweep": name})
    tracker.log_params(
        sweep_run,
        {"name": name, "methods": sorted({t.method for t in trials}), "seeds": [0, 1], "storage": "x"},
    )
    for spec in trials:
        _log_trial(tracker, name, sweep_run, spec, tasks)
    finished = sum(t.finished for t in trials)
    tracker.log_metrics(
        sweep_run, {"trials_total": len(trials), "trials_finished": finished, "wall_time_s": 30.0}
    )
    tracker.log_dict(sweep_run, {"trials": [t.key for t in trials]}, "trials.json")
    tracker.end_run(sweep_run)
    time.sleep(0.01)  # sweeps are ordered by start time (ms): keep two sweeps apart
    return sweep_run
