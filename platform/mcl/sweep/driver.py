"""Run (or resume) a sweep from its driver: the sweep's MLflow run, one Tune experiment per group of pending
trials, and the leaderboard of the finished ones.

The sweep folder (``<storage>/<name>``) holds the sweep's own state (:data:`SWEEP_STATE_FILE`: its MLflow run
and config, for resuming), the trials' run folders under ``trials/`` (read only through
:class:`~mcl.run.rundir.RunDir`), Tune's storage under ``tune/`` and the leaderboard files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from mcl.run.provenance import sweep_provenance
from mcl.run.rundir import RunDir
from mcl.sweep.config import SweepConfig, check_resumable
from mcl.sweep.progress import progress_callback
from mcl.sweep.trainable import EARLY_STOPPED_TAG, run_trial
from mcl.sweep.trials import TrialSpec, expand_trials, max_concurrent, trial_record, trial_resources

SWEEP_STATE_FILE = "sweep_state.json"
# A trial's own actor only waits on its Train jobs; Tune needs a non-empty request, so a sliver of a CPU.
TRIAL_ACTOR_CPU = 0.01

Log = Callable[[str], None]


@dataclass
class SweepSummary:
    """What a finished sweep produced."""

    run_id: str
    tracking_uri: str
    sweep_dir: str
    results: list[dict[str, Any]]  # one record per finished trial (leaderboard input)
    failed: list[str]
    leaderboard_md: str
    wall_s: float


def run_sweep(sweep: SweepConfig, log: Log = print) -> SweepSummary:
    """Run (or resume) a sweep; returns the leaderboard records of its finished trials.

    Finished trials are not launched again, trials the scheduler stopped are not resumed, an interrupted
    trial continues from its last finished task, and the sweep continues in its original MLflow run.
    """
    from mcl.tracking import Tracker, resolve_tracking_uri

    t_start = time.perf_counter()
    trials = expand_trials(sweep)
    sweep_dir = sweep.folder()
    trials_dir = sweep_dir / "trials"
    uri = resolve_tracking_uri(sweep.tracking.uri)
    for t in trials:  # every trial logs to the same store and writes under the sweep's folder
        t.config["tracking"]["uri"] = uri
        t.config["tracking"]["output_dir"] = str(trials_dir)
        # Tune runs each trial in its own working directory: relative data paths are resolved here.
        t.config["stream"]["root"] = str(Path(t.config["stream"]["root"]).resolve())
        if t.config["stream"].get("manifest"):
            t.config["stream"]["manifest"] = str(Path(t.config["stream"]["manifest"]).resolve())
    _build_streams(trials, log)
    tracker = Tracker(uri, sweep.tracking.experiment)  # creates the store and experiment once, here
    run_id = _open_sweep_run(sweep, sweep_dir, tracker, uri, log)
    tracker.log_dict(run_id, [asdict(t) for t in trials], "trials.json")

    finished = _finished(trials, trials_dir)
    stopped = _stopped(trials, trials_dir)
    pending = [t for t in trials if t.key not in finished and t.key not in stopped]
    log(
        f"sweep {sweep.name!r}: {len(trials)} trials ({len(finished)} already finished, {len(pending)} to run)"
        + "".join(f"\n  {t.key}" for t in pending)
    )
    try:
        if pending:
            _run_pending(sweep, pending, run_id, sweep_dir, log)
        finished.update(_finished([t for t in trials if t.key not in finished], trials_dir))
        stopped = _stopped(trials, trials_dir)
        records = [trial_record(t, finished[t.key]) for t in trials if t.key in finished]
        md = _write_leaderboard(tracker, run_id, records, sweep_dir)
        tracker.log_metrics(
            run_id,
            {
                "trials_total": len(trials),
                "trials_finished": len(finished),
                "wall_time_s": time.perf_counter() - t_start,
            },
        )
        status = "FINISHED" if len(finished) + len(stopped) == len(trials) else "FAILED"
        tracker.end_run(run_id, status)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    missing = [t.key for t in trials if t.key not in finished and t.key not in stopped]
    return SweepSummary(run_id, uri, str(sweep_dir), records, missing, md, time.perf_counter() - t_start)


def _open_sweep_run(sweep: SweepConfig, sweep_dir: Path, tracker: Any, uri: str, log: Log) -> str:
    """The sweep's MLflow run: reopened when the sweep folder holds this sweep already, else started."""
    state_path = sweep_dir / SWEEP_STATE_FILE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        check_resumable(sweep, state["config"])
        run_id = state["run_id"]
        tracker.reopen_run(run_id)
        log(f"resuming sweep {sweep.name!r} (MLflow run {run_id} in {uri})")
        return run_id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    run_id = tracker.start_run(sweep.name, tags={"mcl.kind": "sweep", "mcl.sweep": sweep.name})
    state_path.write_text(json.dumps({"run_id": run_id, "config": sweep.flat()}, indent=1))
    tracker.log_params(run_id, sweep.flat())
    tracker.set_tags(run_id, sweep_provenance(sweep.flat()))
    tracker.log_dict(run_id, asdict(sweep), "sweep.json")
    tracker.client.log_text(run_id, yaml.safe_dump(asdict(sweep), sort_keys=False), "sweep.yaml")
    log(f"sweep {sweep.name!r}: MLflow run {run_id} in {uri} (experiment {sweep.tracking.experiment!r})")
    return run_id


