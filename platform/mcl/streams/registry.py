"""Registry of streams. A stream factory turns options + a data root into an ordered list of tasks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcl.errors import ConfigError, DataError, SampleError, UnknownNameError
from mcl.streams.samples import Sample

StreamProblemHandler = Callable[[SampleError, str, str], None]
"""``(problem, task, split)``: receives a row's problem while a stream is read, instead of it being raised."""

# The handler of the read in progress (see read_stream). A context variable, because factories have a fixed
# signature ``(root, options)``: the readers they call get the handler through problem_handler().
_PROBLEM_HANDLER: ContextVar[StreamProblemHandler | None] = ContextVar("mcl_problem_handler", default=None)


@dataclass(frozen=True)
class TaskData:
    """One task of a stream: its name and its train/test samples."""

    name: str
    train: list[Sample]
    test: list[Sample]


@dataclass(frozen=True)
class Stream:
    """An ordered list of tasks."""

    name: str
    tasks: list[TaskData]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def reordered(self, order: list[str]) -> Stream:
        """The same tasks trained in ``order`` (every task named exactly once; empty = this order). Errors name
        the field ``stream.task_order`` and the unknown, repeated or missing tasks."""
        if not order:
            return self
        by_name = {t.name: t for t in self.tasks}
        unknown = [n for n in order if n not in by_name]
        repeated = sorted({n for n in order if order.count(n) > 1})
        missing = [n for n in by_name if n not in order]
        problems = [
            f"{what} {', '.join(names)}"
            for what, names in (("unknown tasks", unknown), ("repeated", repeated), ("missing", missing))
            if names
        ]
        if problems:
            raise ConfigError(
                f"stream.task_order: must name every task of stream {self.name!r} once "
                f"({', '.join(by_name)}): {'; '.join(problems)}, got {order!r}"
            )
        return Stream(self.name, [by_name[n] for n in order])

    def validate(self) -> None:
        """Fail if the stream or any of its tasks is empty, or task names repeat."""
        if not self.tasks:
            raise DataError(f"stream {self.name!r} has no tasks")
        seen: set[str] = set()
        for task in self.tasks:
            if task.name in seen:
                raise DataError(f"stream {self.name!r}: task name {task.name!r} appears twice")
            seen.add(task.name)
            for split, samples in (("train", task.train), ("test", task.test)):
                if not samples:
                    raise DataError(f"stream {self.name!r}: task {task.name!r} has no {split} samples")


StreamFactory = Callable[[Path, dict[str, Any]], Stream]
_FACTORIES: dict[str, StreamFactory] = {}


def register_stream(name: str) -> Callable[[StreamFactory], StreamFactory]:
    """Register ``factory(root, options) -> Stream`` under ``name``."""

    def decorator(factory: StreamFactory) -> StreamFactory:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"stream {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return decorator


def _load_builtin_streams() -> None:
    # Importing registers them; kept lazy so `import mcl.streams` stays light.
    import mcl.streams.coin  # noqa: F401
    import mcl.streams.generated  # noqa: F401
    import mcl.streams.mllm_cl  # noqa: F401
    import mcl.streams.msvqa  # noqa: F401
    import mcl.streams.ucit  # noqa: F401


def available_streams() -> list[str]:
    _load_builtin_streams()
    return sorted(_FACTORIES)


def build_stream(name: str, root: str | Path, options: dict[str, Any] | None = None) -> Stream:
    """Build a registered stream from its data root; raise if the name is unknown or the stream is empty."""
    stream = read_stream(name, root, options)
    stream.validate()
    return stream


def read_stream(
    name: str,
    root: str | Path,
    options: dict[str, Any] | None = None,
    on_problem: StreamProblemHandler | None = None,
) -> Stream:
    """Read a registered stream without validating it (tasks may be empty).

    With ``on_problem``, the readers of the published formats hand every problem confined to one row (a
    :class:`~mcl.errors.SampleError`) to it and leave the row out, instead of raising. Problems of whole
    files, folders and options still raise.
    """
    _load_builtin_streams()
    if name not in _FACTORIES:
        raise UnknownNameError(f"unknown stream {name!r}; valid streams: {', '.join(sorted(_FACTORIES))}")
    with _handling_problems(on_problem):
        return _FACTORIES[name](Path(root), dict(options or {}))


def problem_handler(task: str, split: str) -> Callable[[SampleError], None] | None:
    """For a stream factory: the ``on_problem`` to give the readers of ``task``'s ``split`` (None = raise)."""
    handler = _PROBLEM_HANDLER.get()
    if handler is None:
        return None
    return lambda problem: handler(problem, task, split)


@contextmanager
def _handling_problems(handler: StreamProblemHandler | None) -> Iterator[None]:
    token = _PROBLEM_HANDLER.set(handler)
    try:
        yield
    finally:
        _PROBLEM_HANDLER.reset(token)
