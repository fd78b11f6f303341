"""Task orders as a sweep axis, on the real path: a local Ray instance runs a sweep of 2 task orders x 2 seeds
of the generated stream at its smallest (2 tasks, one optimiser step per task, 2 test samples), each trial a
real stream run (Ray Train, Ray Data, MLflow). Checks that each trial trained its own order, that MLflow
tags it, and that the leaderboard averages seeds and orders and adds the order-sensitivity column."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TASKS = ["aerial", "underwater"]


def test_a_sweep_of_two_orders_by_two_seeds(local_ray, tmp_path):
    from mlflow import MlflowClient

    from mcl.sweep import run_sweep, sweep_config_from_dict

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = sweep_config_from_dict(
        {
            "name": "orders",
            "base": str(REPO / "jobs" / "configs" / "default.yaml"),
            "overrides": {
                "stream.root": str(tmp_path / "data"),
                "stream.options": {"seed": 0, "tasks": TASKS, "train_per_task": 4, "test_per_task": 2},
                "train.batch_size": 4,
                # The order axis depends neither on the engine nor on the worker count: one DDP worker starts fastest.
                "scaling.deepspeed": False,
                "scaling.num_workers": 1,
                "train.epochs": 1,
                "eval.max_new_tokens": 2,
            },
            "methods": ["sequential_lora"],
            "streams": ["generated"],
            "seeds": [0, 1],
            "orders": 2,
            "register_models": False,
            "storage": str(tmp_path / "sweeps"),
            "tracking": {"uri": uri, "experiment": "orders"},
        }
    )
    lines: list[str] = []
    summary = run_sweep(sweep, log=lines.append)
    assert not summary.failed, lines
    assert sorted((r["order"], r["seed"]) for r in summary.results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {r["trial"] for r in summary.results} == {
        f"sequential_lora-generated-o{o}-s{s}" for o in (0, 1) for s in (0, 1)
    }

    client = MlflowClient(uri)
    for record in summary.results:
        run = client.get_run(record["run_id"])
        expected = TASKS if record["order"] == 0 else TASKS[::-1]  # 2 tasks: the second order is the reverse
        assert run.data.tags["mcl.order"] == str(record["order"])
        assert run.data.tags["mcl.task_order"] == ",".join(expected)
        local = client.download_artifacts(
            record["run_id"], "accuracy_matrix.json", str(tmp_path / record["trial"])
        )
        assert json.loads(Path(local).read_text())["tasks"] == expected  # trained in that order

    with open(Path(summary.sweep_dir) / "leaderboard.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["sequential_lora", "zero_shot"]  # the untrained model's row is one entry per seed
    row = rows["sequential_lora"]
    assert row["seeds"] == "2" and row["orders"] == "2"
    assert rows["zero_shot"]["seeds"] == "2"
    assert "mfn_order_std" in row and float(row["mfn_order_std"]) >= 0.0
    assert "MFN order std" in summary.leaderboard_md
