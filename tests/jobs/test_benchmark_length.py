"""The length-grouping benchmark job runs in smoke mode and prints its figures; grouping cuts the padding."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "jobs" / "benchmark_length.py"


def _load_job():
    spec = importlib.util.spec_from_file_location("mcl_benchmark_length_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_prints_padding_and_samples_per_s_with_grouping_off_and_on(
    tiny_model_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "length.json"
    assert _load_job().main(["--smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in ("token lengths (prompt + image + answer): mean", "padding fraction", "samples/s (epoch)"):
        assert line in printed
    figures = json.loads(out.read_text())
    off, on = figures["off"], figures["on"]
    assert all(math.isfinite(f["samples_per_s"]) and f["samples_per_s"] > 0 for f in (off, on))
    assert on["padding_fraction"] < 0.5 * off["padding_fraction"]
    # The counted lengths are exact: the fractions computed from them equal those of the collated batches.
    assert figures["padding_from_lengths"]["off"] == pytest.approx(off["padding_fraction"])
    assert figures["padding_from_lengths"]["on"] == pytest.approx(on["padding_fraction"])
    stats = figures["length_stats"]
    assert stats["p50"] < stats["p95"] <= stats["max"]
