"""Benchmarks laid out as one instructions folder and one images folder under the data root (CoIN, UCIT).

Task ``t``'s annotations are ``<instructions_dir>/<folder>/<train_file>`` and ``.../<test_file>``, where
``folder`` is the first of the task's candidate folders that holds the file; every image path in them is
relative to ``<images_dir>``. Both folders are stream options with per-benchmark defaults; ``layout`` and
the other options of :mod:`mcl.streams.sources` apply as for every published benchmark. A benchmark may add
options of its own and a ``finish`` step that sees the loaded tasks before the sample limits apply (CoIN
joins the TextVQA annotators' answers there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcl.streams.formats import AnswerTypeRule
from mcl.streams.registry import Stream, TaskData
from mcl.streams.sources import (
    BenchmarkSpec,
    StreamOptions,
    TaskLayout,
    TaskSpec,
    folder_option,
    limit_tasks,
    load_tasks,
    parse_options,
)

FinishStep = Callable[[list[TaskData], Path, StreamOptions], list[TaskData]]


@dataclass(frozen=True)
class InstructionTask:
    """One row of a benchmark's task table.

    Attributes:
        name: Task name.
        answer_type: Scorer of its samples (the default where ``answer_rule`` is set).
        folders: Candidate folders under the instructions folder, the first holding the file wins;
            empty = ``(name,)``.
        train_file: Train annotation file in the task's folder.
        test_file: Test annotation file in the task's folder.
        answer_rule: Optional per-row rule ``(row, question) -> scorer``.
        answer_fields: Test-row fields holding the answer, the first present wins.
    """

    name: str
    answer_type: str
    folders: tuple[str, ...] = ()
    train_file: str = "train.json"
    test_file: str = "test.json"
    answer_rule: AnswerTypeRule | None = None
    answer_fields: tuple[str, ...] = ("answer",)

    def spec(self, instructions_dir: str, images_dir: str) -> TaskSpec:
        """The task with its instruction and image folders at the given places under the root."""
        folders = self.folders or (self.name,)

        def files(name: str) -> tuple[str, ...]:
            return tuple((Path(instructions_dir) / folder / name).as_posix() for folder in folders)

        layout = TaskLayout(files(self.train_file), files(self.test_file), images_dir, images_dir)
        return TaskSpec(self.name, layout, self.answer_type, self.answer_rule, self.answer_fields)


@dataclass(frozen=True)
class InstructionBenchmark:
    """A benchmark's stream name, task table (in published order) and default folders.

    Attributes:
        extra_options: Further stream options of this benchmark with their defaults.
        finish: Optional step ``(tasks, root, options) -> tasks`` run on the loaded tasks (all samples).
    """

    stream: str
    tasks: tuple[InstructionTask, ...]
    instructions_dir: str
    images_dir: str
    extra_options: Mapping[str, Any] = field(default_factory=dict)
    finish: FinishStep | None = None

    def spec(self, instructions_dir: str | None = None, images_dir: str | None = None) -> BenchmarkSpec:
        """The benchmark with its instruction and image folders at the given places under the root
        (None = the default)."""
        instructions_dir = self.instructions_dir if instructions_dir is None else instructions_dir
        images_dir = self.images_dir if images_dir is None else images_dir
        return BenchmarkSpec(
            self.stream, tuple(task.spec(instructions_dir, images_dir) for task in self.tasks)
        )

    def build(self, root: Path, options: dict[str, Any]) -> Stream:
        """The stream: options validated (the common ones, ``instructions_dir``, ``images_dir`` and
        ``extra_options``), tasks read from their source, ``finish`` run, sample limits applied."""
        defaults = {
            "instructions_dir": self.instructions_dir,
            "images_dir": self.images_dir,
            **self.extra_options,
        }
        opts = parse_options(self.stream, options, defaults)
        spec = self.spec(folder_option(opts, "instructions_dir"), folder_option(opts, "images_dir"))
        tasks = load_tasks(spec, root, opts)
        if self.finish is not None:
            tasks = self.finish(tasks, Path(root), opts)
        return Stream(self.stream, limit_tasks(tasks, opts))
