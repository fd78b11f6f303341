"""Sweeps: methods x streams x seeds x hyper-parameters, one Ray Tune trial per combination.

A sweep YAML (:func:`load_sweep_config`) names a base experiment config, the methods and streams to cross,
the seeds and the search spaces. :func:`expand_trials` turns it into a fixed, ordered list of trials
(random spaces are drawn with a seeded RNG, so a re-run sees the same trials). :func:`run_sweep` runs the
trials that are not finished yet as a Ray Tune experiment: every trial is a function trainable that runs
its stream with :func:`mcl.runner.run_experiment` (one Ray Train job per trial, its tasks and phases in
turn) and reports after every task. Concurrency is bounded from the cluster's resources, since Tune does not count the Train
workers a trial starts. FIFO by default; an early-stopping scheduler only when asked, and then one Tune
experiment per stream so trials of different streams are never compared.

MLflow: a sweep run, a nested run per trial, a nested run per task. Re-running the same sweep resumes it:
finished trials are not launched again, an interrupted trial continues from its last finished task, and
the sweep continues in its original MLflow run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mcl.config import (
    _flatten,
    apply_overrides,
    changed_fields,
    config_from_dict,
    read_yaml_file,
    set_dotted,
)
from mcl.errors import ConfigError, MclError, UnknownNameError

SWEEP_STATE_FILE = "sweep_state.json"
TRIAL_DONE_FILE = "trial_done.json"
TRIAL_STOPPED_FILE = "trial_stopped.json"  # stopped early by the scheduler: not resumed by a re-run
EARLY_STOPPED_TAG = "mcl.early_stopped"  # on the KILLED MLflow runs of a trial the scheduler stopped
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")
# A trial's own actor only waits on its Train jobs; Tune needs a non-empty request, so a sliver of a CPU.
TRIAL_ACTOR_CPU = 0.01
# Sweep fields that may change between an interrupted sweep and its resumption (where and how it runs).
_RESUMABLE_CHANGES = ("tracking.uri", "ray_address", "max_concurrent_trials")


@dataclass
class MethodEntry:
    """A method of the sweep, its fixed ``params`` and a search space over its params."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    search: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class StreamEntry:
    """A stream of the sweep; empty ``root``/``options`` keep the base config's."""

    name: str
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EarlyStopping:
    """ASHA over tasks: trials of one stream are compared on ``metric`` after ``grace_tasks`` tasks."""

    metric: str = "maa"
    grace_tasks: int = 1
    reduction_factor: int = 2


@dataclass
class SweepTracking:
    uri: str = ""
    experiment: str = "mcl-sweeps"


@dataclass
class SweepConfig:
    """A sweep; see the module docstring and ``jobs/configs/sweep_default.yaml``."""

    name: str
    base: str
    methods: list[MethodEntry]
    streams: list[StreamEntry]
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: dict[str, Any] = field(default_factory=dict)
    search: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 1
    max_concurrent_trials: int = 0
    early_stopping: EarlyStopping | None = None
    storage: str = "mcl_sweeps"
    register_models: bool = True
    tracking: SweepTracking = field(default_factory=SweepTracking)
    ray_address: str = ""

    def flat(self) -> dict[str, Any]:
        return _flatten(asdict(self))


@dataclass
class TrialSpec:
    """One trial: a fully resolved experiment config plus what identifies it in the sweep."""

    key: str
    label: str  # method plus its searched values: the leaderboard row (seeds are averaged)
    method: str
    stream: str
    seed: int
    values: dict[str, Any]
    config: dict[str, Any]


# ---------------------------------------------------------------------------------------------- config


