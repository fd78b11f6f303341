"""The evaluation-batches benchmark job runs in smoke mode and prints its figures: sorting cuts the padding,
stopping per answer type changes no answer, and predictions come back in the original order."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "jobs" / "benchmark_eval_batches.py"


def _load_job():
    spec = importlib.util.spec_from_file_location("mcl_benchmark_eval_batches_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_prints_padding_samples_per_s_and_changed_answers(
    tiny_model_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "eval.json"
    try:
        assert _load_job().main(["--smoke", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    for line in (
        "prompt lengths (prompt + image tokens): mean",
        "padding fraction",
        "samples per CPU-second",
    ):
        assert line in printed
    figures = json.loads(out.read_text())
    before, after = figures["before"], figures["after"]
    assert all(math.isfinite(f["samples_per_cpu_s"]) and f["samples_per_cpu_s"] > 0 for f in (before, after))
    assert figures["sorted"]["padding_fraction"] < 0.5 * before["padding_fraction"]
    assert figures["answers_changed"] == {"before": 0, "sorted": 0, "after": 0}
    assert figures["original_order"] is True
    assert figures["stop_strings_by_type"]  # the after mode did stop on strings
