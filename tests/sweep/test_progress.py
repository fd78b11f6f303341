"""The sweep's console progress: counts, each running trial's task and the ETA, without Ray."""

from __future__ import annotations

from mcl.sweep.progress import ProgressBoard, format_duration


def test_board_follows_trials_through_their_tasks():
    board = ProgressBoard(2, {"a": 2, "b": 2})
    assert board.trial_started("a") == ["[sweep] trial a started"]
    assert board.running == {"a": "task 1/2"}
    lines = board.trial_result("a", {"tasks_done": 1, "task": "aerial", "acc_seen": 50.0})
    assert lines[0] == "[sweep] a: task 1/2 aerial done, acc_seen 50.0"
    assert lines[1].startswith(
        "[sweep] 0/2 trials done, 0 failed, 1 running (a: task 2/2); elapsed 0m00s, ETA "
    )
    assert board.trial_result("a", {"tasks_done": 2, "acc_seen": 40.0})[1].count("a: registering") == 1
    assert board.trial_result("a", {"done": True, "tasks_done": 2}) == []
    assert board.trial_completed("a")[0] == "[sweep] trial a finished"
    board.trial_started("b")
    assert board.trial_failed("b")[1].startswith("[sweep] 1/2 trials done, 1 failed, 0 running (-)")
    assert board.units_this_attempt == 2 and board.tasks_done == {"a": 2}


def test_eta_is_unknown_until_a_task_finishes_and_ticks_are_rate_limited():
    board = ProgressBoard(1, {"a": 3})
    assert board.line().endswith("ETA ?")
    assert len(board.tick()) == 1 and board.tick() == []
    assert format_duration(725.9) == "12m05s"
