"""General-capability probes (``stream.probes``): evaluation-only tasks, never trained on.

A probe is the test split of a task of any registered stream (whose options may name an export, see
:mod:`mcl.streams.sources`), or an MLLM-CL test file (:func:`mcl.streams.formats.read_mllmcl_test`). Its
samples carry the task ``probe:<name>``, so their records are scored apart from the stream's tasks: probes
never enter the accuracy matrix or the CL metrics. They are evaluated for the untrained model and after
every task; ``retention`` = final accuracy / untrained accuracy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mcl.errors import ConfigError, DataError
from mcl.streams.registry import TaskData, build_stream

if TYPE_CHECKING:
    from mcl.config import ProbeConfig

PROBE_PREFIX = "probe:"


def probe_task_name(name: str) -> str:
    """The ``task`` a probe's samples and records carry: ``probe:<name>``."""
    return f"{PROBE_PREFIX}{name}"


def load_probe(probe: ProbeConfig, index: int, limit: int = 0) -> TaskData:
    """The probe's test samples (the first ``probe.max_samples``, else ``limit``; 0 = all), each with the
    task ``probe:<name>``, as a task named ``probe.name`` with no training samples."""
    where = f"stream.probes[{index}]"
    if probe.file:
        samples = _file_samples(probe, where)
    else:
        stream = build_stream(probe.stream, probe.root or ".", probe.options)
        tasks = {t.name: t for t in stream.tasks}
        if probe.task not in tasks:
            raise ConfigError(
                f"{where}.task: stream {probe.stream!r} has no task {probe.task!r}; its tasks: "
                f"{', '.join(tasks)}"
            )
        samples = tasks[probe.task].test
    count = probe.max_samples or limit or len(samples)
    tagged = [dataclasses.replace(s, task=probe_task_name(probe.name)) for s in samples[:count]]
    if not tagged:
        raise DataError(f"{where}: probe {probe.name!r} has no test samples")
    return TaskData(probe.name, [], tagged)


def _file_samples(probe: ProbeConfig, where: str) -> Sequence:
    from mcl.streams.formats import read_mllmcl_test

    path = Path(probe.file)
    if not path.is_file():
        raise ConfigError(f"{where}.file: no such file {probe.file!r}")
    root = probe.image_root or str(path.parent)
    return read_mllmcl_test(path, root, probe.name, probe.answer_type)


def load_probes(probes: Sequence[ProbeConfig], limit: int = 0) -> list[TaskData]:
    """Every probe of ``stream.probes``, in order (see :func:`load_probe`)."""
    return [load_probe(p, i, limit) for i, p in enumerate(probes)]


def retention(final: float, untrained: float) -> float:
    """Final accuracy / untrained accuracy (NaN when the untrained model scored 0)."""
    return final / untrained if untrained > 0 else math.nan


__all__ = ["PROBE_PREFIX", "load_probe", "load_probes", "probe_task_name", "retention"]
