"""The MR-LoRA routing benchmark runs end to end in a tiny setting (2 tasks, a few samples)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "jobs" / "benchmark_routing.py"


def _load_job():
    spec = importlib.util.spec_from_file_location("mcl_benchmark_routing_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_routing_benchmark_gives_positive_rates_and_naive_equals_routed(
    tiny_model_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _load_job()
    overrides = [
        f"stream.root={tmp_path / 'stream'}",
        "stream.options={seed: 0, train_per_task: 16, test_per_task: 4, tasks: [aerial, underwater]}",
        "train.batch_size=8",
        "train.epochs=2",
        "method.params.router_samples_per_task=4",
        "method.params.router_epochs=2",
        "eval.batch_size=4",
        "eval.max_new_tokens=2",
    ]
    out = tmp_path / "routing.json"
    assert job.main([*overrides, "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "routed / single" in printed and "routed / naive" in printed
    figures = json.loads(out.read_text())
    assert figures["settings"]["samples"] == 8 and figures["settings"]["batches"] == 2
    assert figures["settings"]["experts"] == 2
    for mode in ("routed", "single", "naive", "dispatch"):
        assert figures[mode]["samples_per_s"] > 0 and figures[mode]["seconds"] > 0
    # One router forward + one generate per batch; the naive way generates once per expert.
    assert (figures["routed"]["forward_calls"], figures["routed"]["generate_calls"]) == (2, 2)
    assert figures["naive"]["generate_calls"] == 4
    for key in ("ratio_routed_vs_single", "ratio_routed_vs_naive", "ratio_dispatch_vs_single"):
        assert isinstance(figures[key], float) and math.isfinite(figures[key]) and figures[key] > 0
    assert figures["predictions_equal"] is True and figures["mismatches"] == 0
    assert sum(figures["experts_used"].values()) == 8
    assert 0.0 <= figures["router_fallback_rate"] <= 1.0
