"""Evaluation policy (``eval.tasks``), probes' scoring, the zero-shot row and null cells: pure, fast."""

from __future__ import annotations

import json
import random

import pytest

from mcl.config import config_from_dict
from mcl.errors import ConfigError
from mcl.evaluation.generation import phase_scores
from mcl.evaluation.leaderboard import leaderboard, to_markdown, zero_shot_records
from mcl.evaluation.metrics import accuracy_matrix_json, cl_metrics, heatmap_png, mfn, zero_shot_metrics
from mcl.evaluation.policy import baseline_columns, evaluated_columns, evaluation_count, masked
from mcl.run.table import AccuracyTable, format_matrix
from mcl.worker.job import TaskResult


def test_seen_and_next_evaluates_seen_tasks_and_the_next_one():
    assert evaluated_columns("seen_and_next", 0, 4) == [0, 1]
    assert evaluated_columns("seen_and_next", 2, 4) == [0, 1, 2, 3]
    assert evaluated_columns("seen_and_next", 3, 4) == [0, 1, 2, 3]
    assert evaluated_columns("all", 0, 4) == [0, 1, 2, 3]
    # FWT compares column j at row j-1 with the untrained model's column j: the baseline row is whole.
    assert baseline_columns("seen_and_next", 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="eval.tasks"):
        evaluated_columns("some", 0, 4)


@pytest.mark.parametrize("tasks", [1, 2, 3, 5, 20])
def test_evaluation_count(tasks):
    assert evaluation_count("all", tasks) == tasks * tasks
    assert evaluation_count("seen_and_next", tasks) == tasks * (tasks + 1) // 2 + tasks - 1


def test_msvqa_20_steps_count():
    assert (evaluation_count("seen_and_next", 20), evaluation_count("all", 20)) == (229, 400)


@pytest.mark.parametrize("tasks", [1, 2, 3, 6])
def test_metrics_under_seen_and_next_equal_metrics_under_all(tasks):
    rng = random.Random(tasks)
    full = [[rng.uniform(0, 100) for _ in range(tasks)] for _ in range(tasks)]
    baseline = [rng.uniform(0, 100) for _ in range(tasks)]
    part = masked(full, "seen_and_next")
    assert sum(v is None for row in part for v in row) == tasks * tasks - evaluation_count(
        "seen_and_next", tasks
    )
    # Every metric reads only evaluated cells (reading a null raises), and gives the same value.
    assert cl_metrics(part, baseline) == cl_metrics(full, baseline)


def test_a_metric_that_would_read_a_null_cell_names_it():
    with pytest.raises(ValueError, match=r"\[1\]\[0\] was not evaluated"):
        mfn([[1.0, 2.0], [None, 4.0]])


