"""MLflow tracking: one run per stream run, a nested run per task.

All calls go through an explicit :class:`mlflow.MlflowClient` and run ids (no fluent, process-global
active run). The store follows ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in the
working directory, always as an absolute URI (Ray trials change directory).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def resolve_tracking_uri(configured: str = "", cwd: str | Path | None = None) -> str:
    """The tracking URI to use: the config's, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # sqlite:///relative.db -> absolute, so every process sees the same file.
            uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
        return uri
    base = Path(cwd) if cwd else Path.cwd()
    return "sqlite:///" + str((base / "mlflow.db").resolve())


# MLflow 3's UI opens an experiment on its GenAI pages (traces) unless told it holds training runs: the experiment
# kind tag (read by the experiment header's kind selector) and the ``workflowType=machine_learning`` URL parameter
# (which MLflow 3.17's UI reads instead of the tag to pick the view, remembered in the browser afterwards).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A saved runs-table view (MLflow's "Views" menu; opened by ``viewStateShareKey=<id>`` in the URL): the key
# metrics first, then what tells the runs apart.
RUNS_VIEW_ID = "mcl-cl-metrics"
RUNS_VIEW_TAG = "mlflow.sharedViewState." + RUNS_VIEW_ID
KEY_METRICS = ("mfn", "bwt", "maa", "mft", "fwt", "forgetting")
KEY_PARAMS = ("method.name", "stream.name", "train.seed")


def runs_view_state() -> dict[str, Any]:
    """The saved view's state: columns (metrics ``MFN, BWT, MAA`` first), runs sorted by MFN."""
    columns = [f"metrics.`{m}`" for m in KEY_METRICS] + [f"params.`{p}`" for p in KEY_PARAMS]
    return {"selectedColumns": columns, "columnOrder": columns, "orderByKey": columns[0], "orderByAsc": False}


def experiment_tags(now_ms: int) -> dict[str, str]:
    """The tags mcl sets on its experiments: the training-runs kind and the saved key-metrics view."""
    view = {
        "name": "mcl: continual-learning metrics",
        "createdAt": now_ms,
        "updatedAt": now_ms,
        "state": json.dumps(runs_view_state(), separators=(",", ":")),
    }
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, RUNS_VIEW_TAG: json.dumps(view, separators=(",", ":"))}


def experiment_ui_path(experiment_id: str) -> str:
    """The UI route of an experiment's runs table, in the training-runs view, with the key-metrics view open."""
    return (
        f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_ID}"
    )


def experiment_ui_url(uri: str, experiment_id: str) -> str:
    """Where to see an experiment: the URL on a tracking server, else the command and the local URL."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{experiment_ui_path(experiment_id)}"
    return f"{ui_command(uri)}, then open http://127.0.0.1:5000/{experiment_ui_path(experiment_id)}"


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on this store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --port 5000"


class Tracker:
    """Creates and fills the MLflow runs of one stream run."""

    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):
                db = Path(uri[len("sqlite:///") :])
                artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location
            )
            exp_tags: dict[str, str] = {}
        else:
            self.experiment_id = exp.experiment_id
            exp_tags = exp.tags
        self._tag_experiment(exp_tags)

    def _tag_experiment(self, existing: dict[str, str]) -> None:
        """Set :func:`experiment_tags` that are missing (a view the user edited in the UI is kept)."""
        import time

        for key, value in experiment_tags(int(time.time() * 1000)).items():
            if key not in existing:
                self.client.set_experiment_tag(self.experiment_id, key, value)

    def start_run(
        self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None
    ) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        self._log_metric_points(run_id, [(k, step or 0, v) for k, v in metrics.items()])

    def log_metric_series(self, run_id: str, key: str, values: list[tuple[int, float]]) -> None:
        """One metric over steps, e.g. ``train_loss`` per optimiser step."""
        self._log_metric_points(run_id, [(key, s, v) for s, v in values])

    def _log_metric_points(self, run_id: str, points: list[tuple[str, int, Any]]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(s)) for k, s, v in points if _finite(v)]
        for start in range(0, len(items), 500):  # MLflow's per-request limit is 1000 metrics
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(run_id, str(p), artifact_path=artifact_path)
        else:
            self.client.log_artifact(run_id, str(p), artifact_path=artifact_path)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in sorted(tags.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, tags=items[start : start + 100])

    def log_dict(self, run_id: str, data: Any, name: str) -> None:
        self.client.log_text(run_id, json.dumps(data, indent=1), name)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen_run(self, run_id: str) -> None:
        """Mark a run RUNNING again (a resumed stream run continues in its original MLflow run)."""
        self.client.update_run(run_id, status="RUNNING")

    def delete_run(self, run_id: str) -> None:
        """Delete a run left behind by an interrupted attempt (it moves to MLflow's deleted view)."""
        self.client.delete_run(run_id)

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return text[:6000]
