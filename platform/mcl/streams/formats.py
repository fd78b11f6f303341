"""Readers for the published MLLM-CL data formats, producing :class:`~mcl.streams.samples.Sample` lists.

Two formats are read:

* LLaVA conversations (training files): a JSON list of ``{"id", "image", "conversations": [...]}``
  (``question_id`` is accepted where ``id`` is missing, as the MLLM-CL training code does).
* MLLM-CL test files: a JSON list or JSON Lines of ``{"question_id", "image", "text", "answer"}`` plus
  an optional ``answer_type`` and any further keys (kept in ``Sample.extra``).

The published benchmarks differ in details, so both readers take keyword options (defaults: the strict
behaviour above): an ``image_resolver`` (e.g. tile a list of camera views into one image), a per-row
``answer_type`` rule, ``row_answer_type="extra"`` (the row's ``answer_type`` is a category, not a scorer),
``flexible_answers`` (numbers and lists of reference answers) and ``answer_fields`` (e.g. CoIN's
``answer_bbox``).

Parsing is pure (no Ray, no torch). Every problem raises :class:`~mcl.errors.DataError` naming the file and,
where it applies, the row, field, sample id and image path. Image paths must be relative and stay inside the
image root after resolving ``..`` and symlinks. A problem confined to one row is a
:class:`~mcl.errors.SampleError` (with its kind); given ``on_problem``, the readers hand such problems to it
and go on without the row instead of raising (what ``mcl.streams.check`` uses to report every problem).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, NoReturn, TextIO

from PIL import Image

from mcl.errors import DataError, SampleError
from mcl.streams.samples import Sample
from mcl.streams.store import SampleList, SampleWriter

_PLACEHOLDER = re.compile(r"\s*<image>\s*")
_MAX_REPORTED = 5

# One parsed row with the label used in error messages ("row 3", or "row 3 (line 5)" for JSON Lines).
_Row = tuple[str, Any]

ImageResolver = Callable[[Any, Path, str, str], str]
"""``(raw image value, annotation file, where, sample id) -> absolute image path``; raises DataError."""

AnswerTypeRule = Callable[[dict[str, Any], str], str]
"""``(raw row, question) -> scorer name``, for benchmarks whose scorer depends on the row."""

ProblemHandler = Callable[[SampleError], None]
"""Receives a row's problem instead of it being raised; the row is left out."""


def read_llava_conversations(
    path: str | Path,
    image_root: str | Path,
    task: str,
    answer_type: str | AnswerTypeRule = "exact",
    *,
    image_resolver: ImageResolver | None = None,
    on_problem: ProblemHandler | None = None,
) -> SampleList:
    """Read a LLaVA conversation file (a JSON list) into samples.

    The question is the first ``human`` turn with the ``<image>`` placeholder and the whitespace around it
    removed; the answer is the ``gpt`` turn right after it. Further turns are ignored for now (one sample
    per conversation). The id is ``id``, or ``question_id`` where ``id`` is missing.

    Args:
        path: The JSON file.
        image_root: Directory the ``image`` fields are relative to.
        task: Task name stored in every sample.
        answer_type: Scorer name stored in every sample, or a rule ``(row, question) -> name``.
        image_resolver: Turns the raw ``image`` value into a path (default: a relative path string, checked
            to stay inside ``image_root``).
        on_problem: Receives each row's problem (a :class:`~mcl.errors.SampleError`) instead of it being
            raised; the row is left out. File-level problems still raise.

    Returns:
        The samples in file order, kept on disk (:class:`~mcl.streams.store.SampleList`), read row by row.

    Raises:
        DataError: The file is missing or malformed, a row is invalid, an id repeats or an image path is unsafe.
    """
    path = Path(path)
    root = Path(image_root).resolve()

    def parse(row: Any, where: str) -> Sample:
        obj = _require_object(row, where)
        id_field = "question_id" if "id" not in obj and "question_id" in obj else "id"
        sample_id = _require_id(obj, id_field, where)
        image = _resolve_image(obj, root, path, where, sample_id, image_resolver)
        question, answer = _first_exchange(obj, where)
        return Sample(
            id=sample_id,
            image=image,
            question=question,
            answer=answer,
            answer_type=answer_type if isinstance(answer_type, str) else answer_type(obj, question),
            task=task,
        )

    return _collect(path, _iter_json_list(path), parse, ("id", "question_id"), on_problem)


