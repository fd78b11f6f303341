"""Tracking URI resolution and run bookkeeping on a real MLflow sqlite store."""

from __future__ import annotations

import pytest

from mcl.tracking import Tracker, resolve_tracking_uri, ui_command


def test_uri_follows_config_then_env_then_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("", cwd=tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert resolve_tracking_uri("") == "http://127.0.0.1:5001"
    assert resolve_tracking_uri("http://head:5000") == "http://head:5000"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path}/rel.db"


def test_ui_command():
    assert (
        ui_command("sqlite:////x/mlflow.db")
        == "mlflow ui --backend-store-uri sqlite:////x/mlflow.db --port 5000"
    )


def test_failed_run_is_marked_failed_not_finished(tmp_path, failing_executor, generated_root):
    """A failure mid-run (here: the task's training job raising) leaves the parent and task runs FAILED."""
    from mlflow import MlflowClient

    from mcl.config import load_config
    from mcl.run import run_experiment

    def broken_fit(_run_dir):
        raise RuntimeError("worker died")

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        None, [f"stream.root={generated_root}", f"tracking.uri={uri}", f"tracking.output_dir={tmp_path}/runs"]
    )
    with pytest.raises(RuntimeError, match="worker died"):
        run_experiment(cfg, log=lambda _m: None, executor=failing_executor(broken_fit))
    client = MlflowClient(uri)
    runs = client.search_runs([Tracker(uri, cfg.tracking.experiment).experiment_id])
    assert len(runs) == 2
    assert {r.info.status for r in runs} == {"FAILED"}
