"""The evaluation-backend benchmark runs end to end at its smallest (1 task, 4 test samples, 2 ZeRO-3 workers)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "jobs" / "benchmark_eval.py"


def _load_job():
    spec = importlib.util.spec_from_file_location("mcl_benchmark_eval_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_eval_benchmark_measures_both_backends_on_the_same_matrix(
    tiny_model_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _load_job()
    overrides = [
        f"stream.root={tmp_path / 'stream'}",
        "stream.options={seed: 0, train_per_task: 8, test_per_task: 4, tasks: [aerial]}",
        "train.batch_size=8",
        "train.epochs=1",
        "eval.batch_size=4",
        "eval.max_new_tokens=2",
        "scaling.ray_num_cpus=4",
    ]
    out = tmp_path / "eval.json"
    assert job.main([*overrides, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ray_data / workers samples/s" in printed
    figures = json.loads(out.read_text())
    assert figures["matrix_equal"] is True and len(figures["matrix"]) == 1
    for backend in ("workers", "ray_data"):
        assert figures[backend]["samples"] == 4 and figures[backend]["samples_per_s"] > 0
    assert figures["ratio_pool_vs_workers"] > 0
