"""The Ray Train worker function: every remaining phase of a run, one after another, in one worker group.

Phase ``k`` streams this rank's shard ``p<k>_train_<rank>`` (and ``p<k>_eval_<rank>`` if it evaluates,
``p<k>_baseline_<rank>`` if it evaluates the untrained model first), trains from
the state the previous phase left, and rank 0 publishes the phase folder in the run folder as a whole (the
driver waits for it). After a worker failure Ray Train restarts the group and this function again: phases
already published are skipped, so the run continues from the last finished phase with the same seeds.

With ``train.checkpoint_every_steps``, the workers also report a step checkpoint every that many steps
(:mod:`mcl.worker.checkpoint`); a restarted group, or the fit of a resumed run, continues the phase in
progress from the last one (``ray.train.get_checkpoint()``) instead of from its start.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mcl.logs import quiet_ray_worker_logs
from mcl.run.rundir import RunDir
from mcl.worker.engine import StepEngine
from mcl.worker.job import TaskJob
from mcl.worker.recipe import train_and_evaluate_task


class RayStepCheckpoints:
    """Step checkpoints through Ray Train: reported with ``ray.train.report(checkpoint=...)`` into the run's
    storage, restored from ``ray.train.get_checkpoint()``.

    Each fit has its own ``fit_id``. A checkpoint is resumed when this fit saved it (a worker group restarted
    mid-phase), or when it belongs to the fit's first phase (a resumed run: the phases before it are the
    ones the driver recorded, so the phase starts from the same state). A checkpoint of a later phase from an
    earlier fit is not: that fit's workers ran ahead of the driver's record, and the phases before it are
    trained again in this fit.
    """

    def __init__(self, every: int, fit_id: str, first_phase: str) -> None:
        self.every, self.fit_id, self.first_phase = every, fit_id, first_phase

    def save(self, engine: StepEngine, key: str, step: int, client_state: dict[str, Any]) -> None:
        from mcl.worker.checkpoint import report_step_checkpoint

        report_step_checkpoint(
            {"phase_key": key},
            engine,
            step=step,
            phase_key=key,
            client_state=client_state,
            attempt=self.fit_id,
        )

    def restore(self, engine: StepEngine, key: str) -> tuple[int, dict[str, Any]] | None:
        from mcl.worker.checkpoint import restore_from_ray

        def accept(meta: Any) -> bool:
            return meta.attempt == self.fit_id or key == self.first_phase

        meta = restore_from_ray(engine, key, accept)
        return None if meta is None else (meta.step, meta.client_state or {})


def train_phases(loop_config: dict[str, Any]) -> None:
    """``TorchTrainer`` loop: ``loop_config`` holds ``jobs`` (one :class:`TaskJob` dict per phase), their
    ``folders`` (phase folder names), the ``run_dir`` and the ``micro_batch`` / ``eval_batch`` sizes."""
    import ray.train

    quiet_ray_worker_logs()
    jobs = [TaskJob(**j) for j in loop_config["jobs"]]
    folders: list[str] = loop_config["folders"]
    run_dir = RunDir(loop_config["run_dir"])
    if not jobs[0].config["scaling"]["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # also when Ray was started without our runtime env
    rank = ray.train.get_context().get_world_rank()
    # Where to start: rank 0 decides (one view of the shared folder), every rank follows.
    first = next((k for k, f in enumerate(folders) if not run_dir.is_published(f)), len(folders))
    for k in range(_from_rank0(first), len(jobs)):
        # The driver asks the group to stop (its own error) through the run folder: rank 0 looks before
        # every phase and all ranks end together (a clean end of the Train job, not a failure to retry).
        if _from_rank0(rank == 0 and run_dir.abort_requested()):
            return
        _run_phase(k, jobs[k], folders[k], run_dir, rank, loop_config)
        _release_memory()
        # A barrier as well: no rank starts phase k+1 before rank 0 has published the state it starts from.
        ray.train.report({"phase": k, "task_index": jobs[k].task_index})


def _run_phase(
    k: int, job: TaskJob, folder: str, run_dir: RunDir, rank: int, loop_config: dict[str, Any]
) -> None:
    import ray.train
    import ray.train.torch

    micro, eval_bs = loop_config["micro_batch"], loop_config["eval_batch"]
    train_shard = ray.train.get_dataset_shard(f"p{k}_train_{rank}")
    # Phases that do not evaluate read no evaluation data.
    eval_shard = ray.train.get_dataset_shard(f"p{k}_eval_{rank}") if job.evaluate else None
    baseline_shard = ray.train.get_dataset_shard(f"p{k}_baseline_{rank}") if job.evaluate_before else None
    if rank == 0:
        out = run_dir.partial(folder).path
        shutil.rmtree(out, ignore_errors=True)  # left by a worker group that died mid-phase
    else:
        out = Path(tempfile.mkdtemp(prefix="mcl-task-"))
    try:
        train_and_evaluate_task(
            job,
            train_shard.iter_batches(batch_size=micro, batch_format="numpy", prefetch_batches=2),
            lambda: _eval_batches(eval_shard, eval_bs),
            out,
            device=ray.train.torch.get_device(),
            checkpoints=RayStepCheckpoints(
                job.config["train"]["checkpoint_every_steps"],
                loop_config["fit_id"],
                loop_config["first_phase"],
            ),
            baseline_batches=lambda: _eval_batches(baseline_shard, eval_bs),
        )
        if rank == 0:
            run_dir.publish(folder)  # atomic: the driver sees a whole phase or none
    finally:
        if rank != 0:
            shutil.rmtree(out, ignore_errors=True)


def _eval_batches(shard: Any, batch_size: int) -> Any:
    """This rank's evaluation batches from a dataset shard (none without one)."""
    if shard is None:
        return []
    return shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1)


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself outside a process group)."""
    import torch.distributed as td

    box = [value]
    if td.is_available() and td.is_initialized():
        td.broadcast_object_list(box, src=0)
    return box[0]


def _release_memory() -> None:
    """Free what the finished phase held before the next one loads its model (one process, many phases)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
