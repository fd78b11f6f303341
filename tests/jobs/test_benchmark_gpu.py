"""The GPU benchmark job's smoke mode: the same code path on the tiny shape, on CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_smoke_mode_reports_figures(tmp_path):
    spec = importlib.util.spec_from_file_location("mcl_benchmark_gpu", REPO / "jobs" / "benchmark_gpu.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "gpu.json"
    args = ["--shape", "tiny", "--device", "cpu", "--steps", "3", "--batch-size", "4", "--eval-samples", "4"]
    assert job.main([*args, "--lora-r", "8", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    fig = json.loads(out.read_text())
    assert fig["steps"] == 3 and fig["batch_size"] == 4
    assert fig["tokens_per_sample"] > 16  # 16 image tokens + the question and answer
    assert fig["train_samples_per_s"] > 0 and fig["train_tokens_per_s"] > fig["train_samples_per_s"]
    assert fig["params_language_model"] > 0 and fig["params_vision_tower"] > 0
    assert 0 < fig["mfu"] < fig["mfu_6n"]
    assert fig["eval_samples_per_s"] > 0 and fig["peak_memory_gib"] is None