def read_mllmcl_test(
    path: str | Path,
    image_root: str | Path,
    task: str,
    answer_type: str | AnswerTypeRule = "exact",
    *,
    image_resolver: ImageResolver | None = None,
    row_answer_type: Literal["scorer", "extra"] = "scorer",
    flexible_answers: bool = False,
    answer_fields: tuple[str, ...] = ("answer",),
    on_problem: ProblemHandler | None = None,
) -> SampleList:
    """Read an MLLM-CL test file (JSON list, or JSON Lines) into samples.

    The file is a JSON list if its first non-blank character is ``[``, else JSON Lines (one object per
    non-blank line). A row's ``answer_type`` overrides the default; keys other than ``question_id``,
    ``image``, ``text``, the answer field used and ``answer_type`` go into ``Sample.extra``.

    Args:
        path: The JSON or JSON Lines file.
        image_root: Directory the ``image`` fields are relative to.
        task: Task name stored in every sample.
        answer_type: Scorer name for rows without their own ``answer_type``, or a rule
            ``(row, question) -> name``.
        image_resolver: Turns the raw ``image`` value into a path (default: a relative path string, checked
            to stay inside ``image_root``).
        row_answer_type: ``"scorer"``: a row's ``answer_type`` names its scorer; ``"extra"``: it is a
            category of the benchmark (e.g. MLLM-CL OCR), kept in ``Sample.extra["answer_type"]``.
        flexible_answers: Also accept numbers (stored as text) and lists of reference answers (strings,
            numbers or ``{"answer": ...}`` objects, stored as a compact JSON list, e.g. ``["yes","no"]``).
        answer_fields: Answer fields; the first one present is used (e.g. ``("answer", "answer_bbox")``).
        on_problem: Receives each row's problem (a :class:`~mcl.errors.SampleError`) instead of it being
            raised; the row is left out. File-level problems still raise.

    Returns:
        The samples in file order, kept on disk (:class:`~mcl.streams.store.SampleList`), read row by row.

    Raises:
        DataError: The file is missing or malformed, a row is invalid, an id repeats or an image path is unsafe.
    """
    path = Path(path)
    root = Path(image_root).resolve()

    def parse(row: Any, where: str) -> Sample:
        obj = _require_object(row, where)
        sample_id = _require_id(obj, "question_id", where)
        image = _resolve_image(obj, root, path, where, sample_id, image_resolver)
        question = strip_placeholder(_require_str(obj, "text", where))
        answer_field, answer = _test_answer(obj, where, answer_fields, flexible_answers)
        return Sample(
            id=sample_id,
            image=image,
            question=question,
            answer=answer,
            answer_type=_test_answer_type(obj, where, question, answer_type, row_answer_type),
            task=task,
            extra=_test_extra(obj, answer_field, row_answer_type),
        )

    return _collect(path, _iter_json_rows(path), parse, ("question_id",), on_problem)


def _test_answer(
    obj: dict[str, Any], where: str, answer_fields: tuple[str, ...], flexible: bool
) -> tuple[str, str]:
    """``(field used, answer text)`` of a test row: the first of ``answer_fields`` present (else the first)."""
    field = next((name for name in answer_fields if name in obj), answer_fields[0])
    if flexible:
        return field, answer_text(obj.get(field), where, field, present=field in obj)
    return field, _require_str(obj, field, where, allow_empty=True)


def _test_answer_type(
    obj: dict[str, Any],
    where: str,
    question: str,
    default: str | AnswerTypeRule,
    row_answer_type: Literal["scorer", "extra"],
) -> str:
    """The scorer of a test row: its own ``answer_type`` in ``"scorer"`` mode, else ``default`` (or its rule)."""
    default_type = default if isinstance(default, str) else default(obj, question)
    if row_answer_type == "scorer" and "answer_type" in obj:
        return _require_str(obj, "answer_type", where)
    return default_type


def _test_extra(
    obj: dict[str, Any], answer_field: str, row_answer_type: Literal["scorer", "extra"]
) -> dict[str, Any]:
    """The fields of a test row that no :class:`Sample` attribute took (``answer_type`` too in ``"extra"`` mode)."""
    consumed = {"question_id", "image", "text", answer_field}
    if row_answer_type == "scorer":
        consumed.add("answer_type")
    return {key: value for key, value in obj.items() if key not in consumed}


