"""One phase in this process, without Ray (one worker): for tests, debugging and the GPU benchmarks."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mcl.config import config_from_dict
from mcl.data import Preprocessor, local_batches, shard
from mcl.worker.job import TaskJob, TaskResult
from mcl.worker.recipe import train_and_evaluate_task


def run_task_locally(
    job: TaskJob,
    train_rows: Sequence[dict[str, Any]],
    eval_rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    device: Any = None,
    log: Callable[[str], None] = print,
    baseline_rows: Sequence[dict[str, Any]] | None = None,
) -> TaskResult:
    """Run one phase in this process (single worker). With ``scaling.deepspeed`` on, a one-process gloo/nccl
    group is created for DeepSpeed. ``baseline_rows``: what the untrained model is evaluated on
    (``job.evaluate_before``; default ``eval_rows``)."""
    cfg = config_from_dict(job.config)
    if cfg.scaling.num_workers != 1:
        raise ValueError("run_task_locally runs one worker; set scaling.num_workers=1")
    if cfg.scaling.deepspeed:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        init_single_process_group()
    trust = cfg.model.trust_remote_code
    train_pre = Preprocessor(job.model_path, train=True, trust_remote_code=trust)
    eval_pre = Preprocessor(job.model_path, train=False, trust_remote_code=trust)
    result = train_and_evaluate_task(
        job,
        local_batches(shard(train_rows, 0, 1), train_pre, cfg.micro_batch),
        lambda: local_batches(eval_rows, eval_pre, cfg.eval.batch_size),
        out_dir,
        device=device,
        log=log,
        baseline_batches=lambda: local_batches(
            eval_rows if baseline_rows is None else baseline_rows, eval_pre, cfg.eval.batch_size
        ),
    )
    assert result is not None
    return result


def init_single_process_group() -> None:
    """A one-process group for DeepSpeed outside Ray (a free loopback port, rank 0 of 1)."""
    import socket

    import torch
    import torch.distributed as td

    if td.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # DeepSpeed insists on these (normally set by its launcher); Ray Train sets its own in its workers.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    td.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
