"""Data checks: read a stream collecting every problem instead of stopping at the first, and report them.

:func:`check_stream` reads every task and split of a stream with the readers' collecting mode (see
:func:`mcl.streams.registry.read_stream`), then checks what was read: test samples must name a registered
scorer, and every image must exist and decode (each distinct file once). The :class:`DataReport` holds, per
task and split, the good samples, the samples left out, the answer types and the problems by kind with the
first few examples; it renders as JSON (:meth:`DataReport.to_dict`) and Markdown (:func:`format_report`).

Problem kinds (:data:`mcl.errors.SAMPLE_PROBLEMS`): ``malformed_row``, ``duplicate_id``, ``escaping_path``
(absolute, or resolving outside the image root), ``missing_image``, ``undecodable_image``,
``unknown_answer_type``. A problem of a whole file or folder (missing annotations, malformed JSON) cannot be
skipped: it is the report's ``fatal`` error, and so is a task left without samples.

:func:`read_clean_stream` (and :func:`inspect_stream`) give the stream without its bad samples (what ``stream.skip_bad_samples`` and
``jobs/prepare_data.py --skip-bad`` use). Problems found while reading name the task as read: for MSVQA's
``20step`` protocol that is the scenario, not the step.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mcl.errors import DataError, SampleError
from mcl.evaluation.scoring import SCORERS
from mcl.streams.formats import image_problems
from mcl.streams.registry import Stream, StreamProblemHandler, TaskData, read_stream
from mcl.streams.samples import Sample
from mcl.streams.sources import SPLITS

EXAMPLES_PER_KIND = 5

_SampleKey = tuple[str, str, int]  # (task, split, index in the split)
_Located = tuple[str, str, int, Sample]  # (task, split, index in the split, sample)


@dataclass(frozen=True)
class Problem:
    """One bad sample (or row): what is wrong, where, and the message naming file, row, id and path."""

    kind: str
    task: str
    split: str
    sample_id: str | None
    image: str | None
    reason: str


@dataclass
class SplitReport:
    """One task's split: good samples, samples left out, answer types of the good ones, problems by kind."""

    task: str
    split: str
    samples: int = 0
    skipped: int = 0
    answer_types: dict[str, int] = field(default_factory=dict)
    problems: dict[str, int] = field(default_factory=dict)
    examples: list[Problem] = field(default_factory=list)


@dataclass
class DataReport:
    """What :func:`check_stream` found. ``ok`` when there is no problem at all."""

    stream: str
    root: str
    options: dict[str, Any]
    images_checked: bool
    splits: list[SplitReport]
    fatal: str | None = None

    @property
    def ok(self) -> bool:
        return self.fatal is None and self.skipped == 0

    @property
    def skipped(self) -> int:
        """Samples (rows) left out for a problem."""
        return sum(s.skipped for s in self.splits)

    @property
    def samples(self) -> int:
        """Samples that pass every check."""
        return sum(s.samples for s in self.splits)

    def problem_counts(self) -> dict[str, int]:
        """Problems by kind over all tasks and splits."""
        counts: Counter[str] = Counter()
        for split in self.splits:
            counts.update(split.problems)
        return dict(sorted(counts.items()))

    def skipped_metrics(self) -> dict[str, float]:
        """``data_skipped_total`` and ``data_skipped_<task>_<split>`` for every split (MLflow metric names)."""
        metrics = {"data_skipped_total": float(self.skipped)}
        for split in self.splits:
            metrics[_metric_name(f"data_skipped_{split.task}_{split.split}")] = float(split.skipped)
        return metrics

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "stream": self.stream,
            "root": self.root,
            "options": self.options,
            "images_checked": self.images_checked,
            "ok": self.ok,
            "fatal": self.fatal,
            "samples": self.samples,
            "skipped": self.skipped,
            "problems": self.problem_counts(),
            "splits": [asdict(split) for split in self.splits],
        }


def check_stream(
    name: str,
    root: str | Path,
    options: dict[str, Any] | None = None,
    *,
    images: bool = True,
    workers: int = 8,
    log: Callable[[str], None] | None = None,
) -> DataReport:
    """Read stream ``name`` under ``root`` and report every problem (nothing is raised for bad data).

    Args:
        name: A registered stream.
        root: Its data root.
        options: Its options (as ``stream.options``).
        images: Also check that every image exists and decodes.
        workers: Threads decoding images.
        log: Called with progress lines.

    Raises:
        ConfigError, UnknownNameError: The name or an option is invalid (not a data problem).
    """
    return inspect_stream(name, root, options, images=images, workers=workers, log=log)[1]


