"""Token lengths of training rows, measured in the driver without decoding a single image.

The length of a row is what :class:`mcl.data.Preprocessor` makes of it: the model's chat-template prompt with
the image placeholder expanded into the image's tokens, plus (for a supervised row) the answer and EOS. Text is
tokenised in batches with the model's (fast) tokenizer. Image tokens come from the processor's own rule for an
image of a given size (``_get_num_multimodal_tokens``, the method transformers keeps for vLLM to count
placeholders without pixels), checked against the real processor on blank probe images when the counter is
built: LLaVA and InternVL (without tiling) give every image the same count, so no image file is opened;
Qwen2.5-VL's depends on the size, read from the file's header (``PIL.Image.open(path).size``, no decode).
A processor without that rule (or whose rule disagrees with its output) is run on a blank image of each
distinct size instead (a few ms per size, cached).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from mcl.data import RowOrder, answer_text, build_prompt, cached_processor
from mcl.errors import DataError

# (width, height) of the blank images the rule is checked on: square, wide and tall.
PROBE_SIZES: tuple[tuple[int, int], ...] = ((336, 336), (1024, 320), (320, 1024))
TOKENIZE_CHUNK = 1024  # rows per tokenizer call
PROGRESS_MIN_ROWS = 2000  # below this a task's lengths take a second or so: no progress bar


class LengthCounter:
    """Counts the tokens of training rows as :class:`mcl.data.Preprocessor` would produce them.

    Args:
        processor: The model's processor (its tokenizer, chat template and image processor).
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._prompt = build_prompt(processor, "?")
        self._base = len(self.tokenizer(self._prompt)["input_ids"])
        self._by_size: dict[tuple[int, int], int] = {}
        measured = {size: self._measured(size) for size in PROBE_SIZES}
        rules = [self._rule(size) for size in PROBE_SIZES]
        # The rule counts an image's tokens; a prompt gains that count minus its placeholder (a constant).
        offsets = (
            {measured[s] - r for s, r in zip(PROBE_SIZES, rules, strict=True)} if None not in rules else ()
        )
        self._offset = next(iter(offsets)) if len(offsets) == 1 else None
        if self._offset is None:  # no rule, or one that disagrees with the processor: blank images per size
            self._by_size.update(measured)
        values = set(measured.values())
        self.fixed_image_tokens: int | None = values.pop() if len(values) == 1 else None

    def _rule(self, size: tuple[int, int]) -> int | None:
        count_tokens = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if count_tokens is None:
            return None
        try:
            counts = count_tokens(image_sizes=[(size[1], size[0])])
            return int(counts.num_image_tokens[0])
        except (AttributeError, KeyError, TypeError, ValueError, IndexError):
            return None

    def _measured(self, size: tuple[int, int]) -> int:
        from PIL import Image

        enc = self.processor(text=[self._prompt], images=[Image.new("RGB", size)], return_tensors="np")
        return int(enc["input_ids"].shape[1]) - self._base

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Tokens an image of ``size`` (width, height) adds to a prompt: its placeholder's expansion, less the
        placeholder itself."""
        if self.fixed_image_tokens is not None:
            return self.fixed_image_tokens
        if size not in self._by_size:
            rule = self._rule(size) if self._offset is not None else None
            self._by_size[size] = rule + self._offset if rule is not None else self._measured(size)
        return self._by_size[size]

    def row_image_tokens(self, row: dict[str, Any]) -> int:
        """Tokens the image of ``row`` adds (its file's header is read only when the count depends on size)."""
        path = row.get("image")
        if not path:
            raise DataError(
                f"training row {row.get('id')!r} has no image: mcl trains image-text rows only "
                "(train.group_by_length measures each row's image tokens)"
            )
        if self.fixed_image_tokens is not None:
            return self.fixed_image_tokens
        from PIL import Image

        try:
            with Image.open(path) as img:
                size = img.size
        except (OSError, ValueError) as exc:
            raise DataError(f"sample {row.get('id')!r}: image {path!r} cannot be read ({exc})") from None
        return self.image_tokens(size)

    def lengths(self, rows: Sequence[dict[str, Any]], answers: bool = True) -> np.ndarray:
        """Token lengths of ``rows`` (annotation rows: ``question``, ``answer``, ``image``, ``supervised``);
        with ``answers`` False, of their prompts only (what an evaluation batch holds)."""
        if not rows:
            return np.zeros(0, dtype=np.int32)
        prompts = [build_prompt(self.processor, str(row["question"])) for row in rows]
        out = np.asarray([len(ids) for ids in self.tokenizer(prompts)["input_ids"]], dtype=np.int64)
        supervised = [i for i, row in enumerate(rows) if answers and row.get("supervised", True)]
        if supervised:
            answers = [answer_text(prompts[i], str(rows[i]["answer"])) for i in supervised]
            ids = self.tokenizer(answers, add_special_tokens=False)["input_ids"]
            out[supervised] += np.asarray([len(a) + 1 for a in ids])  # + EOS
        out += np.asarray([self.row_image_tokens(row) for row in rows], dtype=np.int64)
        return out.astype(np.int32)


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def row_lengths(
    counter: LengthCounter, rows: Sequence[dict[str, Any]], desc: str = "", answers: bool = True
) -> np.ndarray:
    """Token lengths of ``rows`` (int32; prompts only without ``answers``), counted ``TOKENIZE_CHUNK`` rows at
    a time; a progress bar on stderr for ``PROGRESS_MIN_ROWS`` rows or more."""
    out = np.empty(len(rows), dtype=np.int32)
    bar = None
    if len(rows) >= PROGRESS_MIN_ROWS:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc=desc or "measuring token lengths", unit="row", mininterval=2.0)
    at = 0
    for chunk in _chunks(rows, TOKENIZE_CHUNK):
        out[at : at + len(chunk)] = counter.lengths(chunk, answers)
        at += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def order_lengths(order: RowOrder, counter: LengthCounter) -> np.ndarray:
    """The token length of every position of ``order`` (int32): each distinct row is counted once."""
    base = row_lengths(counter, order.rows, "measuring token lengths (group_by_length)")
    extra = row_lengths(counter, order.extra)
    # Position -1 - k is extra[k]: with extra reversed after base, numpy's negative indexing finds it.
    return np.concatenate([base, extra[::-1]])[order.index]


def training_lengths(order: RowOrder, model_path: str, trust_remote_code: bool = False) -> np.ndarray:
    """The token length of every position of ``order`` for the model at ``model_path`` (see the module doc)."""
    return order_lengths(order, LengthCounter(cached_processor(model_path, trust_remote_code)))


def prompt_lengths(
    rows: Sequence[dict[str, Any]], model_path: str, trust_remote_code: bool = False
) -> np.ndarray:
    """The token length of the prompt of every row of ``rows`` (image tokens included) for the model at
    ``model_path``: what an evaluation batch pads (``eval.sort_by_length``)."""
    counter = LengthCounter(cached_processor(model_path, trust_remote_code))
    return row_lengths(counter, rows, "measuring prompt lengths (eval.sort_by_length)", answers=False)


def padding_fraction(lengths: Sequence[int], batch: int) -> float:
    """Padded / all tokens of consecutive batches of ``batch`` rows with these token lengths (each batch padded
    to its longest row): what sorting rows by length saves."""
    padded = total = 0
    for s in range(0, len(lengths), batch):
        chunk = lengths[s : s + batch]
        padded += max(chunk) * len(chunk) - sum(chunk)
        total += max(chunk) * len(chunk)
    return padded / total
