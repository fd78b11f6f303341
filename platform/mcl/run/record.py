"""MLflow recording of a run: a run per stream run, a nested run per task; params, curves, matrix, states.

:class:`RunRecorder` is the only code in the run core that talks to MLflow. It knows which runs it left open,
so that an interrupted run closes them FAILED (or KILLED when it was stopped).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcl.config import ExperimentConfig
from mcl.errors import RunStopped
from mcl.evaluation.metrics import heatmap_png
from mcl.methods_api import Phase
from mcl.run.memory_plan import MemoryPlan
from mcl.run.prepare import PreparedRun
from mcl.run.provenance import as_tags, ray_cluster, run_tags
from mcl.run.rundir import Progress, RunDir
from mcl.run.table import AccuracyTable
from mcl.tracking import Tracker, resolve_tracking_uri
from mcl.worker.job import TaskResult


def resource_hours(cfg: ExperimentConfig, wall_s: float) -> dict[str, float]:
    """CPU and GPU hours reserved by the Ray Train workers over ``wall_s`` seconds (what a cluster bills)."""
    workers = cfg.scaling.num_workers
    return {
        "cpu_hours": wall_s * workers * cfg.scaling.cpus_per_worker / 3600.0,
        "gpu_hours": wall_s * workers / 3600.0 if cfg.scaling.use_gpu else 0.0,
    }


class RunRecorder:
    """The MLflow side of one stream run."""

    def __init__(self, prep: PreparedRun, tags: dict[str, str] | None, log: Callable[[str], None]) -> None:
        cfg = prep.config
        self.prep, self.cfg, self.log = prep, cfg, log
        self.uri = resolve_tracking_uri(cfg.tracking.uri)
        self.tracker = Tracker(self.uri, cfg.tracking.experiment)
        self.tags = {
            "mcl.method": cfg.method.name,
            "mcl.stream": cfg.stream.name,
            "mcl.seed": str(cfg.train.seed),
            **(tags or {}),
            "mcl.kind": "stream_run",
        }
        self.run_id = ""
        self.open_runs: list[str] = []
        self.global_step = 0  # optimiser steps of the run's ``train`` phases so far (the parent's loss axis)

    # -- the stream run
    def open(self, progress: Progress, name: str, parent_run_id: str | None) -> str:
        """Start the stream run, or continue the one ``progress`` names (an earlier attempt's)."""
        names = self.prep.stream.task_names
        if progress.run_id:
            self.run_id = progress.run_id
            done = len(progress.tasks_done)
            # A run killed after its last task but before it was closed is finished (and closed) now.
            if done < len(names) or self.tracker.run_status(self.run_id) != "FINISHED":
                self.tracker.reopen_run(self.run_id)
                self.open_runs.append(self.run_id)
            self.log(
                f"resuming MLflow run {self.run_id} in {self.uri}: {done}/{len(names)} tasks already done"
            )
        else:
            self.run_id = self.tracker.start_run(name, parent_run_id=parent_run_id, tags=self.tags)
            self.open_runs.append(self.run_id)
            self.log(f"MLflow run {self.run_id} in {self.uri} (experiment {self.cfg.tracking.experiment!r})")
        return self.run_id

    def log_setup(self, run_dir: RunDir, plan: MemoryPlan | None = None) -> None:
        """Params, config, data report and memory plan (``plan.*`` params, ``memory_plan.json``) of a new run."""
        cfg, prep = self.cfg, self.prep
        resolved = {
            "resolved.model_path": prep.model_path,
            "resolved.stream_root": str(Path(cfg.stream.root).resolve()),
            "resolved.tasks": prep.stream.task_names,
        }
        self.tracker.log_params(self.run_id, {**cfg.flat(), **resolved})
        self.tracker.log_artifact(self.run_id, run_dir.config_file)
        self.tracker.set_tags(self.run_id, run_tags(cfg, prep.manifest_sha256))
        if prep.data_report is not None:
            self.tracker.log_metrics(self.run_id, prep.data_report.skipped_metrics())
            self.tracker.log_dict(self.run_id, prep.data_report.to_dict(), "data_report.json")
        if plan is not None:
            self.tracker.log_params(self.run_id, plan.flat())
            self.tracker.log_dict(self.run_id, plan.flat(), "memory_plan.json")

    def finish(self, table: AccuracyTable, run_dir: RunDir, final_state: str | None, t_start: float) -> None:
        """Matrix, metrics, heatmap and final state on the stream run, which is closed FINISHED with its wall
        time since ``t_start`` (``time.perf_counter()``); nothing if this attempt found the run closed."""
        if not self.open_runs:
            return
        tracker, run_id = self.tracker, self.run_id
        tracker.log_metrics(run_id, table.metrics())
        if table.probes:  # final / untrained accuracy per probe
            tracker.log_metrics(run_id, {f"retention_{n}": v for n, v in table.retention().items()})
        run_dir.matrix_json.write_text(json.dumps(table.to_json(), indent=1))
        tracker.log_artifact(run_id, run_dir.matrix_json)
        if self.cfg.tracking.heatmap:
            png = heatmap_png(table.task_names, table.matrix, run_dir.matrix_png, title="accuracy (%)")
            tracker.log_artifact(run_id, png)
        if final_state:
            tracker.log_artifact(run_id, final_state, "final_state")
        wall_s = time.perf_counter() - t_start
        tracker.log_metrics(run_id, {"wall_time_s": wall_s, **resource_hours(self.cfg, wall_s)})
        tracker.set_tags(run_id, as_tags(ray_cluster()))  # Ray is up once the first phase was trained
        tracker.end_run(run_id)
        self.open_runs.remove(run_id)

    # -- tasks
    def start_task(self, t: int, stale_run: str | None) -> str:
        """A nested run for task ``t`` (replacing ``stale_run``, an interrupted attempt's). The caller records
        its id at once, before anything else can fail, so that a resumed run replaces it."""
        if stale_run:
            self.tracker.delete_run(stale_run)
        name = self.prep.stream.task_names[t]
        task_run = self.tracker.start_run(
            f"{t:02d}-{name}",
            parent_run_id=self.run_id,
            tags={**self.tags, "mcl.kind": "task", "mcl.task": name},
        )
        self.open_runs.append(task_run)
        return task_run

    def log_task_params(self, task_run: str, t: int, phases: list[Phase]) -> None:
        name = self.prep.stream.task_names[t]
        self.tracker.log_params(task_run, {"task_index": t, "task": name, "phases": [p.name for p in phases]})

    def log_phase(self, task_run: str, result: TaskResult, phase: Phase) -> None:
        """A phase's loss curves (``train_loss`` for the ``train`` phase, ``<phase>_loss`` otherwise) and
        timings."""
        tracker = self.tracker
        key = "train_loss" if phase.name == "train" else f"{phase.name}_loss"
        losses = [(int(e["step"]), e["loss"]) for e in result.train_log]
        tracker.log_metric_series(task_run, key, losses)
        if phase.name == "train":
            tracker.log_metric_series(self.run_id, key, [(self.global_step + s, v) for s, v in losses])
        extra = [(int(e["step"]), e["extra_loss"]) for e in result.train_log if "extra_loss" in e]
        if extra:
            tracker.log_metric_series(task_run, key.replace("_loss", "_extra_loss"), extra)
        prefix = "" if phase.name == "train" else f"{phase.name}_"
        tracker.log_metrics(task_run, {prefix + k: v for k, v in result.timing.items()})
        if result.resumed_at_step:
            tracker.log_metrics(task_run, {prefix + "resumed_at_step": result.resumed_at_step})
        self.count_steps(result, phase)

    def count_steps(self, result: TaskResult, phase: Phase) -> None:
        if phase.name == "train":
            self.global_step += len(result.train_log)

    def finish_task(
        self, task_run: str, result: TaskResult, wall_s: float, memory: dict[str, float], state: Path
    ) -> None:
        """Accuracies, method metrics, memory, state and predictions of a task; its run is closed."""
        tracker, names = self.tracker, self.prep.stream.task_names
        t = result.task_index
        acc = {f"acc_{n}": result.accuracy[n] for n in names if n in result.accuracy}  # eval.tasks
        probes = {f"probe_{n}": v for n, v in result.probe_accuracy.items()}
        tracker.log_metrics(
            task_run, {**acc, **probes, "acc_current": result.accuracy[names[t]], **result.method_metrics}
        )
        tracker.log_metrics(self.run_id, {**acc, **probes, **result.method_metrics}, step=t)
        tracker.log_metrics(task_run, {"wall_time_s": wall_s, **{f"mem_{k}": v for k, v in memory.items()}})
        if result.baseline_accuracy is not None:
            tracker.log_metrics(
                self.run_id, {f"baseline_acc_{n}": result.baseline_accuracy[n] for n in names}
            )
            baseline_probes = result.baseline_probe_accuracy or {}
            if baseline_probes:
                tracker.log_metrics(
                    self.run_id, {f"baseline_probe_{n}": v for n, v in baseline_probes.items()}
                )
        if state.exists():
            tracker.log_artifact(task_run, state, "state")
        with tempfile.TemporaryDirectory() as tmp:
            preds = Path(tmp) / "predictions.jsonl"
            preds.write_text("".join(json.dumps(r) + "\n" for r in result.predictions))
            tracker.log_artifact(task_run, preds)
        tracker.log_metrics(task_run, resource_hours(self.cfg, wall_s))
        tracker.end_run(task_run)
        self.open_runs.remove(task_run)

    # -- interruption
    def close_interrupted(self, exc: BaseException) -> None:
        """Close the runs left open when ``exc`` interrupted the run: KILLED (with the stop's tags) if ``exc``
        is a stop, i.e. a clean exit (``SystemExit`` with code 0 or None, such as :class:`RunStopped`);
        FAILED otherwise. A run already KILLED (a sweep's driver closes those of a trial its scheduler
        stopped) is never made FAILED."""
        stopped = isinstance(exc, SystemExit) and exc.code in (0, None)
        status = "KILLED" if stopped else "FAILED"
        tags: dict[str, Any] = exc.tags if isinstance(exc, RunStopped) else {}
        if stopped:
            reason = exc.reason if isinstance(exc, RunStopped) else "clean exit"
            self.log(f"run stopped ({reason}): closing its open MLflow runs KILLED")
        for rid in reversed(self.open_runs):
            try:
                for key, value in tags.items():
                    self.tracker.client.set_tag(rid, key, value)
                if not stopped and self.tracker.run_status(rid) == "KILLED":
                    continue
                self.tracker.end_run(rid, status)
            except Exception as err:  # never hide the original error
                self.log(f"could not mark MLflow run {rid} {status}: {err}")