def read_clean_stream(
    name: str,
    root: str | Path,
    options: dict[str, Any] | None = None,
    *,
    images: bool = True,
    workers: int = 8,
    log: Callable[[str], None] | None = None,
) -> tuple[Stream, DataReport]:
    """The stream without its bad samples, and the report saying which were left out.

    Raises:
        DataError: The report has a fatal problem (a file or folder unreadable, a task left empty).
    """
    stream, report = inspect_stream(name, root, options, images=images, workers=workers, log=log)
    if stream is None:
        raise DataError(str(report.fatal))
    return stream, report


def inspect_stream(
    name: str,
    root: str | Path,
    options: dict[str, Any] | None = None,
    *,
    images: bool = True,
    workers: int = 8,
    log: Callable[[str], None] | None = None,
) -> tuple[Stream | None, DataReport]:
    """The stream without its bad samples (None when the report has a fatal problem), and the report.

    Arguments as :func:`check_stream`.
    """
    say = log or (lambda _line: None)
    report = DataReport(name, str(Path(root).resolve()), dict(options or {}), images, [])
    read_problems: list[Problem] = []
    say(f"reading stream {name!r} from {report.root}")
    try:
        stream = read_stream(name, root, options, on_problem=_collector(read_problems))
    except DataError as exc:
        report.fatal = str(exc)
        _fill(report, [], read_problems)
        return None, report

    located = _locate_samples(stream)
    found = _unknown_answer_types(located)
    if images:
        say(f"checking {len({s.image for *_, s in located})} images of {len(located)} samples")
        found += _bad_images(located, workers)
    bad = _by_sample(found)
    clean = _without_bad_samples(stream, bad)
    _fill(report, clean.tasks, read_problems, bad, [t.name for t in stream.tasks])
    report.fatal = _validation_error(clean, report)
    if report.fatal is not None:
        return None, report
    return clean, report


def _collector(problems: list[Problem]) -> StreamProblemHandler:
    """An ``on_problem`` for :func:`read_stream` that appends each row's problem to ``problems``."""

    def collect(error: SampleError, task: str, split: str) -> None:
        problems.append(Problem(error.kind, task, split, error.sample_id, error.image, str(error)))

    return collect


def _locate_samples(stream: Stream) -> list[_Located]:
    """Every sample with its task, split and index there, in stream order (train before test)."""
    return [
        (task.name, split, index, sample)
        for task in stream.tasks
        for split, samples in zip(SPLITS, (task.train, task.test), strict=True)
        for index, sample in enumerate(samples)
    ]


def _unknown_answer_types(located: list[_Located]) -> list[tuple[_SampleKey, Problem]]:
    """Test samples whose ``answer_type`` names no registered scorer."""
    found: list[tuple[_SampleKey, Problem]] = []
    for task, split, index, s in located:
        if split == "test" and s.answer_type not in SCORERS:
            reason = (
                f"task {task!r} sample {s.id!r}: unknown answer_type {s.answer_type!r} "
                "(no scorer of that name in mcl.evaluation.scoring)"
            )
            found.append(
                ((task, split, index), Problem("unknown_answer_type", task, split, s.id, s.image, reason))
            )
    return found


def _bad_images(located: list[_Located], workers: int) -> list[tuple[_SampleKey, Problem]]:
    """Samples whose image is missing or does not decode (each distinct file decoded once)."""
    images = image_problems((s.image for *_, s in located), workers)
    found: list[tuple[_SampleKey, Problem]] = []
    for task, split, index, s in located:
        if s.image in images:
            kind, why = images[s.image]
            reason = f"sample {s.id!r} (task {task!r}, {split}): image {s.image} {why}"
            found.append(((task, split, index), Problem(kind, task, split, s.id, s.image, reason)))
    return found


def _by_sample(found: list[tuple[_SampleKey, Problem]]) -> dict[_SampleKey, list[Problem]]:
    """The problems grouped by sample, samples in order of their first problem."""
    bad: dict[_SampleKey, list[Problem]] = {}
    for key, problem in found:
        bad.setdefault(key, []).append(problem)
    return bad