def _finished(trials: list[TrialSpec], trials_dir: Path) -> dict[str, dict[str, Any]]:
    """Trial key -> what the trial recorded when it finished, for the finished ones among ``trials``."""
    done = {t.key: RunDir(trials_dir / t.key).read_trial_done() for t in trials}
    return {key: record for key, record in done.items() if record is not None}


def _stopped(trials: list[TrialSpec], trials_dir: Path) -> set[str]:
    """Keys of the trials the scheduler stopped early (a re-run does not resume them)."""
    return {t.key for t in trials if RunDir(trials_dir / t.key).read_trial_stopped() is not None}


def _build_streams(trials: list[TrialSpec], log: Log) -> None:
    """Read (and for generated streams, generate) every stream once in the driver, before any trial starts:
    problems with the data show up here, and concurrent trials never race to generate the same folder."""
    from mcl.streams import build_stream

    seen: set[str] = set()
    for t in trials:
        stream = t.config["stream"]
        key = json.dumps({k: v for k, v in stream.items() if k != "task_order"}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            built = build_stream(stream["name"], stream["root"], stream["options"])
            log(f"stream {stream['name']!r} at {stream['root']}: tasks {', '.join(built.task_names)}")


def _run_pending(
    sweep: SweepConfig, pending: list[TrialSpec], run_id: str, sweep_dir: Path, log: Log
) -> None:
    """Run the pending trials: one Tune experiment, or one per stream and task order under an early-stopping
    scheduler."""
    import ray

    if not ray.is_initialized():
        _init_ray(sweep, pending)
    cluster = ray.cluster_resources()
    concurrency = sweep.max_concurrent_trials or max_concurrent(pending, cluster)
    log(
        f"sweep {sweep.name!r}: up to {concurrency} trials at once on {cluster.get('CPU', 0):g} CPUs, "
        f"{cluster.get('GPU', 0):g} GPUs (each trial: {trial_resources(pending[0])})"
    )
    groups = [pending]
    if sweep.early_stopping:  # never compare trials of different streams, or of different task orders
        kinds = dict.fromkeys((t.stream, t.order) for t in pending)
        groups = [[t for t in pending if (t.stream, t.order) == kind] for kind in kinds]
    attempt = time.strftime("%Y%m%d-%H%M%S")
    for i, group in enumerate(groups):
        _run_tune(sweep, group, run_id, concurrency, sweep_dir, f"tune-{attempt}-{i}", log)


def _init_ray(sweep: SweepConfig, pending: list[TrialSpec]) -> None:
    """Connect to the sweep's cluster, or start a local instance sized for the trials that fit the machine."""
    from mcl.run.cluster import init_ray

    address = sweep.ray_address or os.environ.get("RAY_ADDRESS", "")
    use_gpu = any(t.config["scaling"]["use_gpu"] for t in pending)
    if address:
        init_ray(address, 0, use_gpu)
        return
    # A local instance: as many trials as the machine's cores hold at once.
    workers = max(trial_resources(t)["CPU"] - 1 for t in pending)
    fit = max(1, (os.cpu_count() or 1) // workers)
    n = sweep.max_concurrent_trials or fit
    init_ray("", n * (workers + 1) + 1, use_gpu)


def _run_tune(
    sweep: SweepConfig,
    trials: list[TrialSpec],
    run_id: str,
    concurrency: int,
    sweep_dir: Path,
    name: str,
    log: Log,
) -> None:
    """One Tune experiment over ``trials``; logs the trials that errored and closes those stopped early."""
    from ray import tune

    tasks = {t.key: len(_task_names(t)) for t in trials}
    shared = {"name": sweep.name, "run_id": run_id, "register_models": sweep.register_models}
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"CPU": TRIAL_ACTOR_CPU}),
        param_space={"trial": tune.grid_search([asdict(t) for t in trials]), "sweep": shared},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency,
            scheduler=_scheduler(sweep, max(tasks.values())),
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(sweep_dir / "tune"),
            callbacks=[progress_callback(len(trials), tasks)],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    for result in _fit_from(sweep_dir, tuner):
        key = result.config["trial"]["key"]
        run_dir = RunDir(sweep_dir / "trials" / key)
        if result.error is not None:
            log(f"[sweep] trial {key} failed: {type(result.error).__name__}: {str(result.error)[-2000:]}")
        elif run_dir.read_trial_done() is None:  # stopped early by the scheduler
            _close_stopped_trial(run_dir, trials[0].config["tracking"]["uri"], log)