def _need(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: {rule}, got {value!r}")


def _check_space(name: str, spec: Any) -> dict[str, Any]:
    _need(
        isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS,
        name,
        "must be one of {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}",
        spec,
    )
    kind, values = next(iter(spec.items()))
    _need(isinstance(values, list) and values, f"{name}.{kind}", "must be a non-empty list", values)
    if kind in ("uniform", "loguniform"):
        ok = len(values) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        _need(
            ok and values[0] < values[1], f"{name}.{kind}", "must be [low, high] numbers, low < high", values
        )
        _need(kind == "uniform" or values[0] > 0, f"{name}.{kind}", "needs low > 0", values)
    return {kind: list(values)}


def _mapping(data: Any, name: str) -> dict[str, Any]:
    _need(isinstance(data, dict), name, "must be a mapping", data)
    return data


def _only(data: dict[str, Any], allowed: tuple[str, ...], name: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{name}.{key}: unknown key; allowed keys here: {', '.join(allowed)}")


def _entries(
    data: dict[str, Any], key: str, allowed: tuple[str, ...], what: str
) -> list[tuple[str, dict[str, Any]]]:
    """The items of list field ``key`` as ``(where, mapping)``; a bare string is ``{"name": it}``."""
    _need(isinstance(data[key], list) and data[key], key, "must be a non-empty list", data[key])
    out = []
    for i, item in enumerate(data[key]):
        where = f"{key}[{i}]"
        item = _mapping({"name": item} if isinstance(item, str) else item, where)
        _only(item, allowed, where)
        _need(isinstance(item.get("name"), str), f"{where}.name", f"must be {what}", item.get("name"))
        out.append((where, item))
    return out


def sweep_config_from_dict(data: Any) -> SweepConfig:
    """Validate a sweep mapping; errors name the field."""
    data = _mapping(data, "sweep")
    allowed = tuple(SweepConfig.__dataclass_fields__)
    _only(data, allowed, "sweep")
    for key in ("name", "base", "methods", "streams"):
        _need(key in data, key, "is required", None)
    name = data["name"]
    _need(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""), "name",
          "must be a non-empty name of letters, digits, '_', '.', '-'", name)  # fmt: skip
    _need(isinstance(data["base"], str) and data["base"], "base", "must be a path to an experiment YAML",
          data["base"])  # fmt: skip
    methods = [
        MethodEntry(
            item["name"],
            dict(_mapping(item.get("params") or {}, f"{where}.params")),
            {k: _check_space(f"{where}.search.{k}", v) for k, v in (item.get("search") or {}).items()},
        )
        for where, item in _entries(data, "methods", ("name", "params", "search"), "a method name")
    ]
    streams = []
    for where, item in _entries(data, "streams", ("name", "root", "options"), "a stream name"):
        _need(isinstance(item.get("root", ""), str), f"{where}.root", "must be a path", item.get("root"))
        options = _mapping(item.get("options") or {}, f"{where}.options")
        streams.append(StreamEntry(item["name"], item.get("root", ""), dict(options)))
    seeds = data.get("seeds", [0])
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool)
          for s in seeds) and len(set(seeds)) == len(seeds), "seeds", "must be a list of distinct integers",
          seeds)  # fmt: skip
    overrides = _mapping(data.get("overrides") or {}, "overrides")
    search = {
        k: _check_space(f"search.{k}", v) for k, v in _mapping(data.get("search") or {}, "search").items()
    }
    num_samples = data.get("num_samples", 1)
    _need(
        isinstance(num_samples, int) and num_samples >= 1,
        "num_samples",
        "must be an integer >= 1",
        num_samples,
    )
    mct = data.get("max_concurrent_trials", 0)
    _need(
        isinstance(mct, int) and mct >= 0, "max_concurrent_trials", "must be an integer >= 0 (0 = auto)", mct
    )
    early = data.get("early_stopping")
    early_cfg = None
    if early is not None:
        early = _mapping(early, "early_stopping")
        _only(early, ("metric", "grace_tasks", "reduction_factor"), "early_stopping")
        early_cfg = EarlyStopping(**early)
        _need(early_cfg.metric in ("maa", "acc_seen", "acc_current"), "early_stopping.metric",
              "must be one of maa, acc_seen, acc_current", early_cfg.metric)  # fmt: skip
        _need(isinstance(early_cfg.grace_tasks, int) and early_cfg.grace_tasks >= 1,
              "early_stopping.grace_tasks", "must be an integer >= 1", early_cfg.grace_tasks)  # fmt: skip
        _need(isinstance(early_cfg.reduction_factor, int) and early_cfg.reduction_factor >= 2,
              "early_stopping.reduction_factor", "must be an integer >= 2", early_cfg.reduction_factor)  # fmt: skip
    storage = data.get("storage", "mcl_sweeps")
    _need(isinstance(storage, str) and storage, "storage", "must be a folder", storage)
    _need(
        not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", storage),
        "storage",
        "must be a folder every node sees at the same path (a shared filesystem: NFS, EFS, Filestore); "
        "object-store URIs (s3://, gs://) are not supported for it yet",
        storage,
    )
    register = data.get("register_models", True)
    _need(isinstance(register, bool), "register_models", "must be true or false", register)
    tracking = _mapping(data.get("tracking") or {}, "tracking")
    _only(tracking, ("uri", "experiment"), "tracking")
    tracking_cfg = SweepTracking(**tracking)
    _need(isinstance(tracking_cfg.experiment, str) and tracking_cfg.experiment, "tracking.experiment",
          "must be a non-empty name", tracking_cfg.experiment)  # fmt: skip
    address = data.get("ray_address", "")
    _need(isinstance(address, str), "ray_address", "must be a string", address)
    return SweepConfig(
        name, data["base"], methods, streams, list(seeds), dict(overrides), search, num_samples, mct,
        early_cfg, storage, register, tracking_cfg, address,
    )  # fmt: skip


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep YAML, apply ``key=value`` overrides (``tracking.uri=http://...``) and validate. A
    relative ``base`` is resolved against the YAML's folder."""
    p = Path(path)
    data = read_yaml_file(p, "sweep")
    data = apply_overrides(_mapping(data, "sweep"), overrides or [])
    if isinstance(data.get("base"), str) and data["base"] and not Path(data["base"]).is_absolute():
        data["base"] = str((p.parent / data["base"]).resolve())
    return sweep_config_from_dict(data)


# ---------------------------------------------------------------------------------------------- trials


def _draw(spec: dict[str, Any], rng: random.Random) -> Any:
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        return rng.choice(values)
    if kind == "uniform":
        return rng.uniform(values[0], values[1])
    return math.exp(rng.uniform(math.log(values[0]), math.log(values[1])))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def expand_trials(sweep: SweepConfig) -> list[TrialSpec]:
    """Every trial of the sweep, in a fixed order (stream, method, grid point, sample, seed). Each trial's
    experiment config is validated here, so a bad value fails before anything runs."""
    from mcl.config import load_config
    from mcl.methods_api import build_method
    from mcl.streams import available_streams

    base = load_config(sweep.base).to_dict()
    for dotted, value in sweep.overrides.items():
        set_dotted(base, dotted.split("."), value)
    rng = random.Random(f"mcl-sweep-{sweep.name}")
    trials: list[TrialSpec] = []
    keys: set[str] = set()
    for s_index, stream in enumerate(sweep.streams):
        stream_tag = stream.name if len(sweep.streams) == len({s.name for s in sweep.streams}) else (
            f"{stream.name}{s_index}")  # fmt: skip
        for method in sweep.methods:
            spaces = {**sweep.search, **{f"method.params.{k}": v for k, v in method.search.items()}}
            grid_keys = [k for k, v in spaces.items() if "grid" in v]
            random_keys = [k for k in spaces if k not in grid_keys]
            grid_points: list[dict[str, Any]] = [{}]
            for k in grid_keys:
                grid_points = [{**p, k: v} for p in grid_points for v in spaces[k]["grid"]]
            for point in grid_points:
                for _ in range(sweep.num_samples if random_keys else 1):
                    values = {**point, **{k: _draw(spaces[k], rng) for k in random_keys}}
                    label = method.name + "".join(
                        f" {k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in values.items()
                    )
                    for seed in sweep.seeds:
                        tree = json.loads(json.dumps(base))
                        tree["method"] = {"name": method.name, "params": dict(method.params)}
                        tree["stream"]["name"] = stream.name
                        if stream.root:
                            tree["stream"]["root"] = stream.root
                        if stream.options:
                            tree["stream"]["options"] = dict(stream.options)
                        tree["train"]["seed"] = seed
                        for dotted, value in values.items():
                            set_dotted(tree, dotted.split("."), value)
                        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "-", label.replace(" ", "-"))
                        key = f"{slug}-{stream_tag}-s{seed}"
                        if key in keys:
                            key = f"{key}-{len(trials)}"
                        keys.add(key)
                        tree["tracking"]["run_name"] = key
                        tree["tracking"]["experiment"] = sweep.tracking.experiment
                        try:
                            cfg = config_from_dict(tree)
                            build_method(cfg.method.name, cfg.method.params)  # names and params
                            if cfg.stream.name not in available_streams():
                                raise UnknownNameError(
                                    f"stream.name: unknown stream {cfg.stream.name!r}; valid streams: "
                                    + ", ".join(available_streams())
                                )
                        except MclError as exc:
                            raise ConfigError(f"trial {key}: {exc}") from None
                        trials.append(
                            TrialSpec(key, label, method.name, stream.name, seed, values, cfg.to_dict())
                        )
    return trials


