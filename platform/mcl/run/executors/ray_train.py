"""Every remaining phase of a run in one Ray Train worker group (one ``TorchTrainer.fit``), fed by Ray Data.

The fit runs on a background thread; :meth:`RayTrainExecutor.run_phase` hands the driver each phase's folder
as soon as the workers publish it, so the driver records task by task while training goes on. Worker start-up,
imports and DeepSpeed's set-up are paid once per run instead of once per phase.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

from mcl.data import Preprocessor, ray_dataset, shard
from mcl.methods_api import Phase
from mcl.run.cluster import data_tasks_per_rank, init_ray_for_run
from mcl.run.plan import (
    PlannedPhase,
    answer_order,
    baseline_eval_rows,
    phase_eval_columns,
    phase_eval_rows,
    plan_phases,
)
from mcl.run.prepare import PreparedRun
from mcl.run.rundir import PhaseDir, RunDir


class RayTrainExecutor:
    """Plans the run's remaining phases at the first one asked for and trains them all in one Train job."""

    def __init__(self, prep: PreparedRun, run_dir: RunDir) -> None:
        self.prep, self.run_dir = prep, run_dir
        self.plan: dict[str, PlannedPhase] = {}
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def run_phase(self, task_index: int, phase: Phase, previous: str | None) -> PhaseDir:
        key = f"{task_index}:{phase.name}"
        if key not in self.plan:
            self._launch(task_index, phase, previous)
        item = self.plan[key]
        if item.job.previous_state_dir != previous:
            raise RuntimeError(f"phase {key} was planned from {item.job.previous_state_dir}, not {previous}")
        folder = self._wait(item)
        if phase.evaluate and self.prep.config.eval.backend == "ray_data":
            self._evaluate(item, folder)
        return folder

    def _evaluate(self, item: PlannedPhase, folder: PhaseDir) -> None:
        """``eval.backend: ray_data``: the actor pool evaluates the published phase here, in the driver, while
        the Train job goes on with the next phase; the driver records the phase once this returns."""
        from mcl.evaluation.actor_pool import evaluate_phase

        t = item.job.task_index
        baseline = answer_order(self.prep, baseline_eval_rows(self.prep)) if t == 0 else None
        rows = answer_order(self.prep, phase_eval_rows(self.prep, t))
        evaluate_phase(self.prep, item.job, folder, rows, baseline)

    def _launch(self, task_index: int, phase: Phase, previous: str | None) -> None:
        if self.thread is not None:
            raise RuntimeError(f"phase {task_index}:{phase.name} is not in the running plan")
        self.run_dir.clear_abort()  # left by an attempt whose driver failed
        init_ray_for_run(self.prep.config)
        plan = plan_phases(self.prep, task_index, phase, previous, self.run_dir)
        for item in plan:  # an interrupted attempt's folders of these phases: trained again
            self.run_dir.clear_phase(item.folder)
        self.plan = {item.key: item for item in plan}

        def fit() -> None:
            try:
                fit_phases(self.prep, plan, self.run_dir)
            except BaseException as exc:  # handed to the driver thread
                self.error = exc

        self.thread = threading.Thread(target=fit, name="mcl-ray-train", daemon=True)
        self.thread.start()

    def _wait(self, item: PlannedPhase) -> PhaseDir:
        assert self.thread is not None
        while not self.run_dir.is_published(item.folder):
            if not self.thread.is_alive():
                if self.run_dir.is_published(item.folder):
                    break
                if self.error is not None:
                    raise self.error
                raise RuntimeError(f"the Ray Train job ended without finishing phase {item.key}")
            self.thread.join(timeout=0.2)
        return self.run_dir.phase(item.folder)

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
        self.run_dir.request_abort()
        self.thread.join(timeout=wait_s)


