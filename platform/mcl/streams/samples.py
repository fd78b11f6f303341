"""The one sample schema every reader produces."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One visual question with its reference answer.

    Attributes:
        id: Unique id within its task and split (``id`` of a LLaVA conversation, ``question_id`` of a test row).
        image: Absolute path of the image file (already checked to lie inside the data root).
        question: The question text without the ``<image>`` placeholder.
        answer: The reference answer.
        answer_type: Name of the scorer that judges predictions for this sample (see ``mcl.evaluation.scoring``).
        task: Name of the task the sample belongs to.
        extra: Any further fields of the source row (e.g. ``type``), kept for scorers and analysis.
    """

    id: str
    image: str
    question: str
    answer: str
    answer_type: str = "exact"
    task: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """A flat dict (for Ray Data rows and JSON)."""
        row = asdict(self)
        row["extra"] = dict(self.extra)
        return row
