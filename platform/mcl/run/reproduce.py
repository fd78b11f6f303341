"""Re-run a tracked run's exact config and say whether its accuracy matrix comes out the same, digit for digit.

The config is the run's ``config.yaml`` artifact (what :class:`~mcl.run.record.RunRecorder` logs), its matrix
the ``accuracy_matrix.json`` artifact; the re-run is a new MLflow run in the same store, tagged
``mcl.reproduces=<run id>``, trained by the same kind of executor (``mcl.provenance.executor``). Only where the
run is recorded and run from may change (:data:`ALLOWED_OVERRIDES`). When the matrices differ, the provenance
tags that differ (versions, hardware, code, data) are listed: they say where to look.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcl.config import ExperimentConfig, apply_overrides, config_from_dict, load_config, parse_override
from mcl.errors import ConfigError, UnknownNameError
from mcl.run.driver import RunSummary, run_experiment
from mcl.run.executors import ExecutorFactory
from mcl.run.executors.local import LocalExecutor
from mcl.run.executors.ray_train import RayTrainExecutor
from mcl.run.prepare import RESUMABLE_CHANGES
from mcl.run.provenance import PLACE_FIELDS, PREFIX, config_sha256, executor_tag
from mcl.tracking import resolve_tracking_uri

ALLOWED_OVERRIDES = tuple(sorted(set(PLACE_FIELDS) | set(RESUMABLE_CHANGES)))
REPRODUCES_TAG = "mcl.reproduces"
# Tags that differ between any two runs, whatever they ran with.
_UNCOMPARED = {PREFIX + "host", PREFIX + "ray_node_resources"}


@dataclass
class TrackedRun:
    """What MLflow holds of a finished stream run."""

    run_id: str
    name: str
    config: ExperimentConfig
    tasks: list[str]
    matrix: list[list[Any]]
    baseline: list[Any] | None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Reproduction:
    original: TrackedRun
    rerun: TrackedRun
    summary: RunSummary
    differences: list[str]  # matrix cells (and baseline entries) that differ
    provenance_changes: list[str]  # provenance tags that differ

    @property
    def matches(self) -> bool:
        return not self.differences


def load_tracked_run(run_id: str, tracking_uri: str) -> TrackedRun:
    """The run's config and accuracy matrix from its artifacts; UnknownNameError if the run or its artifacts
    are not in the store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(client.download_artifacts(run_id, "config.yaml", tmp))
            matrix = json.loads(
                Path(client.download_artifacts(run_id, "accuracy_matrix.json", tmp)).read_text()
            )
    except (MlflowException, OSError) as exc:
        raise UnknownNameError(
            f"--from-run: run {run_id!r} in {tracking_uri} has no finished stream run's config.yaml and "
            f"accuracy_matrix.json ({str(exc).splitlines()[0]})"
        ) from None
    return TrackedRun(
        run_id,
        run.info.run_name or run_id,
        cfg,
        matrix["tasks"],
        matrix["matrix"],
        matrix.get("baseline"),
        dict(run.data.tags),
    )


