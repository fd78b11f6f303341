"""The Tune function trainable: one trial = one stream run, reporting to Tune after every task."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcl.config import config_from_dict
from mcl.run.rundir import RunDir
from mcl.sweep.trials import TrialSpec

EARLY_STOPPED_TAG = "mcl.early_stopped"  # on the KILLED MLflow runs of a trial the scheduler stopped


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one trial = one stream run, reporting after every task.

    ``config`` is ``{"trial": asdict(TrialSpec), "sweep": {"name", "run_id", "register_models"}}``. When the
    stream is done, the trial registers its final state (if asked) and records its summary in its run folder
    (:meth:`RunDir.write_trial_done`), which tells a re-run of the sweep that the trial is finished.
    """
    import ray
    from ray import tune

    from mcl.run import run_experiment

    trial = TrialSpec(**config["trial"])
    sweep = config["sweep"]
    cfg = config_from_dict(trial.config)
    run_dir = RunDir(Path(cfg.tracking.output_dir) / trial.key)
    started = time.perf_counter()

    def on_task(t: int, names: list[str], matrix: list[list[float]]) -> None:
        if t + 1 == len(names):
            # The last task is reported once the trial's results are saved (below): an early-stopping
            # scheduler stops trials at max_t, and must not stop one before it has recorded them.
            return
        report_or_stop({**task_metrics(t, names, matrix), "trial_key": trial.key})

    def log(message: str) -> None:
        print(f"[{trial.key}] {message}", flush=True)

    node = ray.get_runtime_context().get_node_id()
    tags = {
        "mcl.sweep": sweep["name"],
        "mcl.trial": trial.key,
        "mcl.node_id": node,
        "mcl.label": trial.label,
        "mcl.order": str(trial.order),
    }
    if trial.task_order:  # an order the sweep set; else the stream's own (the run logs resolved.tasks)
        tags["mcl.task_order"] = ",".join(trial.task_order)
    summary = run_experiment(
        cfg, log=log, resume=True, parent_run_id=sweep["run_id"], tags=tags, on_task=on_task
    )
    versions: dict[str, str] = {}
    if sweep["register_models"] and summary.state_dirs:
        versions = _register_final_state(trial, sweep["name"], summary, run_dir, log)
    done = {
        "run_id": summary.run_id,
        "metrics": summary.metrics,
        "tasks": summary.task_names,
        "matrix": summary.matrix,
        "baseline": summary.baseline,
        "versions": versions,
        "final_state": summary.state_dirs[-1] if summary.state_dirs else None,
        "node_id": node,
        "wall_s": time.perf_counter() - started,
    }
    run_dir.write_trial_done(done)
    tune.report(
        {"done": True, "tasks_done": len(summary.task_names), "trial_key": trial.key, **summary.metrics}
    )


def task_metrics(t: int, names: list[str], matrix: list[list[float]]) -> dict[str, Any]:
    """What a trial reports to Tune after task ``t`` (``matrix``: the accuracy matrix's rows so far)."""
    row = matrix[-1]
    seen = row[: t + 1]
    maa = sum(sum(r[: i + 1]) / (i + 1) for i, r in enumerate(matrix)) / len(matrix)
    return {
        "tasks_done": t + 1,
        "tasks_total": len(names),
        "task": names[t],
        "acc_current": row[t],
        "acc_seen": sum(seen) / len(seen),
        "maa": maa,
    }


def report_or_stop(metrics: dict[str, Any]) -> None:
    """``tune.report(metrics)``; raises :class:`mcl.errors.RunStopped` if the scheduler stopped the trial.

    Ray Tune stops a function trainable through its actor's ``stop()``: the Tune session sets a stop event and
    wakes the trial's thread, which waits inside ``tune.report`` (results are reported synchronously), and
    ``tune.report`` raises ``SystemExit(0)``, which Tune takes as the thread's clean end. ``RunStopped`` is
    such an exit too, and tells :func:`mcl.run.run_experiment` to close the trial's runs KILLED, not FAILED.
    """
    from ray import tune

    from mcl.errors import RunStopped

    try:
        tune.report(metrics)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
        raise RunStopped("stopped early by the Tune scheduler", tags={EARLY_STOPPED_TAG: "true"}) from exc


def _register_final_state(
    trial: TrialSpec, sweep_name: str, summary: Any, run_dir: RunDir, log: Callable[[str], None]
) -> dict[str, str]:
    """Register the trial's state after its last task in the MLflow model registry; ``{name: version}``."""
    from mlflow import MlflowClient

    from mcl.registry import register_state, registered_name

    client = MlflowClient(tracking_uri=summary.tracking_uri, registry_uri=summary.tracking_uri)
    name = registered_name(trial.stream, trial.method)
    version = register_state(
        client,
        client.get_run(summary.run_id).info.experiment_id,
        summary.run_id,
        name,
        summary.state_dirs[-1],
        run_dir.config_file,
        {
            "method": trial.method,
            "stream": trial.stream,
            "task": summary.task_names[-1],
            "sweep": sweep_name,
            "trial": trial.key,
            "seed": str(trial.seed),
        },
    )
    log(f"registered {name} version {version}")
    return {name: version}
