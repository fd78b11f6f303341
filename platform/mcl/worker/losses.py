"""Losses the engine trains with, public for methods that add their own terms.

An optimiser step is a global batch run as micro-batches on every worker (``train.micro_batch_size``); each
micro-batch's loss is backpropagated on its own and the engine averages the gradients over the step's
``parts`` (micro-batches per worker x workers), as DeepSpeed does. For a mean over the global batch to stay
exact however the batch is split, a micro-batch's term is its share of the step's total, scaled by
``parts``: :meth:`StepShare.mean` does that from the step's totals, which the engine sums over every
micro-batch of every worker before the step's first forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mcl.data import IGNORE_INDEX


@dataclass(frozen=True)
class StepShare:
    """What one micro-batch needs to write its loss terms as means over the whole optimiser step.

    Attributes:
        totals: Named counts summed over the step's micro-batches on all workers: ``rows``, ``supervised``
            (rows with at least one supervised token) and whatever the method's ``step_counts`` adds.
        parts: Micro-batches per worker x workers: the engine averages the micro-batches' losses over them.
    """

    totals: Mapping[str, float]
    parts: int = 1

    def mean(self, numerator: Any, count: str) -> Any:
        """This micro-batch's part of a mean over the step: ``numerator`` is the micro-batch's sum of the
        term (over rows or tokens), ``count`` the name of the total it is averaged over. Summed over the
        ``parts`` (as the engine's averaging does, times ``parts``) it gives ``sum / totals[count]``; 0 when
        the step has none."""
        return numerator / (max(float(self.totals[count]), 1.0) / self.parts)


def supervised_rows(labels: Any) -> Any:
    """1.0 for each row of ``labels`` with at least one supervised (next-token) target, else 0.0."""
    return ((labels[:, 1:] != IGNORE_INDEX).sum(1) > 0).float()


def step_counts(batch: Mapping[str, Any]) -> dict[str, float]:
    """The engine's counts of one collated micro-batch: its rows and its supervised rows."""
    return {
        "rows": float(batch["input_ids"].shape[0]),
        "supervised": float(supervised_rows(batch["labels"]).sum()),
    }


def per_sample_loss(logits: Any, labels: Any, share: StepShare | None = None) -> Any:
    """Mean token cross-entropy of each sample's supervised tokens, averaged over the samples that have any.

    Averaging per sample (not per token) keeps the loss of a global batch independent of how its samples
    are split over workers and micro-batches. Rows without supervised tokens (a method's unsupervised rows,
    see ``mcl.data.ROW_KEYS``) do not count. With ``share`` (the engine's, in ``TaskContext.step``), the
    average is over the supervised samples of the whole optimiser step (see :class:`StepShare`); without,
    over this batch's. A batch of only unsupervised rows has loss 0.
    """
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).float()
    per_sample = (tok * mask).sum(1) / mask.sum(1).clamp(min=1)
    has_target = (mask.sum(1) > 0).float()
    total = (per_sample * has_target).sum()
    if share is not None:
        return share.mean(total, "supervised")
    return total / has_target.sum().clamp(min=1)


__all__ = ["StepShare", "per_sample_loss", "step_counts", "supervised_rows"]
