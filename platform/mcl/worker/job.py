"""What one phase's workers are given (:class:`TaskJob`) and what rank 0 leaves behind (:class:`TaskResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mcl.run.rundir import PhaseDir


@dataclass
class TaskJob:
    """Everything one phase's training needs; plain data so it pickles to Ray workers.

    Attributes:
        config: The resolved experiment config as a dict.
        model_path: Resolved model folder or hub id.
        task_index: Position of the task being trained.
        task_names: All task names of the stream.
        previous_state_dir: The method's state folder after the previous phase, if any.
        steps: Optimiser steps of this phase (identical on every rank).
        evaluate_before: Also evaluate the untouched model first (the baseline row for forward transfer).
        phase: The phase of the task being trained (see :class:`mcl.methods_api.Phase`); ``config``
            already carries the phase's epochs and learning rate.
        evaluate: Evaluate all tasks at the end of this phase.
        optimize: Take optimiser steps (False: gradients only, for :meth:`Method.on_gradients`).
        driver_state: The method's driver-side state, saved with this phase's state by rank 0.
        eval_tasks: The tasks this phase's evaluation scores (``eval.tasks``); None: every task.
        probe_names: The probes (``stream.probes``) evaluated with them, and with the baseline.
    """

    config: dict[str, Any]
    model_path: str
    task_index: int
    task_names: list[str]
    previous_state_dir: str | None
    steps: int
    evaluate_before: bool = False
    phase: str = "train"
    evaluate: bool = True
    optimize: bool = True
    driver_state: dict[str, Any] | None = None
    eval_tasks: list[str] | None = None
    probe_names: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """``"<task>:<phase>"``: names the phase in progress records and step checkpoints."""
        return f"{self.task_index}:{self.phase}"


@dataclass
class TaskResult:
    """What a phase leaves behind (rank 0 writes it into the phase folder)."""

    task_index: int
    task_names: list[str]
    accuracy: dict[str, float]
    baseline_accuracy: dict[str, float] | None
    train_log: list[dict[str, float]]
    predictions: list[dict[str, Any]]
    timing: dict[str, float]
    memory: dict[str, float] = field(default_factory=dict)
    method_metrics: dict[str, float] = field(default_factory=dict)
    phase: str = "train"
    resumed_at_step: int = 0  # > 0: the phase continued from a step checkpoint taken after that many steps
    probe_accuracy: dict[str, float] = field(default_factory=dict)  # per probe name (stream.probes)
    baseline_probe_accuracy: dict[str, float] | None = None  # the untrained model's, with baseline_accuracy

    def save(self, out_dir: str | Path) -> Path:
        return PhaseDir(out_dir).write_result(asdict(self))

    @classmethod
    def load(cls, out_dir: str | Path) -> TaskResult:
        return cls(**PhaseDir(out_dir).read_result())
