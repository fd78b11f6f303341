"""Live progress of a sweep on the console: trials done/failed/running, each running trial's task, an ETA.

:class:`ProgressBoard` keeps the counts and writes the lines (no Ray); :func:`progress_callback` wraps it in
the Tune callback that feeds it and prints its lines.
"""

from __future__ import annotations

import time
from typing import Any

STATUS_EVERY_S = 60  # a status line at least this often while trials run


class ProgressBoard:
    """The console state of one Tune experiment of ``total`` trials; ``tasks``: trial key -> its task count.

    Each ``trial_*`` method records an event and returns the lines to print for it.
    """

    def __init__(self, total: int, tasks: dict[str, int]) -> None:
        self.total = total
        self.tasks = tasks
        self.started = time.perf_counter()
        self.last_print = 0.0
        self.tasks_done: dict[str, int] = {}
        self.units_this_attempt = 0  # tasks finished since this attempt started: the ETA's pace
        self.finished = 0
        self.failed = 0
        self.running: dict[str, str] = {}  # trial key -> what it is doing

    def line(self) -> str:
        """The status line: counts, running trials and their tasks, elapsed time and ETA."""
        elapsed = time.perf_counter() - self.started
        remaining = sum(self.tasks[k] - self.tasks_done.get(k, 0) for k in self.tasks)
        eta = "?"
        if self.units_this_attempt:
            eta = format_duration(elapsed / self.units_this_attempt * remaining)
        running = ", ".join(f"{k}: {v}" for k, v in sorted(self.running.items())) or "-"
        return (
            f"[sweep] {self.finished}/{self.total} trials done, {self.failed} failed, {len(self.running)} "
            f"running ({running}); elapsed {format_duration(elapsed)}, ETA {eta}"
        )

    def trial_started(self, key: str) -> list[str]:
        self.running[key] = f"task {self.tasks_done.get(key, 0) + 1}/{self.tasks[key]}"
        return [f"[sweep] trial {key} started"]

    def trial_result(self, key: str, result: dict[str, Any]) -> list[str]:
        total = self.tasks[key]
        done = int(result.get("tasks_done", 0))
        before = self.tasks_done.get(key, 0)
        if done > before:
            self.units_this_attempt += done - before
        self.tasks_done[key] = max(done, before)
        if result.get("done"):
            return []
        self.running[key] = f"task {min(done + 1, total)}/{total}" if done < total else "registering"
        acc_seen = result.get("acc_seen", float("nan"))
        return [
            f"[sweep] {key}: task {done}/{total} {result.get('task', '')} done, acc_seen {acc_seen:.1f}",
            self.line(),
        ]

    def trial_completed(self, key: str) -> list[str]:
        self.running.pop(key, None)
        self.finished += 1
        return [f"[sweep] trial {key} finished", self.line()]

    def trial_failed(self, key: str) -> list[str]:
        self.running.pop(key, None)
        self.failed += 1
        return [f"[sweep] trial {key} FAILED (see its log above; re-run the sweep to retry it)", self.line()]

    def tick(self) -> list[str]:
        """The status line when the last one is older than :data:`STATUS_EVERY_S`, else nothing."""
        if time.perf_counter() - self.last_print > STATUS_EVERY_S:
            self.last_print = time.perf_counter()
            return [self.line()]
        return []


def progress_callback(total: int, tasks: dict[str, int]) -> Any:
    """A Tune callback that prints a :class:`ProgressBoard`'s lines. (Tune pickles its callbacks: this one
    prints through :func:`_say`, never a captured logger.)"""
    from ray.tune import Callback

    class SweepProgress(Callback):
        def __init__(self) -> None:
            self.board = ProgressBoard(total, tasks)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _say(self.board.trial_started(_trial_key(trial)))

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            _say(self.board.trial_result(_trial_key(trial), result))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _say(self.board.trial_completed(_trial_key(trial)))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _say(self.board.trial_failed(_trial_key(trial)))

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            _say(self.board.tick())

    return SweepProgress()


def format_duration(seconds: float) -> str:
    """``12m05s``."""
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _trial_key(trial: Any) -> str:
    return trial.config["trial"]["key"]


def _say(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)
