"""Shared machinery of the published-benchmark streams: layouts, options, the image cache and export sources.

A benchmark is a :class:`BenchmarkSpec`: its tasks in their published order, where each task's train and
test annotations and images lie under the data root (:class:`TaskLayout`) and how its answers are scored
(:class:`TaskSpec`). :func:`load_tasks` reads it from one of four sources (option ``source``):

* ``published`` (default): the benchmark's own folder layout (LLaVA train JSON, MLLM-CL-style test JSON).
* ``hf``: a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``Dataset`` with a ``split``
  column, or a ``DatasetDict`` with ``train``/``test`` splits), or anything ``datasets.load_dataset(path)``
  loads (a local folder of data files, or a hub id already in the local cache when offline).
* ``parquet`` / ``jsonl``: one file, or a folder of ``*.parquet`` / ``*.jsonl`` files.

The export schema (one row per sample, written by :func:`write_export`): ``id``; ``image`` (a path relative
to ``image_root``, raw bytes, ``{"bytes": ..., "path": ...}`` as HF's ``Image`` feature stores it, or in JSON
Lines ``{"bytes": "<base64>"}``); ``question``; ``answer`` (text; a list of reference answers becomes a
compact JSON list); ``answer_type`` (a scorer name; empty = the task's default); ``task`` (a task name of
the stream); ``split`` (``train``/``test``; may come from the ``DatasetDict`` split instead); ``extra`` (a
JSON object, or omitted); any other column goes into ``Sample.extra`` too (null values are dropped).

Images embedded as bytes are written once to ``<cache_dir>/images/<sha256>.<ext>``; lists of images (the
six DriveLM camera views) are tiled once into ``<cache_dir>/tiles/`` (:meth:`ImageCache.tile`), because a
:class:`~mcl.streams.samples.Sample` holds one image path. ``cache_dir`` defaults to ``<root>/.mcl_cache``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mcl.errors import ConfigError, DataError, SampleError
from mcl.streams.formats import (
    AnswerTypeRule,
    ImageResolver,
    answer_text,
    iter_json_lines,
    read_llava_conversations,
    read_mllmcl_test,
    safe_image_path,
    strip_placeholder,
)
from mcl.streams.registry import Stream, TaskData, problem_handler
from mcl.streams.samples import Sample
from mcl.streams.store import SampleWriter, take

SOURCES = ("published", "hf", "parquet", "jsonl")
SPLITS = ("train", "test")
EXPORT_COLUMNS = ("id", "image", "question", "answer", "answer_type", "task", "split", "extra")
LAYOUT_KEYS = ("train", "test", "train_images", "test_images")
TILE_VERSION = 1
DEFAULT_CACHE = ".mcl_cache"

COMMON_OPTIONS: dict[str, Any] = {
    "source": "published",
    "path": None,
    "hf_config": None,
    "image_root": None,
    "cache_dir": None,
    "tasks": None,
    "max_train_per_task": None,
    "max_test_per_task": None,
    "seed": 0,
    "layout": None,
}


@dataclass(frozen=True)
class TaskLayout:
    """Where one task lives under the data root (all paths relative to it, ``/``-separated).

    ``train``/``test`` list candidate annotation files; the first that exists is read (e.g. MLLM-CL's
    ``Fin/test.json`` and the README's ``Fin/test.sjon``). ``train_images``/``test_images`` is the folder the
    rows' ``image`` paths are relative to; None = the folder of the annotation file read.
    """

    train: tuple[str, ...]
    test: tuple[str, ...]
    train_images: str | None = None
    test_images: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """One task of a benchmark: name, layout and scoring.

    Attributes:
        name: Task name (what ``tasks`` selects and the export's ``task`` column holds).
        layout: Where its files are.
        answer_type: Scorer of its samples (the default where ``answer_rule`` is set).
        answer_rule: Optional per-row rule ``(row, question) -> scorer`` (e.g. MLLM-CL Sci).
        answer_fields: Test-row fields holding the answer, the first present wins (CoIN: ``answer_bbox``).
    """

    name: str
    layout: TaskLayout
    answer_type: str
    answer_rule: AnswerTypeRule | None = None
    answer_fields: tuple[str, ...] = ("answer",)


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark: the stream name and its tasks in published order."""

    stream: str
    tasks: tuple[TaskSpec, ...]

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]


@dataclass(frozen=True)
class StreamOptions:
    """Validated options shared by the published-benchmark streams (see :data:`COMMON_OPTIONS`)."""

    stream: str
    source: str = "published"
    path: str | None = None
    hf_config: str | None = None
    image_root: str | None = None
    cache_dir: str | None = None
    tasks: tuple[str, ...] | None = None
    max_train_per_task: int | None = None
    max_test_per_task: int | None = None
    seed: int = 0
    layout: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def parse_options(
    stream: str, options: Mapping[str, Any], extra_defaults: Mapping[str, Any] | None = None
) -> StreamOptions:
    """Validate ``options`` (the common ones plus the stream's ``extra_defaults``) and fill in defaults.

    Raises:
        ConfigError: An option is unknown or has a bad value; the message names the option.
    """
    extra_defaults = dict(extra_defaults or {})
    valid = [*COMMON_OPTIONS, *extra_defaults]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"stream {stream!r}: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid)}"
        )
    values = {**COMMON_OPTIONS, **dict(options)}

    def bad(name: str, what: str) -> ConfigError:
        return ConfigError(f"stream {stream!r}: option {name!r} must be {what}, got {values[name]!r}")

    source = values["source"]
    _check_source_options(stream, values, bad)
    tasks = _task_names_option(values["tasks"], bad)
    for name in ("max_train_per_task", "max_test_per_task"):
        value = values[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise bad(name, "a positive integer or null")
    seed = values["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise bad("seed", "a non-negative integer")
    layout = values["layout"]
    if layout is not None and not isinstance(layout, Mapping):
        raise bad("layout", "a mapping task -> {train, test, train_images, test_images}")
    return StreamOptions(
        stream=stream,
        source=source,
        path=None if values["path"] is None else str(values["path"]),
        hf_config=values["hf_config"],
        image_root=None if values["image_root"] is None else str(values["image_root"]),
        cache_dir=None if values["cache_dir"] is None else str(values["cache_dir"]),
        tasks=tasks,
        max_train_per_task=values["max_train_per_task"],
        max_test_per_task=values["max_test_per_task"],
        seed=seed,
        layout={str(k): v for k, v in (layout or {}).items()},
        extra={name: values.get(name, default) for name, default in extra_defaults.items()},
    )


def _check_source_options(
    stream: str, values: dict[str, Any], bad: Callable[[str, str], ConfigError]
) -> None:
    """The options that say where the data comes from: each only with the sources it applies to."""
    source = values["source"]
    if source not in SOURCES:
        raise bad("source", "one of " + ", ".join(SOURCES))
    for name in ("path", "hf_config", "image_root", "cache_dir"):
        value = values[name]
        if value is not None and (not isinstance(value, str | Path) or not str(value).strip()):
            raise bad(name, "a non-empty path or name")
    if source == "published":
        for name in ("path", "hf_config", "image_root"):
            if values[name] is not None:
                raise ConfigError(
                    f"stream {stream!r}: option {name!r} applies to source hf, parquet or jsonl, "
                    "not 'published'"
                )
    elif values["layout"] is not None:
        raise ConfigError(f"stream {stream!r}: option 'layout' applies to source 'published' only")
    if values["hf_config"] is not None and source != "hf":
        raise ConfigError(f"stream {stream!r}: option 'hf_config' applies to source 'hf' only")


def _task_names_option(tasks: Any, bad: Callable[[str, str], ConfigError]) -> tuple[str, ...] | None:
    if tasks is None:
        return None
    if (
        isinstance(tasks, str)
        or not isinstance(tasks, Sequence)
        or not tasks
        or not all(isinstance(t, str) for t in tasks)
    ):
        raise bad("tasks", "a non-empty list of task names")
    if len(set(tasks)) != len(tasks):
        raise bad("tasks", "a list without repeats")
    return tuple(tasks)


def folder_option(opts: StreamOptions, name: str) -> str:
    """The stream-specific option ``name`` checked to be a relative folder (``.`` = the data root)."""
    value = opts.extra[name]
    if not isinstance(value, str) or not value.strip() or Path(value).is_absolute():
        raise ConfigError(
            f"stream {opts.stream!r}: option {name!r} must be a folder relative to stream.root, got {value!r}"
        )
    return value


def selected_tasks(spec: BenchmarkSpec, opts: StreamOptions) -> list[TaskSpec]:
    """The tasks ``opts.tasks`` picks (all by default), in that order, with ``opts.layout`` applied.

    Raises:
        ConfigError: A task or layout entry is unknown, or a layout value is malformed.
    """
    by_name = {task.name: task for task in spec.tasks}
    valid = ", ".join(spec.task_names)
    for name in opts.tasks or ():
        if name not in by_name:
            raise ConfigError(
                f"stream {spec.stream!r}: option 'tasks' names unknown task {name!r}; valid tasks: {valid}"
            )
    for name, entry in opts.layout.items():
        if name not in by_name:
            raise ConfigError(f"stream {spec.stream!r}: option 'layout.{name}': unknown task; valid: {valid}")
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"stream {spec.stream!r}: option 'layout.{name}' must be a mapping with keys "
                f"{', '.join(LAYOUT_KEYS)}, got {entry!r}"
            )
        changes: dict[str, Any] = {}
        for key, value in entry.items():
            option = f"layout.{name}.{key}"
            if key not in LAYOUT_KEYS:
                raise ConfigError(
                    f"stream {spec.stream!r}: option {option!r} is unknown; "
                    f"valid keys: {', '.join(LAYOUT_KEYS)}"
                )
            candidates = [value] if isinstance(value, str) else value
            if (
                not isinstance(candidates, list | tuple)
                or not candidates
                or not all(isinstance(c, str) and c.strip() for c in candidates)
                or (key.endswith("_images") and len(candidates) != 1)
            ):
                raise ConfigError(
                    f"stream {spec.stream!r}: option {option!r} must be a relative path, got {value!r}"
                )
            changes[key] = candidates[0] if key.endswith("_images") else tuple(candidates)
        by_name[name] = replace(by_name[name], layout=replace(by_name[name].layout, **changes))
    return [by_name[name] for name in (opts.tasks or spec.task_names)]


def build_benchmark(spec: BenchmarkSpec, root: str | Path, options: Mapping[str, Any]) -> Stream:
    """The stream of ``spec``: options validated, tasks read from their source, sample limits applied."""
    opts = parse_options(spec.stream, options)
    return Stream(spec.stream, limit_tasks(load_tasks(spec, root, opts), opts))


def load_tasks(spec: BenchmarkSpec, root: str | Path, opts: StreamOptions) -> list[TaskData]:
    """Read the selected tasks of ``spec`` under ``root`` from ``opts.source`` (no sample limits applied)."""
    root = Path(root)
    tasks = selected_tasks(spec, opts)
    cache = ImageCache(Path(opts.cache_dir) if opts.cache_dir else root / DEFAULT_CACHE, spec.stream)
    if opts.source == "published":
        if not root.is_dir():
            raise DataError(f"stream {spec.stream!r}: data root {root} is not a folder (stream.root)")
        return [_published_task(spec.stream, task, root, cache) for task in tasks]
    return _export_tasks(spec, tasks, root, opts, cache)


def limit_tasks(tasks: Sequence[TaskData], opts: StreamOptions) -> list[TaskData]:
    """Each task with at most ``max_train_per_task`` / ``max_test_per_task`` samples.

    The kept samples are a seeded random subset (seed, task name, split) in their original order.
    """
    return [
        TaskData(
            task.name,
            subsample(task.train, opts.max_train_per_task, opts.seed, task.name, "train"),
            subsample(task.test, opts.max_test_per_task, opts.seed, task.name, "test"),
        )
        for task in tasks
    ]


def subsample(
    samples: Sequence[Sample], limit: int | None, seed: int, task: str, split: str
) -> Sequence[Sample]:
    """At most ``limit`` of ``samples``: a subset seeded by (seed, task, split), kept in file order."""
    if limit is None or len(samples) <= limit:
        return samples
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8")), SPLITS.index(split)])
    keep = sorted(rng.choice(len(samples), size=limit, replace=False).tolist())
    return take(samples, keep)


# --- images -----------------------------------------------------------------------------------------------


class ImageCache:
    """Files the engine derives from the data, written once under ``cache_dir`` (atomically, by content key).

    * :meth:`tile`: several images (DriveLM's six camera views) as one grid image, ``tiles/<key>.png``;
      ``cols = ceil(sqrt(n))``, ``rows = ceil(n / cols)`` (six views: 2 rows x 3 columns), filled row by row
      in list order, every cell the size of the first image (others resized, bicubic). The key hashes the
      resolved paths, sizes and modification times of the inputs, so an edited input is tiled again.
    * :meth:`materialise`: image bytes embedded in an export, ``images/<sha256>.<ext>``.
    """

    def __init__(self, cache_dir: Path, stream: str) -> None:
        self.cache_dir = Path(cache_dir)
        self.stream = stream

    def resolver(self, image_root: Path) -> ImageResolver:
        """An image resolver for the readers: a relative path, or a list of them to tile."""
        root = image_root.resolve()

        def resolve(value: Any, path: Path, where: str, sample_id: str) -> str:
            if isinstance(value, str) and value.strip():
                return safe_image_path(root, value, path, sample_id)
            if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
                paths = [safe_image_path(root, v, path, sample_id) for v in value]
                return paths[0] if len(paths) == 1 else self.tile(paths, where, sample_id)
            raise SampleError(
                f"{where}: field 'image' must be a relative path or a non-empty list of them, "
                f"got {type(value).__name__}",
                sample_id=sample_id,
            )

        return resolve

    def tile(self, paths: Sequence[str], where: str, sample_id: str) -> str:
        """Path of the grid image of ``paths`` (made on first use)."""
        stats = []
        for path in paths:
            try:
                stat = os.stat(path)
            except OSError:
                raise SampleError(
                    f"{where}: sample {sample_id!r}: image {path} to tile is missing",
                    "missing_image",
                    sample_id,
                    path,
                ) from None
            stats.append([path, stat.st_size, stat.st_mtime_ns])
        key = hashlib.sha256(json.dumps([TILE_VERSION, stats]).encode("utf-8")).hexdigest()[:32]
        target = self.cache_dir / "tiles" / f"{key}.png"
        if not target.is_file():
            buffer = io.BytesIO()
            tile_images(paths, where, sample_id).save(buffer, format="PNG")
            self._write(target, buffer.getvalue())
        return str(target.resolve())

    def materialise(self, data: bytes) -> str:
        """Path of a file holding ``data`` (written on first use), named by its SHA-256."""
        digest = hashlib.sha256(data).hexdigest()
        try:
            with Image.open(io.BytesIO(data)) as image:
                suffix = "." + (image.format or "img").lower().replace("jpeg", "jpg")
        except Exception:  # Undecodable bytes are kept; check_images reports them with the sample.
            suffix = ".img"
        target = self.cache_dir / "images" / f"{digest}{suffix}"
        if not target.is_file():
            self._write(target, data)
        return str(target.resolve())

    def _write(self, target: Path, data: bytes) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as exc:
            raise DataError(
                f"stream {self.stream!r}: cannot write to the cache folder {self.cache_dir} ({exc}); "
                "set the option 'cache_dir' to a writable folder"
            ) from exc


def tile_images(paths: Sequence[str], where: str = "", sample_id: str = "") -> Image.Image:
    """The images at ``paths`` on a grid (see :class:`ImageCache`), as one RGB image."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except Exception as exc:  # PIL raises many types.
            raise SampleError(
                f"{where}: sample {sample_id!r}: image {path} to tile does not decode "
                f"({type(exc).__name__}: {exc})",
                "undecodable_image",
                sample_id,
                path,
            ) from exc
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height))
    for index, image in enumerate(images):
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        grid.paste(image, ((index % cols) * width, (index // cols) * height))
    return grid


# --- published layout -------------------------------------------------------------------------------------


def _published_task(stream: str, task: TaskSpec, root: Path, cache: ImageCache) -> TaskData:
    split_data = {}
    for split in SPLITS:
        candidates = getattr(task.layout, split)
        annotation = next((root / c for c in candidates if (root / c).is_file()), None)
        if annotation is None:
            looked = ", ".join(str(root / c) for c in candidates)
            raise DataError(
                f"stream {stream!r}: task {task.name!r}: {split} annotations not found "
                f"(looked for {looked}); "
                f"check stream.root or set the option 'layout.{task.name}.{split}'"
            )
        images_rel = getattr(task.layout, f"{split}_images")
        image_root = root / images_rel if images_rel is not None else annotation.parent
        if not image_root.is_dir():
            raise DataError(
                f"stream {stream!r}: task {task.name!r}: {split} image folder {image_root} not found; "
                f"check stream.root or set the option 'layout.{task.name}.{split}_images'"
            )
        answer_type = task.answer_rule or task.answer_type
        resolver = cache.resolver(image_root)
        on_problem = problem_handler(task.name, split)
        if split == "train":
            split_data[split] = read_llava_conversations(
                annotation, image_root, task.name, answer_type, image_resolver=resolver, on_problem=on_problem
            )
        else:
            split_data[split] = read_mllmcl_test(
                annotation,
                image_root,
                task.name,
                answer_type,
                image_resolver=resolver,
                row_answer_type="extra",
                flexible_answers=True,
                answer_fields=task.answer_fields,
                on_problem=on_problem,
            )
    return TaskData(task.name, split_data["train"], split_data["test"])


# --- export sources ---------------------------------------------------------------------------------------


def _export_location(opts: StreamOptions, root: Path) -> tuple[Path | None, str]:
    """(local path or None, text for messages) of the export ``opts.path`` names (default: the root)."""
    if opts.path is None:
        return root, str(root)
    path = Path(opts.path).expanduser()
    local = path if path.is_absolute() else root / path
    if local.exists():
        return local, str(local)
    return None, opts.path


def _export_rows(opts: StreamOptions, root: Path) -> Iterator[tuple[str, Path, str | None, dict[str, Any]]]:
    """(label, source file, split from the container or None, row) for every row of the export."""
    local, shown = _export_location(opts, root)
    if opts.source == "hf":
        yield from _hf_rows(opts, local, shown)
        return
    suffix = "." + opts.source
    if local is None:
        raise DataError(
            f"stream {opts.stream!r}: {opts.source} export {shown} not found (option 'path', relative to "
            f"stream.root {root})"
        )
    files = sorted(p for p in local.iterdir() if p.suffix == suffix) if local.is_dir() else [local]
    if not files:
        raise DataError(f"stream {opts.stream!r}: no *{suffix} files in {local} (option 'path')")
    for file in files:
        if opts.source == "jsonl":
            for label, row in iter_json_lines(file):
                yield f"{file}: {label}", file, None, row
        else:
            for index, row in enumerate(_read_parquet(file, opts.stream)):
                yield f"{file}: row {index}", file, None, row


def _read_parquet(file: Path, stream: str) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet file, read in batches (embedded images never all in memory at once)."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=256)
        for batch in batches:
            yield from batch.to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"stream {stream!r}: cannot read Parquet file {file}: {exc}") from exc


def _hf_rows(
    opts: StreamOptions, local: Path | None, shown: str
) -> Iterator[tuple[str, Path, str | None, dict[str, Any]]]:
    import datasets

    try:
        if (
            local is not None
            and local.is_dir()
            and any((local / name).is_file() for name in ("dataset_dict.json", "state.json"))
        ):
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(str(local) if local is not None else shown, name=opts.hf_config)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...).
        raise DataError(
            f"stream {opts.stream!r}: cannot load a Hugging Face dataset from {shown} (option 'path'; "
            f"a hub id must already be in the local cache when offline): {type(exc).__name__}: {exc}"
        ) from exc
    parts = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, dataset in parts:
        if isinstance(dataset.features.get("image"), datasets.Image):
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        for index, row in enumerate(dataset):
            label = f"{shown} [{split}]: row {index}" if split else f"{shown}: row {index}"
            yield label, local or Path(shown), split, row


def _export_tasks(
    spec: BenchmarkSpec, tasks: list[TaskSpec], root: Path, opts: StreamOptions, cache: ImageCache
) -> list[TaskData]:
    specs = {task.name: task for task in tasks}
    image_root = Path(opts.image_root).expanduser() if opts.image_root else root
    if not image_root.is_absolute():
        image_root = root / image_root
    resolver = cache.resolver(image_root)
    shown = _export_location(opts, root)[1]
    writers = {
        (name, split): SampleWriter(shown, f" in task {name!r} ({split})")
        for name in specs
        for split in SPLITS
    }
    for label, file, container_split, row in _export_rows(opts, root):
        split = (row.get("split") if isinstance(row, Mapping) else None) or container_split
        try:
            if not isinstance(row, Mapping):
                raise SampleError(f"{label}: expected a JSON object, got {type(row).__name__}")
            task = _column_str(row, "task", label)
            if task not in specs:
                if task in spec.task_names:
                    continue  # A task of the stream that option 'tasks' leaves out.
                raise SampleError(
                    f"{label}: unknown task {task!r}; valid tasks: {', '.join(spec.task_names)}"
                )
            if split not in SPLITS:
                raise SampleError(f"{label}: field 'split' must be 'train' or 'test', got {split!r}")
            sample = _export_sample(row, label, file, specs[task], resolver, cache)
        except SampleError as exc:
            fields = row if isinstance(row, Mapping) else {}
            on_problem = problem_handler(str(fields.get("task") or "?"), str(split or "?"))
            if on_problem is None:
                raise
            on_problem(_export_context(exc, fields))
            continue
        writers[task, split].append(sample)
    return [
        TaskData(
            name,
            writers[name, "train"].finish(problem_handler(name, "train")),
            writers[name, "test"].finish(problem_handler(name, "test")),
        )
        for name in specs
    ]


def _export_context(exc: SampleError, row: Mapping[str, Any]) -> SampleError:
    """``exc`` naming the row's id and image path where the raiser could not."""
    if exc.sample_id is None and isinstance(row.get("id"), str | int) and not isinstance(row["id"], bool):
        exc.sample_id = str(row["id"])
    image = row.get("image")
    if exc.image is None:
        path = image.get("path") if isinstance(image, Mapping) else image
        exc.image = path if isinstance(path, str) else None
    return exc


def _column_str(row: Mapping[str, Any], column: str, label: str, allow_empty: bool = False) -> str:
    if column not in row or row[column] is None:
        raise SampleError(f"{label}: missing required column {column!r}")
    value = row[column]
    if isinstance(value, int) and not isinstance(value, bool) and column == "id":
        return str(value)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise SampleError(f"{label}: column {column!r} must be a non-empty string, got {value!r}")
    return value


def _export_sample(
    row: Mapping[str, Any], label: str, file: Path, task: TaskSpec, resolver: ImageResolver, cache: ImageCache
) -> Sample:
    sample_id = _column_str(row, "id", label)
    question = strip_placeholder(_column_str(row, "question", label))
    answer = answer_text(row.get("answer"), label, "answer", present=row.get("answer") is not None)
    answer_type = row.get("answer_type") or task.answer_type
    if not isinstance(answer_type, str):
        raise SampleError(
            f"{label}: column 'answer_type' must be a string, got {answer_type!r}", sample_id=sample_id
        )
    if "image" not in row or row["image"] is None:
        raise SampleError(f"{label}: missing required column 'image'", sample_id=sample_id)
    image = _export_image(row["image"], label, file, sample_id, resolver, cache)
    extra = _extra_column(row.get("extra"), label)
    extra.update({k: v for k, v in row.items() if k not in EXPORT_COLUMNS and v is not None})
    return Sample(sample_id, image, question, answer, answer_type, task.name, extra)


def _export_image(
    value: Any, label: str, file: Path, sample_id: str, resolver: ImageResolver, cache: ImageCache
) -> str:
    if isinstance(value, bytes | bytearray):
        return cache.materialise(bytes(value))
    if isinstance(value, Mapping):
        data = value.get("bytes")
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except ValueError as exc:
                raise SampleError(
                    f"{label}: column 'image': 'bytes' is not valid base64 ({exc})",
                    "undecodable_image",
                    sample_id,
                ) from exc
        if isinstance(data, bytes | bytearray):
            return cache.materialise(bytes(data))
        value = value.get("path")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return cache.materialise(buffer.getvalue())
    return resolver(value, file, label, sample_id)


def _extra_column(value: Any, label: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SampleError(f"{label}: column 'extra' is not a JSON object ({exc.msg})") from None
    if not isinstance(value, Mapping):
        raise SampleError(f"{label}: column 'extra' must be a JSON object, got {type(value).__name__}")
    return {k: v for k, v in value.items() if v is not None}


# --- writing exports --------------------------------------------------------------------------------------


def export_rows(
    tasks: Sequence[TaskData], image_root: str | Path, embed_images: bool = False
) -> list[dict[str, Any]]:
    """Rows of the export schema for ``tasks`` (image paths relative to ``image_root``, or the bytes)."""
    image_root = Path(image_root).resolve()
    return [
        _export_row(sample, task.name, split, image_root, embed_images)
        for task in tasks
        for split, samples in zip(SPLITS, (task.train, task.test), strict=True)
        for sample in samples
    ]


def _export_row(
    sample: Sample, task: str, split: str, image_root: Path, embed_images: bool
) -> dict[str, Any]:
    path = Path(sample.image)
    if embed_images:
        image: Any = path.read_bytes()
    elif path.is_relative_to(image_root):
        image = path.relative_to(image_root).as_posix()
    else:
        raise DataError(f"sample {sample.id!r}: image {path} is outside the image root {image_root}")
    return {
        "id": sample.id,
        "image": image,
        "question": sample.question,
        "answer": sample.answer,
        "answer_type": sample.answer_type,
        "task": task,
        "split": split,
        "extra": json.dumps(sample.extra, ensure_ascii=False, sort_keys=True),
    }


def write_parquet_shards(
    tasks: Sequence[TaskData],
    dest: str | Path,
    shard_rows: int = 1000,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write ``tasks`` as Parquet shards with the image bytes embedded, readable with ``source: parquet``.

    One file per task, split and ``shard_rows`` samples, named ``<NN>-<task>-<split>-<NNNNN>.parquet`` (stream
    order, then file order), each in the export schema; only one shard's images are in memory at a time.
    Ray Data reads the folder with ``ray.data.read_parquet``. Each file is written under a temporary name and
    renamed into place.

    Args:
        tasks: The tasks (e.g. ``build_stream(...).tasks``).
        dest: The folder to write (created); it must not hold ``*.parquet`` files already.
        shard_rows: Samples per file (at least 1).
        log: Called with a line per file written.

    Returns:
        The files written, in order.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shard_rows < 1:
        raise ConfigError(f"shard_rows must be >= 1, got {shard_rows!r}")
    dest = Path(dest)
    if dest.is_dir() and any(dest.glob("*.parquet")):
        raise DataError(f"{dest} already holds Parquet files; write the shards to an empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for t, task in enumerate(tasks):
        name = re.sub(r"[^\w.-]", "_", task.name)
        for split, samples in zip(SPLITS, (task.train, task.test), strict=True):
            for shard, start in enumerate(range(0, len(samples), shard_rows)):
                rows = [
                    _export_row(s, task.name, split, dest, True) for s in samples[start : start + shard_rows]
                ]
                target = dest / f"{t:02d}-{name}-{split}-{shard:05d}.parquet"
                tmp = target.with_name(f".{target.name}.tmp")
                pq.write_table(pa.Table.from_pylist(rows), tmp)
                os.replace(tmp, target)
                written.append(target)
                if log is not None:
                    log(f"wrote {target} ({len(rows)} {split} samples of {task.name})")
    return written


def write_export(
    tasks: Sequence[TaskData],
    dest: str | Path,
    kind: str,
    image_root: str | Path,
    embed_images: bool = False,
    as_dataset_dict: bool = False,
) -> Path:
    """Write ``tasks`` to ``dest`` in the export schema, readable back with option ``source: <kind>``.

    Args:
        tasks: The tasks (e.g. ``build_stream(...).tasks``).
        dest: A ``.jsonl`` or ``.parquet`` file, or for ``hf`` the ``save_to_disk`` folder.
        kind: ``hf``, ``parquet`` or ``jsonl``.
        image_root: Image paths are written relative to it (unless ``embed_images``).
        embed_images: Write the image bytes into the rows (HF ``Image`` feature; base64 in JSON Lines).
        as_dataset_dict: For ``hf``: a ``DatasetDict`` with ``train``/``test`` splits (no ``split`` column).
    """
    if kind not in SOURCES[1:]:
        raise ConfigError(f"export kind must be one of {', '.join(SOURCES[1:])}, got {kind!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    rows = export_rows(tasks, image_root, embed_images)
    if kind == "jsonl":
        with dest.open("w", encoding="utf-8") as out:
            for row in rows:
                if embed_images:
                    row = {**row, "image": {"bytes": base64.b64encode(row["image"]).decode("ascii")}}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), dest)
    else:
        import datasets

        features = datasets.Features(
            {
                name: datasets.Image() if name == "image" and embed_images else datasets.Value("string")
                for name in EXPORT_COLUMNS
            }
        )
        if embed_images:
            rows = [{**row, "image": {"bytes": row["image"], "path": None}} for row in rows]
        if as_dataset_dict:
            del features["split"]
            parts = {
                split: datasets.Dataset.from_list(
                    [{k: v for k, v in row.items() if k != "split"} for row in rows if row["split"] == split],
                    features=features,
                )
                for split in SPLITS
            }
            datasets.DatasetDict(parts).save_to_disk(str(dest))
        else:
            datasets.Dataset.from_list(rows, features=features).save_to_disk(str(dest))
    return dest
