"""The task-selection benchmark (HiDe-LLaVA, DISCO, ModalPrompt) runs end to end in a tiny setting (3 tasks, a
few samples, the default 5 epochs) and selects every sample's own task."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "jobs" / "benchmark_selection.py"


def _load_job():
    spec = importlib.util.spec_from_file_location("mcl_benchmark_selection_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_selection_benchmark_gives_positive_rates_and_picks_each_samples_task(
    tiny_model_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _load_job()
    overrides = [
        f"stream.root={tmp_path / 'stream'}",
        "stream.options={seed: 0, train_per_task: 16, test_per_task: 4, tasks: [aerial, underwater, street]}",
        "train.batch_size=8",
        "eval.batch_size=4",
        "eval.max_new_tokens=2",
    ]
    out = tmp_path / "selection.json"
    assert job.main([*overrides, "--repeats", "1", "--out", str(out)]) == 0
    assert "selected / single" in capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert sorted(figures) == ["disco", "hide_llava", "modalprompt"]
    for method, f in figures.items():
        assert f["settings"]["samples"] == 12 and f["settings"]["batches"] == 3, method
        for mode in ("selected", "single", "selected_at_2_tasks"):
            assert f[mode]["samples_per_s"] > 0 and f[mode]["seconds"] > 0
        for key in ("ratio_selected_vs_single", "ratio_last_vs_2_tasks"):
            assert isinstance(f[key], float) and math.isfinite(f[key]) and f[key] > 0
        assert f["selection_acc"] == 100.0, method
    with pytest.raises(ValueError, match="mr_lora"):
        job.selection_benchmark("mr_lora")
