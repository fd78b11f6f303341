"""Evaluation policy (``eval.tasks``): which task columns of the accuracy matrix each phase evaluates. Pure.

- ``all``: every task after every task (``T^2`` evaluations of trained models).
- ``seen_and_next``: after task ``k``, the tasks seen so far (``0..k``) and the next one (``k+1``). Every
  metric of :mod:`mcl.evaluation.metrics` reads only those cells: MFT, MFN, MAA, BWT and forgetting read
  ``i <= t``; FWT reads ``a[i-1][i]`` (the next task's column) and the untrained model's column ``i``. So
  ``T(T+1)/2 + T-1`` trained-row evaluations instead of ``T^2`` (MSVQA's 20 steps: 229 instead of 400).

The untrained model (the baseline row) is evaluated on every task under both policies: FWT needs its
columns ``1..T-1``, and leaderboards show the whole row as ``zero_shot``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

EvalTasks = Literal["all", "seen_and_next"]
POLICIES: tuple[str, ...] = ("all", "seen_and_next")


def _checked(policy: str, num_tasks: int) -> None:
    if policy not in POLICIES:
        raise ValueError(f"eval.tasks: must be one of {list(POLICIES)}, got {policy!r}")
    if num_tasks < 1:
        raise ValueError(f"a stream has at least one task, got {num_tasks}")


def evaluated_columns(policy: str, task_index: int, num_tasks: int) -> list[int]:
    """The task columns evaluated after training task ``task_index`` (the row ``task_index``)."""
    _checked(policy, num_tasks)
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} out of range for {num_tasks} tasks")
    if policy == "all":
        return list(range(num_tasks))
    return list(range(min(task_index + 2, num_tasks)))


def baseline_columns(policy: str, num_tasks: int) -> list[int]:
    """The task columns the untrained model is evaluated on: every task, under every policy."""
    _checked(policy, num_tasks)
    return list(range(num_tasks))


def evaluation_count(policy: str, num_tasks: int) -> int:
    """Task evaluations of the trained rows (the baseline row not counted): ``T^2`` under ``all``,
    ``T(T+1)/2 + T-1`` under ``seen_and_next``."""
    return sum(len(evaluated_columns(policy, k, num_tasks)) for k in range(num_tasks))


def masked(matrix: Sequence[Sequence[float | None]], policy: str) -> list[list[float | None]]:
    """``matrix`` with the cells ``policy`` does not evaluate set to None (what a run under it records)."""
    size = len(matrix)
    out: list[list[float | None]] = []
    for t, row in enumerate(matrix):
        keep = set(evaluated_columns(policy, t, size))
        out.append([v if i in keep else None for i, v in enumerate(row)])
    return out


__all__ = ["POLICIES", "EvalTasks", "baseline_columns", "evaluated_columns", "evaluation_count", "masked"]