def trial_resources(trial: TrialSpec) -> dict[str, float]:
    """What one running trial needs: its Ray Train workers plus 1 CPU for the Ray Data tasks that feed them.
    (The trial's own actor only waits on its Train jobs and reserves a sliver of a CPU: with every CPU held by workers
    and trial actors, Ray Data could never run and the trials would hang.)"""
    scaling = trial.config["scaling"]
    return {
        "CPU": scaling["num_workers"] * scaling["cpus_per_worker"] + 1,
        "GPU": scaling["num_workers"] if scaling["use_gpu"] else 0,
    }


def max_concurrent(trials: list[TrialSpec], cluster: dict[str, float]) -> int:
    """How many trials fit the cluster at once (Tune alone would not count the Train workers)."""
    need_cpu = max(trial_resources(t)["CPU"] for t in trials)
    need_gpu = max(trial_resources(t)["GPU"] for t in trials)
    fit = int(cluster.get("CPU", 0) // need_cpu)
    if need_gpu:
        fit = min(fit, int(cluster.get("GPU", 0) // need_gpu))
    return max(1, fit)


# ---------------------------------------------------------------------------------------------- state


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


def _sweep_dir(sweep: SweepConfig) -> Path:
    return (Path(sweep.storage) / sweep.name).resolve()


def _check_resumable(sweep: SweepConfig, saved: dict[str, Any]) -> None:
    changed = changed_fields(saved, sweep.flat(), _RESUMABLE_CHANGES)
    if changed:
        diff = "; ".join(changed[:8])
        raise ConfigError(
            f"name: {_sweep_dir(sweep)} holds sweep {sweep.name!r} with a different config ({diff}); "
            "re-run it with the same config or give the sweep another name"
        )


def trial_record(trial: TrialSpec, done: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard record of a finished trial."""
    return {
        "method": trial.label,
        "stream": trial.stream,
        "seed": trial.seed,
        "trial": trial.key,
        "run_id": done["run_id"],
        **done["metrics"],
    }


# ---------------------------------------------------------------------------------------------- trial


def _report_or_stop(metrics: dict[str, Any]) -> None:
    """``tune.report(metrics)``; raises :class:`mcl.runner.RunStopped` if the scheduler stopped the trial.

    Ray Tune stops a function trainable through its actor's ``stop()``: the Tune session sets a stop event and
    wakes the trial's thread, which waits inside ``tune.report`` (results are reported synchronously), and
    ``tune.report`` raises ``SystemExit(0)``, which Tune takes as the thread's clean end. ``RunStopped`` is
    such an exit too, and tells :func:`mcl.runner.run_experiment` to close the trial's runs KILLED, not FAILED.
    """
    from ray import tune

    from mcl.runner import RunStopped

    try:
        tune.report(metrics)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
        raise RunStopped("stopped early by the Tune scheduler", tags={EARLY_STOPPED_TAG: "true"}) from exc


def _trial_function(config: dict[str, Any]) -> None:
    """Tune function trainable: one trial = one stream run, reporting after every task."""
    import ray
    from ray import tune

    from mcl.runner import run_experiment

    trial = TrialSpec(**config["trial"])
    sweep = config["sweep"]
    cfg = config_from_dict(trial.config)
    run_dir = Path(cfg.tracking.output_dir) / trial.key
    started = time.perf_counter()

    def on_task(t: int, names: list[str], matrix: list[list[float]]) -> None:
        if t + 1 == len(names):
            # The last task is reported once the trial's results are saved (below): an early-stopping
            # scheduler stops trials at max_t, and must not stop one before it has recorded them.
            return
        row = matrix[-1]
        seen = row[: t + 1]
        maa = sum(sum(r[: i + 1]) / (i + 1) for i, r in enumerate(matrix)) / len(matrix)
        _report_or_stop(
            {
                "tasks_done": t + 1,
                "tasks_total": len(names),
                "task": names[t],
                "acc_current": row[t],
                "acc_seen": sum(seen) / len(seen),
                "maa": maa,
                "trial_key": trial.key,
            }
        )

    def log(message: str) -> None:
        print(f"[{trial.key}] {message}", flush=True)

    node = ray.get_runtime_context().get_node_id()
    tags = {"mcl.sweep": sweep["name"], "mcl.trial": trial.key, "mcl.node_id": node, "mcl.label": trial.label}
    summary = run_experiment(
        cfg, log=log, resume=True, parent_run_id=sweep["run_id"], tags=tags, on_task=on_task
    )
    versions: dict[str, str] = {}
    if sweep["register_models"] and summary.state_dirs:
        from mlflow import MlflowClient

        from mcl.registry import register_state, registered_name

        client = MlflowClient(tracking_uri=summary.tracking_uri, registry_uri=summary.tracking_uri)
        name = registered_name(trial.stream, trial.method)
        versions[name] = register_state(
            client,
            client.get_run(summary.run_id).info.experiment_id,
            summary.run_id,
            name,
            summary.state_dirs[-1],
            run_dir / "config.yaml",
            {
                "method": trial.method,
                "stream": trial.stream,
                "task": summary.task_names[-1],
                "sweep": sweep["name"],
                "trial": trial.key,
                "seed": str(trial.seed),
            },
        )
        log(f"registered {name} version {versions[name]}")
    done = {
        "run_id": summary.run_id,
        "metrics": summary.metrics,
        "tasks": summary.task_names,
        "matrix": summary.matrix,
        "versions": versions,
        "final_state": summary.state_dirs[-1] if summary.state_dirs else None,
        "node_id": node,
        "wall_s": time.perf_counter() - started,
    }
    tmp = run_dir / (TRIAL_DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(done, indent=1))
    tmp.replace(run_dir / TRIAL_DONE_FILE)
    tune.report(
        {"done": True, "tasks_done": len(summary.task_names), "trial_key": trial.key, **summary.metrics}
    )


# ---------------------------------------------------------------------------------------------- progress


def _progress_callback(total: int, tasks: dict[str, int]) -> Any:
    """A Tune callback that prints trials done/running, each running trial's task and an ETA. (Tune pickles
    its callbacks: this one prints through :func:`_say`, never a captured logger.)"""
    from ray.tune import Callback

    log = _say

    class SweepProgress(Callback):
        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.last_print = 0.0
            self.tasks_done: dict[str, int] = {}
            self.units_this_attempt = 0
            self.finished = 0
            self.failed = 0
            self.running: dict[str, str] = {}

        def _key(self, trial: Any) -> str:
            return trial.config["trial"]["key"]

        def _line(self) -> str:
            elapsed = time.perf_counter() - self.started
            remaining = sum(tasks[k] - self.tasks_done.get(k, 0) for k in tasks)
            eta = "?"
            if self.units_this_attempt:
                eta = _duration(elapsed / self.units_this_attempt * remaining)
            running = ", ".join(f"{k}: {v}" for k, v in sorted(self.running.items())) or "-"
            return (
                f"[sweep] {self.finished}/{total} trials done, {self.failed} failed, {len(self.running)} "
                f"running ({running}); elapsed {_duration(elapsed)}, ETA {eta}"
            )

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = self._key(trial)
            self.running[key] = f"task {self.tasks_done.get(key, 0) + 1}/{tasks[key]}"
            log(f"[sweep] trial {key} started")

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            key = self._key(trial)
            done = int(result.get("tasks_done", 0))
            if done > self.tasks_done.get(key, 0):
                self.units_this_attempt += done - self.tasks_done.get(key, 0)
            self.tasks_done[key] = max(done, self.tasks_done.get(key, 0))
            if not result.get("done"):
                nxt = f"task {min(done + 1, tasks[key])}/{tasks[key]}"
                self.running[key] = nxt if done < tasks[key] else "registering"
                log(f"[sweep] {key}: task {done}/{tasks[key]} {result.get('task', '')} done, "
                    f"acc_seen {result.get('acc_seen', float('nan')):.1f}")  # fmt: skip
                log(self._line())

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = self._key(trial)
            self.running.pop(key, None)
            self.finished += 1
            log(f"[sweep] trial {key} finished")
            log(self._line())

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = self._key(trial)
            self.running.pop(key, None)
            self.failed += 1
            log(f"[sweep] trial {key} FAILED (see its log above; re-run the sweep to retry it)")
            log(self._line())

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if time.perf_counter() - self.last_print > 60:
                self.last_print = time.perf_counter()
                log(self._line())

    return SweepProgress()


def _say(message: str) -> None:
    print(message, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------- driver


def run_sweep(sweep: SweepConfig, log: Callable[[str], None] = print) -> SweepSummary:
    """Run (or resume) a sweep; returns the leaderboard records of its finished trials."""
    import ray

    from mcl.run.cluster import init_ray
    from mcl.tracking import Tracker, resolve_tracking_uri

    t_start = time.perf_counter()
    trials = expand_trials(sweep)
    sweep_dir = _sweep_dir(sweep)
    trials_dir = sweep_dir / "trials"
    uri = resolve_tracking_uri(sweep.tracking.uri)
    for t in trials:  # every trial logs to the same store and writes under the sweep's folder
        t.config["tracking"]["uri"] = uri
        t.config["tracking"]["output_dir"] = str(trials_dir)
        # Tune runs each trial in its own working directory: relative data paths are resolved here.
        t.config["stream"]["root"] = str(Path(t.config["stream"]["root"]).resolve())
    _build_streams(trials, log)
    state_path = sweep_dir / SWEEP_STATE_FILE
    tracker = Tracker(uri, sweep.tracking.experiment)  # creates the store and experiment once, here
    if state_path.exists():
        state = json.loads(state_path.read_text())
        _check_resumable(sweep, state["config"])
        run_id = state["run_id"]
        tracker.reopen_run(run_id)
        log(f"resuming sweep {sweep.name!r} (MLflow run {run_id} in {uri})")
    else:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        run_id = tracker.start_run(sweep.name, tags={"mcl.kind": "sweep", "mcl.sweep": sweep.name})
        state_path.write_text(json.dumps({"run_id": run_id, "config": sweep.flat()}, indent=1))
        tracker.log_params(run_id, sweep.flat())
        tracker.log_dict(run_id, asdict(sweep), "sweep.json")
        tracker.client.log_text(run_id, yaml.safe_dump(asdict(sweep), sort_keys=False), "sweep.yaml")
        log(f"sweep {sweep.name!r}: MLflow run {run_id} in {uri} (experiment {sweep.tracking.experiment!r})")
    tracker.log_dict(run_id, [asdict(t) for t in trials], "trials.json")

    finished = {t.key: _read_done(trials_dir / t.key) for t in trials}
    finished = {k: v for k, v in finished.items() if v is not None}
    stopped = {t.key for t in trials if (trials_dir / t.key / TRIAL_STOPPED_FILE).exists()}
    pending = [t for t in trials if t.key not in finished and t.key not in stopped]
    log(
        f"sweep {sweep.name!r}: {len(trials)} trials ({len(finished)} already finished, {len(pending)} to run)"
        + "".join(f"\n  {t.key}" for t in pending)
    )
    failed: list[str] = []
    try:
        if pending:
            address = sweep.ray_address or os.environ.get("RAY_ADDRESS", "")
            use_gpu = any(t.config["scaling"]["use_gpu"] for t in pending)
            if not ray.is_initialized():
                if address:
                    init_ray(address, 0, use_gpu)
                else:
                    # A local instance: as many trials as the machine's cores hold at once.
                    workers = max(trial_resources(t)["CPU"] - 1 for t in pending)
                    fit = max(1, (os.cpu_count() or 1) // workers)
                    n = sweep.max_concurrent_trials or fit
                    init_ray("", n * (workers + 1) + 1, use_gpu)
            cluster = ray.cluster_resources()
            concurrency = sweep.max_concurrent_trials or max_concurrent(pending, cluster)
            log(
                f"sweep {sweep.name!r}: up to {concurrency} trials at once on {cluster.get('CPU', 0):g} CPUs, "
                f"{cluster.get('GPU', 0):g} GPUs (each trial: {trial_resources(pending[0])})"
            )
            groups = [pending]
            if sweep.early_stopping:  # never compare trials of different streams
                groups = [
                    [t for t in pending if t.stream == s] for s in dict.fromkeys(t.stream for t in pending)
                ]
            attempt = time.strftime("%Y%m%d-%H%M%S")
            for i, group in enumerate(groups):
                failed += _run_tune(sweep, group, run_id, concurrency, sweep_dir, f"tune-{attempt}-{i}", log)
        for t in trials:
            if t.key not in finished:
                done = _read_done(trials_dir / t.key)
                if done is not None:
                    finished[t.key] = done
        stopped = {t.key for t in trials if (trials_dir / t.key / TRIAL_STOPPED_FILE).exists()}
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


def _build_streams(trials: list[TrialSpec], log: Callable[[str], None]) -> None:
    """Read (and for generated streams, generate) every stream once in the driver, before any trial starts:
    problems with the data show up here, and concurrent trials never race to generate the same folder."""
    from mcl.streams import build_stream

    seen: set[str] = set()
    for t in trials:
        stream = t.config["stream"]
        key = json.dumps(stream, sort_keys=True)
        if key not in seen:
            seen.add(key)
            built = build_stream(stream["name"], stream["root"], stream["options"])
            log(f"stream {stream['name']!r} at {stream['root']}: tasks {', '.join(built.task_names)}")


def _read_done(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / TRIAL_DONE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _run_tune(
    sweep: SweepConfig,
    trials: list[TrialSpec],
    run_id: str,
    concurrency: int,
    sweep_dir: Path,
    name: str,
    log: Callable[[str], None],
) -> list[str]:
    """One Tune experiment over ``trials``; returns the keys of trials that errored."""
    from ray import tune

    tasks = {t.key: len(_task_names(t)) for t in trials}
    scheduler = None
    if sweep.early_stopping:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="tasks_done",
            metric=sweep.early_stopping.metric,
            mode="max",
            max_t=max(tasks.values()),
            grace_period=sweep.early_stopping.grace_tasks,
            reduction_factor=sweep.early_stopping.reduction_factor,
        )
    shared = {"name": sweep.name, "run_id": run_id, "register_models": sweep.register_models}
    tuner = tune.Tuner(
        tune.with_resources(_trial_function, {"CPU": TRIAL_ACTOR_CPU}),
        param_space={"trial": tune.grid_search([asdict(t) for t in trials]), "sweep": shared},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency, scheduler=scheduler, reuse_actors=False
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(sweep_dir / "tune"),
            callbacks=[_progress_callback(len(trials), tasks)],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    try:
        cwd: str | None = os.getcwd()
    except FileNotFoundError:
        cwd = None
    # Tune resolves its experiment folder against the working directory at the end of fit(); under
    # `ray job submit` the driver's working directory (Ray's unpacked copy) can be gone by then.
    os.chdir(sweep_dir)
    try:
        results = tuner.fit()
    finally:
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)
    failed = []
    for result in results:
        key = result.config["trial"]["key"]
        if result.error is not None:
            failed.append(key)
            log(f"[sweep] trial {key} failed: {type(result.error).__name__}: {str(result.error)[-2000:]}")
        elif _read_done(sweep_dir / "trials" / key) is None:  # stopped early by the scheduler
            _close_stopped_trial(sweep_dir / "trials" / key, trials[0].config["tracking"]["uri"], log)
    return failed


def _close_stopped_trial(run_dir: Path, uri: str, log: Callable[[str], None]) -> None:
    """Mark an early-stopped trial's MLflow runs KILLED and tagged :data:`EARLY_STOPPED_TAG`.

    The trial itself closes them so once the stop reaches it (see :func:`_report_or_stop`), but Tune may end
    its process first, or while this runs: both sides then write the same status and tag, whatever the order.
    """
    from mlflow import MlflowClient

    from mcl.runner import PROGRESS_FILE

    path = run_dir / PROGRESS_FILE
    if not path.exists():
        return
    progress = json.loads(path.read_text())
    client = MlflowClient(tracking_uri=uri)
    for run_id in [progress["run_id"], *progress["task_runs"].values()]:
        if not run_id:
            continue
        # RUNNING when Tune ended the process before the trial closed it; FAILED if an error raced the stop.
        status = client.get_run(run_id).info.status
        if status in ("RUNNING", "FAILED", "KILLED"):
            client.set_tag(run_id, EARLY_STOPPED_TAG, "true")
        if status in ("RUNNING", "FAILED"):
            client.set_terminated(run_id, "KILLED")
    (run_dir / TRIAL_STOPPED_FILE).write_text(json.dumps({"tasks_done": progress["tasks_done"]}))
    log(f"[sweep] trial {run_dir.name} stopped early after {len(progress['tasks_done'])} tasks")


def _task_names(trial: TrialSpec) -> list[str]:
    from mcl.streams import build_stream

    stream = trial.config["stream"]
    return build_stream(stream["name"], stream["root"], stream["options"]).task_names


def _write_leaderboard(tracker: Any, run_id: str, records: list[dict[str, Any]], sweep_dir: Path) -> str:
    """leaderboard.md / .csv / .png of the finished trials, in the sweep folder and on the sweep run."""
    from mcl.evaluation.leaderboard import leaderboard, to_csv_rows, to_markdown

    entries = leaderboard(records)
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


def leaderboard_png(entries: list[Any], path: Path, metrics: tuple[str, ...] = ("mfn", "maa", "bwt")) -> Path:
    """Bars of mean ± std over seeds per leaderboard row, one panel per metric (and per stream)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = list(dict.fromkeys(e.stream for e in entries))
    fig, axes = plt.subplots(
        len(streams),
        len(metrics),
        figsize=(4.5 * len(metrics), 0.45 * max(4, len(entries)) + 1.5),
        squeeze=False,
    )
    for r, stream in enumerate(streams):
        rows = [e for e in entries if e.stream == stream]
        labels = [e.method for e in rows]
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            ax.barh(
                range(len(rows)), [e.mean[metric] for e in rows], xerr=[e.std[metric] for e in rows],
                color="#4c72b0", capsize=3,
            )  # fmt: skip
            ax.set_yticks(range(len(rows)), labels if c == 0 else [""] * len(rows))
            ax.invert_yaxis()
            ax.axvline(0, color="black", linewidth=0.6)
            ax.set_title(f"{stream}: {metric.upper()} (%)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "EarlyStopping",
    "MethodEntry",
    "StreamEntry",
    "SweepConfig",
    "SweepSummary",
    "TrialSpec",
    "expand_trials",
    "leaderboard_png",
    "load_sweep_config",
    "max_concurrent",
    "run_sweep",
    "sweep_config_from_dict",
    "trial_resources",
]
