"""Early stopping. On the real path, a local Ray instance runs a sweep of two trials under ASHA over tasks.

The trials differ only in the learning rate: 3e-3 learns each generated scenario, 1e-7 learns nothing. The
first trial runs alone (FIFO, one at a time), so it sets the rungs; at the first rung (after task 1) the
second trial's MAA is below the median of the recorded values and ASHA stops it. The stopped trial must be
closed in MLflow as KILLED (tagged ``mcl.early_stopped``), left out of the leaderboard, not resumed by a
re-run, and the sweep itself must end FINISHED.

The fast tests check the two halves of that on their own: how a stop reaching a run closes its MLflow runs,
and how the stop Tune raises in ``tune.report`` becomes that stop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_broken(tmp_path, failing_executor, generated_root, fail):
    """Run ``run_experiment`` with its training job replaced by ``fail(run_dir)``; returns the MLflow client
    and the run's progress record."""
    from mlflow import MlflowClient

    from mcl.config import load_config
    from mcl.run import RunDir, run_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        None,
        [f"stream.root={generated_root}", f"tracking.uri={uri}", f"tracking.output_dir={tmp_path}/runs"],
    )
    with pytest.raises(BaseException) as raised:
        run_experiment(cfg, log=lambda _m: None, executor=failing_executor(fail))
    run_dir = RunDir(next((tmp_path / "runs").iterdir()))
    return MlflowClient(uri), run_dir.read_progress().to_dict(), raised.value


def test_a_stopped_run_is_closed_killed_with_the_stop_tags(tmp_path, failing_executor, generated_root):
    from mcl.errors import RunStopped

    def stop(_run_dir):
        raise RunStopped("stopped by a test", tags={"mcl.early_stopped": "true"})

    client, progress, raised = _run_broken(tmp_path, failing_executor, generated_root, stop)
    assert isinstance(raised, RunStopped) and raised.code == 0
    for run_id in [progress["run_id"], *progress["task_runs"].values()]:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED", run_id
        assert run.data.tags["mcl.early_stopped"] == "true"


def test_a_failure_after_a_stop_leaves_the_run_killed(tmp_path, failing_executor, generated_root):
    """The sweep's driver closes a stopped trial KILLED; an error raised in the trial afterwards (its process
    being torn down) must not turn that into FAILED. Runs it did not close still end FAILED."""
    from mlflow import MlflowClient

    from mcl.run import RunDir

    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def driver_kills_then_fail(run_dir):
        progress = RunDir(run_dir).read_progress()
        MlflowClient(uri).set_terminated(progress.run_id, "KILLED")
        raise RuntimeError("worker died")

    client, progress, raised = _run_broken(tmp_path, failing_executor, generated_root, driver_kills_then_fail)
    assert isinstance(raised, RuntimeError)
    assert client.get_run(progress["run_id"]).info.status == "KILLED"
    assert [client.get_run(r).info.status for r in progress["task_runs"].values()] == ["FAILED"]


def test_tunes_stop_in_report_becomes_run_stopped(monkeypatch):
    """Tune stops a function trainable by raising ``SystemExit(0)`` from ``tune.report``; other exits pass."""
    from ray import tune

    from mcl.errors import RunStopped
    from mcl.sweep import EARLY_STOPPED_TAG
    from mcl.sweep.trainable import report_or_stop

    def exit_with(code):
        def report(_metrics, **_kwargs):
            raise SystemExit(code)

        return report

    monkeypatch.setattr(tune, "report", exit_with(0))
    with pytest.raises(RunStopped) as raised:
        report_or_stop({"maa": 0.0})
    assert raised.value.code == 0 and raised.value.tags == {EARLY_STOPPED_TAG: "true"}
    monkeypatch.setattr(tune, "report", exit_with(3))
    with pytest.raises(SystemExit) as raised:
        report_or_stop({"maa": 0.0})
    assert not isinstance(raised.value, RunStopped) and raised.value.code == 3


@pytest.mark.slow
def test_asha_stops_the_trial_that_does_not_learn(local_ray, tmp_path, generated_root):
    from mlflow import MlflowClient

    from mcl.run.rundir import RunDir
    from mcl.sweep import run_sweep, sweep_config_from_dict

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = sweep_config_from_dict(
        {
            "name": "asha",
            "base": str(REPO / "jobs" / "configs" / "default.yaml"),
            "overrides": {
                "stream.root": str(generated_root),
                # Two tasks are enough: with max_t 2, grace 1 and factor 2, ASHA's rungs are at tasks 1 and 2,
                # and the decision this test is about falls at the first.
                "stream.options": {"seed": 0, "tasks": ["aerial", "underwater"]},
                "train.epochs": 2,
                "eval.max_samples_per_task": 8,
                "eval.max_new_tokens": 2,
            },
            "methods": ["sequential_lora"],
            "streams": ["generated"],
            "seeds": [0],
            "search": {"train.lr": {"grid": [3e-3, 1e-7]}},
            "max_concurrent_trials": 1,
            "early_stopping": {"metric": "maa", "grace_tasks": 1, "reduction_factor": 2},
            "register_models": False,
            "storage": str(tmp_path / "sweeps"),
            "tracking": {"uri": uri, "experiment": "asha"},
        }
    )
    lines: list[str] = []
    summary = run_sweep(sweep, log=lines.append)
    assert [r["method"] for r in summary.results] == ["sequential_lora lr=0.003"], lines
    assert not summary.failed, lines
    trials = Path(summary.sweep_dir) / "trials"
    stopped = [p.name for p in trials.iterdir() if RunDir(p).read_trial_stopped() is not None]
    assert len(stopped) == 1 and "1e-07" in stopped[0], stopped
    assert RunDir(trials / stopped[0]).read_trial_stopped()["tasks_done"] == [0]

    client = MlflowClient(uri)
    assert client.get_run(summary.run_id).info.status == "FINISHED"
    progress = RunDir(trials / stopped[0]).read_progress()
    # The trial run is stopped mid-stream (KILLED); its task run finished before the stop.
    parent = client.get_run(progress.run_id)
    assert parent.info.status == "KILLED", parent.info.status
    assert parent.data.tags["mcl.early_stopped"] == "true"
    assert [client.get_run(r).info.status for r in progress.task_runs.values()] == ["FINISHED"]

    # A re-run neither resumes the stopped trial nor re-runs the finished one.
    again = run_sweep(sweep, log=lines.append)
    assert [r["trial"] for r in again.results] == [r["trial"] for r in summary.results]
    assert any("0 to run" in line for line in lines), lines[-5:]
