"""Samples kept on disk, so that reading a task keeps memory flat however large the task is.

A reader writes each parsed :class:`~mcl.streams.samples.Sample` as one JSON line to a spill file and keeps
only its byte offset (8 bytes) and a 64-bit hash of its id (8 bytes, to find repeated ids once the file is
read). The result, :class:`SampleList`, is a read-only ``Sequence[Sample]``: ``len``, indexing, slicing and
iteration read the samples back from the file when they are used. Views (slices, :meth:`SampleList.select`)
share the file; it is deleted when the last view is garbage collected or the process exits (folders of
processes killed before they could clean up are removed by the next process that spills to the same place).

:class:`ChainedSamples` concatenates sequences (e.g. every task's training samples for a joint method) without
copying them. Both pickle as plain lists, so a sample sequence shipped to another process or node never points
at a file only this machine has.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from mcl.errors import SampleError
from mcl.streams.samples import Sample

# Buffers of the spill files: one read handle stays open per list (every task and split of a stream), so small.
_READ_BUFFER = 1 << 16
_WRITE_BUFFER = 1 << 18


def _id_hash(sample_id: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True
    )


def _encode(sample: Sample) -> bytes:
    row = [
        sample.id,
        sample.image,
        sample.question,
        sample.answer,
        sample.answer_type,
        sample.task,
        sample.extra,
    ]
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _decode(line: bytes) -> Sample:
    sid, image, question, answer, answer_type, task, extra = json.loads(line)
    return Sample(sid, image, question, answer, answer_type, task, extra)


class _SpillFile:
    """One spill file, opened for reading on first use; its folder is removed once nothing refers to it."""

    def __init__(self, folder: Path, path: Path) -> None:
        self.path = path
        self._handles: list[Any] = []  # the read handle, once opened (a list, so the finalizer can close it)
        self._lock = threading.Lock()  # one handle, read from any thread (e.g. a run's background Train job)
        weakref.finalize(self, _remove, folder, self._handles)

    def read_at(self, offset: int) -> Sample:
        with self._lock:
            handle = self._open()
            handle.seek(offset)
            line = handle.readline()
        return _decode(line)

    def read_run(self, offsets: np.ndarray) -> Iterator[Sample]:
        """Samples at ``offsets``; consecutive offsets are read with one buffered forward scan."""
        for offset in offsets.tolist():
            with self._lock:
                handle = self._open()
                if handle.tell() != offset:  # another reader moved the handle, or the offsets jump
                    handle.seek(offset)
                line = handle.readline()
            yield _decode(line)

    def _open(self) -> Any:
        if not self._handles:
            self._handles.append(open(self.path, "rb", buffering=_READ_BUFFER))  # noqa: SIM115 - finalizer
        return self._handles[0]


def _remove(folder: Path, handles: list[Any]) -> None:
    for handle in handles:
        handle.close()
    shutil.rmtree(folder, ignore_errors=True)


_PREFIX = "mcl-samples-"


def _owner_prefix(pid: int) -> str:
    """``mcl-samples-<host>-<pid>-``: a spill folder names the process that owns it (the host too, since a temp
    folder may be shared by machines or containers whose process ids mean different things)."""
    host = socket.gethostname().replace("-", "_") or "host"
    return f"{_PREFIX}{host}-{pid}-"


@functools.cache
def _remove_orphans(base: str) -> None:
    """Remove spill folders in ``base`` left by processes of this host that are gone (killed before they could
    clean up). Once per process and folder."""
    mine = _owner_prefix(0)[: -len("0-")]
    for folder in Path(base).glob(f"{mine}*-*"):
        pid = folder.name[len(mine) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class LazySequence(Sequence[Any]):
    """A read-only sequence whose items are built when read. Compares equal to, and concatenates (``+``, to a
    list) with, any sequence of the same items; pickles as a plain list, so it can travel to another process
    or node without the files or objects it reads from."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: Sequence[Any]) -> list[Any]:
        return [*self, *other]

    def __radd__(self, other: Sequence[Any]) -> list[Any]:
        return [*other, *self]

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return list, (list(self),)


class SampleList(LazySequence):
    """A read-only sequence of samples stored in a spill file (see the module docstring).

    Create one with :class:`SampleWriter`.
    """

    def __init__(self, spill: _SpillFile, offsets: np.ndarray) -> None:
        self._spill = spill
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> SampleList: ...

    def __getitem__(self, index: int | slice) -> Sample | SampleList:
        if isinstance(index, slice):
            return SampleList(self._spill, self._offsets[index])
        return self._spill.read_at(int(self._offsets[index]))

    def __iter__(self) -> Iterator[Sample]:
        return self._spill.read_run(self._offsets)

    def select(self, indices: Sequence[int] | np.ndarray) -> SampleList:
        """The samples at ``indices`` (in that order), sharing this list's file."""
        return SampleList(self._spill, self._offsets[np.asarray(indices, dtype=np.int64)])

    def __repr__(self) -> str:
        return f"SampleList({len(self)} samples in {self._spill.path})"


