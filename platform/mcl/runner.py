"""One continual-learning run: a method trained through a stream, task after task, in one Ray Train job.

:func:`prepare_run` checks everything that can be checked before any compute is spent (method, model,
stream, annotations, images). :func:`run_experiment` then trains task after task. The phases a run still has
to train are planned up front (a method's training rows depend only on its JSON driver state) and run in one
``TorchTrainer`` worker group: for each phase the workers stream their shard from Ray Data, train under
DeepSpeed ZeRO, evaluate all tasks and leave the method's state in a phase folder that the next phase starts
from. The driver picks up each folder as it appears, turns the results into the accuracy matrix and CL
metrics and records everything in MLflow, task by task.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcl.config import ExperimentConfig, save_config
from mcl.data import Preprocessor, SampleRows, ray_dataset, shard
from mcl.errors import ConfigError, DataError, UnknownNameError
from mcl.evaluation.metrics import accuracy_matrix_json, cl_metrics, heatmap_png
from mcl.logs import quiet_ray_worker_logs
from mcl.methods_api import Method, Phase, TrainingData, build_method, load_driver_state
from mcl.models import resolve_model_path
from mcl.run.cluster import data_tasks_per_rank
from mcl.run.cluster import init_ray_for_run as _init_ray
from mcl.streams import Stream, build_stream
from mcl.streams.check import DataReport, read_clean_stream
from mcl.streams.formats import check_images
from mcl.streams.store import ChainedSamples
from mcl.tracking import Tracker, resolve_tracking_uri
from mcl.training import RESULT_FILE, STATE_DIR, TaskJob, TaskResult, train_and_evaluate_task


@dataclass
class PreparedRun:
    """A validated run: nothing here has trained yet."""

    config: ExperimentConfig
    method: Method
    model_path: str
    stream: Stream
    data_report: DataReport | None = None  # with stream.skip_bad_samples: the samples left out


@dataclass
class RunSummary:
    """What a finished run produced."""

    run_id: str
    tracking_uri: str
    task_names: list[str]
    matrix: list[list[float]]
    baseline: list[float] | None
    metrics: dict[str, float]
    output_dir: str
    task_results: list[TaskResult] = field(default_factory=list)
    state_dirs: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def prepare_run(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> PreparedRun:
    """Validate names, data and images; build the tiny model if asked. Raises on any problem.

    With ``stream.skip_bad_samples``, bad samples (see :mod:`mcl.streams.check`) are left out instead, with a
    count per task and split printed; only problems of whole files or folders still raise.
    """
    method = build_method(cfg.method.name, cfg.method.params)
    model_path = resolve_model_path(cfg.model.name)
    check_image_text_model(model_path, cfg.model.trust_remote_code)
    report = None
    if cfg.stream.skip_bad_samples:
        stream, report = read_clean_stream(
            cfg.stream.name, cfg.stream.root, cfg.stream.options, images=cfg.stream.check_images
        )
        skipped = [
            f"{s.task}/{s.split} {s.skipped} ({', '.join(f'{k} {n}' for k, n in s.problems.items())})"
            for s in report.splits
            if s.skipped
        ]
        log(f"stream.skip_bad_samples: left out {report.skipped} bad samples {'; '.join(skipped)}".rstrip())
    else:
        stream = build_stream(cfg.stream.name, cfg.stream.root, cfg.stream.options)
    _check_answer_types(stream)
    for task in stream.tasks:
        n_eval = min(len(task.test), cfg.eval.max_samples_per_task or len(task.test))
        if n_eval < cfg.scaling.num_workers:
            raise DataError(
                f"task {task.name!r} has {n_eval} test samples for {cfg.scaling.num_workers} workers; "
                "every worker needs at least one"
            )
    if cfg.stream.check_images and report is None:
        check_images(ChainedSamples([split for t in stream.tasks for split in (t.train, t.test)]))
    counts = ", ".join(f"{t.name} {len(t.train)}/{len(t.test)}" for t in stream.tasks)
    log(f"stream {stream.name!r}: {len(stream.tasks)} tasks (train/test: {counts})")
    return PreparedRun(cfg, method, model_path, stream, report)


def _check_answer_types(stream: Stream) -> None:
    from mcl.evaluation.scoring import SCORERS

    for task in stream.tasks:
        for sample in task.test:
            if sample.answer_type not in SCORERS:
                raise DataError(
                    f"task {task.name!r} sample {sample.id!r}: unknown answer_type {sample.answer_type!r}; "
                    f"valid types: {', '.join(sorted(SCORERS))}"
                )


def check_image_text_model(model_path: str, trust_remote_code: bool) -> None:
    """Fail early (before any run exists) if the model's config cannot be read or is not image-text-to-text."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UnknownNameError(f"model {model_path!r} cannot be loaded: {exc}") from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not trust_remote_code:
        raise UnknownNameError(
            f"model {model_path!r} is a {config.model_type!r} model, not an image-text-to-text one "
            "(AutoModelForImageTextToText cannot load it)"
        )


