"""Readers for the published MLLM-CL data formats, producing :class:`~mcl.streams.samples.Sample` lists.

Two formats are read:

* LLaVA conversations (training files): a JSON list of ``{"id", "image", "conversations": [...]}``.
* MLLM-CL test files: a JSON list or JSON Lines of ``{"question_id", "image", "text", "answer"}`` plus
  an optional ``answer_type`` and any further keys (kept in ``Sample.extra``).

Parsing is pure (no Ray, no torch). Every problem raises :class:`~mcl.errors.DataError` naming the file and,
where it applies, the row, field, sample id and image path. Image paths must be relative and stay inside the
image root after resolving ``..`` and symlinks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image

from mcl.errors import DataError
from mcl.streams.samples import Sample

_PLACEHOLDER = re.compile(r"\s*<image>\s*")
_TEST_FIELDS = ("question_id", "image", "text", "answer", "answer_type")
_MAX_REPORTED = 5

# One parsed row with the label used in error messages ("row 3", or "row 3 (line 5)" for JSON Lines).
_Row = tuple[str, Any]


def read_llava_conversations(
    path: str | Path, image_root: str | Path, task: str, answer_type: str = "exact"
) -> list[Sample]:
    """Read a LLaVA conversation file (a JSON list) into samples.

    The question is the first ``human`` turn with the ``<image>`` placeholder and the whitespace around it
    removed; the answer is the ``gpt`` turn right after it. Further turns are ignored for now (one sample
    per conversation).

    Args:
        path: The JSON file.
        image_root: Directory the ``image`` fields are relative to.
        task: Task name stored in every sample.
        answer_type: Scorer name stored in every sample.

    Returns:
        The samples, in file order.

    Raises:
        DataError: The file is missing or malformed, a row is invalid, an id repeats or an image path is unsafe.
    """
    path = Path(path)
    root = Path(image_root).resolve()
    rows = _parse_json_list(path, _read_text(path))
    samples: list[Sample] = []
    seen: set[str] = set()
    for label, row in rows:
        where = f"{path}: {label}"
        obj = _require_object(row, where)
        sample_id = _require_id(obj, "id", where)
        _check_unique(sample_id, seen, path)
        image = _require_str(obj, "image", where)
        question, answer = _first_exchange(obj, where)
        samples.append(
            Sample(
                id=sample_id,
                image=_safe_image_path(root, image, path, sample_id),
                question=question,
                answer=answer,
                answer_type=answer_type,
                task=task,
            )
        )
    return samples


def read_mllmcl_test(
    path: str | Path, image_root: str | Path, task: str, answer_type: str = "exact"
) -> list[Sample]:
    """Read an MLLM-CL test file (JSON list, or JSON Lines) into samples.

    The file is a JSON list if its first non-blank character is ``[``, else JSON Lines (one object per
    non-blank line). A row's ``answer_type`` overrides the default; keys other than ``question_id``,
    ``image``, ``text``, ``answer`` and ``answer_type`` go into ``Sample.extra``.

    Args:
        path: The JSON or JSON Lines file.
        image_root: Directory the ``image`` fields are relative to.
        task: Task name stored in every sample.
        answer_type: Scorer name for rows without their own ``answer_type``.

    Returns:
        The samples, in file order.

    Raises:
        DataError: The file is missing or malformed, a row is invalid, an id repeats or an image path is unsafe.
    """
    path = Path(path)
    root = Path(image_root).resolve()
    text = _read_text(path)
    rows = _parse_json_list(path, text) if text.lstrip().startswith("[") else _parse_json_lines(path, text)
    samples: list[Sample] = []
    seen: set[str] = set()
    for label, row in rows:
        where = f"{path}: {label}"
        obj = _require_object(row, where)
        sample_id = _require_id(obj, "question_id", where)
        _check_unique(sample_id, seen, path)
        image = _require_str(obj, "image", where)
        question = _strip_placeholder(_require_str(obj, "text", where))
        answer = _require_str(obj, "answer", where, allow_empty=True)
        row_type = _require_str(obj, "answer_type", where) if "answer_type" in obj else answer_type
        samples.append(
            Sample(
                id=sample_id,
                image=_safe_image_path(root, image, path, sample_id),
                question=question,
                answer=answer,
                answer_type=row_type,
                task=task,
                extra={key: value for key, value in obj.items() if key not in _TEST_FIELDS},
            )
        )
    return samples


def check_images(samples: Iterable[Sample], workers: int = 8) -> None:
    """Check that every sample's image exists and decodes.

    Args:
        samples: The samples to check (images shared by several samples are decoded once).
        workers: Number of threads decoding in parallel.

    Raises:
        DataError: Naming the first few bad samples (id, path, missing or undecodable) and the total count.
    """
    samples = list(samples)
    paths = sorted({sample.image for sample in samples})
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        problems = dict(zip(paths, pool.map(_image_problem, paths), strict=True))
    bad = [sample for sample in samples if problems[sample.image]]
    if not bad:
        return
    details = "; ".join(
        f"sample {s.id!r} (task {s.task!r}): image {s.image} {problems[s.image]}" for s in bad[:_MAX_REPORTED]
    )
    more = f"; ... and {len(bad) - _MAX_REPORTED} more" if len(bad) > _MAX_REPORTED else ""
    raise DataError(f"{len(bad)} of {len(samples)} samples have bad images: {details}{more}")


def _image_problem(path: str) -> str | None:
    """Why the image at ``path`` is unusable ("is missing" / "does not decode (...)"), or None if it is fine."""
    if not Path(path).is_file():
        return "is missing"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except (
        Exception
    ) as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError).
        return f"does not decode ({type(exc).__name__}: {exc})"
    return None


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, optional BOM)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from exc


def _parse_json_list(path: Path, text: str) -> list[_Row]:
    """Parse a JSON document that must be a list; label each element by its index."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {_type_name(data)}")
    return [(f"row {index}", row) for index, row in enumerate(data)]


