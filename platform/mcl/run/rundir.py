"""The run folder: the only code that knows its file names.

A run folder (``<tracking.output_dir>/<run_name>``, or a sweep's ``trials/<key>``) holds::

    config.yaml              the run's resolved config (resume compares against it)
    progress.json            what finished: the MLflow run, each phase's folder, each task's run
    abort                    the driver asks its running Train job to stop before the next phase
    task<NN>-<task>[-<phase>]/           one published phase (renamed from ``.partial`` when whole)
        task_result.json     accuracy, predictions, losses, timing of the phase
        state/               the method's state after the phase (+ driver_state.json)
    ray-train/               Ray Train's storage for the run's worker group (step checkpoints)
    accuracy_matrix.json/.png
    trial_done.json          (sweep trials) the finished trial's summary
    trial_stopped.json       (sweep trials) stopped early by the scheduler: not resumed

:class:`RunDir` reads and writes all of these; :class:`PhaseDir` the inside of one phase folder. Everything
that must survive a kill is written atomically (a temp file renamed over the old one).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
PROGRESS_FILE = "progress.json"
ABORT_FILE = "abort"
RESULT_FILE = "task_result.json"
STATE_DIR = "state"
DRIVER_STATE_FILE = "driver_state.json"
PARTIAL_SUFFIX = ".partial"
RAY_TRAIN_DIR = "ray-train"
MATRIX_JSON = "accuracy_matrix.json"
MATRIX_PNG = "accuracy_matrix.png"
TRIAL_DONE_FILE = "trial_done.json"
TRIAL_STOPPED_FILE = "trial_stopped.json"


def write_json_atomic(path: Path, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` as JSON so that a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    tmp.replace(path)


@dataclass
class Progress:
    """What a run folder records after every finished phase, so that a re-run resumes it."""

    run_id: str = ""
    phases: dict[str, str] = field(default_factory=dict)  # "<task>:<phase>" -> phase folder
    task_runs: dict[str, str] = field(default_factory=dict)  # "<task>" -> MLflow run id
    tasks_done: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "phases": self.phases,
            "task_runs": self.task_runs,
            "tasks_done": self.tasks_done,
        }


def phase_folder_name(task_index: int, task_name: str, phase: str) -> str:
    """``task<NN>-<task>`` for a task's ``train`` phase, ``task<NN>-<task>-<phase>`` for its other phases."""
    suffix = "" if phase == "train" else f"-{phase}"
    return f"task{task_index:02d}-{task_name}{suffix}"


class PhaseDir:
    """One phase folder: the method's ``state/`` and the phase's ``task_result.json``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def state(self) -> Path:
        return self.path / STATE_DIR

    @property
    def result_file(self) -> Path:
        return self.path / RESULT_FILE

    def is_complete(self) -> bool:
        return self.result_file.exists()

    def write_result(self, data: dict[str, Any]) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.result_file, data, indent=None)
        return self.result_file

    def read_result(self) -> dict[str, Any]:
        return json.loads(self.result_file.read_text())

    def write_driver_state(self, driver_state: dict[str, Any]) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / DRIVER_STATE_FILE).write_text(json.dumps(driver_state))


def read_driver_state(state_dir: str | Path | None) -> dict[str, Any] | None:
    """The driver state saved in a state folder (None at the start of the stream or if none was saved)."""
    if state_dir is None:
        return None
    path = Path(state_dir) / DRIVER_STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


class RunDir:
    """A run folder (see the module docstring for its layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- the run as a whole
    def holds_a_run(self) -> bool:
        """True when the folder exists and is not empty (a run, or what an attempt left)."""
        return self.path.exists() and any(self.path.iterdir())

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def read_progress(self) -> Progress:
        path = self.path / PROGRESS_FILE
        if not path.exists():
            return Progress()
        data = json.loads(path.read_text())
        return Progress(data["run_id"], data["phases"], data["task_runs"], data["tasks_done"])

    def write_progress(self, progress: Progress) -> None:
        write_json_atomic(self.path / PROGRESS_FILE, progress.to_dict())

    # -- phases
    def phase(self, folder_name: str) -> PhaseDir:
        return PhaseDir(self.path / folder_name)

    def partial(self, folder_name: str) -> PhaseDir:
        """Where rank 0 writes a phase before :meth:`publish` makes it visible as a whole."""
        return PhaseDir(self.path / (folder_name + PARTIAL_SUFFIX))

    def publish(self, folder_name: str) -> PhaseDir:
        """Rename the phase's partial folder to its final name (atomic: readers see all of it or nothing)."""
        self.partial(folder_name).path.replace(self.path / folder_name)
        return self.phase(folder_name)

    def is_published(self, folder_name: str) -> bool:
        return self.phase(folder_name).is_complete()

    def clear_phase(self, folder_name: str) -> None:
        """Remove what an interrupted attempt left of a phase (its folder and its partial folder)."""
        shutil.rmtree(self.path / folder_name, ignore_errors=True)
        shutil.rmtree(self.partial(folder_name).path, ignore_errors=True)

    # -- the driver asks its Train job to stop
    def request_abort(self, reason: str = "the driver stopped this run") -> None:
        (self.path / ABORT_FILE).write_text(reason + "\n")

    def abort_requested(self) -> bool:
        return (self.path / ABORT_FILE).exists()

    def clear_abort(self) -> None:
        (self.path / ABORT_FILE).unlink(missing_ok=True)

    # -- Ray Train's storage for the run's worker group (its step checkpoints)
    def ray_storage(self, checkpoint_storage: str = "") -> tuple[str, str]:
        """(``storage_path``, ``name``) of the run's Ray Train ``RunConfig``: ``<run>/ray-train``, or with
        ``train.checkpoint_storage`` (a shared folder or a URI: ``file://``, ``s3://``, ``gs://``)
        ``<checkpoint_storage>/<run folder name>-<MLflow run id>``: the run id keeps runs with the same
        folder name (a sweep's trial keys, a re-created run) apart, and stays the same when a run resumes."""
        if not checkpoint_storage:
            return str(self.path), RAY_TRAIN_DIR
        name = f"{self.path.name}-{self.read_progress().run_id}"
        if "://" in checkpoint_storage:
            return checkpoint_storage, name
        return str(Path(checkpoint_storage).resolve()), name  # Ray wants an absolute path

    def clear_ray_storage(self, checkpoint_storage: str = "") -> None:
        """Remove Ray Train's storage of this run (a fit with the same storage would restore from it)."""
        storage_path, name = self.ray_storage(checkpoint_storage)
        if "://" not in storage_path:
            shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
            return
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        target = f"{root.rstrip('/')}/{name}"
        if fs.get_file_info(target).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(target)

    # -- results
    @property
    def matrix_json(self) -> Path:
        return self.path / MATRIX_JSON

    @property
    def matrix_png(self) -> Path:
        return self.path / MATRIX_PNG

    # -- sweep trials
    def write_trial_done(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.path / TRIAL_DONE_FILE, data)

    def read_trial_done(self) -> dict[str, Any] | None:
        path = self.path / TRIAL_DONE_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def write_trial_stopped(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.path / TRIAL_STOPPED_FILE, data)

    def read_trial_stopped(self) -> dict[str, Any] | None:
        path = self.path / TRIAL_STOPPED_FILE
        return json.loads(path.read_text()) if path.exists() else None
