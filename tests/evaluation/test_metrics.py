"""Continual-learning metrics against hand-computed accuracy matrices."""

import json

import numpy as np
import pytest

from mcl.evaluation.metrics import (
    accuracy_matrix_json,
    average_forgetting,
    bwt,
    cl_metrics,
    fwt,
    heatmap_png,
    last_step_scores,
    maa,
    mfn,
    mft,
)

# a[t][i]: accuracy on task i after training through task t.
A2 = [
    [80, 20],
    [60, 90],
]
# mft = (80 + 90) / 2 = 85;  mfn = (60 + 90) / 2 = 75;  maa = (80 + (60 + 90) / 2) / 2 = 77.5
# bwt = 60 - 80 = -20;  forgetting = 80 - 60 = 20;  fwt with baseline [10, 10] = 20 - 10 = 10

A3 = [
    [90, 30, 20],
    [100, 80, 40],
    [60, 50, 70],
]
# mft = (90 + 80 + 70) / 3 = 80;  mfn = (60 + 50 + 70) / 3 = 60
# maa = (90 + (100 + 80) / 2 + (60 + 50 + 70) / 3) / 3 = (90 + 90 + 60) / 3 = 80
# bwt = ((60 - 90) + (50 - 80)) / 2 = -30
# forgetting: f0 = max(90, 100) - 60 = 40, f1 = 80 - 50 = 30 -> 35 (the best accuracy, not the diagonal)
# fwt with baseline [25, 10, 30] = ((30 - 10) + (40 - 30)) / 2 = 15

A4 = [
    [60, 10, 20, 30],
    [50, 70, 30, 20],
    [40, 80, 90, 40],
    [30, 60, 70, 80],
]
# mft = (60 + 70 + 90 + 80) / 4 = 75;  mfn = (30 + 60 + 70 + 80) / 4 = 60
# maa = (60 + (50 + 70) / 2 + (40 + 80 + 90) / 3 + (30 + 60 + 70 + 80) / 4) / 4
#     = (60 + 60 + 70 + 60) / 4 = 62.5
# bwt = ((30 - 60) + (60 - 70) + (70 - 90)) / 3 = -20
# forgetting: f0 = 60 - 30 = 30, f1 = max(70, 80) - 60 = 20, f2 = 90 - 70 = 20 -> 70 / 3
# fwt with baseline [0, 10, 15, 10] = ((10 - 10) + (30 - 15) + (40 - 10)) / 3 = 15


@pytest.mark.parametrize(
    ("a", "baseline", "expected"),
    [
        (A2, [10, 10], {"mft": 85, "mfn": 75, "maa": 77.5, "bwt": -20, "forgetting": 20, "fwt": 10}),
        (A3, [25, 10, 30], {"mft": 80, "mfn": 60, "maa": 80, "bwt": -30, "forgetting": 35, "fwt": 15}),
        (
            A4,
            [0, 10, 15, 10],
            {"mft": 75, "mfn": 60, "maa": 62.5, "bwt": -20, "forgetting": 70 / 3, "fwt": 15},
        ),
    ],
)
def test_metrics_match_hand_computation(a, baseline, expected):
    assert mft(a) == pytest.approx(expected["mft"])
    assert mfn(a) == pytest.approx(expected["mfn"])
    assert maa(a) == pytest.approx(expected["maa"])
    assert bwt(a) == pytest.approx(expected["bwt"])
    assert average_forgetting(a) == pytest.approx(expected["forgetting"])
    assert fwt(a, baseline) == pytest.approx(expected["fwt"])
    assert cl_metrics(a, baseline) == pytest.approx(expected)


def test_cl_metrics_omits_fwt_without_baseline():
    assert set(cl_metrics(A3)) == {"mft", "mfn", "maa", "bwt", "forgetting"}


def test_single_task():
    a = [[70]]
    assert cl_metrics(a, [40]) == {"mft": 70, "mfn": 70, "maa": 70, "bwt": 0.0, "forgetting": 0.0, "fwt": 0.0}
    assert last_step_scores(a) == [70.0]


def test_forgetting_is_negative_when_accuracy_only_rises():
    # Chaudhry et al.'s max runs over l <= T-2 only, so a final gain shows as negative forgetting.
    a = [[50, 0], [60, 70]]
    assert bwt(a) == 10
    assert average_forgetting(a) == -10


def test_last_step_scores_is_last_row_as_floats():
    scores = last_step_scores(A4)
    assert scores == [30.0, 60.0, 70.0, 80.0]
    assert all(isinstance(s, float) for s in scores)


def test_accepts_numpy_and_tuples():
    assert cl_metrics(np.array(A3, dtype=float)) == pytest.approx(cl_metrics(A3))
    assert mft(tuple(tuple(r) for r in A2)) == 85


@pytest.mark.parametrize(
    ("a", "message"),
    [
        ([], "empty"),
        ([[1, 2], [3]], "row 1 has 1 entries, expected 2"),
        ([[1, 2]], "row 0 has 2 entries, expected 1"),
        ([[1], [2]], "row 0 has 1 entries, expected 2"),
        ([[1, 2, 3], [4, 5, 6]], "not square"),
        ([1, 2], "row 0"),
        (["ab", "cd"], "row 0"),
        ([[1, float("nan")], [3, 4]], r"\[0\]\[1\]"),
    ],
)
def test_rejects_bad_matrices(a, message):
    for fn in (mft, mfn, maa, bwt, average_forgetting, last_step_scores, cl_metrics):
        with pytest.raises(ValueError, match=message):
            fn(a)


def test_fwt_rejects_wrong_baseline_length():
    with pytest.raises(ValueError, match="baseline has 2 entries, expected 3"):
        fwt(A3, [0, 0])
    with pytest.raises(ValueError, match="baseline"):
        cl_metrics(A3, [0, 0, 0, 0])


def test_accuracy_matrix_json_round_trips():
    out = accuracy_matrix_json(["vqa", "ocr"], A2)
    assert out == {"tasks": ["vqa", "ocr"], "matrix": [[80.0, 20.0], [60.0, 90.0]]}
    assert json.loads(json.dumps(out)) == out
    with pytest.raises(ValueError, match="3 task names for a 2x2"):
        accuracy_matrix_json(["a", "b", "c"], A2)


def test_heatmap_png_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = heatmap_png(["vqa", "ocr", "grounding"], A3, tmp_path / "plots" / "matrix.png", title="run 1")
    assert path == tmp_path / "plots" / "matrix.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2 task names"):
        heatmap_png(["a", "b"], A3, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