def _parse_json_lines(path: Path, text: str) -> list[_Row]:
    """Parse JSON Lines (blank lines skipped); label each row by its index and line number."""
    rows: list[_Row] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: malformed JSON Lines at line {line_number}, column {exc.colno}: {exc.msg}"
            ) from None
        rows.append((f"row {len(rows)} (line {line_number})", row))
    return rows


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(row)}")
    return row


def _require_str(obj: dict[str, Any], field: str, where: str, allow_empty: bool = False) -> str:
    """The string field ``field`` of ``obj``; raise if it is missing, not a string or (by default) empty."""
    if field not in obj:
        raise DataError(f"{where}: missing required field {field!r}")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _require_id(obj: dict[str, Any], field: str, where: str) -> str:
    """The id field as a string; integer ids (common in published test files) are converted."""
    if field not in obj:
        raise DataError(f"{where}: missing required field {field!r}")
    value = obj[field]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _require_str(obj, field, where)


def _check_unique(sample_id: str, seen: set[str], path: Path) -> None:
    if sample_id in seen:
        raise DataError(f"{path}: duplicate id {sample_id!r}")
    seen.add(sample_id)


def _strip_placeholder(text: str) -> str:
    """``text`` without ``<image>`` placeholders and the whitespace around them."""
    return _PLACEHOLDER.sub(" ", text).strip()


def _first_exchange(obj: dict[str, Any], where: str) -> tuple[str, str]:
    """(question, answer) from the first human turn and the gpt turn right after it."""
    if "conversations" not in obj:
        raise DataError(f"{where}: missing required field 'conversations'")
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field 'conversations' must be a list, got {_type_name(turns)}")
    for index, turn in enumerate(turns):
        if _turn_role(turn, index, where) != "human":
            continue
        question = _strip_placeholder(_require_str(turn, "value", f"{where}: conversations[{index}]"))
        if index + 1 >= len(turns):
            raise DataError(f"{where}: field 'conversations' has no 'gpt' turn after the first 'human' turn")
        reply = turns[index + 1]
        if _turn_role(reply, index + 1, where) != "gpt":
            raise DataError(
                f"{where}: field 'conversations[{index + 1}].from' must be 'gpt' after the first 'human' turn"
            )
        answer = _require_str(reply, "value", f"{where}: conversations[{index + 1}]", allow_empty=True)
        return question, answer
    raise DataError(f"{where}: field 'conversations' has no 'human' turn")


def _turn_role(turn: Any, index: int, where: str) -> str:
    """The ``from`` field of conversation turn ``index``, checking the turn is an object."""
    label = f"{where}: conversations[{index}]"
    return _require_str(_require_object(turn, label), "from", label)


def _safe_image_path(root: Path, image: str, path: Path, sample_id: str) -> str:
    """Absolute resolved path of ``image`` under ``root``; raise if it is absolute or escapes ``root``."""
    if PurePosixPath(image).is_absolute() or PureWindowsPath(image).is_absolute():
        raise DataError(
            f"{path}: sample {sample_id!r}: image path {image!r} is absolute; it must be relative"
        )
    try:
        resolved = (root / image).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"{path}: sample {sample_id!r}: image path {image!r} cannot be resolved: {exc}"
        ) from exc
    if not resolved.is_relative_to(root):
        raise DataError(
            f"{path}: sample {sample_id!r}: image path {image!r} escapes the image root {root} "
            f"(resolves to {resolved})"
        )
    return str(resolved)