def reproduction_config(original: TrackedRun, tracking_uri: str, overrides: list[str]) -> ExperimentConfig:
    """The original config, recorded in ``tracking_uri`` under a new run name, with ``overrides`` of where it
    runs only (ConfigError naming any other field)."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key not in ALLOWED_OVERRIDES:
            raise ConfigError(
                f"{key}: --from-run re-runs the tracked config as it was; only where it runs and is recorded may "
                f"change ({', '.join(ALLOWED_OVERRIDES)})"
            )
    # Seconds alone collide when two re-runs of one run start within a second (each run name holds one run).
    name = f"{original.name}-repro-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    data = apply_overrides(original.config.to_dict(), [*overrides, f"tracking.run_name={name}"])
    data["tracking"]["uri"] = tracking_uri
    return config_from_dict(data)


def executor_for(tags: dict[str, str]) -> ExecutorFactory:
    """The executor the original run was trained by: in-process when it was, else one Ray Train job."""
    local = executor_tag(LocalExecutor)[PREFIX + "executor"]
    if tags.get(PREFIX + "executor") == local:
        return lambda prep, run_dir: LocalExecutor(prep, run_dir, log=lambda _m: None)
    return RayTrainExecutor


def compare_runs(original: TrackedRun, rerun: TrackedRun) -> list[str]:
    """Every cell of the matrix (and of the untrained baseline) that is not the same number in both runs."""
    if original.tasks != rerun.tasks:
        return [f"tasks: {original.tasks} -> {rerun.tasks}"]
    out = []
    for t, (row_a, row_b) in enumerate(zip(original.matrix, rerun.matrix, strict=False)):
        for i, (a, b) in enumerate(zip(row_a, row_b, strict=True)):
            if a != b:
                out.append(f"after {original.tasks[t]}, on {original.tasks[i]}: {a} -> {b}")
    if len(original.matrix) != len(rerun.matrix):
        out.append(f"rows: {len(original.matrix)} -> {len(rerun.matrix)}")
    if original.baseline != rerun.baseline:
        out.append(f"untrained baseline: {original.baseline} -> {rerun.baseline}")
    return out


def provenance_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    keys = sorted(k for k in set(before) | set(after) if k.startswith(PREFIX) and k not in _UNCOMPARED)
    return [
        f"{k[len(PREFIX) :]}: {before.get(k)} -> {after.get(k)}"
        for k in keys
        if before.get(k) != after.get(k)
    ]


def reproduce_run(
    run_id: str, overrides: list[str] | None = None, log: Callable[[str], None] = print
) -> Reproduction:
    """Re-run tracked run ``run_id`` (found in ``tracking.uri`` of ``overrides``, else ``$MLFLOW_TRACKING_URI``,
    else ``./mlflow.db``) with its exact config, and compare the two accuracy matrices."""
    overrides = list(overrides or [])
    uri_override = [o for o in overrides if o.startswith("tracking.uri=")]
    uri = resolve_tracking_uri(uri_override[-1].split("=", 1)[1] if uri_override else "")
    original = load_tracked_run(run_id, uri)
    cfg = reproduction_config(original, uri, overrides)
    saved_hash = original.tags.get(PREFIX + "config_sha256")
    if saved_hash and saved_hash != config_sha256(original.config):
        raise ConfigError(
            f"--from-run: the config.yaml of run {run_id} does not hash to its recorded config_sha256"
        )
    log(f"re-running MLflow run {run_id} ({original.name}) as {cfg.tracking.run_name}")
    summary = run_experiment(
        cfg, log=log, tags={REPRODUCES_TAG: run_id}, executor=executor_for(original.tags)
    )
    rerun = load_tracked_run(summary.run_id, uri)
    return Reproduction(
        original, rerun, summary, compare_runs(original, rerun), provenance_changes(original.tags, rerun.tags)
    )


def format_reproduction(rep: Reproduction) -> str:
    """Both matrices, the verdict, and what differs."""
    from mcl.run.table import format_matrix

    lines = [
        f"original run {rep.original.run_id} ({rep.original.name}):",
        format_matrix(rep.original.tasks, rep.original.matrix),
        f"re-run {rep.rerun.run_id} ({rep.rerun.name}):",
        format_matrix(rep.rerun.tasks, rep.rerun.matrix),
    ]
    if rep.matches:
        lines.append("verdict: REPRODUCED, the accuracy matrix matches digit for digit")
    else:
        lines.append(f"verdict: NOT REPRODUCED, {len(rep.differences)} cells differ:")
        lines += [f"  {d}" for d in rep.differences]
    if rep.provenance_changes:
        lines.append("provenance that differs from the original run:")
        lines += [f"  {c}" for c in rep.provenance_changes]
    return "\n".join(lines)
