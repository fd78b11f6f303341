"""mcl.run.cluster: how a run's Ray is sized and configured (pure parts; the Ray runs cover the rest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcl.config import config_from_dict
from mcl.run import cluster

ROOT = Path(__file__).resolve().parents[2]


def _cfg(num_workers: int, cpus_per_worker: int):
    return config_from_dict({"scaling": {"num_workers": num_workers, "cpus_per_worker": cpus_per_worker}})


@pytest.mark.parametrize(
    ("workers", "cpus", "cluster_cpus", "expected"),
    [
        (2, 1, 2 + cluster.LOCAL_DATA_CPUS, 1),  # the default run on its local instance: 2 tasks in all
        (1, 2, 2 + cluster.LOCAL_DATA_CPUS, 2),  # jobs/benchmark.py
        (2, 1, 2, 1),  # no spare CPU: still one task per rank (Ray Data's tasks ask for a fraction)
        (4, 8, 64, 8),  # a 64-CPU node: its 32 spare CPUs shared by 4 ranks
        (2, 1, 3.5, 0 + 1),  # fractional spare CPUs do not count as a task each
    ],
)
def test_data_tasks_per_rank(workers: int, cpus: int, cluster_cpus: float, expected: int) -> None:
    assert cluster.data_tasks_per_rank(_cfg(workers, cpus), cluster_cpus) == expected


def test_local_instances_turn_the_preemption_watcher_off_clusters_keep_it() -> None:
    local = cluster.runtime_env(use_gpu=False, local=True)
    remote = cluster.runtime_env(use_gpu=True)
    assert local["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in remote["env_vars"]
    assert local["env_vars"]["DS_ACCELERATOR"] == "cpu" and "DS_ACCELERATOR" not in remote["env_vars"]
    # The engine and methods being run are shipped, not an installed copy.
    assert local["py_modules"] == [str(ROOT / "platform" / "mcl"), str(ROOT / "methods")]
