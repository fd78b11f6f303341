"""One continual-learning run: prepare -> plan -> execute -> record.

- :mod:`~mcl.run.prepare`: every check before compute (:func:`prepare_run`), and the run folder's opening;
- :mod:`~mcl.run.plan`: pure phase planning (each phase's job and training rows), no Ray;
- :mod:`~mcl.run.executors`: what trains the phases (one Ray Train job, or this process);
- :mod:`~mcl.run.record`: MLflow recording;
- :mod:`~mcl.run.rundir`: the run folder, the only code that knows its files;
- :mod:`~mcl.run.table`: the accuracy table built from the phases' results;
- :mod:`~mcl.run.driver`: :func:`run_experiment` and :func:`run_stream_locally`, one driver loop for both.

The names below are imported on first use (``from mcl.run import run_experiment``), so that worker code can
import :mod:`mcl.run.rundir` without loading the driver.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunStopped": "mcl.errors",
    "LocalStreamResult": "mcl.run.driver",
    "RunSummary": "mcl.run.driver",
    "StreamLoop": "mcl.run.driver",
    "run_experiment": "mcl.run.driver",
    "run_stream_locally": "mcl.run.driver",
    "PlannedPhase": "mcl.run.plan",
    "baseline_eval_rows": "mcl.run.plan",
    "eval_rows": "mcl.run.plan",
    "phase_eval_rows": "mcl.run.plan",
    "phase_config": "mcl.run.plan",
    "phase_folder": "mcl.run.plan",
    "phase_job": "mcl.run.plan",
    "phase_training_data": "mcl.run.plan",
    "plan_phases": "mcl.run.plan",
    "task_training_rows": "mcl.run.plan",
    "PreparedRun": "mcl.run.prepare",
    "check_image_text_model": "mcl.run.prepare",
    "prepare_run": "mcl.run.prepare",
    "PhaseDir": "mcl.run.rundir",
    "Progress": "mcl.run.rundir",
    "RunDir": "mcl.run.rundir",
    "AccuracyTable": "mcl.run.table",
    "format_matrix": "mcl.run.table",
    "format_metrics": "mcl.run.table",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mcl.run' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
