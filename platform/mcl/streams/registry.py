"""Registry of streams. A stream factory turns options + a data root into an ordered list of tasks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcl.errors import DataError, UnknownNameError
from mcl.streams.samples import Sample


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
    _load_builtin_streams()
    if name not in _FACTORIES:
        raise UnknownNameError(f"unknown stream {name!r}; valid streams: {', '.join(sorted(_FACTORIES))}")
    stream = _FACTORIES[name](Path(root), dict(options or {}))
    stream.validate()
    return stream
