"""The data-path benchmark job runs in smoke mode and reports sane memory and evaluation figures."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "jobs" / "benchmark_data.py"


def _load_job():
    spec = importlib.util.spec_from_file_location("mcl_benchmark_data_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value: object) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.mark.slow  # two fresh Python processes (one per task size) plus the evaluation: ~30 s on 2 cores
def test_smoke_reports_peak_rss_per_size_and_equal_answers_at_both_batch_sizes(
    tiny_model_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data.json"
    assert _load_job().main(["--smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "peak RSS (ru_maxrss, MiB)" in printed
        and "growth per 1,000 samples" in printed
        and "what the driver holds per sample" in printed
    )
    assert "answers identical at both batch sizes: True (0 mismatches)" in printed

    figures = json.loads(out.read_text())
    reading = figures["reading"]
    assert set(reading["sizes"]) == {"100", "400"}
    for size, fig in reading["sizes"].items():
        n = int(size)
        assert fig["samples"] == n and fig["stages"]["read"]["samples"] == 2 * n
        assert fig["stages"]["preprocess"]["rows"] == n  # every training row streamed
        order = fig["stages"]["order"]["rows"]  # 5 epochs, each padded to whole batches of 16
        assert order == 5 * (n + (-n) % 16)
        assert fig["held_rows"] == 2 * n + order
        for key in ("baseline_rss_mib", "peak_rss_mib", "annotation_mib"):
            assert _positive(fig[key]), (size, key, fig[key])
        assert fig["peak_rss_mib"] >= fig["baseline_rss_mib"]
        assert all(_positive(stage["s"]) for stage in fig["stages"].values())
    assert _positive(reading["peak_ratio"])
    assert math.isfinite(reading["peak_growth_mib_per_1k"])

    evaluation = figures["evaluation"]
    assert evaluation["settings"]["samples"] == 16 and evaluation["settings"]["batch_size"] == 8
    for way in ("generate", "end_to_end"):
        assert evaluation[way]["batched"]["batch_size"] == 8 and evaluation[way]["bs1"]["batch_size"] == 1
        for mode in ("batched", "bs1"):
            assert _positive(evaluation[way][mode]["samples_per_s"])
        assert _positive(evaluation[way]["ratio"])
    assert evaluation["predictions_equal"] is True and evaluation["mismatches"] == []
