"""The accuracy table of a run, built from its phases' results: for the driver, local runs and sweeps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mcl.evaluation.metrics import accuracy_matrix_json, cl_metrics
from mcl.streams.probes import retention as probe_retention
from mcl.worker.job import TaskResult


@dataclass
class AccuracyTable:
    """Row ``t`` = accuracy (%) on every task after training task ``t`` (None: not evaluated, see
    ``eval.tasks``); ``baseline`` = the untrained model's. Probes (``stream.probes``) are kept apart:
    ``probes[name]`` = accuracy after every task, ``baseline_probes[name]`` = the untrained model's."""

    task_names: list[str]
    matrix: list[list[float | None]] = field(default_factory=list)
    baseline: list[float | None] | None = None
    probes: dict[str, list[float]] = field(default_factory=dict)
    baseline_probes: dict[str, float] | None = None

    def add(self, result: TaskResult) -> list[float | None]:
        """Add the row of a task's evaluating phase (and the baseline, if the phase measured it)."""
        row = [result.accuracy.get(n) for n in self.task_names]
        self.matrix.append(row)
        if result.baseline_accuracy is not None:
            self.baseline = [result.baseline_accuracy.get(n) for n in self.task_names]
            self.baseline_probes = result.baseline_probe_accuracy
        for name, value in result.probe_accuracy.items():
            self.probes.setdefault(name, []).append(value)
        return row

    def metrics(self) -> dict[str, float]:
        return cl_metrics(self.matrix, self.baseline)

    def retention(self) -> dict[str, float]:
        """Per probe: accuracy after the last task so far / the untrained model's."""
        base = self.baseline_probes or {}
        return {n: probe_retention(v[-1], base[n]) for n, v in self.probes.items() if v and n in base}

    def to_json(self) -> dict[str, Any]:
        """The table as ``accuracy_matrix.json`` holds it (tasks, matrix with nulls for cells not evaluated,
        baseline, metrics, and ``probes`` when the run has any)."""
        data = accuracy_matrix_json(self.task_names, self.matrix)
        if self.baseline is not None:
            data["baseline"] = self.baseline
        data["metrics"] = self.metrics()
        if self.probes:
            base, kept = self.baseline_probes or {}, self.retention()
            data["probes"] = {
                n: {"baseline": base.get(n), "after_task": v, "retention": _finite(kept.get(n))}
                for n, v in self.probes.items()
            }
        return data


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def format_matrix(names: list[str], matrix: list[list[float | None]]) -> str:
    """The accuracy matrix as an aligned text table (rows: after training task t; "-": not evaluated)."""
    width = max(8, *(len(n) for n in names)) + 1
    head = " " * (width + 6) + "".join(n.rjust(width) for n in names)
    lines = [head]
    for t, row in enumerate(matrix):
        cells = "".join("-".rjust(width) if v is None else f"{v:{width}.1f}" for v in row)
        lines.append(f"after {names[t]}".ljust(width + 6) + cells)
    return "\n".join(lines)


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(
        f"{k.upper()} {v:+.2f}" if k in ("bwt", "fwt") else f"{k.upper()} {v:.2f}" for k, v in metrics.items()
    )