def _without_bad_samples(stream: Stream, bad: dict[_SampleKey, list[Problem]]) -> Stream:
    """``stream`` without the samples in ``bad`` (not validated)."""
    return Stream(
        stream.name,
        [
            TaskData(
                task.name,
                [s for i, s in enumerate(task.train) if (task.name, "train", i) not in bad],
                [s for i, s in enumerate(task.test) if (task.name, "test", i) not in bad],
            )
            for task in stream.tasks
        ],
    )


def _validation_error(clean: Stream, report: DataReport) -> str | None:
    """Why the cleaned stream is unusable (e.g. a task left empty), or None.

    ``report`` is already filled (:func:`_fill`): its counts tell whether leaving bad samples out emptied the split.
    """
    try:
        clean.validate()
    except DataError as exc:
        names = set(clean.task_names)
        empty = next((s for s in report.splits if s.task in names and s.samples == 0), None)
        emptied = empty is not None and empty.skipped > 0  # the split validate() names first
        return f"{exc} once the bad samples are left out" if emptied else str(exc)
    return None


def _fill(
    report: DataReport,
    tasks: list[TaskData],
    read_problems: list[Problem],
    bad: dict[tuple[str, str, int], list[Problem]] | None = None,
    order: list[str] | None = None,
) -> None:
    """Fill ``report.splits``: one entry per task (stream order, then tasks named only by problems) and split."""
    splits: dict[tuple[str, str], SplitReport] = {}

    def entry(task: str, split: str) -> SplitReport:
        if (task, split) not in splits:
            splits[task, split] = SplitReport(task, split)
        return splits[task, split]

    for name in order or []:
        for split in SPLITS:
            entry(name, split)
    for task in tasks:
        for split, samples in zip(SPLITS, (task.train, task.test), strict=True):
            counts = entry(task.name, split)
            counts.samples = len(samples)
            counts.answer_types = dict(sorted(Counter(s.answer_type for s in samples).items()))
    sample_problems = [p for found in (bad or {}).values() for p in found]
    for problem in read_problems:
        entry(problem.task, problem.split).skipped += 1
    for found in (bad or {}).values():
        entry(found[0].task, found[0].split).skipped += 1
    for problem in [*read_problems, *sample_problems]:
        counts = entry(problem.task, problem.split)
        counts.problems[problem.kind] = counts.problems.get(problem.kind, 0) + 1
        if sum(e.kind == problem.kind for e in counts.examples) < EXAMPLES_PER_KIND:
            counts.examples.append(problem)
    for counts in splits.values():
        counts.problems = dict(sorted(counts.problems.items()))
    report.splits = list(splits.values())


def _metric_name(text: str) -> str:
    return re.sub(r"[^\w\-./ ]", "_", text)


def format_report(report: DataReport) -> str:
    """The report as Markdown: a summary line, a table per task and split, then examples of each problem."""
    options = json.dumps(report.options, sort_keys=True) if report.options else "{}"
    lines = [
        f"# Data check: stream {report.stream!r}",
        "",
        f"root: {report.root}  ",
        f"options: {options}  ",
        f"images: {'checked (exist and decode)' if report.images_checked else 'not checked'}",
        "",
    ]
    if report.fatal:
        lines += [f"**Cannot use this data**: {report.fatal}", ""]
    if report.ok:
        lines += [f"**OK**: {report.samples} samples, no problems.", ""]
    elif report.skipped:
        kinds = ", ".join(f"{kind} {n}" for kind, n in report.problem_counts().items())
        lines += [
            f"**{report.skipped} bad samples** ({kinds}); {report.samples} good samples. "
            "Fix the data, or leave the bad samples out (prepare_data.py --skip-bad, "
            "stream.skip_bad_samples=true).",
            "",
        ]
    if report.splits:
        lines += [
            "| task | split | samples | skipped | answer types | problems |",
            "| --- | --- | ---: | ---: | --- | --- |",
        ]
        for s in report.splits:
            types = ", ".join(f"{t} {n}" for t, n in s.answer_types.items())
            found = ", ".join(f"{k} {n}" for k, n in s.problems.items())
            lines.append(f"| {s.task} | {s.split} | {s.samples} | {s.skipped} | {types} | {found} |")
        lines.append("")
    with_examples = [s for s in report.splits if s.examples]
    if with_examples:
        lines += [f"## Problems (first {EXAMPLES_PER_KIND} of each kind per task and split)", ""]
        for s in with_examples:
            lines.append(f"### {s.task} / {s.split}")
            for p in s.examples:
                image = f" [image {p.image}]" if p.image and p.image not in p.reason else ""
                lines.append(f"- {p.kind}: {p.reason}{image}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
