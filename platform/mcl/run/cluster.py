"""mcl's Ray set-up: connect to a cluster, or start a local instance sized for the run, with mcl's runtime
environment (the engine and methods being run, shipped to every worker).

On a local instance (``ray.init`` starting Ray on this machine) mcl also sets what only makes sense there:

- Idle workers are kept for reuse. Ray kills an idle worker 1 s after its task once the node runs more
  workers than its CPU count, and a Train run always does (controller, Train workers, Ray Data's
  coordinator, stats and dataset actors): every Ray Data task then starts, and imports transformers in, a
  fresh process.
- Ray Data runs at most :func:`data_tasks_per_rank` preprocessing tasks per Train rank at once (on any
  cluster; see there).
- No preemption watcher: Ray Train's actor that polls for nodes being drained (spot instances) costs a
  process on a single node that nothing drains, and its creation logs an ``E ... core_worker.cc`` line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mcl.config import ExperimentConfig
from mcl.errors import ConfigError
from mcl.logs import quiet_ray_driver_logs

# Every worker of an mcl job, on any cluster (the job's runtime env).
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Train V2 re-routes print() through its logger and tees it when stdout is wrapped: lines doubled.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# Only on a local instance: one node, which nothing preempts.
LOCAL_WORKER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# How long an idle worker of a local instance waits for its next task before Ray ends it (Ray's default: 1 s).
IDLE_WORKER_KEEP_MS = 300_000
# Logical CPUs a local instance has beyond the Train workers' own: room for Ray Data's preprocessing tasks.
LOCAL_DATA_CPUS = 2


def runtime_env(use_gpu: bool, local: bool = False) -> dict[str, Any]:
    """mcl's job runtime env: the engine and methods being run (not a stale installed copy) and the
    workers' environment variables."""
    import mcl
    import methods

    env = dict(WORKER_ENV)
    if local:
        env.update(LOCAL_WORKER_ENV)
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    py_modules = [str(Path(m.__file__).resolve().parent) for m in (mcl, methods)]
    return {"env_vars": env, "py_modules": py_modules}


def init_ray(address: str, num_cpus: int, use_gpu: bool) -> None:
    """Connect to the Ray cluster at ``address`` (or start a local instance with ``num_cpus`` logical CPUs)
    with mcl's runtime environment: the engine and methods being run are shipped to every worker."""
    import ray

    quiet_ray_driver_logs()
    if address:  # an existing cluster (also under `ray job submit`, which sets RAY_ADDRESS)
        ray.init(address=address, runtime_env=runtime_env(use_gpu))
        return
    # The dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves.
    ray.init(
        num_cpus=num_cpus,
        runtime_env=runtime_env(use_gpu, local=True),
        _system_config={
            "idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS,
            # Workers Ray starts ahead of demand sat idle all run (the default run: 19 worker processes
            # with prestart, 18 without) and add to the burst of processes starting on 2 cores.
            "prestart_worker_first_driver": False,
            "enable_worker_prestart": False,
        },
    )


def init_ray_for_run(cfg: ExperimentConfig) -> None:
    """Ray for one run: reuse a running instance (checking it has the CPUs the Train workers need), else
    connect to ``scaling.ray_address`` / ``RAY_ADDRESS``, else start a local instance with room for Ray
    Data's preprocessing beside the workers."""
    import ray

    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if ray.is_initialized():
        total = ray.cluster_resources().get("CPU", 0)
        if total < need:
            raise ConfigError(
                f"scaling: {cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPUs need {need} "
                f"CPUs but the running Ray instance has {total:g}"
            )
        return
    address = cfg.scaling.ray_address or os.environ.get("RAY_ADDRESS", "")
    init_ray(address, cfg.scaling.ray_num_cpus or need + LOCAL_DATA_CPUS, cfg.scaling.use_gpu)


def data_tasks_per_rank(cfg: ExperimentConfig, cluster_cpus: float | None = None) -> int:
    """How many Ray Data preprocessing tasks each Train rank's dataset runs at once: the whole CPUs the
    cluster has beside the Train workers, shared among the ranks (at least one).

    A preprocessing task asks for a fraction of a CPU (``mcl.data.DATA_TASK_CPUS``) so that it fits beside
    fractional reservations, but Ray Data would then run four tasks per free CPU, each its own process
    importing transformers and loading the processor: eight processes on a 2-core machine's two spare
    logical CPUs, competing with training for the cores.
    """
    if cluster_cpus is None:
        import ray

        cluster_cpus = ray.cluster_resources().get("CPU", 0)
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    spare = math.floor(cluster_cpus - need)
    return max(1, spare // cfg.scaling.num_workers)