def fit_phases(prep: PreparedRun, phases: list[PlannedPhase], run_dir: RunDir) -> None:
    """Train ``phases`` in order in one Ray Train worker group (one ``TorchTrainer.fit``); each phase's
    folder appears in ``run_dir`` as it finishes."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mcl.worker.ray_loop import train_phases

    cfg = prep.config
    storage = cfg.train.checkpoint_storage
    if not cfg.train.checkpoint_every_steps:
        run_dir.clear_ray_storage(storage)  # nothing to resume from: start Ray Train's run afresh
    # With step checkpoints, the storage is kept: Ray Train restores the run's last checkpoint, and the phase
    # it belongs to resumes from it if it is this fit's first phase (see mcl.worker.ray_loop).
    # Ray Train gives workers 60 s to start (imports, runtime env); a busy small host can need more. Ray
    # propagates this variable from the driver to the controller; an explicit setting wins.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    storage_path, name = run_dir.ray_storage(storage)
    trainer = TorchTrainer(
        train_phases,
        train_loop_config={
            "jobs": [item.job.__dict__ for item in phases],
            "folders": [item.folder for item in phases],
            "run_dir": str(run_dir.path),
            "micro_batch": cfg.micro_batch,
            "eval_batch": cfg.eval.batch_size,
            "fit_id": uuid.uuid4().hex,
            "first_phase": phases[0].key,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            # Ray Train's per-report INFO lines drown mcl's own progress; warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=phase_datasets(prep, phases),
        # Per-rank datasets (sharded by position in phase_datasets), each read in order.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=_ordered_execution()),
    )
    trainer.fit()
    run_dir.clear_ray_storage(storage)  # every phase is published: its step checkpoints are spent


def phase_datasets(prep: PreparedRun, phases: list[PlannedPhase]) -> dict[str, Any]:
    """Ray Datasets of a worker group's phases, per phase ``k`` and rank: ``p<k>_train_<rank>``;
    ``p<k>_eval_<rank>`` if the phase evaluates (the tasks ``eval.tasks`` names for its row, and the probes);
    ``p<k>_baseline_<rank>`` if it also evaluates the untrained model (every task, and the probes). Lazy: a
    phase's data is read and preprocessed while that phase streams it."""
    import ray.data

    cfg = prep.config
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    world = cfg.scaling.num_workers
    micro = cfg.micro_batch
    trust = cfg.model.trust_remote_code
    train_pre = Preprocessor(prep.model_path, train=True, trust_remote_code=trust)
    tasks = data_tasks_per_rank(cfg)
    eval_pre = Preprocessor(prep.model_path, train=False, trust_remote_code=trust)
    datasets: dict[str, Any] = {}
    shared: dict[tuple[int, ...], list[Any]] = {}  # the same rows (e.g. under eval.tasks=all): one dataset

    def evaluation(columns: list[int], rows: Any) -> list[Any]:
        if tuple(columns) not in shared:
            rows = answer_order(prep, rows)  # sharded by position: each rank's shard keeps the order
            shared[tuple(columns)] = [
                ray_dataset(shard(rows, rank, world), eval_pre, cfg.eval.batch_size, tasks)
                for rank in range(world)
            ]
        return shared[tuple(columns)]

    for k, item in enumerate(phases):
        for rank in range(world):
            datasets[f"p{k}_train_{rank}"] = ray_dataset(
                shard(item.rows, rank, world), train_pre, micro, tasks
            )
        if item.job.evaluate:
            columns = phase_eval_columns(prep, item.job.task_index)
            for rank, ds in enumerate(evaluation(columns, phase_eval_rows(prep, item.job.task_index))):
                datasets[f"p{k}_eval_{rank}"] = ds
        if item.job.evaluate_before:
            columns = list(range(len(prep.stream.tasks)))
            for rank, ds in enumerate(evaluation(columns, baseline_eval_rows(prep))):
                datasets[f"p{k}_baseline_{rank}"] = ds
    return datasets


def _ordered_execution() -> Any:
    from ray.data import ExecutionOptions

    options = ExecutionOptions()
    options.preserve_order = True
    return options