def _collect(
    path: Path,
    rows: Iterable[_Row],
    parse: Callable[[Any, str], Sample],
    id_fields: tuple[str, ...],
    on_problem: ProblemHandler | None,
) -> SampleList:
    """Parse ``rows`` one at a time into a :class:`~mcl.streams.store.SampleList` (kept on disk, so memory
    stays flat however long the file is); a row's problem is raised or handed to ``on_problem``."""
    writer = SampleWriter(str(path))
    for label, row in rows:
        try:
            writer.append(parse(row, f"{path}: {label}"))
        except SampleError as exc:
            if on_problem is None:
                raise
            on_problem(_in_context(exc, row, id_fields))
    return writer.finish(on_problem)


def _in_context(exc: SampleError, row: Any, id_fields: tuple[str, ...]) -> SampleError:
    """``exc`` naming the row's id and image where the raiser could not (e.g. a row missing its text)."""
    if isinstance(row, dict):
        if exc.sample_id is None:
            value = next((row[f] for f in id_fields if isinstance(row.get(f), str | int)), None)
            exc.sample_id = None if value is None or isinstance(value, bool) else str(value)
        if exc.image is None and row.get("image") is not None:
            image = row["image"]
            exc.image = image if isinstance(image, str) else json.dumps(image, ensure_ascii=False)
    return exc


def answer_text(value: Any, where: str, field: str = "answer", present: bool = True) -> str:
    """A reference answer as text: strings as they are, numbers as text, lists as a compact JSON list.

    List items may be strings, numbers or ``{"answer": ...}`` objects (VQA annotator answers). Raises
    DataError naming ``where`` and ``field`` for anything else.
    """
    if not present:
        raise SampleError(f"{where}: missing required field {field!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and value:
        items = [item.get("answer") if isinstance(item, dict) else item for item in value]
        if all(
            isinstance(item, str) or (isinstance(item, int | float) and not isinstance(item, bool))
            for item in items
        ):
            return json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    raise SampleError(
        f"{where}: field {field!r} must be a string, a number or a non-empty list of answers, "
        f"got {_type_name(value)}"
    )


def safe_image_path(root: Path, image: str, path: Path, sample_id: str) -> str:
    """Absolute resolved path of the relative ``image`` under ``root``; raise DataError if it escapes ``root``.

    ``path`` (the annotation file) and ``sample_id`` only name the problem in the error message.
    """
    return _safe_image_path(root.resolve(), image, path, sample_id)


def _resolve_image(
    obj: dict[str, Any], root: Path, path: Path, where: str, sample_id: str, resolver: ImageResolver | None
) -> str:
    """The row's image as an absolute path, through ``resolver`` if one is given."""
    if resolver is None:
        return _safe_image_path(root, _require_str(obj, "image", where), path, sample_id)
    if "image" not in obj:
        raise SampleError(f"{where}: missing required field 'image'", sample_id=sample_id)
    return resolver(obj["image"], path, where, sample_id)


def check_images(samples: Iterable[Sample], workers: int = 8) -> None:
    """Check that every sample's image exists and decodes.

    Args:
        samples: The samples to check (images shared by several samples are decoded once). Read once, and a
            second time only to name bad samples; a sequence is never copied (a one-shot iterator is).
        workers: Number of threads decoding in parallel.

    Raises:
        DataError: Naming the first few bad samples (id, path, missing or undecodable) and the total count.
    """
    if iter(samples) is samples:
        samples = list(samples)
    total = 0
    paths: set[str] = set()
    for sample in samples:
        total += 1
        paths.add(sample.image)
    problems = image_problems(paths, workers)
    if not problems:
        return
    bad = [sample for sample in samples if sample.image in problems]
    details = "; ".join(
        f"sample {s.id!r} (task {s.task!r}): image {s.image} {problems[s.image][1]}"
        for s in bad[:_MAX_REPORTED]
    )
    more = f"; ... and {len(bad) - _MAX_REPORTED} more" if len(bad) > _MAX_REPORTED else ""
    raise DataError(f"{len(bad)} of {total} samples have bad images: {details}{more}")


def image_problems(paths: Iterable[str], workers: int = 8) -> dict[str, tuple[str, str]]:
    """The unusable images among ``paths``: ``path -> (kind, reason)``, each distinct path decoded once.

    ``kind`` is ``missing_image`` or ``undecodable_image``; ``reason`` reads after the path ("is missing",
    "does not decode (...)"). Paths that are fine are left out.
    """
    unique = sorted(set(paths))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(unique)))) as pool:
        checked = pool.map(_image_problem, unique)
        found = dict(zip(unique, _image_progress(checked, len(unique)), strict=True))
    return {path: problem for path, problem in found.items() if problem is not None}