def test_null_cells_in_json_table_and_heatmap(tmp_path):
    part = masked([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0], [70.0, 80.0, 90.0]], "seen_and_next")
    data = json.loads(json.dumps(accuracy_matrix_json(["a", "b", "c"], part)))
    assert data["matrix"][0] == [10.0, 20.0, None]
    text = format_matrix(["a", "b", "c"], part)
    assert text.splitlines()[1].split()[-1] == "-" and "90.0" in text
    png = heatmap_png(["a", "b", "c"], part, tmp_path / "m.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def _record(task: str, prediction: str, answer: str) -> dict:
    return {"id": "x", "task": task, "prediction": prediction, "answer": answer, "answer_type": "exact"}


def test_phase_scores_keeps_probes_apart_from_tasks():
    records = [
        _record("a", "yes", "yes"),
        _record("a", "no", "yes"),
        _record("probe:vqa", "cat", "cat"),
        _record("c", "x", "x"),  # a task the phase does not evaluate: not counted
    ]
    scores = phase_scores(records, ["a", "b"], ["vqa"])
    assert scores.accuracy["a"] == 50.0 and scores.probes == {"vqa": 100.0}
    assert set(scores.accuracy) == {"a", "b"} and scores.accuracy["b"] != scores.accuracy["b"]  # NaN
    assert all("score" in r for r in records)


def _result(t: int, accuracy: dict, probes: dict, baseline=None, baseline_probes=None) -> TaskResult:
    return TaskResult(
        t,
        ["a", "b", "c"],
        accuracy,
        baseline,
        [],
        [],
        {},
        probe_accuracy=probes,
        baseline_probe_accuracy=baseline_probes,
    )


def test_table_keeps_probes_out_of_the_matrix_and_computes_retention():
    table = AccuracyTable(["a", "b", "c"])
    base = {"a": 10.0, "b": 20.0, "c": 30.0}
    table.add(_result(0, {"a": 80.0, "b": 25.0}, {"vqa": 40.0}, base, {"vqa": 50.0}))
    table.add(_result(1, {"a": 60.0, "b": 90.0, "c": 35.0}, {"vqa": 30.0}))
    table.add(_result(2, {"a": 50.0, "b": 70.0, "c": 95.0}, {"vqa": 25.0}))
    assert table.matrix[0] == [80.0, 25.0, None]
    data = json.loads(json.dumps(table.to_json()))
    assert data["matrix"][0][2] is None and data["baseline"] == [10.0, 20.0, 30.0]
    assert data["probes"] == {"vqa": {"baseline": 50.0, "after_task": [40.0, 30.0, 25.0], "retention": 0.5}}
    assert data["metrics"]["fwt"] == pytest.approx(((25 - 20) + (35 - 30)) / 2)


def test_zero_shot_row_in_leaderboards():
    assert zero_shot_metrics([10.0, 30.0]) == {
        "mft": 20.0,
        "mfn": 20.0,
        "maa": 15.0,
        "bwt": 0.0,
        "forgetting": 0.0,
        "fwt": 0.0,
    }
    runs = [
        {"method": "ewc", "stream": "s", "seed": 0, "mfn": 50.0, "baseline": [10.0, 30.0]},
        {"method": "lwf", "stream": "s", "seed": 0, "mfn": 40.0, "baseline": [10.0, 30.0]},
        {"method": "ewc", "stream": "s", "seed": 1, "mfn": 60.0, "baseline": [20.0, 40.0]},
        {"method": "old", "stream": "s", "seed": 2, "mfn": 1.0},  # no baseline: no zero-shot record
    ]
    zero = zero_shot_records(runs)
    assert [(z["seed"], z["mfn"]) for z in zero] == [(0, 20.0), (1, 30.0)]  # one per (stream, seed)
    entries = {e.method: e for e in leaderboard([*runs, *zero])}
    assert entries["zero_shot"].n == 2 and entries["zero_shot"].mean["mfn"] == 25.0
    assert "| zero_shot | s | 2 |" in to_markdown(list(entries.values()))


def _cfg(**stream) -> dict:
    return {"stream": {"name": "generated", **stream}}


def test_config_validates_eval_tasks_and_probes_with_field_names():
    assert config_from_dict({}).eval.tasks == "all" and config_from_dict({}).stream.probes == []
    cfg = config_from_dict(
        {
            "eval": {"tasks": "seen_and_next"},
            **_cfg(probes=[{"name": "vqa", "stream": "generated", "task": "ocr"}]),
        }
    )
    assert cfg.eval.tasks == "seen_and_next" and cfg.stream.probes[0].task == "ocr"
    assert config_from_dict(cfg.to_dict()) == cfg  # what workers rebuild from TaskJob.config
    bad = [
        ({"eval": {"tasks": "some"}}, "eval.tasks: must be one of"),
        (_cfg(probes=[{"name": "", "file": "x.json"}]), r"stream.probes\[0\].name"),
        (
            _cfg(probes=[{"name": "a", "file": "x"}, {"name": "a", "file": "y"}]),
            r"stream.probes\[1\].name: must be unique",
        ),
        (_cfg(probes=[{"name": "a"}]), r"stream.probes\[0\].stream: give exactly one"),
        (_cfg(probes=[{"name": "a", "stream": "generated"}]), r"stream.probes\[0\].task"),
        (_cfg(probes=[{"name": "a", "file": "x", "size": 3}]), r"stream.probes\[0\].size: unknown key"),
        (
            _cfg(probes=[{"name": "a", "file": "x", "max_samples": "3"}]),
            r"stream.probes\[0\].max_samples: must be",
        ),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(data)


def test_sweep_analysis_reads_matrices_with_null_cells():
    from mcl.analysis import SweepData, TrialData, leaderboard_frame, plot_matrices

    full = [[80.0, 10.0, 20.0], [30.0, 90.0, 10.0], [20.0, 40.0, 90.0]]
    trials = [
        TrialData(
            f"r{s}",
            f"ewc-generated-s{s}",
            "ewc",
            "generated",
            s,
            "FINISHED",
            tasks=["a", "b", "c"],
            matrix=masked(full, "seen_and_next"),
            baseline=[5.0, 10.0, 15.0],
        )
        for s in (0, 1)
    ]
    data = SweepData("sweep", "sweep", "mcl-sweeps", "sqlite://", "FINISHED", trials=trials)
    frame = leaderboard_frame(data).set_index("method")
    assert frame.loc["ewc", "mfn_mean"] == pytest.approx(50.0)
    assert frame.loc["ewc", "fwt_mean"] == pytest.approx(((10 - 10) + (10 - 15)) / 2)
    fig = plot_matrices(data)
    assert "-" in [t.get_text() for t in fig.axes[0].texts]  # the null cell, greyed
