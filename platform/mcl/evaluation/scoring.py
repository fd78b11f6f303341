"""Per-sample answer scorers: ``scorer(prediction, answer) -> float`` in ``[0, 1]``, keyed by answer type.

The registry of answer types. The built-in scorers are defined in two modules that import nothing from this
one: the generic types in :mod:`mcl.evaluation.generic_scorers`, the published benchmarks' (MLLM-CL,
OCRBench, VQAv2, MSVQA) in :mod:`mcl.evaluation.benchmark_scorers`. :data:`SCORERS` holds both from the
start; :func:`register_scorer` adds more.
"""

from __future__ import annotations

from mcl.errors import UnknownNameError
from mcl.evaluation.benchmark_scorers import BENCHMARK_SCORERS
from mcl.evaluation.generic_scorers import (
    GENERIC_SCORERS,
    Scorer,
    extract_choice,
    normalize_answer,
    score_choice,
    score_contains,
    score_exact,
    score_list,
)

__all__ = [
    "SCORERS",
    "Scorer",
    "answer_types",
    "extract_choice",
    "normalize_answer",
    "register_scorer",
    "score",
    "score_choice",
    "score_contains",
    "score_exact",
    "score_list",
]

SCORERS: dict[str, Scorer] = {}


def register_scorer(answer_type: str, scorer: Scorer) -> None:
    """Register ``scorer`` under the answer type ``answer_type``.

    Raises:
        ValueError: If ``answer_type`` is already registered.
    """
    if answer_type in SCORERS:
        raise ValueError(f"answer type {answer_type!r} is already registered")
    SCORERS[answer_type] = scorer


for _table in (GENERIC_SCORERS, BENCHMARK_SCORERS):
    for _name, _scorer in _table.items():
        register_scorer(_name, _scorer)


def answer_types() -> list[str]:
    """Names of the registered answer types."""
    return sorted(SCORERS)


def score(prediction: str, answer: str, answer_type: str) -> float:
    """Score ``prediction`` against ``answer`` with the scorer registered for ``answer_type``.

    Raises:
        UnknownNameError: If ``answer_type`` is not registered; the message lists the valid types.
    """
    scorer = SCORERS.get(answer_type)
    if scorer is None:
        raise UnknownNameError(
            f"unknown answer type {answer_type!r}; valid types: {', '.join(answer_types())}"
        )
    return scorer(prediction, answer)
