"""Connecting to Ray with mcl's runtime environment."""

from __future__ import annotations

import os
from pathlib import Path

from mcl.config import ExperimentConfig
from mcl.errors import ConfigError


def init_ray_for(cfg: ExperimentConfig) -> None:
    """Connect to (or start) the Ray instance a run's ``scaling`` asks for; refuse one too small for it."""
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
    # Room for Ray Data's preprocessing tasks beside the workers on a local instance.
    init_ray(address, cfg.scaling.ray_num_cpus or need + 2, cfg.scaling.use_gpu)


def init_ray(address: str, num_cpus: int, use_gpu: bool) -> None:
    """Connect to the Ray cluster at ``address`` (or start a local instance with ``num_cpus`` logical CPUs)
    with mcl's runtime environment: the engine and methods being run are shipped to every worker."""
    import ray

    import mcl
    import methods

    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        # Train V2 re-routes print() through its logger and tees it when stdout is wrapped: lines doubled.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # Ship the engine and methods being run (not a stale installed copy) to every worker.
    py_modules = [str(Path(m.__file__).resolve().parent) for m in (mcl, methods)]
    runtime_env = {"env_vars": env, "py_modules": py_modules}
    if address:  # an existing cluster (also under `ray job submit`, which sets RAY_ADDRESS)
        ray.init(address=address, runtime_env=runtime_env)
    else:
        # The dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves.
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env)