# Below this many images the check takes a second or two: no progress bar.
PROGRESS_BAR_MIN_IMAGES = 2000


def _image_progress(checked: Iterable[Any], total: int) -> Iterable[Any]:
    """``checked`` with a progress bar on stderr when there are many images (a real stream has 10^5)."""
    if total < PROGRESS_BAR_MIN_IMAGES:
        return checked
    from tqdm.auto import tqdm

    return tqdm(checked, total=total, desc="checking images", unit="img", mininterval=2.0)


def _image_problem(path: str) -> tuple[str, str] | None:
    """(kind, reason) if the image at ``path`` is missing or does not decode, else None."""
    if not Path(path).is_file():
        return "missing_image", "is missing"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except (
        Exception
    ) as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError).
        return "undecodable_image", f"does not decode ({type(exc).__name__}: {exc})"
    return None


_CHUNK = 1 << 18  # characters read at a time by the streaming JSON reader
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@contextmanager
def _open_text(path: Path) -> Iterator[TextIO]:
    """The file opened as UTF-8 text (optional BOM); read errors become DataError naming the file."""
    try:
        with path.open(encoding="utf-8-sig") as handle:
            yield handle
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from exc


def _iter_json_rows(path: Path) -> Iterator[_Row]:
    """The rows of a JSON list (the first non-blank character is ``[``) or else of JSON Lines."""
    with _open_text(path) as handle:
        head = handle.read(_CHUNK)
        is_list = head.lstrip().startswith("[")
    yield from _iter_json_list(path) if is_list else iter_json_lines(path)


def iter_json_lines(path: Path) -> Iterator[_Row]:
    """The rows of a JSON Lines file, one line at a time (blank lines skipped); each labelled by its index and
    line number."""
    with _open_text(path) as handle:
        index = 0
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: malformed JSON Lines at line {line_number}, column {exc.colno}: {exc.msg}"
                ) from None
            yield f"row {index} (line {line_number})", row
            index += 1


def _iter_json_list(path: Path) -> Iterator[_Row]:
    """The elements of a JSON document that must be a list, decoded one at a time from a sliding window of
    the file (memory does not grow with the file); each labelled by its index."""
    with _open_text(path) as handle:
        yield from _JsonListReader(path, handle).rows()


