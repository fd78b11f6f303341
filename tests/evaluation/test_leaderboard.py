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


def test_several_orders_add_the_std_over_orders_of_the_seed_means():
    # order 0: seeds 20, 30 (mean 25); order 1: seeds 40, 60 (mean 50); joint: one order only
    records = [
        {"method": "seq", "stream": "g", "seed": s, "order": o, "mfn": v}
        for (o, s), v in {(0, 0): 20.0, (0, 1): 30.0, (1, 0): 40.0, (1, 1): 60.0}.items()
    ] + [{"method": "joint", "stream": "g", "seed": 0, "mfn": 90.0}]
    joint, seq = leaderboard(records, metrics=("mfn",))
    assert (seq.n, seq.seeds, seq.orders) == (4, 2, 2) and seq.mean["mfn"] == 37.5
    assert seq.order_std["mfn"] == pytest.approx(25.0 / math.sqrt(2.0))
    assert joint.orders == 1 and math.isnan(joint.order_std["mfn"])
    rows = to_csv_rows([joint, seq], metrics=("mfn",))
    assert list(rows[1]) == ["method", "stream", "seeds", "orders", "mfn_mean", "mfn_std", "mfn_order_std"]
    assert rows[1]["seeds"] == 2 and rows[1]["mfn_order_std"] == pytest.approx(17.677, abs=1e-3)
    table = to_markdown([joint, seq], metrics=("mfn",))
    assert "| method | stream | seeds | orders | MFN | MFN order std |" in table
    assert (
        "| seq | g | 2 | 2 | 37.5 ± 17.1 | 17.7 |" in table
        and "| joint | g | 1 | 1 | 90.0 ± 0.0 | n/a |" in table
    )
