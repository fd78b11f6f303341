"""The throughput benchmark job runs end to end (tiny settings) and writes its figures as JSON."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "jobs" / "benchmark.py"


def _load_job():
    spec = importlib.util.spec_from_file_location("mcl_benchmark_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_writes_rates_for_both_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "figures" / "bench.json"
    job = _load_job()
    rc = job.main(
        [
            f"stream.root={tmp_path / 'stream'}",
            "stream.options={seed: 0, train_per_task: 12, test_per_task: 2, tasks: [aerial]}",
            "train.batch_size=4",
            "train.epochs=2",
            "eval.max_samples_per_task=2",
            "eval.batch_size=2",
            f"tracking.output_dir={tmp_path / 'runs'}",
            "--no-routing",  # measured by tests/jobs/test_benchmark_routing.py
            "--checkpoint-every",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    figures = json.loads(out.read_text())
    assert figures["settings"]["steps"] == 6
    assert figures["settings"]["num_workers"] == 1 and figures["settings"]["cpus_per_worker"] == 2
    for path in ("full", "bare"):
        assert figures[path]["steps"] == 6 and figures[path]["batch_size"] == 4
        assert figures[path]["steady_samples_per_s"] > 0
        assert figures[path]["train_samples_per_s"] > 0
    assert figures["bare"]["torch_threads"] == 2
    assert figures["full"]["ray_init_s"] >= 0 and figures["full"]["fit_overhead_s"] > 0
    assert figures["bare"]["model_load_s"] > 0
    ratio = figures["ratio"]
    assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0
    # Same model, LoRA init and first batch: both paths start from the same loss.
    assert figures["full"]["first_loss"] == pytest.approx(figures["bare"]["first_loss"], rel=1e-4)
    # The full path once more with a step checkpoint every 2 of its 6 steps (none after the last).
    ckpt = figures["step_checkpoints"]
    assert ckpt["every"] == 2 and ckpt["checkpoints"] == 2
    assert ckpt["step_ms_with_checkpoints"] > 0 and math.isfinite(ckpt["seconds_per_checkpoint"])
    # The benchmark cleans up its Ray Train storage.
    assert not list((tmp_path / "runs").glob("benchmark-*"))