class _JsonListReader:
    """Incremental reader of one JSON list: ``json.JSONDecoder.raw_decode`` on a window of the text that
    slides forward; error positions are reported in lines and columns of the whole file."""

    def __init__(self, path: Path, handle: TextIO) -> None:
        self.path = path
        self.handle = handle
        self.decoder = json.JSONDecoder()
        self.text = ""
        self.pos = 0
        self.eof = False
        self.lines_before = 0  # newlines in the text already dropped from the window
        self.column_before = 0  # characters after the last dropped newline

    def rows(self) -> Iterator[_Row]:
        self._skip_blank()
        if self._at_end():
            self._fail("Expecting value")
        if self.text[self.pos] != "[":
            self._not_a_list()
        self.pos += 1
        self._skip_blank()
        index = 0
        if not self._at_end() and self.text[self.pos] == "]":
            self.pos += 1
        else:
            while True:
                yield f"row {index}", self._value()
                index += 1
                self._skip_blank()
                if self._at_end():
                    self._fail("Expecting ',' delimiter")
                char = self.text[self.pos]
                self.pos += 1
                if char == "]":
                    break
                if char != ",":
                    self.pos -= 1
                    self._fail("Expecting ',' delimiter")
                self._skip_blank()
        self._skip_blank()
        if not self._at_end():
            self._fail("Extra data")

    def _value(self) -> Any:
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                if self._more():
                    continue  # the element may run past the window
                self._fail(exc.msg, exc.pos)
            if end == len(self.text) and self._more():
                continue  # a number or literal may go on past the window: decode it again
            self.pos = end
            return value

    def _skip_blank(self) -> None:
        while True:
            match = _WHITESPACE.match(self.text, self.pos)
            assert match is not None
            self.pos = match.end()
            if self.pos < len(self.text) or not self._more():
                return

    def _at_end(self) -> bool:
        return self.pos >= len(self.text) and self.eof

    def _more(self) -> bool:
        """Read the next chunk into the window, dropping what was consumed; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.handle.read(_CHUNK)
        if not chunk:
            self.eof = True
            return False
        consumed = self.text[: self.pos]
        newlines = consumed.count("\n")
        if newlines:
            self.lines_before += newlines
            self.column_before = len(consumed) - consumed.rfind("\n") - 1
        else:
            self.column_before += len(consumed)
        self.text = self.text[self.pos :] + chunk
        self.pos = 0
        return True

    def _fail(self, message: str, pos: int | None = None) -> NoReturn:
        pos = self.pos if pos is None else pos
        newlines = self.text.count("\n", 0, pos)
        line = self.lines_before + newlines + 1
        column = pos - self.text.rfind("\n", 0, pos) if newlines else self.column_before + pos + 1
        raise DataError(f"{self.path}: malformed JSON at line {line}, column {column}: {message}")

    def _not_a_list(self) -> NoReturn:
        """Not a list: decode the whole document (an error path) to say what it is, or where it is malformed."""
        while self._more():
            pass
        try:
            data = json.loads(self.text[self.pos :])
        except json.JSONDecodeError as exc:
            self._fail(exc.msg, self.pos + exc.pos)
        raise DataError(f"{self.path}: expected a JSON list of rows, got {_type_name(data)}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise SampleError(f"{where}: expected a JSON object, got {_type_name(row)}")
    return row


def _require_str(obj: dict[str, Any], field: str, where: str, allow_empty: bool = False) -> str:
    """The string field ``field`` of ``obj``; raise if it is missing, not a string or (by default) empty."""
    if field not in obj:
        raise SampleError(f"{where}: missing required field {field!r}")
    value = obj[field]
    if not isinstance(value, str):
        raise SampleError(f"{where}: field {field!r} must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise SampleError(f"{where}: field {field!r} is empty")
    return value


def _require_id(obj: dict[str, Any], field: str, where: str) -> str:
    """The id field as a string; integer ids (common in published test files) are converted."""
    if field not in obj:
        raise SampleError(f"{where}: missing required field {field!r}")
    value = obj[field]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _require_str(obj, field, where)


def strip_placeholder(text: str) -> str:
    """``text`` without ``<image>`` placeholders and the whitespace around them."""
    return _PLACEHOLDER.sub(" ", text).strip()


def _first_exchange(obj: dict[str, Any], where: str) -> tuple[str, str]:
    """(question, answer) from the first human turn and the gpt turn right after it."""
    if "conversations" not in obj:
        raise SampleError(f"{where}: missing required field 'conversations'")
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise SampleError(f"{where}: field 'conversations' must be a list, got {_type_name(turns)}")
    for index, turn in enumerate(turns):
        if _turn_role(turn, index, where) != "human":
            continue
        question = strip_placeholder(_require_str(turn, "value", f"{where}: conversations[{index}]"))
        if index + 1 >= len(turns):
            raise SampleError(
                f"{where}: field 'conversations' has no 'gpt' turn after the first 'human' turn"
            )
        reply = turns[index + 1]
        if _turn_role(reply, index + 1, where) != "gpt":
            raise SampleError(
                f"{where}: field 'conversations[{index + 1}].from' must be 'gpt' after the first 'human' turn"
            )
        answer = _require_str(reply, "value", f"{where}: conversations[{index + 1}]", allow_empty=True)
        return question, answer
    raise SampleError(f"{where}: field 'conversations' has no 'human' turn")


def _turn_role(turn: Any, index: int, where: str) -> str:
    """The ``from`` field of conversation turn ``index``, checking the turn is an object."""
    label = f"{where}: conversations[{index}]"
    return _require_str(_require_object(turn, label), "from", label)


def _safe_image_path(root: Path, image: str, path: Path, sample_id: str) -> str:
    """Absolute resolved path of ``image`` under ``root``; raise if it is absolute or escapes ``root``."""
    if PurePosixPath(image).is_absolute() or PureWindowsPath(image).is_absolute():
        raise SampleError(
            f"{path}: sample {sample_id!r}: image path {image!r} is absolute; it must be relative",
            "escaping_path",
            sample_id,
            image,
        )
    try:
        resolved = (root / image).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise SampleError(
            f"{path}: sample {sample_id!r}: image path {image!r} cannot be resolved: {exc}",
            sample_id=sample_id,
            image=image,
        ) from exc
    if not resolved.is_relative_to(root):
        raise SampleError(
            f"{path}: sample {sample_id!r}: image path {image!r} escapes the image root {root} "
            f"(resolves to {resolved})",
            "escaping_path",
            sample_id,
            image,
        )
    return str(resolved)
