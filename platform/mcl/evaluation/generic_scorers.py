"""Generic per-sample answer scorers (``exact``, ``contains``, ``choice``, ``list``) and the text helpers
that the benchmark scorers reuse (:func:`normalize_answer`, :func:`extract_choice`).

Every scorer is pure, ``scorer(prediction, answer) -> float`` in ``[0, 1]``. They are registered by answer
type in :data:`mcl.evaluation.scoring.SCORERS`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from mcl.errors import DataError

Scorer = Callable[[str, str], float]

_ARTICLES = frozenset({"a", "an", "the"})
_DIGITS = frozenset("0123456789")
_PUNCT = re.compile(r"[^\w\s]|_")
_APOSTROPHES = frozenset("'\u2019")


def _punct_replacement(text: str, match: re.Match[str]) -> str:
    """Keep punctuation inside numbers (``3.5``, ``1,000``, ``-3``), drop apostrophes, else use a space."""
    ch, i = match.group(), match.start()
    prev = text[i - 1] if i > 0 else ""
    nxt = text[i + 1] if i + 1 < len(text) else ""
    if ch in ".,:/" and prev in _DIGITS and nxt in _DIGITS:
        return ch
    if ch == "-" and nxt in _DIGITS and not (prev.isalnum() or prev == "_"):
        return ch
    if ch in _APOSTROPHES:
        return ""
    return " "


def normalize_answer(text: str) -> str:
    """Normalise free text for comparison.

    NFKC + lowercase, punctuation removed (apostrophes deleted, other marks become spaces) except inside
    numbers such as ``3.5``, ``1,000`` or ``-2``, the articles a/an/the dropped, whitespace collapsed.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(lambda m: _punct_replacement(text, m), text)
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def _phrase_in(phrase: str, text: str) -> bool:
    """Whether normalised ``phrase`` occurs in normalised ``text`` as whole words."""
    return f" {phrase} " in f" {text} "


def score_exact(prediction: str, answer: str) -> float:
    """1.0 when prediction and answer are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def score_contains(prediction: str, answer: str) -> float:
    """1.0 when the normalised answer occurs in the normalised prediction as whole words, else 0.0.

    An answer that normalises to nothing (e.g. ``"the"``) falls back to exact match.
    """
    gold = normalize_answer(answer)
    pred = normalize_answer(prediction)
    if not gold:
        return float(not pred)
    return float(_phrase_in(gold, pred))


# A response that is only a letter: "B", "(b)", "B.", "B)".
_LETTER_ONLY = re.compile(r"^\s*\(?\s*([A-Za-z])\s*\)?\s*[.:)]?\s*$")
# A response opening with a marked letter: "B) text", "b) text", "B. text", "B: text", "(B) text".
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Za-z])\)|([A-Z])[.:])(?=\s|$)")
# A letter in parentheses anywhere: "I pick (C)."
_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")
# "Answer: B", "the answer is b", "answer is option (C)", "correct choice: D". A lower-case letter counts only
# when nothing but punctuation follows it, so "the answer is a cat" names no letter.
_STATED_LETTER = re.compile(
    r"\b(?i:answer|option|choice)\b\s*(?:(?i:is)\s+|:\s*)?(?:(?i:option|choice)\s*)?\(?"
    r"(?:([A-Z])(?![\w'])|([a-z])(?=\)?\s*(?:[.,;:!?]|$)))"
)


def extract_choice(prediction: str) -> str | None:
    """The single option letter (upper case) a response names, or None when it names none or several.

    Recognised: a bare letter (``"B"``, ``"(B)"``, ``"B."``), a leading marked letter (``"B) text"``,
    ``"B. text"``), a parenthesised letter anywhere, and stated forms (``"Answer: B"``,
    ``"the answer is b"``).
    Prose such as the article in ``"A cat"`` names no letter.
    """
    only = _LETTER_ONLY.match(prediction)
    if only:
        return only.group(1).upper()
    matches = [_LEADING_LETTER.match(prediction), *_PAREN_LETTER.finditer(prediction)]
    matches += _STATED_LETTER.finditer(prediction)
    found = {next(g for g in m.groups() if g).upper() for m in matches if m}
    return found.pop() if len(found) == 1 else None


def score_choice(prediction: str, answer: str) -> float:
    """1.0 when the response names exactly one option letter and it is the answer's letter, else 0.0.

    Raises:
        DataError: If ``answer`` is not a single letter such as ``"B"`` or ``"(B)"``.
    """
    gold = _LETTER_ONLY.match(answer)
    if not gold:
        raise DataError(f"choice answer must be a single option letter such as 'B' or '(B)', got {answer!r}")
    return float(extract_choice(prediction) == gold.group(1).upper())


def score_list(prediction: str, answer: str) -> float:
    """Fraction of the answer's comma-separated items that occur (as whole words) in the prediction.

    Raises:
        DataError: If ``answer`` has no non-empty items.
    """
    items = list(dict.fromkeys(item.strip() for item in answer.split(",") if item.strip()))
    if not items:
        raise DataError(f"list answer has no items: {answer!r}")
    return sum(score_contains(prediction, item) for item in items) / len(items)


GENERIC_SCORERS: dict[str, Scorer] = {
    "exact": score_exact,
    "contains": score_contains,
    "choice": score_choice,
    "list": score_list,
}
