"""The accuracy table of a run, built from its phases' results: for the driver, local runs and sweeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mcl.evaluation.metrics import accuracy_matrix_json, cl_metrics
from mcl.worker.job import TaskResult


@dataclass
class AccuracyTable:
    """Row ``t`` = accuracy (%) on every task after training task ``t``; ``baseline`` = the untrained model's."""

    task_names: list[str]
    matrix: list[list[float]] = field(default_factory=list)
    baseline: list[float] | None = None

    def add(self, result: TaskResult) -> list[float]:
        """Add the row of a task's evaluating phase (and the baseline, if the phase measured it)."""
        row = [result.accuracy[n] for n in self.task_names]
        self.matrix.append(row)
        if result.baseline_accuracy is not None:
            self.baseline = [result.baseline_accuracy[n] for n in self.task_names]
        return row

    def metrics(self) -> dict[str, float]:
        return cl_metrics(self.matrix, self.baseline)

    def to_json(self) -> dict[str, Any]:
        """The table as ``accuracy_matrix.json`` holds it (tasks, matrix, baseline, metrics)."""
        data = accuracy_matrix_json(self.task_names, self.matrix)
        if self.baseline is not None:
            data["baseline"] = self.baseline
        data["metrics"] = self.metrics()
        return data


def format_matrix(names: list[str], matrix: list[list[float]]) -> str:
    """The accuracy matrix as an aligned text table (rows: after training task t)."""
    width = max(8, *(len(n) for n in names)) + 1
    head = " " * (width + 6) + "".join(n.rjust(width) for n in names)
    lines = [head]
    for t, row in enumerate(matrix):
        lines.append(f"after {names[t]}".ljust(width + 6) + "".join(f"{v:{width}.1f}" for v in row))
    return "\n".join(lines)


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(
        f"{k.upper()} {v:+.2f}" if k in ("bwt", "fwt") else f"{k.upper()} {v:.2f}" for k, v in metrics.items()
    )