class SampleWriter:
    """Collect samples into a :class:`SampleList`, finding repeated ids without keeping the ids in memory.

    Args:
        label: Names the source in duplicate-id problems (the annotation file the samples come from).
        detail: Appended to duplicate-id messages (e.g. which task and split).
        spill_dir: Where the spill file's folder goes (default: the environment variable ``MCL_SPILL_DIR``,
            else the system temp folder).
    """

    def __init__(self, label: str, detail: str = "", spill_dir: str | Path | None = None) -> None:
        base = Path(spill_dir or os.environ.get("MCL_SPILL_DIR") or tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        _remove_orphans(str(base))
        folder = Path(tempfile.mkdtemp(prefix=_owner_prefix(os.getpid()), dir=base))
        self._spill = _SpillFile(folder, folder / "samples.jsonl")
        self._file = open(self._spill.path, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115 - closed in finish
        self._label = label
        self._detail = detail
        self._offsets: list[int] = []
        self._hashes: list[int] = []
        self._position = 0
        self._offsets_array = np.zeros(0, dtype=np.int64)
        self._hashes_array = np.zeros(0, dtype=np.int64)

    def append(self, sample: Sample) -> None:
        line = _encode(sample)
        self._file.write(line)
        self._offsets.append(self._position)
        self._hashes.append(_id_hash(sample.id))
        self._position += len(line)
        if len(self._offsets) >= 4096:  # Python ints cost ~36 bytes each: pack them every few thousand
            self._pack()

    def finish(self, on_problem: Callable[[SampleError], None] | None = None) -> SampleList:
        """Close the file and return the samples; a sample whose id an earlier one already has is a
        ``duplicate_id`` problem: raised, or handed to ``on_problem`` and left out (the first one is kept)."""
        self._pack()
        self._file.close()
        samples = SampleList(self._spill, self._offsets_array)
        keep = self._unique_ids(samples, on_problem)
        return samples if keep is None else samples.select(keep)

    def _pack(self) -> None:
        if self._offsets:
            self._offsets_array = np.concatenate([self._offsets_array, np.asarray(self._offsets, np.int64)])
            self._hashes_array = np.concatenate([self._hashes_array, np.asarray(self._hashes, np.int64)])
            self._offsets.clear()
            self._hashes.clear()

    def _unique_ids(
        self, samples: SampleList, on_problem: Callable[[SampleError], None] | None
    ) -> np.ndarray | None:
        """Positions to keep, or None when every id is unique (the common case: one sort of the hashes)."""
        hashes = self._hashes_array
        if len(hashes) < 2:
            return None
        ordered = np.sort(hashes)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if not len(repeated):
            return None
        # Only samples whose hash repeats are read back; equal hashes of different ids are not duplicates.
        candidates = np.flatnonzero(np.isin(hashes, repeated))
        seen: set[str] = set()
        dropped: list[int] = []
        for position in candidates.tolist():
            sample = samples[position]
            if sample.id in seen:
                problem = SampleError(
                    f"{self._label}: duplicate id {sample.id!r}{self._detail}",
                    "duplicate_id",
                    sample.id,
                    sample.image,
                )
                if on_problem is None:
                    raise problem
                on_problem(problem)
                dropped.append(position)
            seen.add(sample.id)
        if not dropped:
            return None
        return np.setdiff1d(np.arange(len(hashes)), np.asarray(dropped, dtype=np.int64))


class ChainedSamples(LazySequence):
    """Sequences read one after another as one sequence, without copying them (e.g. several tasks' samples)."""

    def __init__(self, parts: Sequence[Sequence[Any]]) -> None:
        self._parts = [p for p in parts if len(p)]
        self._starts = np.cumsum([0, *(len(p) for p in self._parts)]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        part = bisect.bisect_right(self._starts, index) - 1
        return self._parts[part][index - self._starts[part]]

    def __iter__(self) -> Iterator[Any]:
        for part in self._parts:
            yield from part


def take(samples: Sequence[Sample], indices: Sequence[int]) -> Sequence[Sample]:
    """The samples at ``indices``: a view for a :class:`SampleList`, a list otherwise."""
    if isinstance(samples, SampleList):
        return samples.select(indices)
    return [samples[i] for i in indices]