def _scheduler(sweep: SweepConfig, max_tasks: int) -> Any:
    """ASHA over tasks when the sweep asks for early stopping; None (FIFO) otherwise."""
    if not sweep.early_stopping:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="tasks_done",
        metric=sweep.early_stopping.metric,
        mode="max",
        max_t=max_tasks,
        grace_period=sweep.early_stopping.grace_tasks,
        reduction_factor=sweep.early_stopping.reduction_factor,
    )


def _fit_from(sweep_dir: Path, tuner: Any) -> Any:
    """``tuner.fit()`` with the sweep folder as working directory, restored afterwards when it still exists.

    Tune resolves its experiment folder against the working directory at the end of fit(); under
    `ray job submit` the driver's working directory (Ray's unpacked copy) can be gone by then.
    """
    try:
        cwd: str | None = os.getcwd()
    except FileNotFoundError:
        cwd = None
    os.chdir(sweep_dir)
    try:
        return tuner.fit()
    finally:
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)


def _close_stopped_trial(run_dir: RunDir, uri: str, log: Log) -> None:
    """Mark an early-stopped trial's MLflow runs KILLED and tagged :data:`EARLY_STOPPED_TAG`.

    The trial itself closes them so once the stop reaches it (see :func:`~mcl.sweep.trainable.report_or_stop`),
    but Tune may end its process first, or while this runs: both sides then write the same status and tag,
    whatever the order.
    """
    from mlflow import MlflowClient

    progress = run_dir.read_progress()
    if not progress.run_id:  # stopped before its run started: nothing recorded, nothing to close
        return
    client = MlflowClient(tracking_uri=uri)
    for run_id in [progress.run_id, *progress.task_runs.values()]:
        if not run_id:
            continue
        # RUNNING when Tune ended the process before the trial closed it; FAILED if an error raced the stop.
        status = client.get_run(run_id).info.status
        if status in ("RUNNING", "FAILED", "KILLED"):
            _set_tag_beside_the_trial(client, run_id, EARLY_STOPPED_TAG, "true")
        if status in ("RUNNING", "FAILED"):
            client.set_terminated(run_id, "KILLED")
    run_dir.write_trial_stopped({"tasks_done": progress.tasks_done})
    log(f"[sweep] trial {run_dir.path.name} stopped early after {len(progress.tasks_done)} tasks")


def _set_tag_beside_the_trial(client: Any, run_id: str, key: str, value: str) -> None:
    """``client.set_tag`` while the stopped trial may write the same tag: MLflow's SQL store upserts a tag
    with a read then an insert, so when both processes read "absent" the second insert fails on the unique
    key (seen on sqlite: ``UNIQUE constraint failed: tags.key, tags.run_uuid``). The tag is then there: fine
    if it holds ``value``, an error otherwise."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_tag(run_id, key, value)
    except MlflowException:
        if client.get_run(run_id).data.tags.get(key) != value:
            raise


def _task_names(trial: TrialSpec) -> list[str]:
    from mcl.streams import build_stream

    stream = trial.config["stream"]
    return build_stream(stream["name"], stream["root"], stream["options"]).task_names


def _write_leaderboard(tracker: Any, run_id: str, records: list[dict[str, Any]], sweep_dir: Path) -> str:
    """leaderboard.md / .csv / .png of the finished trials, in the sweep folder and on the sweep run."""
    from mcl.analysis import leaderboard_png
    from mcl.evaluation.leaderboard import leaderboard, to_csv_rows, to_markdown, zero_shot_records

    entries = leaderboard([*records, *zero_shot_records(records)])  # with the untrained model's row
    md = to_markdown(entries) if entries else "(no finished trials)"
    (sweep_dir / "leaderboard.md").write_text(md + "\n")
    rows = to_csv_rows(entries)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "leaderboard.csv").write_text(buf.getvalue())
    (sweep_dir / "results.json").write_text(json.dumps(records, indent=1))
    for name in ("leaderboard.md", "leaderboard.csv", "results.json"):
        tracker.log_artifact(run_id, sweep_dir / name)
    if entries:
        tracker.log_artifact(run_id, leaderboard_png(entries, sweep_dir / "leaderboard.png"))
    return md
