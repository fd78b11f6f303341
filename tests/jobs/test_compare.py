"""The comparison job: methods x seeds through the engine, a leaderboard written as markdown/CSV/JSON."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "jobs" / "compare.py"


def _load_job():
    spec = importlib.util.spec_from_file_location("mcl_compare_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compare_writes_a_leaderboard_over_methods_and_seeds(tmp_path, generated_root, capsys):
    job = _load_job()
    out = tmp_path / "cmp"
    argv = [
        "--local",
        "--methods",
        "sequential_lora,joint",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        f"stream.root={generated_root}",
        "stream.options.tasks=[aerial,underwater]",
        "train.epochs=1",
        "eval.max_samples_per_task=8",
        "eval.max_new_tokens=2",
        f"tracking.output_dir={tmp_path / 'runs'}",
    ]
    assert job.main(argv) == 0
    runs = json.loads((out / "runs.json").read_text())
    assert [(r["method"], r["seed"]) for r in runs] == [
        ("sequential_lora", 0),
        ("sequential_lora", 1),
        ("joint", 0),
        ("joint", 1),
    ]
    assert all(len(r["matrix"]) == 2 for r in runs)
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert sorted(r["method"] for r in rows) == ["joint", "sequential_lora", "zero_shot"]
    assert all(r["seeds"] == "2" for r in rows)
    seq = [r["mfn"] for r in runs if r["method"] == "sequential_lora"]
    row = next(r for r in rows if r["method"] == "sequential_lora")
    assert float(row["mfn_mean"]) == pytest.approx(sum(seq) / 2)
    table = (out / "leaderboard.md").read_text()
    assert "| sequential_lora | generated | 2 |" in table and "MFN" in table
    # The untrained model's row (one per seed): its MFN is the mean of the baseline.
    zero = next(r for r in rows if r["method"] == "zero_shot")
    baselines = [sum(r["baseline"]) / len(r["baseline"]) for r in runs if r["method"] == "joint"]
    assert float(zero["mfn_mean"]) == pytest.approx(sum(baselines) / 2) and float(zero["bwt_mean"]) == 0.0

    # Re-running reads the finished runs back instead of training them again.
    marker = out / "local" / "compare-joint-s1" / "result.json"
    stamp = marker.stat().st_mtime_ns
    capsys.readouterr()
    assert job.main(argv) == 0
    assert marker.stat().st_mtime_ns == stamp


def test_compare_rejects_unknown_methods_and_bad_seeds(tmp_path, capsys):
    job = _load_job()
    assert job.main(["--local", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown methods ['nope']" in capsys.readouterr().err
    assert job.main(["--local", "--seeds", "a,b", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