def _ray_stream_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: every remaining phase of the run, one after another, in one worker group.

    Phase ``k`` streams this rank's shard ``p<k>_train_<rank>`` (and ``eval_<rank>`` if it evaluates), trains
    from the state the previous phase left, and rank 0 publishes its folder atomically as
    ``<run_dir>/<fit name>`` (``task_result.json`` inside marks it finished; the driver watches for it). After a
    worker failure Ray Train restarts the group and this function again: phases already published are skipped,
    so the run continues from the last finished phase with the same seeds.
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as td

    quiet_ray_worker_logs()
    jobs = [TaskJob(**j) for j in loop_config["jobs"]]
    names: list[str] = loop_config["fit_names"]
    run_dir = Path(loop_config["run_dir"])
    if not jobs[0].config["scaling"]["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # also when Ray was started without our runtime env
    rank = ray.train.get_context().get_world_rank()
    micro, eval_bs = loop_config["micro_batch"], loop_config["eval_batch"]
    # Where to start: rank 0 decides (one view of the shared folder), every rank follows.
    start = [next((k for k, n in enumerate(names) if not (run_dir / n / RESULT_FILE).exists()), len(names))]
    if td.is_available() and td.is_initialized():
        td.broadcast_object_list(start, src=0)
    for k in range(start[0], len(jobs)):
        # The driver asks the group to stop (its own error) by writing ABORT_FILE: rank 0 looks before every
        # phase and all ranks end together (a clean end of the Train job, not a failure to retry).
        stop = [rank == 0 and (run_dir / ABORT_FILE).exists()]
        if td.is_available() and td.is_initialized():
            td.broadcast_object_list(stop, src=0)
        if stop[0]:
            return
        job = jobs[k]
        train_shard = ray.train.get_dataset_shard(f"p{k}_train_{rank}")
        # Phases that do not evaluate read no evaluation data.
        eval_shard = ray.train.get_dataset_shard(f"eval_{rank}") if job.evaluate else None
        partial = run_dir / f"{names[k]}.partial" if rank == 0 else Path(tempfile.mkdtemp(prefix="mcl-task-"))
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a worker group that died mid-phase
        try:
            train_and_evaluate_task(
                job,
                train_shard.iter_batches(batch_size=micro, batch_format="numpy", prefetch_batches=2),
                lambda eval_shard=eval_shard: (
                    eval_shard.iter_batches(batch_size=eval_bs, batch_format="numpy", prefetch_batches=1)
                    if eval_shard is not None
                    else []
                ),
                partial,
                device=ray.train.torch.get_device(),
            )
            if rank == 0:
                partial.replace(run_dir / names[k])  # atomic: the driver sees a whole phase or none
        finally:
            if rank != 0:
                shutil.rmtree(partial, ignore_errors=True)
        _release_memory()
        # A barrier as well: no rank starts phase k+1 before rank 0 has published the state it starts from.
        ray.train.report({"phase": k, "task_index": job.task_index})


def _release_memory() -> None:
    """Free what the finished phase held before the next one loads its model (one process, many phases)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def phase_config(cfg: ExperimentConfig, phase: Phase) -> ExperimentConfig:
    """The experiment config a phase trains with (its own epochs and learning rate, when it sets them)."""
    changes = {k: v for k, v in (("epochs", phase.epochs), ("lr", phase.lr)) if v is not None}
    if not changes:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def phase_training_data(
    prep: PreparedRun, task_index: int, phase: Phase, driver_state: dict[str, Any] | None
) -> TrainingData:
    """The global order of training rows of one phase (every epoch, padded to whole global batches): what
    the workers of that phase train on, before sharding. Chosen by the method."""
    cfg = phase_config(prep.config, phase)
    data = prep.method.training_data(
        phase,
        task_index,
        prep.stream.tasks,
        driver_state,
        epochs=cfg.train.epochs,
        global_batch=cfg.train.batch_size,
        seed=cfg.train.seed + task_index,
    )
    if not data.rows or len(data.rows) % cfg.train.batch_size:
        raise RuntimeError(
            f"method {cfg.method.name!r} gave {len(data.rows)} training rows for phase {phase.name!r} of task "
            f"{task_index}; it must be a positive multiple of train.batch_size ({cfg.train.batch_size})"
        )
    return data


def task_training_rows(prep: PreparedRun, task_index: int) -> list[dict[str, Any]]:
    """Training rows of the first phase of task ``task_index`` (at the start of the stream's state)."""
    return phase_training_data(prep, task_index, prep.method.phases(task_index)[0], None).rows


def _phase_datasets(prep: PreparedRun, phases: list[PlannedPhase]) -> dict[str, Any]:
    """Ray Datasets of a worker group's phases: ``p<k>_train_<rank>`` per phase and rank, and one
    ``eval_<rank>`` per rank (every task's test samples) if any phase evaluates. Lazy: a phase's data is
    read and preprocessed while that phase streams it."""
    import ray.data

    cfg = prep.config
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    world = cfg.scaling.num_workers
    micro = cfg.train.batch_size // world
    trust = cfg.model.trust_remote_code
    train_pre = Preprocessor(prep.model_path, train=True, trust_remote_code=trust)
    tasks = data_tasks_per_rank(cfg)
    datasets = {}
    for k, item in enumerate(phases):
        for rank in range(world):
            datasets[f"p{k}_train_{rank}"] = ray_dataset(
                shard(item.rows, rank, world), train_pre, micro, tasks
            )
    if any(item.job.evaluate for item in phases):
        eval_rows = _eval_rows(prep)
        eval_pre = Preprocessor(prep.model_path, train=False, trust_remote_code=trust)
        for rank in range(world):
            datasets[f"eval_{rank}"] = ray_dataset(
                shard(eval_rows, rank, world), eval_pre, cfg.eval.batch_size, tasks
            )
    return datasets


def _eval_rows(prep: PreparedRun) -> SampleRows:
    """Every task's test samples (the first ``eval.max_samples_per_task`` of each), as rows read lazily."""
    limit = prep.config.eval.max_samples_per_task
    return SampleRows(ChainedSamples([t.test[:limit] if limit else t.test for t in prep.stream.tasks]))


def _ordered_execution() -> Any:
    from ray.data import ExecutionOptions

    options = ExecutionOptions()
    options.preserve_order = True
    return options


def _fit_name(task_index: int, task_name: str, phase: Phase) -> str:
    suffix = "" if phase.name == "train" else f"-{phase.name}"
    return f"task{task_index:02d}-{task_name}{suffix}"


def _fit_phases(prep: PreparedRun, phases: list[PlannedPhase], run_dir: Path) -> None:
    """Train ``phases`` in order in one Ray Train worker group (one ``TorchTrainer.fit``); each phase's
    folder appears in ``run_dir`` as it finishes. Worker start-up, imports and DeepSpeed's set-up are paid
    once per run instead of once per phase."""
    from ray.train import DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = prep.config
    shutil.rmtree(run_dir / _RAY_RUN_NAME, ignore_errors=True)  # Ray Train would restore an earlier attempt
    # Ray Train gives workers 60 s to start (imports, runtime env); a busy small host can need more. Ray
    # propagates this variable from the driver to the controller; an explicit setting wins.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    trainer = TorchTrainer(
        _ray_stream_loop,
        train_loop_config={
            "jobs": [item.job.__dict__ for item in phases],
            "fit_names": [item.fit_name for item in phases],
            "run_dir": str(run_dir),
            "micro_batch": cfg.train.batch_size // cfg.scaling.num_workers,
            "eval_batch": cfg.eval.batch_size,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=_RAY_RUN_NAME,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            # Ray Train's per-report INFO lines drown mcl's own progress; warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=_phase_datasets(prep, phases),
        # Per-rank datasets (sharded by position in _phase_datasets), each read in order.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=_ordered_execution()),
    )
    trainer.fit()


_RAY_RUN_NAME = "ray-train"


@dataclass
class PlannedPhase:
    """One phase of a run's remaining plan: the job its workers run, their training rows, and the folder
    (``<run_dir>/<fit_name>``) its state and ``task_result.json`` land in."""

    key: str  # "<task>:<phase>"
    fit_name: str
    job: TaskJob
    rows: list[dict[str, Any]]


def plan_phases(
    prep: PreparedRun, t: int, phase: Phase, previous: str | None, run_dir: Path
) -> list[PlannedPhase]:
    """Every phase from ``phase`` of task ``t`` to the end of the stream, starting from the state folder
    ``previous``. The chain is known up front: a method's training rows depend only on its JSON driver state
    (never on trained weights), and each phase starts from the folder the previous one will write."""
    names = prep.stream.task_names
    driver_state = load_driver_state(previous)
    plan: list[PlannedPhase] = []
    for task in range(t, len(names)):
        phases = prep.method.phases(task)
        first = [p.name for p in phases].index(phase.name) if task == t else 0
        for ph in phases[first:]:
            job, rows = _phase_job(prep, task, ph, previous, driver_state)
            fit_name = _fit_name(task, names[task], ph)
            plan.append(PlannedPhase(f"{task}:{ph.name}", fit_name, job, rows))
            driver_state = job.driver_state
            previous = str(run_dir / fit_name / STATE_DIR)
    return plan


class _PhaseRunner:
    """Runs a run's remaining phases in one Ray Train job on a background thread and hands the driver each
    phase's folder as soon as it is published, so the driver logs task by task while training goes on."""

    def __init__(self, prep: PreparedRun, run_dir: Path) -> None:
        self.prep, self.run_dir = prep, run_dir
        self.plan: dict[str, PlannedPhase] = {}
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def run(self, t: int, phase: Phase, previous: str | None) -> Path:
        key = f"{t}:{phase.name}"
        if key not in self.plan:
            self._launch(t, phase, previous)
        item = self.plan[key]
        if item.job.previous_state_dir != previous:
            raise RuntimeError(f"phase {key} was planned from {item.job.previous_state_dir}, not {previous}")
        return self._wait(item)

    def _launch(self, t: int, phase: Phase, previous: str | None) -> None:
        if self.thread is not None:
            raise RuntimeError(f"phase {t}:{phase.name} is not in the running plan")
        (self.run_dir / ABORT_FILE).unlink(missing_ok=True)  # left by an attempt whose driver failed
        _init_ray(self.prep.config)
        plan = plan_phases(self.prep, t, phase, previous, self.run_dir)
        for item in plan:  # an interrupted attempt's folders of these phases: trained again
            shutil.rmtree(self.run_dir / item.fit_name, ignore_errors=True)
            shutil.rmtree(self.run_dir / f"{item.fit_name}.partial", ignore_errors=True)
        self.plan = {item.key: item for item in plan}

        def fit() -> None:
            try:
                _fit_phases(self.prep, plan, self.run_dir)
            except BaseException as exc:  # handed to the driver thread
                self.error = exc

        self.thread = threading.Thread(target=fit, name="mcl-ray-train", daemon=True)
        self.thread.start()

    def _wait(self, item: PlannedPhase) -> Path:
        folder = self.run_dir / item.fit_name
        assert self.thread is not None
        while not (folder / RESULT_FILE).exists():
            if not self.thread.is_alive():
                if (folder / RESULT_FILE).exists():
                    break
                if self.error is not None:
                    raise self.error
                raise RuntimeError(f"the Ray Train job ended without finishing phase {item.key}")
            self.thread.join(timeout=0.2)
        return folder

    def close(self) -> None:
        """Wait for the Train job to end (after its last phase) and raise its error, if any."""
        if self.thread is not None:
            self.thread.join()
            if self.error is not None:
                raise self.error

    def abort(self, wait_s: float = 0.0) -> None:
        """Ask a running Train job to stop before its next phase (the driver failed or was stopped), so that
        a long-lived process (a notebook) does not go on training in the background; wait up to ``wait_s``
        seconds for it to end. The phase in progress finishes first (its folder is kept, and a resumed run
        does not train it again)."""
        if self.thread is None or not self.thread.is_alive():
            return
        (self.run_dir / ABORT_FILE).write_text("the driver stopped this run\n")
        self.thread.join(timeout=wait_s)


PROGRESS_FILE = "progress.json"
ABORT_FILE = "abort"  # in a run directory: the driver asks its running Train job to stop
# Settings that may change between an interrupted run and its resumption (where and how it runs).
_RESUMABLE_CHANGES = ("scaling.ray_address", "scaling.ray_num_cpus", "scaling.max_failures")


@dataclass
class _Progress:
    """What a run directory records after every finished phase, so that a re-run resumes it."""

    path: Path
    run_id: str = ""
    phases: dict[str, str] = field(default_factory=dict)  # "<task>:<phase>" -> checkpoint folder
    task_runs: dict[str, str] = field(default_factory=dict)  # "<task>" -> MLflow run id
    tasks_done: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path) -> _Progress:
        path = run_dir / PROGRESS_FILE
        if not path.exists():
            return cls(path)
        data = json.loads(path.read_text())
        return cls(path, data["run_id"], data["phases"], data["task_runs"], data["tasks_done"])

    def save(self) -> None:
        data = {
            "run_id": self.run_id,
            "phases": self.phases,
            "task_runs": self.task_runs,
            "tasks_done": self.tasks_done,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)  # atomic: a kill never leaves half a file


def _check_resumable(cfg: ExperimentConfig, run_dir: Path, model_path: str) -> None:
    from mcl.config import changed_fields, load_config

    saved, current = load_config(run_dir / "config.yaml").flat(), cfg.flat()
    # Compare the LoRA targets that take effect: "" (the family default, since 2026-12-02) equals the regex a
    # run saved before then spelled out, when that regex is the model family's default.
    key = "model.lora.target_modules"
    if "" in (saved.get(key), current.get(key)):
        default = _family_lora_targets(model_path)
        for flat in (saved, current):
            if flat.get(key) == "" and default is not None:
                flat[key] = default
    changed = changed_fields(saved, current, _RESUMABLE_CHANGES)
    if changed:
        diff = "; ".join(changed[:8])
        raise ConfigError(
            f"tracking.run_name: {run_dir} holds a run with a different config ({diff}); "
            "resume it with the same config or pick another run_name"
        )


def _family_lora_targets(model_path: str) -> str | None:
    """The default LoRA targets of the model family at ``model_path`` (None if the family or config is unknown)."""
    from mcl.models import model_family

    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(model_path).model_type
    except (OSError, ValueError):
        return None
    family = model_family(model_type)
    return family.lora_targets if family is not None else None


class RunStopped(SystemExit):
    """Raised (e.g. by ``on_task``) to end a run early because it was stopped, not because it failed.

    :func:`run_experiment` closes the run's open MLflow runs KILLED and adds ``tags`` to them. It is a
    ``SystemExit`` with code 0, which Python and Ray Tune (for a trial's thread) take as a clean end.
    """

    def __init__(self, reason: str, tags: dict[str, str] | None = None) -> None:
        super().__init__(0)
        self.reason = reason
        self.tags = dict(tags or {})

    def __str__(self) -> str:
        return self.reason


def _close_interrupted_runs(
    tracker: Tracker, open_runs: list[str], exc: BaseException, log: Callable[[str], None]
) -> None:
    """Close the runs left open when ``exc`` interrupted a run: KILLED (with the stop's tags) if ``exc`` is a
    stop, i.e. a clean exit (``SystemExit`` with code 0 or None, such as :class:`RunStopped`); FAILED otherwise.
    A run already KILLED (a sweep's driver closes those of a trial its scheduler stopped) is never made FAILED."""
    stopped = isinstance(exc, SystemExit) and exc.code in (0, None)
    status = "KILLED" if stopped else "FAILED"
    tags = exc.tags if isinstance(exc, RunStopped) else {}
    if stopped:
        reason = exc.reason if isinstance(exc, RunStopped) else "clean exit"
        log(f"run stopped ({reason}): closing its open MLflow runs KILLED")
    for rid in reversed(open_runs):
        try:
            for key, value in tags.items():
                tracker.client.set_tag(rid, key, value)
            if not stopped and tracker.run_status(rid) == "KILLED":
                continue
            tracker.end_run(rid, status)
        except Exception as err:  # never hide the original error
            log(f"could not mark MLflow run {rid} {status}: {err}")


def run_experiment(
    cfg: ExperimentConfig,
    log: Callable[[str], None] = print,
    prepared: PreparedRun | None = None,
    resume: bool = False,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    on_task: Callable[[int, list[str], list[list[float]]], None] | None = None,
) -> RunSummary:
    """Train ``cfg.method`` through ``cfg.stream`` and return the accuracy matrix and CL metrics.

    With ``resume``, a run directory left by an earlier attempt with the same ``tracking.run_name`` and
    config is continued: finished phases are not trained again (their checkpoints are reused), the run
    continues in its original MLflow run, and a task run left by the interrupted attempt is replaced. A
    finished run is returned as it is. Without ``resume``, an existing run directory is an error.

    ``parent_run_id`` nests the run's MLflow run under another (a sweep's); ``tags`` are added to the run.
    ``on_task(t, task_names, matrix)`` is called after every task (also those an earlier attempt finished),
    with the accuracy matrix so far; a sweep reports progress through it. If the run is stopped (``on_task``
    raises :class:`RunStopped`, or anything in the run exits cleanly: ``SystemExit`` with code 0), its open
    MLflow runs are closed KILLED; any other exception closes them FAILED. Either way the exception is
    re-raised.
    """
    t_start = time.perf_counter()
    prep = prepared or prepare_run(cfg, log)
    names = prep.stream.task_names
    run_name = (
        cfg.tracking.run_name or f"{cfg.method.name}-{cfg.stream.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run_dir = (Path(cfg.tracking.output_dir) / run_name).resolve()
    existing = run_dir.exists() and any(run_dir.iterdir())
    if existing and not resume:
        # Ray Train would restore from the old run's task folders; refuse instead of mixing two runs.
        raise ConfigError(
            f"tracking.run_name: {run_dir} already holds a run; pick another run_name or resume it"
        )
    progress = _Progress.load(run_dir)
    if existing and (run_dir / "config.yaml").exists():
        _check_resumable(cfg, run_dir, prep.model_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = save_config(cfg, run_dir / "config.yaml")

    uri = resolve_tracking_uri(cfg.tracking.uri)
    tracker = Tracker(uri, cfg.tracking.experiment)
    tags = {
        "mcl.method": cfg.method.name,
        "mcl.stream": cfg.stream.name,
        "mcl.seed": str(cfg.train.seed),
        **(tags or {}),
        "mcl.kind": "stream_run",
    }
    open_runs: list[str] = []
    phase_runner = _PhaseRunner(prep, run_dir)
    if progress.run_id:
        run_id = progress.run_id
        done = len(progress.tasks_done)
        # A run killed after its last task but before it was closed is finished (and closed) now.
        if done < len(names) or tracker.run_status(run_id) != "FINISHED":
            tracker.reopen_run(run_id)
            open_runs.append(run_id)
        log(f"resuming MLflow run {run_id} in {uri}: {done}/{len(names)} tasks already done")
    else:
        run_id = tracker.start_run(run_name, parent_run_id=parent_run_id, tags=tags)
        progress.run_id = run_id
        progress.save()
        open_runs.append(run_id)
        log(f"MLflow run {run_id} in {uri} (experiment {cfg.tracking.experiment!r})")
    try:
        if not existing:
            resolved = {
                "resolved.model_path": prep.model_path,
                "resolved.stream_root": str(Path(cfg.stream.root).resolve()),
                "resolved.tasks": names,
            }
            tracker.log_params(run_id, {**cfg.flat(), **resolved})
            tracker.log_artifact(run_id, config_path)
            if prep.data_report is not None:
                tracker.log_metrics(run_id, prep.data_report.skipped_metrics())
                tracker.log_dict(run_id, prep.data_report.to_dict(), "data_report.json")
        matrix: list[list[float]] = []
        baseline: list[float] | None = None
        results: list[TaskResult] = []
        state_dirs: list[str] = []
        previous: str | None = None
        global_step = 0
        for t, name in enumerate(names):
            phases = prep.method.phases(t)
            if sum(p.evaluate for p in phases) != 1:
                raise RuntimeError(f"method {cfg.method.name!r}: exactly one phase of task {t} must evaluate")
            if t in progress.tasks_done:  # finished by an earlier attempt: its results are in MLflow
                for phase in phases:
                    ckpt = Path(progress.phases[f"{t}:{phase.name}"])
                    result = TaskResult.load(ckpt)
                    global_step += len(result.train_log) if phase.name == "train" else 0
                    if phase.evaluate:
                        results.append(result)
                        matrix.append([result.accuracy[n] for n in names])
                        if result.baseline_accuracy is not None:
                            baseline = [result.baseline_accuracy[n] for n in names]
                    previous = str(ckpt / STATE_DIR)
                state_dirs.append(previous)
                if on_task is not None:
                    on_task(t, names, matrix)
                continue
            log(f"=== task {t + 1}/{len(names)}: {name} ({cfg.method.name}) ===")
            stale = progress.task_runs.get(str(t))
            if stale:  # the interrupted attempt's task run: replaced by this one
                tracker.delete_run(stale)
            task_run = tracker.start_run(
                f"{t:02d}-{name}", parent_run_id=run_id, tags={**tags, "mcl.kind": "task", "mcl.task": name}
            )
            progress.task_runs[str(t)] = task_run
            progress.save()
            open_runs.append(task_run)
            tracker.log_params(
                task_run,
                {"task_index": t, "task": name, "phases": [p.name for p in phases]},
            )
            t_task = time.perf_counter()
            evaluated: TaskResult | None = None
            last_memory: dict[str, float] = {}
            for phase in phases:
                key = f"{t}:{phase.name}"
                fit_name = _fit_name(t, name, phase)
                if key in progress.phases:
                    ckpt = Path(progress.phases[key])
                    log(f"{fit_name}: reusing the checkpoint of an earlier attempt")
                else:
                    ckpt = _run_phase(prep, t, phase, previous, run_dir, phase_runner)
                    progress.phases[key] = str(ckpt)
                    progress.save()
                result = TaskResult.load(ckpt)
                _log_phase(tracker, task_run, run_id, result, phase, global_step)
                if phase.name == "train":
                    global_step += len(result.train_log)
                if phase.evaluate:
                    evaluated = result
                last_memory = result.memory
                previous = str(ckpt / STATE_DIR)
            assert evaluated is not None
            results.append(evaluated)
            row = [evaluated.accuracy[n] for n in names]
            matrix.append(row)
            if evaluated.baseline_accuracy is not None:
                baseline = [evaluated.baseline_accuracy[n] for n in names]
            task_wall = time.perf_counter() - t_task
            _log_task(tracker, task_run, run_id, evaluated, names, task_wall, last_memory, Path(previous))
            tracker.log_metrics(task_run, _resource_hours(cfg, task_wall))
            state_dirs.append(previous)
            tracker.end_run(task_run)
            open_runs.remove(task_run)
            progress.tasks_done.append(t)
            progress.save()
            log(
                f"task {name} done in {task_wall:.1f}s: "
                + ", ".join(f"{n} {a:.1f}" for n, a in zip(names, row, strict=True))
            )
            if on_task is not None:
                on_task(t, names, matrix)
        phase_runner.close()
        metrics = cl_metrics(matrix, baseline)
        if open_runs:  # something was trained (or left open) in this attempt
            _log_final(
                tracker, run_id, names, matrix, baseline, metrics, run_dir, cfg.tracking.heatmap, previous
            )
            wall = time.perf_counter() - t_start
            tracker.log_metrics(run_id, {"wall_time_s": wall, **_resource_hours(cfg, wall)})
            tracker.end_run(run_id)
            open_runs.remove(run_id)
    except BaseException as exc:
        phase_runner.abort()
        _close_interrupted_runs(tracker, open_runs, exc, log)
        raise
    wall = time.perf_counter() - t_start
    return RunSummary(run_id, uri, names, matrix, baseline, metrics, str(run_dir), results, state_dirs, wall)


def _resource_hours(cfg: ExperimentConfig, wall_s: float) -> dict[str, float]:
    """CPU and GPU hours reserved by the Ray Train workers over ``wall_s`` seconds (what a cluster bills)."""
    workers = cfg.scaling.num_workers
    return {
        "cpu_hours": wall_s * workers * cfg.scaling.cpus_per_worker / 3600.0,
        "gpu_hours": wall_s * workers / 3600.0 if cfg.scaling.use_gpu else 0.0,
    }


def phase_job(
    prep: PreparedRun, t: int, phase: Phase, previous: str | None
) -> tuple[TaskJob, list[dict[str, Any]]]:
    """The job and the global training rows of phase ``phase`` of task ``t``, starting from the state
    folder ``previous`` (None at the start of the stream): what a Ray Train job or a local run trains."""
    return _phase_job(prep, t, phase, previous, load_driver_state(previous))


def _phase_job(
    prep: PreparedRun,
    t: int,
    phase: Phase,
    previous: str | None,
    previous_driver_state: dict[str, Any] | None,
) -> tuple[TaskJob, list[dict[str, Any]]]:
    cfg = phase_config(prep.config, phase)
    data = phase_training_data(prep, t, phase, previous_driver_state)
    job = TaskJob(
        cfg.to_dict(),
        prep.model_path,
        t,
        prep.stream.task_names,
        previous,
        steps=len(data.rows) // cfg.train.batch_size,
        evaluate_before=(t == 0 and phase.evaluate),
        phase=phase.name,
        evaluate=phase.evaluate,
        optimize=phase.optimize,
        driver_state=data.driver_state if data.driver_state is not None else previous_driver_state,
    )
    return job, data.rows


def _run_phase(
    prep: PreparedRun, t: int, phase: Phase, previous: str | None, run_dir: Path, runner: _PhaseRunner
) -> Path:
    """The folder of phase ``phase`` of task ``t`` once trained (the first call starts one Ray Train job for
    every remaining phase of the run; later calls wait for theirs)."""
    return runner.run(t, phase, previous)


@dataclass
class LocalStreamResult:
    """What :func:`run_stream_locally` produced: per task, the evaluating phase's result and the final
    state folder; per phase, its checkpoint folder (``"<task>:<phase>"``)."""

    results: list[TaskResult]
    state_dirs: list[Path]
    phase_dirs: dict[str, Path]
    matrix: list[list[float]]
    baseline: list[float] | None = None


def run_stream_locally(
    prep: PreparedRun,
    out_dir: str | Path,
    tasks: int | None = None,
    log: Callable[[str], None] = print,
    start_state: str | Path | None = None,
    start_task: int = 0,
) -> LocalStreamResult:
    """Train the first ``tasks`` tasks in this process, without Ray or MLflow (one worker).

    The same driver-side hooks (phases, training data, driver state) and the same per-task function as
    :func:`run_experiment` run here, each phase via :func:`mcl.training.run_task_locally`. Meant for
    mechanism tests and debugging a method; ``start_state``/``start_task`` continue from a saved state.
    """
    from mcl.training import run_task_locally

    names = prep.stream.task_names
    out = Path(out_dir)
    results: list[TaskResult] = []
    state_dirs: list[Path] = []
    phase_dirs: dict[str, Path] = {}
    matrix: list[list[float]] = []
    baseline: list[float] | None = None
    previous = str(start_state) if start_state else None
    eval_rows = _eval_rows(prep)
    for t in range(start_task, tasks if tasks is not None else len(names)):
        for phase in prep.method.phases(t):
            job, rows = phase_job(prep, t, phase, previous)
            phase_dir = out / _fit_name(t, names[t], phase)
            result = run_task_locally(job, rows, eval_rows if phase.evaluate else [], phase_dir, log=log)
            phase_dirs[f"{t}:{phase.name}"] = phase_dir
            previous = str(phase_dir / STATE_DIR)
            if phase.evaluate:
                results.append(result)
                matrix.append([result.accuracy[n] for n in names])
                if result.baseline_accuracy is not None:
                    baseline = [result.baseline_accuracy[n] for n in names]
        state_dirs.append(Path(previous))
    return LocalStreamResult(results, state_dirs, phase_dirs, matrix, baseline)


def _log_phase(
    tracker: Tracker, task_run: str, parent: str, result: TaskResult, phase: Phase, global_step: int
) -> None:
    """A phase's loss curves (``train_loss`` for the ``train`` phase, ``<phase>_loss`` otherwise)."""
    key = "train_loss" if phase.name == "train" else f"{phase.name}_loss"
    losses = [(int(e["step"]), e["loss"]) for e in result.train_log]
    tracker.log_metric_series(task_run, key, losses)
    if phase.name == "train":
        tracker.log_metric_series(parent, key, [(global_step + s, v) for s, v in losses])
    extra = [(int(e["step"]), e["extra_loss"]) for e in result.train_log if "extra_loss" in e]
    if extra:
        tracker.log_metric_series(task_run, key.replace("_loss", "_extra_loss"), extra)
    prefix = "" if phase.name == "train" else f"{phase.name}_"
    tracker.log_metrics(task_run, {prefix + k: v for k, v in result.timing.items()})


def _log_task(
    tracker: Tracker,
    task_run: str,
    parent: str,
    result: TaskResult,
    names: list[str],
    wall: float,
    memory: dict[str, float],
    state: Path,
) -> None:
    t = result.task_index
    acc = {f"acc_{n}": result.accuracy[n] for n in names}
    tracker.log_metrics(task_run, {**acc, "acc_current": result.accuracy[names[t]], **result.method_metrics})
    tracker.log_metrics(parent, {**acc, **result.method_metrics}, step=t)
    tracker.log_metrics(task_run, {"wall_time_s": wall, **{f"mem_{k}": v for k, v in memory.items()}})
    if result.baseline_accuracy is not None:
        tracker.log_metrics(parent, {f"baseline_acc_{n}": result.baseline_accuracy[n] for n in names})
    if state.exists():
        tracker.log_artifact(task_run, state, "state")
    with tempfile.TemporaryDirectory() as tmp:
        preds = Path(tmp) / "predictions.jsonl"
        preds.write_text("".join(json.dumps(r) + "\n" for r in result.predictions))
        tracker.log_artifact(task_run, preds)


def _log_final(
    tracker: Tracker,
    run_id: str,
    names: list[str],
    matrix: list[list[float]],
    baseline: list[float] | None,
    metrics: dict[str, float],
    run_dir: Path,
    heatmap: bool,
    final_state: str | None,
) -> None:
    tracker.log_metrics(run_id, metrics)
    data = accuracy_matrix_json(names, matrix)
    if baseline is not None:
        data["baseline"] = baseline
    data["metrics"] = metrics
    (run_dir / "accuracy_matrix.json").write_text(json.dumps(data, indent=1))
    tracker.log_artifact(run_id, run_dir / "accuracy_matrix.json")
    if heatmap:
        png = heatmap_png(names, matrix, run_dir / "accuracy_matrix.png", title="accuracy (%)")
        tracker.log_artifact(run_id, png)
    if final_state:
        tracker.log_artifact(run_id, final_state, "final_state")


def format_matrix(names: list[str], matrix: list[list[float]]) -> str:
    """The accuracy matrix as an aligned text table (rows: after training task t)."""
    width = max(8, *(len(n) for n in names)) + 1
    head = " " * (width + 6) + "".join(n.rjust(width) for n in names)
    lines = [head]
    for t, row in enumerate(matrix):
        lines.append(f"after {names[t]}".ljust(width + 6) + "".join(f"{v:{width}.1f}" for v in row))
    return "\n".join(lines)


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(
        f"{k.upper()} {v:+.2f}" if k in ("bwt", "fwt") else f"{k.upper()} {v:.2f}" for k, v in metrics.items()
    )


__all__ = [
    "PreparedRun",
    "RunSummary",
    "format_matrix",
    "format_metrics",
    "prepare_run",
    "run_experiment",
    "run_stream_locally",
    "phase_job",
    "phase_training_data",
    "task_training_rows",
]
