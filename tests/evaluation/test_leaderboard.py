"""Leaderboard aggregation: hand-computed means and sample standard deviations, ordering, formats."""

from __future__ import annotations

import math

import pytest

from mcl.evaluation.leaderboard import leaderboard, mean_std, to_csv_rows, to_markdown


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    mean, std = mean_std([])
    assert math.isnan(mean) and math.isnan(std)


def test_leaderboard_groups_by_method_and_stream_and_sorts_by_mfn():
    records = [
        {"method": "seq", "stream": "g", "seed": 0, "mfn": 20.0, "bwt": -80.0},
        {"method": "seq", "stream": "g", "seed": 1, "mfn": 30.0, "bwt": -70.0},
        {"method": "joint", "stream": "g", "seed": 0, "mfn": 90.0, "bwt": 0.0},
        {"method": "seq", "stream": "h", "seed": 0, "mfn": 50.0, "bwt": float("nan")},
    ]
    entries = leaderboard(records, metrics=("mfn", "bwt"))
    assert [(e.method, e.stream, e.n) for e in entries] == [
        ("joint", "g", 1),
        ("seq", "g", 2),
        ("seq", "h", 1),
    ]
    seq = entries[1]
    assert seq.mean["mfn"] == 25.0 and seq.std["mfn"] == pytest.approx(math.sqrt(50.0))
    assert math.isnan(entries[2].mean["bwt"])  # non-finite values are left out, not averaged in
    table = to_markdown(entries, metrics=("mfn", "bwt"))
    assert "| seq | g | 2 | 25.0 ± 7.1 | -75.0 ± 7.1 |" in table
    assert "n/a" in table
    assert to_csv_rows(entries, metrics=("mfn",))[0] == {
        "method": "joint",
        "stream": "g",
        "seeds": 1,
        "mfn_mean": 90.0,
        "mfn_std": 0.0,
    }
